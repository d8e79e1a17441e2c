"""``uv run tools/export.py --help``: a thin entry point, as is the ``detlib-export`` command; the tool is ``detlib.tools.export``."""

import sys

from detlib.tools.export import main

if __name__ == "__main__":
    sys.exit(main())
