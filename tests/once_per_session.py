"""Expensive fixtures built once per test session, however many pytest-xdist workers it has.

Each xdist worker is a process with its own session, so a session or module fixture is built
by every worker whose tests use it. `once_per_session(tmp_path_factory, name, build)` calls
`build(folder)` in the first worker that asks (the folder is under that worker's base temp
directory) and writes its result as JSON in the session's own directory (the parent of every
worker's base temp directory); a worker asking later, or while it is being built (it waits on
a file lock), reads that result instead. A build that fails writes nothing, so the next
worker to ask builds again, in a folder of its own. Without workers it simply builds. The
results name files the tests only read: a test must never write into such a folder, since
another worker may be reading it.
"""

import fcntl
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


def once_per_session(tmp_path_factory: pytest.TempPathFactory, name: str,
                     build: Callable[[Path], Any]) -> Any:
    """`build(folder)`'s result (JSON-able), built by one worker of the session only."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return build(tmp_path_factory.mktemp(name))
    session_dir = tmp_path_factory.getbasetemp().parent
    result_file = session_dir / f"{name}.json"
    with open(session_dir / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # Released when the file closes, or the worker dies.
        if result_file.exists():
            return json.loads(result_file.read_text())
        result = build(tmp_path_factory.mktemp(name))
        partial = result_file.with_suffix(".partial")
        partial.write_text(json.dumps(result))
        partial.rename(result_file)
        return result
