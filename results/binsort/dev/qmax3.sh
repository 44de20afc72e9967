#!/usr/bin/env bash
# The last run of the Q-maximising study (cause 4: target entropy 0, a wider actor), as qmax.sh / qmax2.sh
cd /work/exp5
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
L=/work/runs/p24/seed_0/logs
/work/venv/bin/python finetune.py --ckpt /work/runs/p24/seed_0/cql_pre/ckpt_00007500.pt --prior /work/runs/p24/seed_0/data/prior --target /work/runs/p24/seed_0/data/target --out /work/runs/p24/seed_0/qmax_entropy --mix 0.7 --steps 2000 --save_every 250 --batch_size 64 --log_every 250 --seed 0 --bc_steps 7500 --target_entropy 0 --resume >> $L/qmax_entropy.log 2>&1 && /work/venv/bin/python select_ckpt.py /work/runs/p24/seed_0/qmax_entropy >> $L/select_qmax_entropy.log 2>&1 && /work/venv/bin/python online.py eval --ckpt $(python3 -c "import json; print(json.load(open('/work/runs/p24/seed_0/qmax_entropy/selection.json'))['chosen'])") --episodes 50 --seed 1000 --json /work/runs/p24/seed_0/eval/dev_qmax_entropy.json --binarize_gripper --task sort_mug_cube --sample_actions >> $L/eval_dev_qmax_entropy.log 2>&1
echo "qmax_entropy done $(date -u +%T)"
