"""Prompt sets and corpora shipped in the repository's ``data/`` folder."""
from __future__ import annotations

from pathlib import Path

from .errors import HeadlensError

DATA_DIR = Path(__file__).resolve().parent.parent / "data"


def data_path(name: str) -> Path:
    """Path of a file in ``data/`` (raises a one-line error if it is missing)."""
    path = DATA_DIR / name
    if not path.exists():
        raise HeadlensError(f"data file {name} not found in {DATA_DIR} (install headlens from its "
                            "repository with `pip install -e .` so data/ is next to the package)")
    return path


def file_or_data(name: str) -> Path:
    """``name`` itself when it is a file, else the file of that name in ``data/``."""
    return Path(name) if Path(name).is_file() else data_path(name)
