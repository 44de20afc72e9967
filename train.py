"""PTR phase 1: multi-task offline RL pre-training (paper Section IV-A), and the
baselines of Section V-A.

    python train.py --data bridge/ --arch resnet34                   # PTR: multi-task CQL
                                                                       on all tasks
    python train.py --data bridge/ --exclude toykitchen6             # hold a domain out,
                                                                       as the paper does
    python train.py --data bridge/ --algo bc                         # BC pre-training
                                                                       (the "BC finetune" baseline)
    python train.py --data bridge/ --target my_task/ --mix 0.9       # joint training from scratch
                                                                       (COG / BC joint)
    torchrun --nproc_per_node=4 train.py --data bridge/              # data parallel over 4 GPUs
                                                                       (gloo on CPU)

The run folder (--out) holds config.json (every resolved option), progress.csv, and ckpt_<step>.pt
files written atomically every --save_every steps; --resume continues from the newest checkpoint
with the same result as an uninterrupted run (step, optimizers, sampler and torch RNG state), and
refuses data other than the checkpoint's (check_same_data).
finetune.py and online.py reuse this file's checkpoint and loop helpers, so a run of any
phase looks the same on disk.
"""

import argparse
import contextlib
import csv
import dataclasses
import json
import math
import os
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from cli import (
    EXIT_INTERRUPTED,
    FRACTION,
    POSITIVE,
    ExpectedError,
    add_dataclass_args,
    check_flags,
    dataclass_from_args,
    run_cli,
)
from cql import ALGOS, COMPILE_MODES, STRUCTURE, Agent, AgentConfig
from batches import MixedSampler, Prefetcher, Sampler, augment, target_task_ids
from data import load_store
from fileio import atomic_write, atomic_write_text, pid_alive, sweep_stale_tmp
from model import ARCHS, HEADS, NORMS
from runfolder import CKPT_PATTERN, LOCK_FILE, list_checkpoints, steps_to_delete

CKPT_FORMAT = 1
POLICY_KIND = "policy"  # a checkpoint cut down to its actors (policy_checkpoint)
ACTORS = ("policy", "bc_policy")  # the networks that act: CQL's tanh-Gaussian, BC's MSE policy
PRETRAIN_KEEP_LAST = 5  # ours: a pre-training run keeps its 5 newest checkpoints
MIX_TAU = 0.9  # fraction of each batch from the prior data (SPEC section 3; paper 0.7-0.9)
RESERVED_TASK = (
    "<reserved {}>"  # one-hot slots kept free at pre-training for future target tasks (Sec. IV-A)
)
# Options that fix the network's shapes: a checkpoint only loads into a run that
# agrees on all of them.


class CheckpointError(ExpectedError, RuntimeError):
    """A checkpoint that is missing, damaged or does not fit the run (one line, cli.py)."""


class RunFolderBusy(ExpectedError, RuntimeError):
    """Another live process owns the run folder (its lock file names the pid)."""


def is_reserved(task_name):
    return task_name.startswith(RESERVED_TASK.format("")[:-1])


# ----------------------------------------------------------------------------- checkpoints


def atomic_torch_save(obj, path):
    """A checkpoint appears whole or not at all; a failed save leaves no temporary file."""
    atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path):
    """Load a PTR checkpoint on the CPU (weights_only), with a clear error for every
    way it can be wrong."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a cut-off zip archive
        raise CheckpointError(
            f"{path}: cannot be read, the file is truncated or not a PTR checkpoint ({e})"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise CheckpointError(
            f"{path}: not a PTR checkpoint (expected a dict with format={CKPT_FORMAT})"
        )
    missing = [
        k for k in ("step", "agent", "task_names", "action_low", "action_high") if k not in ckpt
    ]
    if missing or not isinstance(ckpt["agent"], dict) or "config" not in ckpt["agent"]:
        raise CheckpointError(f"{path}: checkpoint misses the fields {missing or ['agent.config']}")
    return ckpt


def ckpt_config(ckpt):
    """The learner's AgentConfig fields, as the agent saved them (the one copy in a checkpoint)."""
    return ckpt["agent"]["config"]


