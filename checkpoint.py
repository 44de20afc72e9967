"""checkpoint.py: the PTR checkpoint format, written by every training phase (train.py, finetune.py,
online.py finetune) and read by every consumer (finetune.py, online.py eval/export, select_ckpt.py's
runs, scripts/).

A checkpoint is one dict saved with torch.save, loadable with torch.load(weights_only=True):
    format       CKPT_FORMAT
    kind         the phase that wrote it: pretrain, finetune, online (or POLICY_KIND, an export)
    task_names   the one-hot's task names, slot by slot (paper Section IV-A, task identifiers)
    action_low, action_high   the per-dimension bounds the policy's [-1, 1] maps to (SPEC section 3)
    step         the run's step count when it was saved
    agent        agent_state(agent): config, networks, optimizers, temperature, generator
    sampler, rng, rank_states   the sampler's and torch's random streams, for an exact --resume
    data         what the run trained on (source_record), which --resume must find again
and the phase's own fields (target_task_ids, target_tasks, source_ckpt, online_task, loop, ...).
agent_state / load_agent_state save and restore the learner (cql.Agent), with an error that names
every way a state does not fit the agent's network shapes or algo; run_payload + build_checkpoint
write the checkpoint, load_checkpoint reads it back (a named CheckpointError for
every way a file can be wrong) and upgrades the layouts older releases wrote, agent_from_checkpoint
builds the learner it holds, policy_checkpoint cuts it down to the actors for sharing (export_policy
writes that file, for `online.py export`), and capture_rng / restore_rng / restore_run carry the
random state that makes a resume exact. A level-2 file (SPEC section 2): it imports cli.py,
fileio.py, runfolder.py and cql.py.
"""

import os
from dataclasses import asdict

import torch

from cli import ExpectedError
from cql import STRUCTURE, Agent, AgentConfig
from fileio import atomic_write
from runfolder import CKPT_PATTERN, list_checkpoints, prune_checkpoints

CKPT_FORMAT = 1
POLICY_KIND = "policy"  # a checkpoint cut down to its actors (policy_checkpoint)
ACTORS = ("policy", "bc_policy")  # the networks that act: CQL's tanh-Gaussian, BC's MSE policy
# The fields load_checkpoint requires besides the format and the agent.
REQUIRED = ("step", "agent", "task_names", "action_low", "action_high")
# Conversion options that leave a store's transitions as they are: the image size is checked with
# the network's shapes (check_compatible), the format version is how the store lays them out.
LAYOUT_OPTIONS = ("image_size", "format_version")


class CheckpointError(ExpectedError, RuntimeError):
    """A checkpoint that is missing, damaged or does not fit the run (one line, cli.py)."""


# ----------------------------------------------------------------------------- the agent's state


def agent_state(agent):
    """A cql.Agent's learner state, a checkpoint's "agent": its config, update count, entropy
    temperature, networks, optimizers and sampling generator. Tensors and python values only
    (torch.load(weights_only=True) safe)."""
    return {
        "config": asdict(agent.cfg),
        "updates": agent.updates,
        "log_temp": agent.log_temp.detach().clone(),
        "nets": {k: v.state_dict() for k, v in agent.nets.items()},
        "optimizers": {k: v.state_dict() for k, v in agent.optimizers.items()},
        "generator": agent.generator.get_state(),
    }


def agent_from_state(d, device="cpu", strict=True):
    """An agent built with the state's config, then loaded (load_agent_state)."""
    agent = Agent(AgentConfig(**d["config"]), device)
    load_agent_state(agent, d, strict)
    return agent


