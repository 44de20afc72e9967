"""PTR phase 2: offline fine-tuning on a handful of target demonstrations (paper
Section IV-A, "Phase 2").

    python finetune.py --ckpt runs/pre/ckpt_00500000.pt --prior bridge/ --target my_task/ \
        --task new --mix 0.9 --steps 50000 --save_every 5000 --out runs/ft_my_task

The very same learner resumes on batches that mix a fraction tau (--mix) of prior data with 1 - tau
of target data, so the few target transitions are seen often without forgetting the prior
(Section IV-A). The target task either takes a fresh one-hot slot (--task new; a slot reserved at
pre-training with --extra_tasks is used first, otherwise the one-hot input grows) or re-targets an
existing task (--task put_sushi_in_pot). --algo bc | awbc gives the baselines (BC finetune from a BC
checkpoint; advantage-weighted BC, Table IX).

Every --save_every steps a checkpoint and the Q-values of both heads along every held-out target
trajectory (the target's val split) are written to the run folder; select_ckpt.py ranks checkpoints
from them (Section IV-B, "Cross-validation during offline fine-tuning", Figure 3). A checkpoint
saved when the run is stopped (Ctrl-C, SIGTERM) gets none: it is for --resume only, so
select_ckpt.py never offers it. --resume refuses other data, --mix or --task than the run's.
"""

import argparse
import dataclasses
import json
import math
import os
import sys

import numpy as np
import torch

from batches import MixedSampler, Sampler, assign_target_slots, is_reserved
from checkpoint import (
    CheckpointError,
    agent_from_checkpoint,
    agent_from_state,
    agent_state,
    check_same_data,
    ckpt_config,
    load_checkpoint,
    restore_run,
    resume_state,
    run_payload,
    source_ckpt,
    source_record,
)
from cli import FRACTION, check_flags, dataclass_from_args, run_cli
from cql import ALGO_FAMILY
from data import DataOptions, add_data_args
from fileio import atomic_write_text
from runfolder import (
    QTRACE_PATTERN,
    VALLOSS_PATTERN,
    claim_run_folder,
    list_checkpoints,
    write_config,
)
from train import (
    MIX_TAU,
    RUN_RULES,
    RunConfig,
    add_learner_overrides,
    add_run_args,
    learner_overrides,
    open_store,
    store_task_ids,
    train_loop,
)

FINETUNE_KEEP_LAST = 0  # every checkpoint stays: select_ckpt.py chooses among them (Section IV-B)


def q_traces(agent, sampler, traj_ids):
    """Q(s_t, a_t) of both heads along whole held-out trajectories, with the rewards and
    MC returns beside them."""
    traces = []
    for tid in traj_ids:
        traj = sampler.trajectory(int(tid))
        batch = {k: v.to(agent.device) for k, v in traj.items()}
        q = agent.q_values(batch).float().cpu()
        assert q.shape == (len(traj["reward"]), 2), q.shape
        traces.append(
            {
                "traj_id": int(tid),
                "q": q.T.tolist(),
                "reward": traj["reward"].tolist(),
                "mc_return": traj["mc_return"].tolist(),
            }
        )
    return traces


def non_finite_traces(traces):
    """[(traj_id, head, time step)] of each trajectory's first non-finite Q-value."""
    found = []
    for t in traces:
        for head, q in enumerate(t["q"]):
            bad = [i for i, v in enumerate(q) if not math.isfinite(v)]
            if bad:
                found.append((t["traj_id"], head, bad[0]))
                break
    return found


def write_q_traces(agent, sampler, traj_ids, step, out, task):
    """qvalues_<step>.json beside ckpt_<step>.pt. Non-finite Q-values are written as they are (NaN
    in the JSON), with a warning: select_ckpt.py then refuses that checkpoint and says why."""
    traces = q_traces(agent, sampler, traj_ids)
    for traj_id, head, t in non_finite_traces(traces):
        print(
            f"warning: step {step}: Q-values of held-out trajectory {traj_id} are not finite (head "
            f"{head}, time step {t}); select_ckpt.py will not choose this checkpoint. A NaN or inf "
            f"action or state in the target's val data gives this",
            file=sys.stderr,
        )
    doc = {"step": step, "task": task, "trajectories": traces}
    held_out = concat_trajectories(sampler, traj_ids, agent.device)
    doc["diagnostics"] = {
        # a value that is far from the return where the task is half done cannot steer a policy
        "q_minus_mc_at_t0": float(
            np.mean([min(t["q"][0][0], t["q"][1][0]) - t["mc_return"][0] for t in traces])
        ),
        **agent.critic_diagnostics(held_out),
    }
    atomic_write_text(json.dumps(doc) + "\n", os.path.join(out, QTRACE_PATTERN.format(step)))


