#!/usr/bin/env bash
# round 6: PTR (tau 0.7, 2000 steps, as the protocol's ptr) with another fine-tuning seed
# usage: run_ptr_seed.sh SEED
set -euo pipefail
cd /work/c6p   # detached worktree at commit 160dbe2 (the protocol's)
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
PY=/work/main/.venv/bin/python; D=/work/main/runs/binsort6p/data; O=/work/main/runs/binsort6
SEED=$1; NAME=ptr_seed$SEED
$PY finetune.py --ckpt /work/main/runs/binsort5/cql_pre/ckpt_00010000.pt --prior $D/prior --target $D/target --out $O/$NAME --mix 0.7 --steps 2000 --save_every 250 --batch_size 64 --log_every 250 --bc_steps 12000 --seed $SEED --resume > $O/logs/$NAME.log 2>&1
$PY select_ckpt.py $O/$NAME --plot $O/qvalues_$NAME.png > $O/logs/select_$NAME.log 2>&1
CHOSEN=$(tail -1 $O/logs/select_$NAME.log)
$PY online.py eval --ckpt $CHOSEN --episodes 50 --seed 1000 --json $O/eval/sort_$NAME.json --binarize_gripper --task sort_mug_cube --sample_actions > $O/logs/eval_sort_$NAME.log 2>&1
echo done $NAME $CHOSEN
