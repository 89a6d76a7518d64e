"""Ending a process that ran collectives on gloo without aborting on the way out.

A gloo worker thread drops its reference to a finished collective (and with it the last C++
reference to the collective's tensors) a moment after the collective completes. When that
happens while Python is already finalizing, the thread needs the GIL to release the tensors'
Python objects, Python ends the thread instead, and the process dies in ``std::terminate``
("terminate called without an active exception", SIGABRT) although its work is done: a
two-rank tensor-parallel training run exited that way about once in fifteen runs here.
``destroy_process_group`` does not join those threads (only the group's destructor does, and a
group lives on while anything refers to it), so a finished rank leaves with ``os._exit``
instead, after flushing its output: the race has no interpreter finalization to hit.
"""

import os
import sys


def exit_process(code: int):
    """Flush stdout and stderr and end the process with `code`, skipping Python's finalization.
    Call it only when everything the process writes is closed (files, checkpoints, logs)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):   # a closed or broken pipe: nothing left to say
            pass
    os._exit(code)


__all__ = ["exit_process"]
