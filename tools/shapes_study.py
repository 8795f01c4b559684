#!/usr/bin/env python
"""``python tools/shapes_study.py ...`` is ``megamdm-shapes-study ...`` (megamdm/demo/study.py)."""

import sys

from megamdm.demo.study import main

if __name__ == "__main__":
    sys.exit(main())
