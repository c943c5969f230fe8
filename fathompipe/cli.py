"""What every command-line entry point shares."""
from __future__ import annotations

import os
import sys
from typing import Callable


def quiet_pipe(main: Callable[[], int]) -> int:
    """Run `main`; when the reader of stdout goes away (`| head`), end quietly with 141 (128 + SIGPIPE)
    instead of a BrokenPipeError traceback."""
    try:
        rc = main()
        sys.stdout.flush()
        return rc
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the flush at exit cannot fail again
        return 141
