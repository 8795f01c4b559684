#!/usr/bin/env python
"""``python tools/build_gce_groups.py ...`` is ``megamdm-build-gce-groups ...`` (megamdm/cli/build_gce_groups.py)."""

import sys

from megamdm.cli.build_gce_groups import main

if __name__ == "__main__":
    sys.exit(main())
