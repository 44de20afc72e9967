#!/usr/bin/env bash
# round 5, post-protocol: the protocol's COG on the cube-first target demos
set -euo pipefail
cd /work/c5   # commit 75b5eeb
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
PY=/work/main/.venv/bin/python; C=/work/main/runs/binsort5_cubefirst
$PY train.py --data $C/data/prior --out $C/cog --steps 12000 --save_every 3000 --algo cql --alpha 1.0 --gamma 0.98 --bc_steps 12000 --arch small --batch_size 64 --log_every 250 --target $C/data/target --mix 0.9 --resume > $C/logs/cog.log 2>&1
$PY online.py eval --ckpt $C/cog/ckpt_00012000.pt --episodes 50 --seed 1000 --json $C/eval/sort_cog.json --binarize_gripper --task sort_mug_cube --sample_actions > $C/logs/eval_sort_cog.log 2>&1
echo done
