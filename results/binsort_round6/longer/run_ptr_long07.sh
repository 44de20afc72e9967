#!/usr/bin/env bash
# round 6, after the protocol: the protocol's PTR (tau 0.7) fine-tuned for 4000 steps instead of 2000
set -euo pipefail
cd /work/cq   # detached worktree at commit dce05e6
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
PY=/work/main/.venv/bin/python; D=/work/main/runs/binsort6p/data; O=/work/main/runs/binsort6; NAME=ptr_ft4000
$PY finetune.py --ckpt /work/main/runs/binsort5/cql_pre/ckpt_00010000.pt --prior $D/prior --target $D/target --out $O/$NAME --mix 0.7 --steps 4000 --save_every 500 --batch_size 64 --log_every 250 --bc_steps 14000 --resume > $O/logs/$NAME.log 2>&1
$PY select_ckpt.py $O/$NAME --plot $O/qvalues_$NAME.png > $O/logs/select_$NAME.log 2>&1
CHOSEN=$(tail -1 $O/logs/select_$NAME.log)
$PY online.py eval --ckpt $CHOSEN --episodes 50 --seed 1000 --json $O/eval/sort_$NAME.json --binarize_gripper --task sort_mug_cube --sample_actions > $O/logs/eval_sort_$NAME.log 2>&1
for STEP in 2500 3000 3500 4000; do
  $PY online.py eval --ckpt $O/$NAME/ckpt_0000$STEP.pt --episodes 20 --seed 1000 --json $O/eval/${NAME}_step_$STEP.json --binarize_gripper --task sort_mug_cube --sample_actions > $O/logs/eval_${NAME}_$STEP.log 2>&1
done
echo done $NAME $CHOSEN
