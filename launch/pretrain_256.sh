#!/bin/bash
# Pretraining stage at 256 px of the 8B model. Submit from the repository root:
#   sbatch launch/pretrain_256.sh [key=value overrides]
#   CONTAINER_IMAGE=megamdm.sqsh sbatch launch/pretrain_256.sh
#SBATCH --job-name=megamdm-256
#SBATCH --nodes=16
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=USR1@120
#SBATCH --dependency=singleton

CONFIG=${CONFIG:-configs/pretrain_256.yaml}
source "${SLURM_SUBMIT_DIR:-.}/launch/common.sh"
run_training "$@"
