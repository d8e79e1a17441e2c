"""``uv run tools/browse_dataset.py --help``: a thin entry point, as is the ``detlib-browse-dataset`` command; the tool is ``detlib.tools.browse_dataset``."""

import sys

from detlib.tools.browse_dataset import main

if __name__ == "__main__":
    sys.exit(main())