def load_agent_state(agent, d, strict=True):
    """Load an agent_state() into an agent with the same STRUCTURE fields (the algo may differ
    where the networks allow: a BC policy in the state is added to the agent). strict=False
    accepts a state that lacks some of the agent's networks (e.g. an awbc agent from a cql
    checkpoint); returns the names left as built. d has the current layout: load_checkpoint
    upgrades the layouts of older files (upgrade_agent_state)."""
    saved = d["config"]
    diff = [
        f"{k}: checkpoint {saved.get(k)!r}, agent {getattr(agent.cfg, k)!r}"
        for k in STRUCTURE
        if saved.get(k) != getattr(agent.cfg, k)
    ]
    if diff:
        raise ValueError(
            f"checkpoint.py: load_agent_state: checkpoint and AgentConfig disagree on "
            f"{'; '.join(diff)} (build the agent with the checkpoint's config, e.g. "
            "agent_from_state, then grow_tasks)"
        )
    if "bc_policy" in d["nets"]:
        agent.add_bc_policy()
    extra = [k for k in d["nets"] if k not in agent.nets]
    if extra:
        raise ValueError(
            f"checkpoint.py: load_agent_state: checkpoint has {extra}, "
            f"which an agent built with algo={agent.cfg.algo!r} lacks"
        )
    missing = [k for k in agent.nets if k not in d["nets"]] + [
        f"{k} optimizer" for k in agent.optimizers if k not in d["optimizers"]
    ]
    if missing and strict:
        raise ValueError(
            f"checkpoint.py: load_agent_state: checkpoint (algo={saved.get('algo')!r}) has no "
            f"{missing}; pass strict=False to keep them as initialised"
        )
    for k, net in agent.nets.items():
        if k in d["nets"]:
            net.load_state_dict(d["nets"][k])
    for k, opt in agent.optimizers.items():
        if k not in d["optimizers"]:
            continue
        sd = dict(d["optimizers"][k])
        # keep the agent's fused/foreach choice and cfg learning rates, not the checkpoint's
        sd["param_groups"] = [
            {**gs, "fused": g["fused"], "foreach": g["foreach"], "lr": g["lr"]}
            for gs, g in zip(sd["param_groups"], opt.param_groups)
        ]
        opt.load_state_dict(sd)
        # the moments keep the layout they were saved with (channels_last on CUDA): fused Adam
        # needs the parameter's own layout, so a checkpoint can move between CPU and GPU
        for p, st in opt.state.items():
            for key, v in st.items():
                if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                    st[key] = torch.empty_like(p).copy_(v)
    if "temp" in agent.optimizers and "temp" in d["optimizers"]:
        with torch.no_grad():
            agent.log_temp.copy_(d["log_temp"])
    try:
        agent.generator.set_state(d["generator"])
    except RuntimeError:  # saved on another device type (CPU vs CUDA generator): keep the agent's
        pass
    agent.updates = int(d["updates"])
    return missing


# ----------------------------------------------------------------------------- writing


def run_payload(kind, task_names, action_low, action_high, **fields):
    """The fixed fields of every checkpoint of a run, which build_checkpoint completes: the phase
    (kind), the one-hot's task names, the action bounds as floats, then the phase's own fields in
    the order given (data, target slots, source checkpoint, ...)."""
    return {
        "kind": kind,
        "task_names": list(task_names),
        "action_low": [float(x) for x in action_low],
        "action_high": [float(x) for x in action_high],
        **fields,
    }


def source_ckpt(ckpt, path):
    """The checkpoint a chain of fine-tuning runs started from: the one `ckpt` names, else `path`
    (the file `ckpt` was read from), for a fine-tuning payload's source_ckpt."""
    return str(ckpt.get("source_ckpt", path))


def build_checkpoint(payload, step, agent, sampler_state, rng, **extra):
    """The one checkpoint dict of every phase (load_checkpoint reads it back): the run's fixed
    fields (run_payload), the format, the step, the agent (networks, optimizers, config), the
    sampler's and torch's random state; online.py adds its loop state in `extra`."""
    return dict(
        payload,
        format=CKPT_FORMAT,
        step=step,
        agent=agent_state(agent),
        sampler=sampler_state,
        rng=rng,
        **extra,
    )


def atomic_torch_save(obj, path):
    """A checkpoint appears whole or not at all; a failed save leaves no temporary file."""
    atomic_write(path, lambda f: torch.save(obj, f))


