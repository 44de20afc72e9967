#!/usr/bin/env bash
# round 6: PTR fine-tuning variants on the cube-first target demos, from round 5's CQL pre-training
# usage: run_ptr.sh NAME MIX STEPS SAVE_EVERY
set -euo pipefail
cd /work/c6   # detached worktree at the round-6 start commit
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
PY=/work/main/.venv/bin/python; R=/work/main/runs/binsort5; C=/work/main/runs/binsort5_cubefirst; O=/work/main/runs/binsort6
NAME=$1; MIX=$2; STEPS=$3; SAVE=$4
$PY finetune.py --ckpt $R/cql_pre/ckpt_00010000.pt --prior $C/data/prior --target $C/data/target --out $O/$NAME --mix $MIX --steps $STEPS --save_every $SAVE --batch_size 64 --log_every 250 --bc_steps $((10000 + STEPS)) --resume > $O/logs/$NAME.log 2>&1
$PY select_ckpt.py $O/$NAME --plot $O/qvalues_$NAME.png > $O/logs/select_$NAME.log 2>&1
CHOSEN=$(tail -1 $O/logs/select_$NAME.log)
$PY online.py eval --ckpt $CHOSEN --episodes 50 --seed 1000 --json $O/eval/sort_$NAME.json --binarize_gripper --task sort_mug_cube --sample_actions > $O/logs/eval_sort_$NAME.log 2>&1
echo done $NAME $CHOSEN
