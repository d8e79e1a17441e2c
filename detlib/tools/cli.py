"""What every tool's ``main`` shares: user errors as one line on stderr, and the program's name."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from detlib.data.validation import AnnotationError
from detlib.errors import CheckpointError, ToolError, is_device_failure  # noqa: F401 - ToolError: the tools' error

# Errors a user can cause with a bad path or file: reported as one line, no traceback (CUDA failures,
# RuntimeErrors too, are not: ``is_device_failure``); and omegaconf's, where a tool composed a config.
USER_ERRORS = (FileNotFoundError, NotADirectoryError, ValueError, KeyError, RuntimeError, CheckpointError,
               AnnotationError)


def user_errors() -> tuple[type[BaseException], ...]:
    """``USER_ERRORS`` and, once omegaconf is imported, its base exception (not imported for it: scoring two
    files, ``evaluate.py --gt --dt``, starts without omegaconf's 0.3 s)."""
    oc = sys.modules.get("omegaconf.errors")
    return USER_ERRORS + ((oc.OmegaConfBaseException,) if oc is not None else ())


def prog_name(script: str) -> str:
    """``script`` (``evaluate.py``, as ``tools/evaluate.py`` is called), or the console script's own name
    (``detlib-evaluate``) when that is what runs."""
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return name if name.startswith("detlib-") else script


def cli(run: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None, script: str) -> int:
    """Call ``run(argv)``; a user error becomes ``prog: error: message`` on stderr and exit status 1."""
    try:
        return run(argv)
    except Exception as e:
        # not a user error, or a CUDA error or out of memory (not bad input either): keep its traceback
        if not isinstance(e, user_errors()) or is_device_failure(e):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"{prog_name(script)}: error: {msg}", file=sys.stderr)
        return 1
