"""``uv run tools/visualize.py --help``: a thin entry point, as is the ``detlib-visualize`` command; the tool is ``detlib.tools.visualize``."""

import sys

from detlib.tools.visualize import main

if __name__ == "__main__":
    sys.exit(main())