def concat_trajectories(sampler, traj_ids, device):
    """Every transition of the held-out trajectories as one batch on device."""
    parts = [sampler.trajectory(int(tid)) for tid in traj_ids]
    return {k: torch.cat([p[k] for p in parts]).to(device) for k in parts[0]}


def write_val_loss(agent, sampler, traj_ids, step, out):
    """valloss_<step>.json beside ckpt_<step>.pt: the acting policy's imitation error on the
    held-out target demos (Agent.validation_loss), which select_ckpt.py --by val_loss ranks (the
    paper's rule for the BC baselines)."""
    value, metric = agent.validation_loss(concat_trajectories(sampler, traj_ids, agent.device))
    doc = {"step": step, "val_loss": value, "metric": metric}
    atomic_write_text(json.dumps(doc) + "\n", os.path.join(out, VALLOSS_PATTERN.format(step)))


def write_missing_q_traces(out, val_sampler, val_ids, task, device):
    """A kill between a checkpoint's rename and its trace leaves a checkpoint select_ckpt.py never
    lists: a resume computes the trace of every checkpoint that lacks one, from that checkpoint's
    own weights. A checkpoint saved when the run was stopped has none on purpose (train_loop)."""
    for step, path in list_checkpoints(out):
        if os.path.exists(os.path.join(out, QTRACE_PATTERN.format(step))):
            continue
        ckpt = load_checkpoint(path)
        if ckpt.get("stopped"):
            continue
        agent = agent_from_checkpoint(ckpt, device, path)
        write_q_traces(agent, val_sampler, val_ids, step, out, task)
        print(f"wrote the missing Q-value trace of {path}")


def target_slots(agent, task_names, target_names, task):
    """The target's one-hot slots in a checkpoint whose tasks are task_names (--task: 'new' or a
    task to re-target; batches.assign_target_slots), with the agent's one-hot widened where the new
    slots need it (cql.Agent.grow_tasks). Returns (global index of each target task, the task
    names after the assignment)."""
    real = [n for n in task_names if not is_reserved(n)]
    if task != "new" and task not in real:
        raise SystemExit(f"--task {task!r}: not a task of the checkpoint; its tasks are {real}")
    target_ids, names = assign_target_slots(task_names, target_names, task)
    if len(names) > agent.cfg.num_tasks:
        agent.grow_tasks(len(names))
    return target_ids, names


def target_assignment(source, source_path, target, agent, task):
    """(task names, target one-hot ids) of a run that starts from the checkpoint `source` (online.py
    finetune): a fine-tuned (or online) checkpoint keeps its own, for the same target tasks only; a
    pre-trained one gives the target its slots (target_slots, growing the one-hot if needed)."""
    if "target_task_ids" in source:
        if list(source["target_tasks"]) != list(target.task_names):
            raise SystemExit(
                f"{source_path} was fine-tuned on {source['target_tasks']}, but --target holds "
                f"{list(target.task_names)}"
            )
        return list(source["task_names"]), list(source["target_task_ids"])
    target_ids, names = target_slots(agent, source["task_names"], target.task_names, task)
    return names, target_ids


def finetune_config(cfg, overrides):
    """Phase 2's learner (Section IV-A): the checkpoint's AgentConfig with the learner flags given
    here, e.g. --alpha 5, or --algo awbc to start advantage-weighted BC from a PTR checkpoint. BC,
    Gaussian BC and the critic-based learners have different networks, so --algo cannot cross
    between them."""
    new = dataclasses.replace(cfg, **overrides)
    if ALGO_FAMILY[new.algo] != ALGO_FAMILY[cfg.algo]:
        raise SystemExit(
            f"--algo {new.algo} cannot fine-tune a {cfg.algo} checkpoint (BC, Gaussian BC and CQL "
            f"learners have different networks)"
        )
    return new


