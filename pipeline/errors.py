"""The one error type users see, and the entry point that turns it into a one-line message."""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator


class PipelineError(Exception):
    """A problem the user can fix: bad parameters, missing files, mismatched inputs."""


class Stopped(BaseException):
    """This process stops because another one failed (the launcher's SIGTERM, or a peer gone): unwinds like Ctrl-C."""


def _terminating(pid: int) -> Callable[[int, object], None]:
    def handler(signum: int, frame: object) -> None:
        if os.getpid() != pid:  # a forked DataLoader worker: just go
            os._exit(128 + signum)
        raise Stopped("terminated")

    return handler


def _tell_launcher(message: str) -> None:
    """Hand the error to the launcher (ours, or torchrun, whose summary then shows it for this rank)."""
    if path := os.environ.get("TORCHELASTIC_ERROR_FILE"):
        info = {"py_callstack": message, "timestamp": str(int(time.time()))}  # the format torchrun's summary reads
        with open(path, "w") as f:
            json.dump({"message": {"message": message, "extraInfo": info}}, f)


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's ``main()``: configure logging once and report user errors without a traceback.

    With several processes, every line names the process (``rank 1 of 2``).
    Set ``PIPELINE_DEBUG=1`` to see the full traceback of a user error.
    """
    size = int(os.environ.get("WORLD_SIZE", 1))
    who = f"rank {os.environ.get('RANK', 0)} of {size}: " if size > 1 else ""
    logging.basicConfig(level=logging.INFO, format=f"%(levelname)s {who}%(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _terminating(os.getpid()))  # so that `finally` blocks keep the work done so far
    # What the imports made lives as long as the process: no collection need walk it again (nor touch the pages
    # that forked decode workers share). The collector is off while a stage imports (pipeline/__init__.py).
    gc.freeze()
    gc.enable()
    try:
        main()
        # The stage's work is written. Leave what it made to the exit too: the interpreter's teardown otherwise
        # walks every object not frozen, in several full collections (0.5-0.65 s of a stage when that was all
        # that torch's import had made).
        gc.freeze()
    except PipelineError as err:
        _tell_launcher(f"error: {err}")
        if os.environ.get("PIPELINE_DEBUG"):
            raise
        lead = "\n" if size > 1 else ""  # rank 0's progress bar may stand unfinished on the line: start our own
        print(f"{lead}error: {who}{err}", file=sys.stderr)
        sys.exit(2)
    except Exception as err:
        if isinstance(err.__context__, (KeyboardInterrupt, Stopped)):  # raised while stopping, e.g. the DataLoader
            _stop(err.__context__, who)  # noticing that its decode workers got the same signal: the stop is the news
        _tell_launcher(f"{type(err).__name__}: {err}")  # a bug: the traceback follows
        raise
    except (KeyboardInterrupt, Stopped) as stop:
        _stop(stop, who)


@contextlib.contextmanager
def importing() -> Iterator[None]:
    """For imports a stage makes in ``main()``, once it knows that it needs them: as at its start, with the
    collector off, and what they made frozen after (run_stage's reasons)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def _stop(stop: BaseException, who: str) -> None:
    """Exit quietly for Ctrl-C (130) or a stop (143), with one line saying so."""
    interrupted = isinstance(stop, KeyboardInterrupt)
    print(f"{who}{'interrupted' if interrupted else stop}", file=sys.stderr)
    sys.exit(130 if interrupted else 143)
