"""``uv run tools/plot_logs.py --help``: a thin entry point, as is the ``detlib-plot-logs`` command; the tool is ``detlib.tools.plot_logs``."""

import sys

from detlib.tools.plot_logs import main

if __name__ == "__main__":
    sys.exit(main())