def save_checkpoint(ckpt, run, on_save=None):
    """How every training loop saves (train.train_loop, online.OnlineLoop): ckpt_<step>.pt in the
    run folder run.out, atomically; on_save(step), which writes that checkpoint's own files
    (finetune.py's Q-value traces); then the run's retention (run.keep_last, run.keep_steps)."""
    atomic_torch_save(ckpt, os.path.join(run.out, CKPT_PATTERN.format(ckpt["step"])))
    if on_save is not None:
        on_save(ckpt["step"])
    prune_checkpoints(run.out, run.keep_last, run.keep_steps)


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


# ----------------------------------------------------------------------------- reading


def load_checkpoint(path):
    """Load a PTR checkpoint on the CPU (weights_only), with a clear error for every way it can be
    wrong, upgraded to the current layout (upgrade_agent_state)."""
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
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing or not isinstance(ckpt["agent"], dict) or "config" not in ckpt["agent"]:
        raise CheckpointError(f"{path}: checkpoint misses the fields {missing or ['agent.config']}")
    ckpt["agent"] = upgrade_agent_state(ckpt["agent"])
    return ckpt


def upgrade_agent_state(state):
    """An agent's state as load_agent_state loads it, from any layout a release wrote. A
    policy saved before policies normalized their state (model.StateNormalizer) gets the identity
    normalizer (mean 0, std 1), so it acts as it did. Returns a new dict; `state` is not changed."""
    dim = state["config"].get("state_dim", AgentConfig.state_dim)
    nets = dict(state["nets"])
    for name in ACTORS:
        if name in nets and "state_norm.mean" not in nets[name]:
            nets[name] = {
                **nets[name],
                "state_norm.mean": torch.zeros(dim),
                "state_norm.std": torch.ones(dim),
            }
    return {**state, "nets": nets}


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
        return agent_from_state(ckpt["agent"], device, strict=not policy_only)
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(
            f"{path}: weights do not fit the network its config describes ({e})"
        ) from None


# ----------------------------------------------------------------------------- exporting


def export_policy(src, dst, evaluation):
    """Write the actors of the checkpoint file `src` alone (policy_checkpoint) to `dst`, atomically,
    with how to evaluate them: `evaluation` = {sample_actions, binarize_gripper, and task (one of
    src's task names) where one is chosen}, the entry rollout.load_policy reads. Returns the
    checkpoint written; `evaluation` is copied, not kept."""
    ckpt = policy_checkpoint(load_checkpoint(src))
    task = evaluation.get("task")
    if task is not None and task not in ckpt["task_names"]:
        raise CheckpointError(
            f"task {task!r}: not a task of {src}; its tasks are {ckpt['task_names']}"
        )
    ckpt["source_ckpt"] = os.path.abspath(src)
    ckpt["evaluation"] = dict(evaluation)
    atomic_torch_save(ckpt, dst)
    return ckpt


# ----------------------------------------------------------------------------- resuming


def capture_rng():
    """torch's random state on the CPU and every CUDA device, for restore_rng."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state):
    """Set torch's random state to what capture_rng saved (CUDA too where it was saved)."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resume_state(out, resume, expected):
    """The newest checkpoint of the run folder `out` when resume is asked (and one exists), checked
    against the network shapes `expected` (check_compatible), else None."""
    ckpts = list_checkpoints(out)
    if not (resume and ckpts):
        return None
    step, path = ckpts[-1]
    ckpt = load_checkpoint(path)
    check_compatible(ckpt, path, expected)
    print(f"resuming {path} at step {step}")
    return ckpt


def restore_run(ckpt, agent, sampler, rank=0):
    """Weights, optimizers and this rank's random streams. A rank the checkpoint has no streams
    for (a Ctrl-C checkpoint of a torchrun run, or more processes than before) keeps its fresh
    seed + rank streams: still data-parallel, not bit-exact. Returns the checkpoint's step."""
    load_agent_state(agent, ckpt["agent"])
    states = ckpt.get("rank_states") or [{"sampler": ckpt["sampler"], "rng": ckpt["rng"]}]
    if rank < len(states):
        sampler.load_state_dict(states[rank]["sampler"])
        restore_rng(states[rank]["rng"])
        if "generator" in states[rank]:
            agent.generator.set_state(states[rank]["generator"])
    else:
        agent.generator.manual_seed(agent.cfg.seed + rank + ckpt["step"])
    return ckpt["step"]
