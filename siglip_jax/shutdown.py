"""A prompt exit with the right code from an entry point, whatever background threads run.

Why errors used to exit at random (exit 1, abort 134 "terminate called without an active
exception", or a hang): an uncaught exception keeps its traceback, and with it the failed
frames' locals — the live tf.data iterator (C++ prefetch/shuffle threads), the orbax manager —
alive until interpreter teardown. There those C++ threads are destroyed after the Python
objects that own them are half gone: std::terminate on a joinable thread (134) or a join
that never returns (hang). Dropping the traceback and collecting garbage while the
interpreter is whole, then leaving with `os._exit`, makes every error exit prompt and exact.

Use: `if __name__ == "__main__": run_main(main)` where `main()` returns the exit code.
Resources with pending work (the async checkpointer) must be closed by their owner first
(`with Checkpointer(...)` or try/finally): `run_main` does not know them.
"""

from __future__ import annotations

import faulthandler
import gc
import os
import sys
import traceback
from collections.abc import Callable
from typing import NoReturn


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass


def exit_now(code: int) -> NoReturn:
    """Flushes stdout/stderr and ends the process at once with `code` (no teardown)."""
    _flush()
    os._exit(code)


def run_main(main: Callable[[], int | None], teardown_timeout_s: float = 60.0) -> NoReturn:
    """Runs `main()` and exits with its code.

    An exception escaping `main` prints its traceback and ends the process at once with 1
    (`exit_now`: no interpreter teardown, see the module docstring). A returned code exits
    normally (atexit handlers such as jax.distributed's shutdown run), guarded by a C-level
    watchdog: a teardown still running after `teardown_timeout_s` is ended with code 1 and a
    dump of every thread instead of hanging.
    """
    failed = False
    try:
        code = main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, int) and e.code is not None:
            print(e.code, file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code, failed = 130, True
    except BaseException:  # noqa: BLE001 - the last resort of a process.
        traceback.print_exc()
        code, failed = 1, True
    code = 0 if code is None else int(code)
    # Free the failed frames (and the iterators/threads they hold) now, not in teardown.
    sys.last_type = sys.last_value = sys.last_traceback = None
    gc.collect()
    if failed:
        exit_now(code)
    _flush()
    faulthandler.dump_traceback_later(teardown_timeout_s, exit=True)
    sys.exit(code)