def imitation_learner(agent, path):
    """Filtered BC's learner (online.py --filtered_bc): the checkpoint's acting policy trained by
    imitation alone, no critic. A CQL checkpoint's tanh-Gaussian actor becomes a Gaussian BC agent
    (algo gbc: likelihood and entropy temperature), an AW-BC checkpoint's BC policy a BC agent
    (MSE); weights, optimizer moments, update count and sampling generator are kept. A BC or
    Gaussian BC agent already is one."""
    if agent.critic is None:
        return agent
    algo, nets, optimizers = ("gbc", ["policy"], ["actor", "temp"])
    if agent.cfg.algo == "awbc":  # act() uses its BC policy
        algo, nets, optimizers = ("bc", ["bc_policy"], ["bc"])
    saved = agent_state(agent)
    saved["config"]["algo"] = algo
    saved["nets"] = {k: saved["nets"][k] for k in nets}
    saved["optimizers"] = {k: saved["optimizers"][k] for k in optimizers}
    print(f"{path}: filtered BC trains its {agent.cfg.algo} actor as {algo}, without the critic")
    return agent_from_state(saved, agent.device)


def open_run(out, resume, ckpt, prior, target, data, prior_store=None, target_store=None):
    """What a fine-tuning run starts from (offline here, online in online.py): the checkpoint
    (ckpt, or with resume the newest in out), and the prior and target stores opened at its image
    size (data: the DataOptions of the flags; an image_size there must be the checkpoint's).
    Returns (the resumed checkpoint or None, the source checkpoint, its path, prior store, target
    store, the image size). The caller owns out already (runfolder.claim_run_folder)."""
    resumed = resume_state(out, resume, {})
    if resumed is None and not ckpt:
        raise SystemExit(
            f"--resume: {out} holds no checkpoint yet; pass --ckpt to start the fine-tuning"
        )
    source = resumed if resumed is not None else load_checkpoint(ckpt)
    source_path = ckpt or out
    size = ckpt_config(source)["image_size"]
    if data.image_size is not None and data.image_size != size:
        raise CheckpointError(
            f"{source_path}: checkpoint has image_size={size} but --image_size is {data.image_size}"
        )
    options = dataclasses.replace(data, image_size=size)
    target_store_ = open_store(target, options, target_store, prior=False)
    prior_store_ = open_store(prior, options, prior_store)
    return resumed, source, source_path, prior_store_, target_store_, size


def open_run_from_flags(args):
    """open_run with the flags of finetune.py and online.py finetune."""
    return open_run(
        args.out,
        args.resume,
        args.ckpt,
        args.prior,
        args.target,
        dataclass_from_args(DataOptions, args),
        args.prior_store,
        args.target_store,
    )


def run_data(args, prior, target):
    """What a fine-tuning run trains on, kept in its checkpoints so that --resume refuses other data
    (checkpoint.check_same_data): both sources, the batch mix and the target's slot."""
    return {
        **source_record("--prior", args.prior, prior),
        **source_record("--target", args.target, target),
        "--mix": args.mix,
        "--task": args.task,
    }


def task_samplers(prior, target, names, target_ids, source, gamma, seed, prior_src):
    """Train-split samplers of the prior and the target data: global task ids, the
    checkpoint's action bounds."""
    kw = dict(gamma=gamma, action_low=source["action_low"], action_high=source["action_high"])
    return (
        Sampler(prior, "train", task_ids=store_task_ids(prior, names, prior_src), seed=seed, **kw),
        Sampler(target, "train", task_ids=target_ids, seed=seed + 7919, **kw),
    )


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--ckpt", default=None, help="pre-trained checkpoint (not needed with --resume)")
    p.add_argument("--prior", required=True, help="the prior (pre-training) data")
    p.add_argument(
        "--target", required=True, help="the target task's demonstrations (Bridge format)"
    )
    p.add_argument(
        "--mix", type=float, default=MIX_TAU, help="tau: fraction of each batch from the prior data"
    )
    p.add_argument(
        "--task",
        default="new",
        help="'new' (fresh one-hot slot) or an existing task name (re-target)",
    )
    p.add_argument(
        "--zero_target_slot",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a slot reserved at pre-training starts with zero input weights, as a slot "
        "grow_tasks adds does (--no-zero_target_slot: its untrained random ones)",
    )
    p.add_argument("--prior_store", default=None)
    p.add_argument("--target_store", default=None)
    add_run_args(p, steps=50_000, save_every=5_000, keep_last=FINETUNE_KEEP_LAST)
    add_data_args(p)
    add_learner_overrides(p)
    args = p.parse_args(argv)
    if not args.out:
        args.out = os.path.join("runs", "ft_" + os.path.basename(os.path.normpath(args.target)))
    if not args.resume and not args.ckpt:
        p.error("--ckpt is required (or --resume with an --out folder that holds checkpoints)")
    check_flags(args, {**RUN_RULES, "--mix": FRACTION})

    if (
        int(os.environ.get("WORLD_SIZE", "1")) > 1
    ):  # 10 demos fit one GPU; only train.py is parallel
        raise SystemExit("finetune.py runs in a single process: start it with python, not torchrun")
    with claim_run_folder(args.out, args.resume):
        finetune(args)


