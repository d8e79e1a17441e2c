"""``uv run tools/benchmark.py --help``: a thin entry point, as is the ``detlib-benchmark`` command; the tool is ``detlib.tools.benchmark``."""

import sys

from detlib.tools.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
