#!/usr/bin/env python
"""``python tools/preprocess.py ...`` is ``megamdm-preprocess ...`` (megamdm/cli/preprocess.py)."""

import sys

from megamdm.cli.preprocess import main

if __name__ == "__main__":
    sys.exit(main())
