"""runfolder.py: the names of the files in a PTR run folder, and which checkpoints a retention
policy keeps (a leaf: imports nothing from the project, nor torch, so select_ckpt.py can read a run
folder cheaply).

A run folder (--out of train.py, finetune.py, online.py finetune) holds:
    config.json               every resolved option of the run
    progress.csv              one row per logged step
    run.lock                  the pid of the process that owns the folder (train.claim_run_folder)
    ckpt_<step>.pt            checkpoints, step zero-padded to 8 digits
    qvalues_<step>.json       finetune.py: Q-values on the held-out target demos at that checkpoint
    valloss_<step>.json       finetune.py: the policy's imitation error on those demos
    selection.json            select_ckpt.py: the ranking and the chosen checkpoint
    episodes/episode_<n>.npz  online.py: each online trajectory, written once
"""

import glob
import os
import re

CKPT_PATTERN = "ckpt_{:08d}.pt"
QTRACE_PATTERN = "qvalues_{:08d}.json"
VALLOSS_PATTERN = "valloss_{:08d}.json"
EPISODE_PATTERN = os.path.join("episodes", "episode_{:06d}.npz")
LOCK_FILE = "run.lock"
CONFIG_FILE = "config.json"
PROGRESS_FILE = "progress.csv"


def list_checkpoints(run_dir):
    """[(step, path)] of a run folder, oldest first."""
    found = []
    for path in glob.glob(os.path.join(run_dir, "ckpt_*.pt")):
        m = re.fullmatch(r"ckpt_(\d+)\.pt", os.path.basename(path))
        if m:
            found.append((int(m.group(1)), path))
    return sorted(found)


def steps_to_delete(steps, keep_last, keep_steps=()):
    """Retention: the newest keep_last checkpoints stay, and every step in keep_steps
    (the ones a user marked); keep_last 0 keeps everything. Returns the steps to delete, oldest
    first."""
    if keep_last <= 0:
        return []
    newest = set(sorted(steps)[-keep_last:])
    return [s for s in sorted(steps) if s not in newest and s not in set(keep_steps)]