def check_compatible(ckpt, path, expected):
    """Refuse a checkpoint whose network shapes differ from what this run asks for
    (arch, image size, tasks...)."""
    cfg = ckpt_config(ckpt)
    for key, want in expected.items():
        if want is not None and key in cfg and cfg[key] != want:
            raise CheckpointError(
                f"{path}: checkpoint has {key}={cfg[key]!r} but this run uses {key}={want!r}; "
                f"start a new --out folder or pass the checkpoint's {key}"
            )


# Conversion options that leave a store's transitions as they are: the image size is checked with
# the network's shapes (check_compatible), the format version is how the store lays them out.
LAYOUT_OPTIONS = ("image_size", "format_version")


def source_record(flag, src, store):
    """What a data flag stood for in a run, for check_same_data: its resolved path, its store's
    task names and the conversion options that decide the store's data (camera, include, ...)."""
    options = {k: v for k, v in store.meta["options"].items() if k not in LAYOUT_OPTIONS}
    record = {flag: os.path.realpath(src), f"{flag} tasks": list(store.task_names)}
    record.update({f"{flag} {name}": value for name, value in sorted(options.items())})
    return record


def check_same_data(ckpt, out, record):
    """--resume continues a run on the data it trained on. record: this run's data (source_record
    of each source, and the flags that decide a batch such as --mix), as every checkpoint keeps it
    (payload "data"). Refuse a checkpoint that differs in any entry both hold, naming each
    difference; the caller has written nothing yet, so config.json and the checkpoints stay as they
    are. A checkpoint without a record (an older format) is not checked."""
    recorded = ckpt.get("data", {})
    differs = [
        f"{key} {_short(value)} (checkpoint: {_short(recorded[key])})"
        for key, value in record.items()
        if key in recorded and recorded[key] != value
    ]
    if differs:
        raise CheckpointError(
            f"{out}: --resume with other data than the run's checkpoints were trained on: "
            f"{'; '.join(differs)}; resume with the run's own data and flags, or pass another --out"
        )


