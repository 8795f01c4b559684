#!/usr/bin/env python
"""``python tools/inspect_shards.py ...`` is ``megamdm-inspect-shards ...`` (megamdm/cli/inspect_shards.py)."""

import sys

from megamdm.cli.inspect_shards import main

if __name__ == "__main__":
    sys.exit(main())
