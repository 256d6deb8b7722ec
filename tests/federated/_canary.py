"""NOT a task: the proof that a task name made a process import or call code of the requester's choosing.

Importing this module appends ``imported`` and calling :func:`touch` appends ``called`` to the file named by
``EDGEFLEET_TEST_CANARY`` — harmless stand-ins for ``os:abort``, which killed the control plane in issue 8.
"""

from __future__ import annotations

import os


def _mark(what: str) -> None:
    path = os.environ.get("EDGEFLEET_TEST_CANARY")
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(what + "\n")


_mark("imported")


def touch() -> None:
    _mark("called")
