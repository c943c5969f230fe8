"""The commands fathompipe prints for the user to run next, written so that each works when pasted into the shell
that printed it: quoted (paths with blanks), with the interpreter that has fathompipe, from the right directory."""
from __future__ import annotations

import os
import shlex
import shutil
import sys


def python() -> str:
    """`python` when that name runs this very interpreter (an activated venv), else this interpreter's path
    (e.g. `.venv/bin/python` run by its path: a bare `python` would be the system's, without fathompipe)."""
    found = shutil.which("python")
    return "python" if found and os.path.abspath(found) == os.path.abspath(sys.executable) else sys.executable


def fathompipe(module: str, *args: str) -> str:
    """`python -m fathompipe.<module> ARGS`, quoted for a POSIX shell."""
    return shlex.join([python(), "-m", f"fathompipe.{module}", *args])


def from_dir(command: str, cwd: str) -> str:
    """`command` as typed in `cwd`, where its relative paths point: prefixed with `cd` when this shell is elsewhere."""
    if not cwd or os.path.abspath(os.getcwd()) == os.path.abspath(cwd):
        return command
    return f"cd {shlex.quote(cwd)} && {command}"
