"""``python tests/die_after.py EVENT ARGS...``: ``python -m headlens ARGS`` that ends hard (``os._exit(75)``,
no cleanup, as a kill would) right after the checkpoint write ``EVENT``: a detector's role after its file,
``chunks:<k>`` after the scan's k-th chunk-file write (the ``on_write`` of
:class:`headlens.runtime.checkpoint.Checkpoint`). A deterministic stand-in for a kill, used by tests/test_resume.py;
it also runs under torchrun, once per rank."""
import os
import runpy
import sys

from headlens.runtime.checkpoint import Checkpoint

event = sys.argv.pop(1)
_open = Checkpoint.open.__func__


def _open_and_die(cls, *args, **kwargs):
    return _open(cls, *args, on_write=lambda e: os._exit(75) if e == event else None, **kwargs)


Checkpoint.open = classmethod(_open_and_die)
sys.argv[0] = "headlens"
runpy.run_module("headlens", run_name="__main__", alter_sys=True)