def _short(value, limit=160):
    """repr(value), cut to `limit` characters (a list of 80 task names stays one readable line)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def agent_from_checkpoint(ckpt, device, path="checkpoint", acting_only=False):
    """The agent a checkpoint holds. acting_only: a policy checkpoint (policy_checkpoint) is
    accepted, its critic left as initialised; training needs the whole checkpoint."""
    policy_only = ckpt.get("kind") == POLICY_KIND
    if policy_only and not acting_only:
        raise CheckpointError(
            f"{path}: a policy-only checkpoint (online.py export) can be evaluated but not trained "
            "from; use the run folder's ckpt_*.pt"
        )
    try:
        return Agent.from_state_dict(ckpt["agent"], device, strict=not policy_only)
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(
            f"{path}: weights do not fit the network its config describes ({e})"
        ) from None


def policy_checkpoint(ckpt):
    """The acting part of a checkpoint, for sharing a result: the actors' weights (with their
    state normalization), the config, task names and action bounds. No critic, optimizer or run
    state: about a tenth of the size; online.py eval loads it, training does not."""
    agent = ckpt["agent"]
    nets = {name: agent["nets"][name] for name in ACTORS if name in agent["nets"]}
    run_state = ("agent", "sampler", "rng", "rank_states")
    kept = {k: v for k, v in ckpt.items() if k not in run_state}
    actor = {
        "config": agent["config"],
        "updates": agent["updates"],
        "log_temp": agent["log_temp"],
        "nets": nets,
        "optimizers": {},
        "generator": agent["generator"],
    }
    return {**kept, "kind": POLICY_KIND, "source_kind": ckpt.get("kind"), "agent": actor}


def capture_rng():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- batches and stores


def prepare_batch(batch, device):
    """Move a CPU batch to the device and augment both images (random crop + color
    jitter, Appendix B)."""
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    batch["obs"] = augment(batch["obs"])
    batch["next_obs"] = augment(batch["next_obs"])
    return batch


def open_store(src, args, store_dir=None, prior=True):
    """Build (first time) and open a store; --include/--exclude/--aliases select
    the prior data only."""
    store = load_store(
        src,
        store=store_dir,
        image_size=args.image_size,
        camera=args.camera,
        include=args.include if prior else (),
        exclude=args.exclude if prior else (),
        aliases=args.aliases if prior else None,
        skip_bad=args.skip_bad,
    )
    h, w = store.image_size
    if h != w:
        raise SystemExit(
            f"{src}: images are {h}x{w}; the encoders expect square images (pass --image_size)"
        )
    if (
        args.image_size is not None and h != args.image_size
    ):  # a store passed as --data is opened as it is
        raise SystemExit(
            f"{src}: a store of {h}x{w} images, but {args.image_size}x{args.image_size} are needed "
            f"(convert the source again with --image_size {args.image_size})"
        )
    if store.num_transitions("train") == 0:
        raise SystemExit(
            f"{src}: no training trajectories found (is it a Bridge-format tree of out.npy files?)"
        )
    return store


def store_task_ids(store, task_names, src):
    """Global one-hot index of each task of a store, by name; a task the checkpoint
    never saw is an error."""
    ids = []
    for name in store.task_names:
        if name not in task_names:
            raise SystemExit(
                f"{src}: task {name!r} is not among the checkpoint's {len(task_names)} tasks "
                f"(use the same --include/--exclude/--aliases as in pre-training)"
            )
        ids.append(task_names.index(name))
    return np.asarray(ids, dtype=np.int64)


# ----------------------------------------------------------------------------- the run folder


class RunLog:
    """progress.csv + one stdout line every --log_every steps (+ TensorBoard when asked).
    Rank 0 only."""

    def __init__(self, out, total_steps, start_step, enabled=True, tensorboard=False):
        self.out, self.total, self.enabled = out, total_steps, enabled
        self.t0, self.step0 = time.time(), start_step
        self.path = os.path.join(out, "progress.csv")
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


def write_config(out, args, extra):
    config = {k: v for k, v in vars(args).items()}
    config.update(extra)
    atomic_write_text(
        json.dumps(config, indent=2, sort_keys=True, default=str) + "\n",
        os.path.join(out, "config.json"),
    )


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


def prune_checkpoints(out, keep_last, keep_steps=()):
    """Retention (--keep_last, --keep_steps): delete what runfolder.steps_to_delete names."""
    ckpts = dict(list_checkpoints(out))
    for step in steps_to_delete(list(ckpts), keep_last, keep_steps):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(ckpts[step])


# ----------------------------------------------------------------------------- distributed


def init_distributed(device):
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; a plain `python train.py` runs as rank 0 of 1."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def _distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def assert_ranks_in_sync(agent):
    """Ranks that drifted apart would silently train different networks: compare a checksum of the
    weights (parameters only: BatchNorm statistics are per rank by design)."""
    if not _distributed():
        return
    total = sum(p.detach().double().sum() for net in agent.nets.values() for p in net.parameters())
    sums = torch.tensor(
        [float(total)], dtype=torch.float64, device=agent.device
    )  # nccl reduces CUDA tensors only
    gathered = [torch.zeros_like(sums) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, sums)
    values = [float(g) for g in gathered]
    if max(values) - min(values) > 1e-6 * max(1.0, abs(values[0])):
        raise RuntimeError(f"ranks hold different weights after training (checksums {values})")


# ----------------------------------------------------------------------------- the loop


def check_finite(info, step):
    """One device sync per step (a single stacked check); the loop over names runs
    only after a failure."""
    if bool(torch.isfinite(torch.stack([v.float() for v in info.values()])).all()):
        return
    for name, value in info.items():
        if not math.isfinite(float(value)):
            raise FloatingPointError(
                f"{name} became {float(value)} at step {step}; the run stops here and the "
                f"last good checkpoint stays (lower the learning rates or alpha)"
            )


def train_step(agent, sampler, batch_size, step):
    """The one gradient step of every phase (pre-training, offline and online fine-tuning): sample a
    batch, move and augment it (prepare_batch), update every network, stop on a non-finite value.
    `step` is the number this update will have, for the error message. Returns the update's info
    (0-d tensors)."""
    info = agent.update(prepare_batch(sampler.sample(batch_size), agent.device))
    check_finite(info, step)
    return info


class StopFlag:
    """Ctrl-C (SIGINT) or a job scheduler's SIGTERM: stop at the next step boundary (never
    mid-update) and save; a second signal aborts at once (KeyboardInterrupt). Installed in the main
    thread only."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self.signum = None
        self._previous = {}

    def __enter__(self):
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.signum = signum
        print(
            f"\n{signal.Signals(signum).name}: stopping at the next step and saving "
            f"(a second signal aborts without saving)",
            file=sys.stderr,
        )

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)

    @property
    def exit_status(self):
        """What a shell reports for a process that signal ended: 130 SIGINT, 143 SIGTERM."""
        return 128 + (self.signum or signal.SIGINT)


