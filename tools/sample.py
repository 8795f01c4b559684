#!/usr/bin/env python
"""``python tools/sample.py ...`` is ``megamdm-sample ...`` (megamdm/cli/sample.py)."""

import sys

from megamdm.cli.sample import main

if __name__ == "__main__":
    sys.exit(main())
