"""The one error type users see, and the entry point that turns it into a one-line message."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable


class PipelineError(Exception):
    """A problem the user can fix: bad parameters, missing files, mismatched inputs."""


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's ``main()``: configure logging once and report user errors without a traceback.

    Set ``PIPELINE_DEBUG=1`` to see the full traceback of a user error.
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        main()
    except PipelineError as err:
        if os.environ.get("PIPELINE_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
