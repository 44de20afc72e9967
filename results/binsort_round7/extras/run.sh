#!/bin/bash
# Round 7 extras (results/binsort_round7/extras/), run after the protocol (runs/binsort7) from /work/wt7x (a detached worktree):
#   bash run.sh ptr_aw   PTR's fine-tuning with --actor_awbc: the critic weighs what the actor imitates
#   bash run.sh bc_d0    BC pre-training with --bc_dropout 0 (the paper tunes BC; Table XI's is 0.4)
# One thread each; resumable (train/finetune --resume; an eval is skipped when its JSON exists).
set -euo pipefail
PY=/work/main/.venv/bin/python
R=/work/main/runs/binsort7
X=/work/main/runs/binsort7x
export OMP_NUM_THREADS=1
cd /work/wt7x
mkdir -p "$X/eval"
evaluate() {  # ckpt json extra-flags...
  local ckpt=$1 json=$2
  shift 2
  [ -f "$json" ] || $PY online.py eval --ckpt "$ckpt" --seed 1000 --json "$json" --binarize_gripper "$@"
}
case $1 in
  ptr_aw)
    $PY finetune.py --ckpt $R/cql_pre/ckpt_00010000.pt --prior $R/data/prior --target $R/data/target \
      --out $X/ptr_aw --mix 0.7 --steps 2000 --save_every 250 --batch_size 64 --log_every 250 \
      --bc_steps 12000 --actor_awbc --resume
    [ -f $X/ptr_aw/selection.json ] || $PY select_ckpt.py $X/ptr_aw --plot $X/qvalues_ptr_aw.png
    chosen=$($PY -c "import json; print(json.load(open('$X/ptr_aw/selection.json'))['chosen'])")
    evaluate "$chosen" $X/eval/sort_ptr_aw.json --episodes 50 --task sort_mug_cube --sample_actions
    evaluate $X/ptr_aw/ckpt_00002000.pt $X/eval/sort_ptr_aw_last.json --episodes 50 \
      --task sort_mug_cube --sample_actions
    ;;
  bc_d0)
    $PY train.py --data $R/data/prior --out $X/bc_d0 --steps 10000 --save_every 2500 --algo bc \
      --gamma 0.98 --arch small --batch_size 64 --log_every 250 --extra_tasks 1 --bc_dropout 0 --resume
    for task in pick_cube_to_left pick_duck_to_right pick_mug_to_left pick_ball_to_right; do
      evaluate $X/bc_d0/ckpt_00010000.pt $X/eval/bc_d0_$task.json --episodes 25 --task $task
    done
    ;;
esac
