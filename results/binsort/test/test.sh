#!/bin/bash
# the test phase, from the fixed worktree /work/exp5 (commit e46ffb2)
cd /work/exp5
exec /work/venv/bin/python scripts/binsort_experiment.py --out /work/runs/p24 --jobs 2 --curve_runs ptr_q0 --test 1 --seeds 0,1,2
