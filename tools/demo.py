#!/usr/bin/env python
"""``python tools/demo.py ...`` is ``megamdm-demo ...`` (megamdm/demo/run.py)."""

import sys

from megamdm.demo.run import main

if __name__ == "__main__":
    sys.exit(main())
