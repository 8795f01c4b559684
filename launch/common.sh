# shellcheck shell=bash
# Shared by launch/pretrain_*.sh (sourced inside the sbatch allocation; submit from the repo root).
#
#   CONFIG           the megamdm config (set by each script)
#   LAUNCHER         srun (default: one task per GPU, Megatron style) | torchrun (one task per node)
#   GPUS_PER_NODE    default: SLURM's allocation, else 8
#   CONTAINER_IMAGE  run inside this image with pyxis/enroot (e.g. the one from docker/Dockerfile)
#   CONTAINER_MOUNTS pyxis --container-mounts (default: the repo at the same path)
#   PYTHON           the interpreter (default: python)
#   LOG_DIR          wandb runs and the preemption marker (default: logs/, where #SBATCH --output writes)
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$PWD}"
LOG_DIR=${LOG_DIR:-$PWD/logs}
mkdir -p "${LOG_DIR}"

: "${CONFIG:?set CONFIG to a megamdm config file}"
NNODES=${SLURM_JOB_NUM_NODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
LAUNCHER=${LAUNCHER:-srun}
PYTHON=${PYTHON:-python}

# rendezvous: the first node of the allocation
MASTER_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)
export MASTER_ADDR
export MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}

# Megatron-LM's environment for H100 clusters
export CUDA_DEVICE_MAX_CONNECTIONS=1          # ordered kernel launch for TP/SP communication overlap
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-19}
export NCCL_IB_SL=${NCCL_IB_SL:-1}
export NCCL_P2P_NET_CHUNKSIZE=${NCCL_P2P_NET_CHUNKSIZE:-2097152}
export TORCH_NCCL_AVOID_RECORD_STREAMS=1
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}  # Megatron-Bridge on H100: NVLink SHARP off (memory, hangs)
export NVTE_FWD_LAYERNORM_SM_MARGIN=${NVTE_FWD_LAYERNORM_SM_MARGIN:-16}
export NVTE_BWD_LAYERNORM_SM_MARGIN=${NVTE_BWD_LAYERNORM_SM_MARGIN:-16}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton_cache_${SLURM_JOB_ID:-0}}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export WANDB_DIR=${WANDB_DIR:-$LOG_DIR}

# preemption: the trainer saves on SIGUSR1 (sbatch --signal=USR1@120) and leaves this marker
export MEGAMDM_PREEMPT_MARKER=${MEGAMDM_PREEMPT_MARKER:-$LOG_DIR/preempted-${SLURM_JOB_ID:-local}}

CONTAINER_ARGS=()
if [[ -n "${CONTAINER_IMAGE:-}" ]]; then
  CONTAINER_ARGS=(--container-image="${CONTAINER_IMAGE}" --container-mounts="${CONTAINER_MOUNTS:-$PWD:$PWD}"
                  --container-workdir="$PWD")
fi

echo "megamdm: job ${SLURM_JOB_ID:-?} on ${NNODES} node(s) x ${GPUS_PER_NODE} task(s), ${LAUNCHER}," \
     "master ${MASTER_ADDR}:${MASTER_PORT}, config ${CONFIG}"

# CPUs: --cpus-per-task of the allocation is meant for one rank. srun (Slurm >= 22.05) does not
# inherit it, so it is passed explicitly; torchrun mode runs one task per node (not the allocation's
# SLURM_NTASKS, which srun would inherit), and that task gets the CPUs of all its ranks.
CPUS_PER_RANK=${SLURM_CPUS_PER_TASK:-1}
CPUS_PER_NODE=$((CPUS_PER_RANK * GPUS_PER_NODE))

run_training() {
  local rc=0
  if [[ "${LAUNCHER}" == torchrun ]]; then
    srun --nodes="${NNODES}" --ntasks="${NNODES}" --ntasks-per-node=1 --cpus-per-task="${CPUS_PER_NODE}" \
      --kill-on-bad-exit=1 "${CONTAINER_ARGS[@]}" \
      "${PYTHON}" -m torch.distributed.run --nnodes="${NNODES}" --nproc-per-node="${GPUS_PER_NODE}" \
      --rdzv-backend=c10d --rdzv-endpoint="${MASTER_ADDR}:${MASTER_PORT}" \
      -m megamdm.train --config "${CONFIG}" "$@" || rc=$?
  else
    srun --ntasks-per-node="${GPUS_PER_NODE}" --cpus-per-task="${CPUS_PER_RANK}" --kill-on-bad-exit=1 \
      "${CONTAINER_ARGS[@]}" \
      "${PYTHON}" -u -m megamdm.train --config "${CONFIG}" "$@" || rc=$?
  fi
  if [[ -f "${MEGAMDM_PREEMPT_MARKER}" ]]; then
    rm -f "${MEGAMDM_PREEMPT_MARKER}"
    echo "megamdm: checkpoint saved on preemption; requeueing job ${SLURM_JOB_ID}"
    scontrol requeue "${SLURM_JOB_ID}"
  fi
  return "${rc}"
}
