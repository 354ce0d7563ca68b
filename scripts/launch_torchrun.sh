#!/usr/bin/env bash
# Launch gnl-train with torchrun: one process per device; Lightning reads torchrun's environment and does not
# start processes of its own.
#
#   one node, 8 GPUs:      NPROC=8 scripts/launch_torchrun.sh trainer=ddp norm=gn_ws data.batch_size=2
#   two nodes (on each):   NPROC=8 NNODES=2 NODE_RANK=<0|1> MASTER_ADDR=<node 0 address> MASTER_PORT=29500 \
#                          RUN_DIR=/shared/outputs/exp1 scripts/launch_torchrun.sh trainer=multinode ...
#   CPU, 2 processes:      NPROC=2 scripts/launch_torchrun.sh trainer=ddp_cpu
#
# RUN_DIR is the one output directory of the run; every rank gets the same, so no rank resolves its own
# time-stamped directory. On several nodes set it yourself to a shared path.
set -euo pipefail
NPROC=${NPROC:-1}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
RUN_DIR=${RUN_DIR:-outputs/$(date +%Y-%m-%d_%H-%M-%S)}
exec torchrun --nproc_per_node="$NPROC" --nnodes="$NNODES" --node_rank="$NODE_RANK" \
  --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
  -m gnlightning.train trainer.devices="$NPROC" trainer.num_nodes="$NNODES" hydra.run.dir="$RUN_DIR" "$@"