def build_checkpoint(payload, step, agent, sampler_state, rng, **extra):
    """The one checkpoint dict of every phase (load_checkpoint reads it back): the run's fixed
    fields (payload: task names, action bounds, ...), the format, the step, the agent (networks,
    optimizers, config), the sampler's and torch's random state; online.py adds its loop state in
    `extra`."""
    return dict(
        payload,
        format=CKPT_FORMAT,
        step=step,
        agent=agent.state_dict(),
        sampler=sampler_state,
        rng=rng,
        **extra,
    )


def train_loop(agent, sampler, args, payload, start_step=0, on_save=None, rank=0):
    """Shared by pre-training and offline fine-tuning: train_step, log, checkpoint, retention.

    payload: the checkpoint's fixed fields (task names, action bounds, ...); each checkpoint adds
    the step, the agent, the sampler's RNG and torch's RNG, which is all an exact resume needs.
    A checkpoint saved because the run was stopped (Ctrl-C, SIGTERM) off the --save_every schedule
    is a point to resume from, not a result: it is marked stopped=True and on_save (finetune.py's
    Q-value traces, hence select_ckpt.py's candidates) skips it, so an interrupted run offers the
    candidates of an uninterrupted one.
    """
    log = RunLog(args.out, args.steps, start_step, enabled=rank == 0, tensorboard=args.tensorboard)

    def save(step, all_ranks=True, stopped=False):
        # every rank's random streams, so that a torchrun resume stays exact and data-parallel;
        # gathering is a collective, skipped when stopping (one rank may be interrupted alone)
        mine = {
            "sampler": sampler.state_dict(),
            "rng": capture_rng(),
            "generator": agent.generator.get_state(),
        }
        states = [mine]
        if all_ranks and _distributed():
            states = [None] * dist.get_world_size()
            dist.all_gather_object(states, mine)
        if rank == 0:
            ckpt = build_checkpoint(
                payload,
                step,
                agent,
                mine["sampler"],
                mine["rng"],
                rank_states=states,
                stopped=stopped,
            )
            atomic_torch_save(ckpt, os.path.join(args.out, CKPT_PATTERN.format(step)))
            if on_save is not None and not stopped:
                on_save(step)
            prune_checkpoints(args.out, args.keep_last, args.keep_steps)

    def save_on_stop(step):
        if step > start_step and not os.path.exists(
            os.path.join(args.out, CKPT_PATTERN.format(step))
        ):
            save(step, all_ranks=False, stopped=True)

    step = start_step
    with StopFlag() as stop:
        try:
            while step < args.steps:
                info = train_step(agent, sampler, args.batch_size, step + 1)
                step += 1
                if step % args.log_every == 0 or step == args.steps:
                    log.log(step, info)
                if step % args.save_every == 0 or step == args.steps:
                    save(step)
                if stop.requested:
                    save_on_stop(step)
                    print(f"stopped at step {step}; resume with --resume", file=sys.stderr)
                    raise SystemExit(stop.exit_status)
        except KeyboardInterrupt:
            # a second signal: `step` counts the updates that finished, the point to resume from
            save_on_stop(step)
            print(f"interrupted at step {step}; resume with --resume", file=sys.stderr)
            raise SystemExit(EXIT_INTERRUPTED) from None
    assert_ranks_in_sync(agent)
    return step


