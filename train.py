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

The run folder (--out, runfolder.py) holds config.json (every resolved option), progress.csv, and
ckpt_<step>.pt files (checkpoint.py) written atomically every --save_every steps; --resume continues
from the newest checkpoint with the same result as an uninterrupted run (step, optimizers, sampler
and torch RNG state), and refuses data other than the checkpoint's (checkpoint.check_same_data).
This file also holds what every training phase shares, so that a run of any phase looks the same on
disk: opening a store (data.py's DataOptions), the data-parallel setup, the gradient step and the
loop (train_step, train_loop with its RunConfig), and the flags of the run and the learner (the
data's come from data.add_data_args, as those of `data.py convert` do).
A level-4 file (SPEC section 2); finetune.py and online.py build on it.
"""

import argparse
import contextlib
import dataclasses
import math
import os
import signal
import sys
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist

from batches import (
    RESERVED_TASK,
    MixedSampler,
    Prefetcher,
    Sampler,
    assign_target_slots,
    augment,
)
from checkpoint import (
    build_checkpoint,
    capture_rng,
    check_same_data,
    restore_run,
    resume_state,
    run_payload,
    save_checkpoint,
    source_record,
)
from cli import (
    EXIT_INTERRUPTED,
    FRACTION,
    POSITIVE,
    add_dataclass_args,
    check_flags,
    dataclass_from_args,
    run_cli,
)
from cql import ALGOS, COMPILE_MODES, STRUCTURE, Agent, AgentConfig
from data import DataOptions, add_data_args, load_store
from model import ARCHS, HEADS, NORMS
from runfolder import CKPT_PATTERN, RunLog, claim_run_folder, write_config

PRETRAIN_KEEP_LAST = 5  # ours: a pre-training run keeps its 5 newest checkpoints
MIX_TAU = 0.9  # fraction of each batch from the prior data (SPEC section 3; paper 0.7-0.9)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What train_loop needs of a run: the flags of add_run_args, which give the defaults."""

    out: str  # the run folder
    steps: int  # the step count the run ends at
    batch_size: int
    save_every: int  # a checkpoint every N steps, and at the last
    log_every: int  # a progress row every N steps, and at the last
    keep_last: int  # retention: the newest N checkpoints stay (0: all)
    keep_steps: Sequence[int]  # checkpoints (by step) that retention never deletes
    tensorboard: bool  # also log to TensorBoard


# ----------------------------------------------------------------------------- batches and stores


def prepare_batch(batch, device):
    """Move a CPU batch to the device and augment both images (random crop + color
    jitter, Appendix B)."""
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    batch["obs"] = augment(batch["obs"])
    batch["next_obs"] = augment(batch["next_obs"])
    return batch


def open_store(src, options: DataOptions, store_dir=None, prior=True):
    """Build (first time) and open a store (options: data.DataOptions, the flags of
    data.add_data_args); include, exclude and aliases select the prior data only."""
    store = load_store(
        src,
        store=store_dir,
        image_size=options.image_size,
        camera=options.camera,
        include=options.include if prior else (),
        exclude=options.exclude if prior else (),
        aliases=options.aliases if prior else None,
        skip_bad=options.skip_bad,
    )
    h, w = store.image_size
    if h != w:
        raise SystemExit(
            f"{src}: images are {h}x{w}; the encoders expect square images (pass --image_size)"
        )
    size = options.image_size
    if size is not None and h != size:  # a store passed as --data is opened as it is
        raise SystemExit(
            f"{src}: a store of {h}x{w} images, but {size}x{size} are needed "
            f"(convert the source again with --image_size {size})"
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
    mid-update) and save; a second signal interrupts at once (KeyboardInterrupt), and the loop
    keeps what it can (train_loop: a checkpoint of the updates that finished; the online loop:
    the checkpoints it saved before). Installed in the main thread only."""

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
            f"(a second signal interrupts at once)",
            file=sys.stderr,
        )

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)

    @property
    def exit_status(self):
        """What a shell reports for a process that signal ended: 130 SIGINT, 143 SIGTERM."""
        return 128 + (self.signum or signal.SIGINT)


def train_loop(agent, sampler, run, payload, start_step=0, on_save=None, rank=0):
    """Shared by pre-training and offline fine-tuning: train_step, log, checkpoint, retention.

    run: the RunConfig (folder, step count, batch size, schedules, retention). payload: the
    checkpoint's fixed fields (task names, action bounds, ...); each checkpoint adds
    the step, the agent, the sampler's RNG and torch's RNG, which is all an exact resume needs.
    A checkpoint saved because the run was stopped (Ctrl-C, SIGTERM) off the --save_every schedule
    is a point to resume from, not a result: it is marked stopped=True and on_save (finetune.py's
    Q-value traces, hence select_ckpt.py's candidates) skips it, so an interrupted run offers the
    candidates of an uninterrupted one.
    """
    log = RunLog(run.out, run.steps, start_step, enabled=rank == 0, tensorboard=run.tensorboard)

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
            save_checkpoint(ckpt, run, on_save=None if stopped else on_save)

    def save_on_stop(step):
        if step > start_step and not os.path.exists(
            os.path.join(run.out, CKPT_PATTERN.format(step))
        ):
            save(step, all_ranks=False, stopped=True)

    step = start_step
    with StopFlag() as stop:
        try:
            while step < run.steps:
                info = train_step(agent, sampler, run.batch_size, step + 1)
                step += 1
                if step % run.log_every == 0 or step == run.steps:
                    log.log(step, info)
                if step % run.save_every == 0 or step == run.steps:
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
    options = dataclass_from_args(DataOptions, args)
    prior = open_store(args.data, options, args.store)
    task_names = list(prior.task_names)
    sampler = Sampler(prior, "train", gamma=args.gamma, seed=args.seed + rank)
    data = source_record("--data", args.data, prior)  # what --resume must find again
    target_ids = None
    if args.target:
        target = open_store(args.target, options, prior=False)
        data.update(source_record("--target", args.target, target))
        data.update({"--target_task": args.target_task, "--mix": args.mix})
        target_ids, task_names = assign_target_slots(
            task_names, target.task_names, args.target_task
        )
        t_sampler = Sampler(
            target,
            "train",
            gamma=args.gamma,
            task_ids=target_ids,
            action_low=prior.action_low,
            action_high=prior.action_high,
            seed=args.seed + 7919 + rank,
        )
        sampler = MixedSampler([sampler, t_sampler], [args.mix, 1.0 - args.mix])
    # the reserved slots come after the prior tasks and any new target task
    task_names += [RESERVED_TASK.format(i) for i in range(args.extra_tasks)]
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
    scalars = (int, float, str, bool, type(None))
    fields = {"data": data, "args": {k: v for k, v in vars(args).items() if isinstance(v, scalars)}}
    if target_ids is not None:
        # joint training (COG, BC joint): the target's slots, so online.py evaluates the target by
        # default
        fields["target_task_ids"] = target_ids
    payload = run_payload("pretrain", task_names, prior.action_low, prior.action_high, **fields)
    start = 0
    ckpt = resume_state(args.out, args.resume, {k: getattr(cfg, k) for k in STRUCTURE})
    if ckpt is not None:
        check_same_data(ckpt, args.out, data)
        start = restore_run(ckpt, agent, sampler, rank)
    if rank == 0:
        derived = {
            "num_tasks": len(task_names),
            "world_size": world,
            "image_size": cfg.image_size,
            "store": prior.path,
            "task_names": task_names,
        }
        write_config(args.out, {**vars(args), **derived})
        print(
            f"{len(prior.task_names)} tasks, {prior.num_transitions('train')} transitions, "
            f"{world} process(es), {cfg.arch} at {cfg.image_size}px on {device}"
        )
    try:
        run = dataclass_from_args(RunConfig, args)
        train_loop(agent, sampler, run, payload, start_step=start, rank=rank)
        if world > 1:
            dist.barrier()  # no rank tears its connections down while another still talks on them
    finally:
        if world > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    run_cli(main)
