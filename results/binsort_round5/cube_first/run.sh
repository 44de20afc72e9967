#!/usr/bin/env bash
# round 5, post-protocol: the same protocol's PTR and BC finetune on target demos that place the cube first
set -euo pipefail
cd /work/c5   # commit 75b5eeb
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
PY=/work/main/.venv/bin/python; R=/work/main/runs/binsort5; C=/work/main/runs/binsort5_cubefirst
$PY sim_binsort.py collect --task sort --n 5 --image_size 64 --first cube --out $C/data/target > $C/logs/collect.log 2>&1
# BC finetune (deterministic) in the background, PTR in the foreground
( $PY finetune.py --ckpt $R/bc_pre/ckpt_00010000.pt --prior $C/data/prior --target $C/data/target --out $C/bc_ft --mix 0.9 --steps 2000 --save_every 500 --batch_size 64 --log_every 250 --resume > $C/logs/bc_ft.log 2>&1 && $PY online.py eval --ckpt $C/bc_ft/ckpt_00002000.pt --episodes 50 --seed 1000 --json $C/eval/sort_bc_ft.json --binarize_gripper --task sort_mug_cube > $C/logs/eval_sort_bc_ft.log 2>&1 ) &
$PY finetune.py --ckpt $R/cql_pre/ckpt_00010000.pt --prior $C/data/prior --target $C/data/target --out $C/ptr --mix 0.9 --steps 2000 --save_every 250 --batch_size 64 --log_every 250 --bc_steps 12000 --resume > $C/logs/ptr.log 2>&1
$PY select_ckpt.py $C/ptr --plot $C/qvalues.png > $C/logs/select_ptr.log 2>&1
CHOSEN=$(tail -1 $C/logs/select_ptr.log)
$PY online.py eval --ckpt $CHOSEN --episodes 50 --seed 1000 --json $C/eval/sort_ptr.json --binarize_gripper --task sort_mug_cube --sample_actions > $C/logs/eval_sort_ptr.log 2>&1
wait
echo done