def resume_state(args, payload_check):
    """Newest checkpoint of --out when --resume is given (and exists), else None."""
    ckpts = list_checkpoints(args.out)
    if not (args.resume and ckpts):
        return None
    step, path = ckpts[-1]
    ckpt = load_checkpoint(path)
    check_compatible(ckpt, path, payload_check)
    print(f"resuming {path} at step {step}")
    return ckpt


def restore_run(ckpt, agent, sampler, rank=0):
    """Weights, optimizers and this rank's random streams. A rank the checkpoint has no streams
    for (a Ctrl-C checkpoint of a torchrun run, or more processes than before) keeps its fresh
    seed + rank streams: still data-parallel, no longer bit-exact."""
    agent.load_state_dict(ckpt["agent"])
    states = ckpt.get("rank_states") or [{"sampler": ckpt["sampler"], "rng": ckpt["rng"]}]
    if rank < len(states):
        sampler.load_state_dict(states[rank]["sampler"])
        restore_rng(states[rank]["rng"])
        if "generator" in states[rank]:
            agent.generator.set_state(states[rank]["generator"])
    else:
        agent.generator.manual_seed(agent.cfg.seed + rank + ckpt["step"])
    return ckpt["step"]


# ----------------------------------------------------------------------------- CLI

# The ranges of add_run_args' counts (cli.check_flags): a batch of no sample cannot be drawn, and a
# checkpoint or a progress row every 0 steps divides by zero.
RUN_RULES = {"--batch_size": POSITIVE, "--save_every": POSITIVE, "--log_every": POSITIVE}


def add_run_args(
    p, steps, save_every, keep_last, log_every=100, out=None, unit="gradient steps", steps_flags=()
):
    """Options of every training phase (pre-training, offline and online fine-tuning); the phase
    gives its defaults (keep_last: pre-training keeps its newest few, fine-tuning all, for
    select_ckpt.py) and what it counts (online fine-tuning: environment steps, also spelt
    --env_steps)."""
    p.add_argument("--out", default=out, help=f"run folder (default {out or 'runs/<name>'})")
    p.add_argument(
        *steps_flags, "--steps", dest="steps", type=int, default=steps, help=f"{unit} in total"
    )
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--save_every", type=int, default=save_every, help=f"a checkpoint every N {unit}"
    )
    p.add_argument(
        "--keep_last",
        type=int,
        default=keep_last,
        help=f"keep the newest N checkpoints, delete older ones (0: keep all; default {keep_last})",
    )
    p.add_argument(
        "--keep_steps",
        type=int,
        nargs="*",
        default=[],
        help="checkpoints (by step) that --keep_last never deletes",
    )
    p.add_argument(
        "--log_every", type=int, default=log_every, help=f"a progress row every N {unit}"
    )
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its newest checkpoint"
    )
    p.add_argument(
        "--tensorboard", action="store_true", help="also log to TensorBoard (needs tensorboard)"
    )


def add_data_args(p):
    p.add_argument(
        "--image_size", type=int, default=None, help="resize images (default: the data's size, 128)"
    )
    p.add_argument("--camera", default="images0", help="images0 | images1 | images2 | all")
    p.add_argument(
        "--include", nargs="*", default=(), help="keep only paths containing one of these words"
    )
    p.add_argument(
        "--exclude", nargs="*", default=(), help="drop paths containing one of these words"
    )
    p.add_argument("--aliases", default=None, help="JSON file mapping task names to merged names")
    p.add_argument(
        "--skip_bad", action="store_true", help="skip malformed trajectories instead of stopping"
    )


