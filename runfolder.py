"""runfolder.py: the PTR run folder without torch: the names of its files, which checkpoints a
retention policy keeps, the lock that gives the folder to one process, the progress log,
config.json and the online trajectories' episode files. A level-1 file (SPEC section 2): it imports
cli.py and fileio.py of the project and never torch (TensorBoard's writer is imported only when a
run asks for it), so select_ckpt.py and the experiment scripts read a run folder cheaply.

A run folder (--out of train.py, finetune.py, online.py finetune) holds:
    config.json               every resolved option of the run (write_config)
    progress.csv              one row per logged step (RunLog)
    run.lock                  the pid of the process that owns the folder (claim_run_folder)
    ckpt_<step>.pt            checkpoints (checkpoint.py), step zero-padded to 8 digits
    qvalues_<step>.json       finetune.py: Q-values on the held-out target demos at that checkpoint
    valloss_<step>.json       finetune.py: the policy's imitation error on those demos
    selection.json            select_ckpt.py: the ranking and the chosen checkpoint
    episodes/episode_<n>.npz  online.py: each online trajectory, written once (write_episode)
"""

import contextlib
import csv
import glob
import json
import math
import os
import re
import time

import numpy as np

from cli import ExpectedError
from fileio import atomic_write, atomic_write_text, pid_alive, sweep_stale_tmp

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


def prune_checkpoints(out, keep_last, keep_steps=()):
    """Retention (--keep_last, --keep_steps): delete the checkpoints steps_to_delete names."""
    ckpts = dict(list_checkpoints(out))
    for step in steps_to_delete(list(ckpts), keep_last, keep_steps):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(ckpts[step])


class RunFolderBusy(ExpectedError, RuntimeError):
    """Another live process owns the run folder (its lock file names the pid)."""


def prepare_out_dir(out, resume):
    """A fresh run refuses a folder that already holds checkpoints, so nothing is
    overwritten by accident."""
    if list_checkpoints(out) and not resume:
        raise SystemExit(
            f"{out} already holds checkpoints: pass --resume to continue that run, or another --out"
        )
    os.makedirs(out, exist_ok=True)


def _lock_owner(lock):
    """The pid written in a lock file, or None when it is unreadable (a writer killed mid-write)."""
    try:
        with open(lock) as f:
            text = f.read().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


@contextlib.contextmanager
def claim_run_folder(out, resume):
    """Own --out for the length of the run: a lock file holds this process's pid, so a
    second run on the same folder stops with a clear line instead of mixing its checkpoints,
    config.json and progress.csv into this one. A lock whose pid is dead (kill -9) is stale and
    taken over; so are the temporary files of dead writers (fileio.sweep_stale_tmp)."""
    prepare_out_dir(out, resume)
    lock = os.path.join(out, LOCK_FILE)
    for _ in range(2):  # a stale lock is removed once, then claimed like a missing one
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            owner = _lock_owner(lock)
            if owner is not None and owner != os.getpid() and pid_alive(owner):
                raise RunFolderBusy(
                    f"{out}: in use by another run (pid {owner}, see {lock}); wait for it to end, "
                    f"stop it, or pass another --out"
                ) from None
            if owner == os.getpid():  # this process already owns it (an earlier main() in-process)
                break
            print(
                f"{out}: taking over the lock of a run that ended without releasing it "
                f"(pid {owner})"
            )
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        break
    for tmp in sweep_stale_tmp(out):
        print(f"removed {tmp}, the temporary file of a save that never finished")
    try:
        yield out
    finally:
        if _lock_owner(lock) == os.getpid():
            os.unlink(lock)


def write_config(out, config):
    """config.json of the run folder: every resolved option of the run (a dict of the parsed flags
    and what the run derived), sorted, atomically; a value JSON cannot hold is written as a str."""
    atomic_write_text(
        json.dumps(config, indent=2, sort_keys=True, default=str) + "\n",
        os.path.join(out, CONFIG_FILE),
    )