def finetune(args):
    """Offline fine-tuning in a run folder this process owns (module docstring)."""
    device = args.device
    resumed, source, source_path, prior, target, size = open_run_from_flags(args)
    data = run_data(args, prior, target)
    if resumed is not None:
        check_same_data(resumed, args.out, data)
    agent = agent_from_checkpoint(source, device, source_path)

    agent.set_config(finetune_config(agent.cfg, learner_overrides(args)))
    algo = agent.cfg.algo

    if resumed is not None:
        names, target_ids = resumed["task_names"], resumed["target_task_ids"]
    else:
        target_ids, names = target_slots(agent, source["task_names"], target.task_names, args.task)
        before = source["task_names"]
        reserved = [i for i in target_ids if i < len(before) and is_reserved(before[i])]
        if args.zero_target_slot and reserved:
            agent.zero_task_slots(reserved)
    low, high = source["action_low"], source["action_high"]
    samplers = task_samplers(
        prior, target, names, target_ids, source, agent.cfg.gamma, args.seed, args.prior
    )
    sampler = MixedSampler(list(samplers), [args.mix, 1.0 - args.mix])
    val_sampler = Sampler(
        target,
        "val",
        seed=0,
        gamma=agent.cfg.gamma,
        task_ids=target_ids,
        action_low=low,
        action_high=high,
    )
    val_ids = target.trajectory_ids("val")
    if agent.critic is None:
        print(
            "note: a BC learner has no Q-function, "
            "so this run writes no Q-value traces for select_ckpt.py"
        )
    elif len(val_ids) == 0:
        print(
            f"warning: {args.target} has no held-out (val) trajectory: "
            "no Q-value traces for select_ckpt.py"
        )

    torch.manual_seed(args.seed)
    start = 0
    if resumed is not None:  # the agent was built from this very checkpoint: the run state is left
        start = restore_run(resumed, agent, sampler)
        if len(val_ids) and agent.critic is not None:
            write_missing_q_traces(args.out, val_sampler, val_ids, target_ids[0], device)
    payload = run_payload(
        "finetune",
        names,
        low,
        high,
        target_task_ids=target_ids,
        target_tasks=list(target.task_names),
        source_ckpt=source_ckpt(source, source_path),
        data=data,
    )
    derived = {
        "num_tasks": agent.cfg.num_tasks,
        "task_names": names,
        "target_task_ids": target_ids,
        "algo": algo,
        "image_size": size,
    }
    write_config(args.out, {**vars(args), **derived})
    print(
        f"fine-tuning {agent.cfg.arch} on {list(target.task_names)} -> one-hot {target_ids} "
        f"of {agent.cfg.num_tasks}; {target.num_transitions('train')} target / "
        f"{prior.num_transitions('train')} prior transitions, tau={args.mix}"
    )

    def on_save(step):
        if len(val_ids):
            write_val_loss(agent, val_sampler, val_ids, step, args.out)
        if len(val_ids) and agent.critic is not None:
            write_q_traces(agent, val_sampler, val_ids, step, args.out, target_ids[0])

    run = dataclass_from_args(RunConfig, args)
    train_loop(agent, sampler, run, payload, start_step=start, on_save=on_save)


if __name__ == "__main__":
    run_cli(main)
