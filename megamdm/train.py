"""Pretraining entry point, launched by torchrun or srun (one task per GPU):

torchrun --nproc-per-node 8 -m megamdm.train --config configs/pretrain_256.yaml [key=value ...]
"""

from __future__ import annotations

import argparse
import sys

from .compat.quiet import library_notices_hidden
from .config import add_config_args, parse_config_args
from .errors import MegamdmError
from .options import ArgumentParser
from .training.parallel import teardown


def main(argv=None) -> int:
    ap = ArgumentParser(
        prog="python -m megamdm.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_args(ap)
    _, cfg = parse_config_args(ap, argv)
    from .training.trainer import pretrain

    with library_notices_hidden():
        try:
            pretrain(cfg)
        except MegamdmError as e:  # bad input (a checkpoint that does not fit): one line, not a traceback
            print(f"error: {e}", file=sys.stderr)
            return 2
        finally:
            teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
