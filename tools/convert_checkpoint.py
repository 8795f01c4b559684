#!/usr/bin/env python
"""``python tools/convert_checkpoint.py ...`` is ``megamdm-convert ...`` (megamdm/cli/convert_checkpoint.py)."""

import sys

from megamdm.cli.convert_checkpoint import main

if __name__ == "__main__":
    sys.exit(main())
