#!/usr/bin/env bash
# The GPU figures of README's benchmark table in one run of under 10 minutes on one GPU (issue 13):
#   OUT=/tmp/gpu_bench scripts/gpu_bench.sh
# Writes into $OUT: one <step>.txt per step (its full output), summary.txt (one line per step:
# rc and seconds, or "skipped" once the time budget is spent) and figures.txt (the lines to copy
# into README). The steps run most important first: the ResNet-34 update eager vs compiled, the
# end-to-end train.py steps/s on a synthetic store, the nccl check, then ResNet-18 / ResNet-50
# and CUDA graphs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the folder for the figures}
PY=${PYTHON:-python}
BUDGET_S=${BUDGET_S:-540} # stop starting new steps after this many seconds
WORK=$(mktemp -d)         # data, stores and checkpoints: large, not copied into $OUT
mkdir -p "$OUT"
start=$SECONDS

step() { # step NAME TIMEOUT_S COMMAND...: run one step unless the budget is spent
    local name=$1 limit=$2
    shift 2
    if ((SECONDS - start > BUDGET_S)); then
        echo "$name skipped (budget of ${BUDGET_S} s spent)" >>"$OUT/summary.txt"
        return
    fi
    local t0=$SECONDS
    # the commands are this file's functions: a child bash gets them exported, and timeout can
    # kill it
    timeout "$limit" bash -c '"$@"' _ "$@" >"$OUT/$name.txt" 2>&1
    echo "$name rc=$? $((SECONDS - t0)) s" >>"$OUT/summary.txt"
}

bench() { # bench ARCH MODE: the CQL update at batch 64, 128 px, eager vs compiled
    $PY bench.py --arch "$1" --batch 64 --image_size 128 --device cuda --steps 20 --warmup 3 \
        --compile_mode "$2"
}

# 8 tasks x 10 trajectories x 40 steps of random 128x128 images (3,200 transitions)
synthetic_tree() {
    $PY - "$WORK/tree" <<'EOF'
import os, sys
import numpy as np
from fileio import bridge_trajectory, write_bridge_file

rng = np.random.default_rng(0)
for task in range(8):
    trajectories = []
    for _ in range(10):
        obs = [
            {"image": rng.integers(0, 256, (128, 128, 3), np.uint8), "state": rng.normal(size=7)}
            for _ in range(41)
        ]
        trajectories.append(bridge_trajectory(obs, rng.uniform(-0.05, 0.05, (40, 7))))
    write_bridge_file(os.path.join(sys.argv[1], f"task{task}", "train", "out.npy"), trajectories)
EOF
}

# train_steps NAME FLAGS...: 400 steps of train.py; steps/s after the first 100 (warm-up)
train_steps() {
    local name=$1
    shift
    $PY - --data "$WORK/tree" --store "$WORK/store" --out "$WORK/$name" --arch resnet34 \
        --batch_size 64 --steps 400 --log_every 100 --save_every 100000 --device cuda "$@" <<'EOF'
import csv, os, sys
import torch
import train

args = sys.argv[1:]
try:
    train.main(args)
finally:
    print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
rows = list(csv.DictReader(open(os.path.join(args[args.index("--out") + 1], "progress.csv"))))
a, b = rows[0], rows[-1]
sps = (int(b["step"]) - int(a["step"])) / (float(b["time"]) - float(a["time"]))
span = f"steps {a['step']}..{b['step']}"
print(f"end-to-end {sps:.2f} steps/s ({span}, data + augmentation + update)")
EOF
}

# train.py runs a world of 1 without a process group: check nccl itself under torchrun
nccl_check() {
    cat >"$WORK/nccl_check.py" <<'EOF'
import os
import torch
import torch.distributed as dist

torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
dist.init_process_group("nccl")
x = torch.full((4,), float(dist.get_rank() + 1), device="cuda")
dist.all_reduce(x)
states = [None] * dist.get_world_size()
dist.all_gather_object(states, {"rank": dist.get_rank()})
dist.barrier()
world = dist.get_world_size()
print(f"nccl ok: backend {dist.get_backend()}, world {world}, all_reduce {x.tolist()}")
dist.destroy_process_group()
EOF
    local torchrun="$PY -m torch.distributed.run --standalone --nproc_per_node=1"
    $torchrun "$WORK/nccl_check.py" &&
        $torchrun train.py --data "$WORK/tree" --store "$WORK/store" --out "$WORK/torchrun" \
            --arch resnet18 --steps 20 --log_every 10 --device cuda
}

export PY WORK
export -f bench synthetic_tree train_steps nccl_check
{
    nvidia-smi
    $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} >"$OUT/device.txt" 2>&1
: >"$OUT/summary.txt"
step synthetic_tree 120 synthetic_tree
step bench_resnet34_default 240 bench resnet34 default
step train_resnet34_compile_prefetch 180 train_steps e2e_compiled --compile --prefetch
step train_resnet34_eager_prefetch 90 train_steps e2e_eager_prefetch --prefetch
step train_resnet34_eager 90 train_steps e2e_eager
step torchrun_nccl 90 nccl_check
step bench_resnet18_default 180 bench resnet18 default
step bench_resnet50_default 180 bench resnet50 default
step bench_resnet34_reduce-overhead 180 bench resnet34 reduce-overhead

grep -H -E "updates/s|compiled / eager|GFLOP/update|steps/s \(|peak memory|nccl ok" "$OUT"/*.txt \
    >"$OUT/figures.txt"
rm -rf "$WORK"
cat "$OUT/summary.txt" "$OUT/figures.txt"
