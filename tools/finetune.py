#!/usr/bin/env python
"""``python tools/finetune.py ...`` is ``megamdm-finetune ...`` (megamdm/cli/finetune.py)."""

import sys

from megamdm.cli.finetune import main

if __name__ == "__main__":
    sys.exit(main())