def episode_path(out, episode):
    """The file of online trajectory `episode` in the run folder `out`."""
    return os.path.join(out, EPISODE_PATTERN.format(episode))


def write_episode(path, images, states, actions, rewards, task, env_rewards=None):
    """An online trajectory's file, written once, atomically, when it is collected (a checkpoint
    lists the ones its buffer holds). env_rewards: the env's own rewards beside a labeler's, if
    given."""
    arrays = dict(images=images, states=states, actions=actions, rewards=rewards)
    if env_rewards is not None:
        arrays["env_rewards"] = env_rewards

    def write(f):  # a file object: np.savez would append .npz to a name
        np.savez(f, **arrays, task=np.int64(task))

    atomic_write(path, write)


def read_episode(path):
    """(images, states, actions, rewards, task) of an episode file (write_episode)."""
    with np.load(path, allow_pickle=False) as z:
        return z["images"], z["states"], z["actions"], z["rewards"], int(z["task"])


class RunLog:
    """progress.csv + one stdout line every --log_every steps (+ TensorBoard when asked).
    Rank 0 only."""

    def __init__(self, out, total_steps, start_step, enabled=True, tensorboard=False):
        self.out, self.total, self.enabled = out, total_steps, enabled
        self.t0, self.step0 = time.time(), start_step
        self.path = os.path.join(out, PROGRESS_FILE)
        self.columns = None
        self.tb = None
        if not enabled:
            return
        if start_step > 0 and os.path.exists(self.path):
            # drop rows written after the checkpoint we resume from, so the csv reads like one run
            with open(self.path) as f:
                rows = list(csv.DictReader(f))
            self.columns = list(rows[0].keys()) if rows else None
            with open(self.path, "w", newline="") as f:
                if self.columns:
                    writer = csv.DictWriter(f, self.columns)
                    writer.writeheader()
                    writer.writerows(r for r in rows if int(r["step"]) <= start_step)
        elif os.path.exists(self.path):
            os.remove(self.path)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise SystemExit(
                    "--tensorboard needs the tensorboard package: pip install tensorboard"
                ) from None
            self.tb = SummaryWriter(out)

    def log(self, step, info):
        if not self.enabled:
            return
        elapsed = time.time() - self.t0
        sps = (step - self.step0) / max(elapsed, 1e-9)
        row = {"step": step, "time": round(elapsed, 3), "steps_per_s": round(sps, 3)}
        row.update({k: float(v) for k, v in sorted(info.items())})
        if self.columns is None:
            self.columns = list(row.keys())
            with open(self.path, "w", newline="") as f:
                csv.DictWriter(f, self.columns).writeheader()
        elif any(k not in self.columns for k in row):
            # a quantity that starts being logged mid-run (e.g. the actor's Q term after its
            # warm-up) gets a column: the rows before it leave that cell empty
            self.columns += [k for k in row if k not in self.columns]
            with open(self.path) as f:
                rows = list(csv.DictReader(f))
            with open(self.path, "w", newline="") as f:
                writer = csv.DictWriter(f, self.columns)
                writer.writeheader()
                writer.writerows(rows)
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.columns, extrasaction="ignore").writerow(row)
        if self.tb is not None:
            for k, v in row.items():
                if k != "step":
                    self.tb.add_scalar(k, v, step)
        eta = _hms(max(0.0, self.total - step) / sps) if sps > 0 else "?"
        # a row logged before any update (online.py's first evaluation) has no losses to show yet
        shown = " ".join(
            f"{k} {row[k]:.3g}"
            for k in row
            if ("loss" in k or k.startswith("q_")) and math.isfinite(row[k])
        )
        # online.py's last trajectory may run past the requested total: say so, not "step 160/100"
        progress = f"step {step}/{self.total}"
        if step > self.total:
            progress = f"step {step} (done, {self.total} requested)"
        print(f"{progress} | {sps:.2f} steps/s | ETA {eta} | {shown}", flush=True)


def _hms(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
