"""``uv run tools/compare_runs.py --help``: a thin entry point, as is the ``detlib-compare`` command; the tool is ``detlib.tools.compare_runs``."""

import sys

from detlib.tools.compare_runs import main

if __name__ == "__main__":
    sys.exit(main())
