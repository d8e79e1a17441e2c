"""``uv run tools/predict.py --help``: a thin entry point, as is the ``detlib-predict`` command; the tool is ``detlib.tools.predict``."""

import sys

from detlib.tools.predict import main

if __name__ == "__main__":
    sys.exit(main())
