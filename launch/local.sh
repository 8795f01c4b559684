#!/bin/bash
# Train on one machine with torchrun: all its GPUs, or NPROC CPU processes (gloo).
#   CONFIG=configs/demo.yaml NPROC=2 launch/local.sh [key=value overrides]
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-configs/demo.yaml}
# the repository's .venv (what `make setup` makes) where there is one, else the python on the PATH
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$("${PYTHON}" -c "import torch; print(torch.cuda.device_count() or 2)")
fi
export CUDA_DEVICE_MAX_CONNECTIONS=1
exec "${PYTHON}" -m torch.distributed.run --standalone --nproc-per-node="${NPROC}" \
  -m megamdm.train --config "${CONFIG}" "$@"
