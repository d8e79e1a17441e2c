"""``uv run tools/gpu_preflight.py --help``: a thin entry point, as is the ``detlib-gpu-preflight`` command; the tool is ``detlib.tools.gpu_preflight``."""

import sys

from detlib.tools.gpu_preflight import main

if __name__ == "__main__":
    sys.exit(main())
