#!/usr/bin/env bash
# Which part of PTR's recipe beats Gaussian BC? On DEVELOPMENT episodes (1000..1049), seeds 1 and 2:
# Gaussian BC fine-tuned at tau 0.7 (PTR's tau), and every run's LAST checkpoint (no checkpoint rule).
# From the fixed worktree /work/exp5 (e46ffb2), one thread per job.
cd /work/exp5
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
PY=/work/venv/bin/python
ev() {  # seed run
  $PY online.py eval --ckpt /work/runs/p24/seed_$1/$2/ckpt_00002000.pt --episodes 50 --seed 1000 --json /work/runs/p24/seed_$1/eval/dev_$2_last.json --binarize_gripper --task sort_mug_cube --sample_actions >> /work/runs/p24/seed_$1/logs/eval_dev_$2_last.log 2>&1
}
for s in 1 2; do
  ( $PY finetune.py --ckpt /work/runs/p24/seed_$s/gbc_pre/ckpt_00007500.pt --prior /work/runs/p24/seed_$s/data/prior --target /work/runs/p24/seed_$s/data/target --out /work/runs/p24/seed_$s/gbc_ft_m0.7 --steps 2000 --save_every 250 --batch_size 64 --log_every 250 --seed $s --mix 0.7 --resume >> /work/runs/p24/seed_$s/logs/gbc_ft_m0.7.log 2>&1 && ev $s gbc_ft_m0.7 && ev $s gbc_ft_m0.9 && ev $s ptr_q0 ) &
done
wait; echo "decomposition done $(date -u +%T)"
