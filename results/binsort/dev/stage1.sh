#!/usr/bin/env bash
# Stage 1 of issue 24's seed 0 from the fixed worktree /work/exp (commit ddff8f3): data, cql_pre, bc_pre
set -e
cd /work/exp
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
PY=/work/venv/bin/python
S=/work/runs/p24/seed_0
D=$S/data
if [ ! -e $D/collected ]; then
  $PY sim_binsort.py collect --task pickplace --n 800 --image_size 64 --workers 2 --out $D/prior > $S/logs/collect.log 2>&1
  $PY sim_binsort.py collect --task sort --n 5 --image_size 64 --out $D/target --first cube >> $S/logs/collect.log 2>&1
  touch $D/collected
fi
echo "collected $(date -u +%T)"
$PY train.py --data $D/prior --out $S/cql_pre --steps 7500 --save_every 1875 --algo cql --alpha 1.0 --gamma 0.98 --bc_steps 9500 --arch small --batch_size 64 --log_every 250 --extra_tasks 1 --resume > $S/logs/cql_pre.log 2>&1 &
$PY train.py --data $D/prior --out $S/bc_pre --steps 7500 --save_every 1875 --algo bc --gamma 0.98 --arch small --batch_size 64 --log_every 250 --extra_tasks 1 --resume > $S/logs/bc_pre.log 2>&1
echo "bc_pre done $(date -u +%T)"
wait
echo "cql_pre done $(date -u +%T)"
