"""``uv run tools/evaluate.py --help``: a thin entry point, as is the ``detlib-evaluate`` command; the tool is ``detlib.tools.evaluate``."""

import sys

from detlib.tools.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
