"""Prompt sets and corpora: the repository's top-level ``data/`` folder.

A wheel (``pip install .``) ships that folder inside the package as ``headlens/_data`` (mapped in
pyproject.toml); a source checkout (``pip install -e .`` or ``PYTHONPATH``) reads ``data/`` in place.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from .errors import HeadlensError


def _data_dir() -> Path:
    installed = resources.files(__package__) / "_data"    # the wheel's copy of data/
    if installed.is_dir():
        return Path(str(installed))
    return Path(__file__).resolve().parent.parent / "data"  # a source checkout


DATA_DIR = _data_dir()


def data_path(name: str) -> Path:
    """Path of a file in ``data/`` (raises a one-line error if it is missing)."""
    path = DATA_DIR / name
    if not path.is_file():
        raise HeadlensError(f"data file {name} not found in {DATA_DIR} (this headlens installation lacks "
                            "its data files: reinstall it, e.g. `pip install --force-reinstall headlens`)")
    return path


def file_or_data(name: str) -> Path:
    """``name`` itself when it is a file, else the file of that name in ``data/``."""
    return Path(name) if Path(name).is_file() else data_path(name)
