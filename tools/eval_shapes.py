#!/usr/bin/env python
"""``python tools/eval_shapes.py ...`` is ``megamdm-eval-shapes ...`` (megamdm/demo/evaluate.py)."""

import sys

from megamdm.demo.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
