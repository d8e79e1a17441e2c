"""``uv run tools/plot_losses.py --help``: a thin entry point, as is the ``detlib-plot-losses`` command; the tool is ``detlib.tools.plot_losses``."""

import sys

from detlib.tools.plot_losses import main

if __name__ == "__main__":
    sys.exit(main())
