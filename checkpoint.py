"""checkpoint.py: the PTR checkpoint format, written by every training phase (train.py, finetune.py,
online.py finetune) and read by every consumer (finetune.py, online.py eval/export, select_ckpt.py's
runs, scripts/).

A checkpoint is one dict saved with torch.save, loadable with torch.load(weights_only=True):
    format       CKPT_FORMAT
    kind         the phase that wrote it: pretrain, finetune, online (or POLICY_KIND, an export)
    task_names   the one-hot's task names, slot by slot (paper Section IV-A, task identifiers)
    action_low, action_high   the per-dimension bounds the policy's [-1, 1] maps to (SPEC section 3)
    step         the run's step count when it was saved
    agent        cql.Agent.state_dict(): config, networks, optimizers, temperature, generator
    sampler, rng, rank_states   the sampler's and torch's random streams, for an exact --resume
    data         what the run trained on (source_record), which --resume must find again
and the phase's own fields (target_task_ids, target_tasks, source_ckpt, online_task, loop, ...).
run_payload + build_checkpoint write it, load_checkpoint reads it back (a named CheckpointError for
every way a file can be wrong) and upgrades the layouts older releases wrote, agent_from_checkpoint
builds the learner it holds, policy_checkpoint cuts it down to the actors for sharing, and
capture_rng / restore_rng / restore_run carry the random state that makes a resume exact. A level-2
file (SPEC section 2): it imports cli.py, fileio.py, runfolder.py and cql.py.
"""

import os

import torch

from cli import ExpectedError
from cql import Agent, AgentConfig
from fileio import atomic_write
from runfolder import list_checkpoints

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
        agent=agent.state_dict(),
        sampler=sampler_state,
        rng=rng,
        **extra,
    )


def atomic_torch_save(obj, path):
    """A checkpoint appears whole or not at all; a failed save leaves no temporary file."""
    atomic_write(path, lambda f: torch.save(obj, f))


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
    """An agent's state as the current cql.Agent loads it, from any layout a release wrote. A
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
        return Agent.from_state_dict(ckpt["agent"], device, strict=not policy_only)
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(
            f"{path}: weights do not fit the network its config describes ({e})"
        ) from None


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