# Set by the data (num_tasks, image_size) or by the run options (seed), not by a learner flag.
AGENT_FIELDS_FROM_RUN = ("num_tasks", "image_size", "seed")
AGENT_CHOICES = {"algo": ALGOS, "arch": ARCHS, "head": HEADS, "norm": NORMS}


def add_agent_args(p):
    """The learner's options, one flag per AgentConfig field, generated from the dataclass (defaults
    and help written once there: the paper's, Table X). --action_input_only is Table XIV's ablation
    flag."""
    g = p.add_argument_group("learner (AgentConfig)")
    add_dataclass_args(g, AgentConfig, skip=AGENT_FIELDS_FROM_RUN, choices=AGENT_CHOICES)
    g.add_argument(
        "--action_input_only",
        dest="action_every_layer",
        action="store_false",
        help="ablation: action at the first Q layer only (= --no-action_every_layer)",
    )


def _override_fields(skip):
    """The AgentConfig fields a fine-tuning phase may change: none that fixes a network shape."""
    skip = (*STRUCTURE, *AGENT_FIELDS_FROM_RUN, *skip)
    return [f.name for f in dataclasses.fields(AgentConfig) if f.name not in skip]


def add_learner_overrides(p, skip=()):
    """Fine-tuning phases: a flag per AgentConfig field that does not fix a network shape (nor is in
    skip), whose default is the checkpoint's value (None here: not given)."""
    g = p.add_argument_group("learner (AgentConfig; default: the checkpoint's)")
    fields = _override_fields(skip)
    add_dataclass_args(
        g,
        AgentConfig,
        skip=[f.name for f in dataclasses.fields(AgentConfig) if f.name not in fields],
        choices=AGENT_CHOICES,
        defaults=dict.fromkeys(fields),
        default_help="the checkpoint's",
    )


def learner_overrides(args, skip=()):
    """{field: value} of the flags add_learner_overrides(p, skip) added that were given."""
    return {k: getattr(args, k) for k in _override_fields(skip) if getattr(args, k) is not None}


def agent_config(args, num_tasks, image_size):
    return dataclass_from_args(
        AgentConfig, args, num_tasks=num_tasks, image_size=image_size, seed=args.seed
    )


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--data", required=True, help="Bridge-format tree, task folder, out.npy or built store"
    )
    p.add_argument(
        "--store", default=None, help="where to build the store (default: inside --data)"
    )
    p.add_argument(
        "--target", default=None, help="joint training: also sample this target task data"
    )
    p.add_argument(
        "--mix",
        type=float,
        default=MIX_TAU,
        help="tau: fraction of each batch from --data with --target",
    )
    p.add_argument(
        "--target_task",
        default="new",
        help="'new' one-hot slot, or an existing task name to re-target",
    )
    p.add_argument(
        "--extra_tasks", type=int, default=0, help="one-hot slots reserved for future target tasks"
    )
    add_run_args(p, steps=500_000, save_every=20_000, keep_last=PRETRAIN_KEEP_LAST)
    p.add_argument(
        "--compile",
        nargs="?",
        const="default",
        default=None,
        choices=COMPILE_MODES,
        help="torch.compile the update; --compile reduce-overhead also replays CUDA graphs",
    )
    p.add_argument(
        "--prefetch",
        action="store_true",
        help="draw batches in a background thread (into pinned memory on CUDA)",
    )
    p.add_argument(
        "--raw_state",
        action="store_true",
        help="feed the policy the state unnormalized (ablation)",
    )
    add_data_args(p)
    add_agent_args(p)
    args = p.parse_args(argv)
    check_flags(args, {**RUN_RULES, "--mix": FRACTION})
    args.out = args.out or os.path.join(
        "runs", f"{args.algo}_{args.arch}_{os.path.basename(os.path.normpath(args.data))}"
    )

    rank, world, device = init_distributed(args.device)
    with contextlib.ExitStack() as owned:
        if rank == 0:  # rank 0 writes the run folder, so it owns it
            owned.enter_context(claim_run_folder(args.out, args.resume))
        elif world > 1:
            # rank 0 converts the data first; the other ranks then open the cached stores
            dist.barrier()
        train(args, rank, world, device)


def train(args, rank, world, device):
    """Pre-training (or joint training) in a run folder this process owns: open the data, build or
    resume the agent, run train_loop."""
    prior = open_store(args.data, args, args.store)
    task_names = list(prior.task_names) + [RESERVED_TASK.format(i) for i in range(args.extra_tasks)]
    sampler = Sampler(prior, "train", gamma=args.gamma, seed=args.seed + rank)
    data = source_record("--data", args.data, prior)  # what --resume must find again
    target_ids = None
    if args.target:
        target = open_store(args.target, args, prior=False)
        data.update(source_record("--target", args.target, target))
        data.update({"--target_task": args.target_task, "--mix": args.mix})
        ids, _ = target_task_ids(prior.task_names, target.task_names, args.target_task)
        target_ids = [int(i) for i in ids]
        # fresh slots right after the prior tasks, before any reserved ones
        if args.target_task == "new":
            task_names[len(prior.task_names) : len(prior.task_names)] = target.task_names
        t_sampler = Sampler(
            target,
            "train",
            gamma=args.gamma,
            task_ids=ids,
            action_low=prior.action_low,
            action_high=prior.action_high,
            seed=args.seed + 7919 + rank,
        )
        sampler = MixedSampler([sampler, t_sampler], [args.mix, 1.0 - args.mix])
    if args.prefetch:
        sampler = Prefetcher(sampler, args.batch_size)

    if world > 1 and rank == 0:
        dist.barrier()
    torch.backends.cudnn.benchmark = (
        True  # fixed image and batch sizes: let cuDNN pick the fastest convs once
    )
    cfg = agent_config(args, len(task_names), prior.image_size[0])
    agent = Agent(cfg, device=device)  # initialised from cfg.seed: the same weights on every rank
    if not args.raw_state:  # the prior data's statistics (a resumed run loads the ones it saved)
        agent.set_state_statistics(*prior.state_statistics("train"))
    if args.compile:
        agent.compile(args.compile)
    torch.manual_seed(args.seed + rank)  # augmentation differs per rank
    payload = {
        "kind": "pretrain",
        "task_names": task_names,
        "action_low": [float(x) for x in prior.action_low],
        "action_high": [float(x) for x in prior.action_high],
        "data": data,
        "args": {
            k: v
            for k, v in vars(args).items()
            if isinstance(v, (int, float, str, bool, type(None)))
        },
    }
    if target_ids is not None:
        # joint training (COG, BC joint): the target's slots, so online.py evaluates
        # the target by default
        payload["target_task_ids"] = target_ids
    start = 0
    ckpt = resume_state(args, {k: getattr(cfg, k) for k in STRUCTURE})
    if ckpt is not None:
        check_same_data(ckpt, args.out, data)
        start = restore_run(ckpt, agent, sampler, rank)
    if rank == 0:
        write_config(
            args.out,
            args,
            {
                "num_tasks": len(task_names),
                "world_size": world,
                "image_size": cfg.image_size,
                "store": prior.path,
                "task_names": task_names,
            },
        )
        print(
            f"{len(prior.task_names)} tasks, {prior.num_transitions('train')} transitions, "
            f"{world} process(es), {cfg.arch} at {cfg.image_size}px on {device}"
        )
    try:
        train_loop(agent, sampler, args, payload, start_step=start, rank=rank)
        if world > 1:
            dist.barrier()  # no rank tears its connections down while another still talks on them
    finally:
        if world > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    run_cli(main)
