"""Running a PTR policy in an environment (SPEC section 2, level 3): episodes, their success and
stage rates with 95% Wilson intervals, videos, the environment factory, and the evaluation of a
checkpoint (EvalConfig, run_evaluation), which `online.py eval` runs; online.py's fine-tuning
(paper Section V-F) collects its trajectories with run_episode().

An episode starts from env.reset(seed), so a list of seeds fixes a list of episodes: two policies
evaluated on the same seeds meet the same starts. Evaluation reports full success with its 95%
Wilson interval (stats.py) and, where the environment reports them in info["stages"] (the
simulator: grasped, first_in_bin, both_in_bins for the sort; grasped, placed for pick-place), each
stage's rate: was it ever reached in the episode (Appendix A discusses the first segment).

Environments share one interface (SPEC section 2): reset(seed) -> obs, step(action) -> (obs,
reward, terminated, truncated, info), obs = {"image": uint8 (H, W, 3), "state": float32 (7,)}.
make_env() imports them (robot.py, binsort_env.py, or a user's module:Class) when asked for one,
so nothing else here needs pybullet or pyserial.
"""

import argparse
import importlib
import inspect
import os
import sys
from dataclasses import dataclass, fields

import numpy as np
import torch
from PIL import Image

from batches import ACTION_CLIP, rescale_actions, unscale_actions
from checkpoint import agent_from_checkpoint, load_checkpoint
from bridge import resize_image
from cli import FlagError, add_dataclass_args
from dynamixel import PORT
from fileio import atomic_write, atomic_write_json
from stats import wilson_interval
from widowx import GRIPPER_CLOSED_BELOW

ENVS = ("binsort", "widowx")  # the environments named; --env also takes module:Class (make_env)
ENV_FORMS = "binsort, widowx or module:Class"
VIDEO_FORMATS = ("gif", "png")  # an animated GIF or a PNG film strip per episode (save_video)
# the simulator's out-of-distribution starts (binsort_env.OOD_STARTS; named here so that the flag
# needs no pybullet): none, objects in a strip the data never used, another arm start, or both
OOD_STARTS = ("none", "objects", "arm", "both")
GRIPPER = 6  # the gripper's index in the 7-d Bridge action


# ---------------------------------------------------------------------------- policies and episodes


class Policy:
    """A checkpoint's actor as a controller: (image at the network's size, state) -> (raw action
    for env.step, [-1, 1] action for the buffer); the [-1, 1] action is clipped to +-0.99 like
    the data's, then unscaled."""

    def __init__(
        self, agent, action_low, action_high, task, task_name=None, binarize_gripper=False
    ):
        self.agent = agent
        self.task = int(task)
        self.task_name = task_name
        self.size = agent.cfg.image_size
        self.low = np.asarray(action_low, np.float32)
        self.high = np.asarray(action_high, np.float32)
        # The Bridge gripper command is absolute, 0 closed .. 1 open, and the demos command 0 or 1;
        # a regression policy can average the two near a grasp (0.3-0.9 dithering opens the fingers
        # again). Binarizing at 0.5 executes the nearer of the two, as the Open X-Embodiment Bridge
        # transform does for the data. Off by default: the gripper executes the command predicted.
        self.binarize_gripper = binarize_gripper

    def __call__(self, image, state, deterministic=True):
        action = self.agent.act(
            torch.from_numpy(image).permute(2, 0, 1)[None],
            torch.from_numpy(state)[None],
            torch.tensor([self.task]),
            deterministic=deterministic,
        )  # act() moves them
        scaled = np.clip(action[0].float().cpu().numpy(), -ACTION_CLIP, ACTION_CLIP)
        raw = unscale_actions(scaled, self.low, self.high)
        if self.binarize_gripper:
            closed = raw[GRIPPER] < GRIPPER_CLOSED_BELOW
            raw[GRIPPER] = 0.0 if closed else 1.0
            # the buffer keeps the action executed, rescaled like the data's (clipped at +-0.99)
            scaled = rescale_actions(raw, self.low, self.high).astype(np.float32)
        return raw, scaled


def load_policy(path, device, task=None, binarize_gripper=None):
    """The actor of any PTR checkpoint; task by name or index. What is left None comes from the
    checkpoint's "evaluation" entry (online.py export), so a shared policy acts as its results
    were measured; otherwise the task is the fine-tuned (or online) target and the gripper is
    executed as predicted. The entry stays on the policy as .evaluation."""
    ckpt = load_checkpoint(path)
    agent = agent_from_checkpoint(ckpt, device, path, acting_only=True)
    names = ckpt["task_names"]
    saved = ckpt.get("evaluation", {})
    if binarize_gripper is None:
        binarize_gripper = bool(saved.get("binarize_gripper", False))
    if task is None:
        task = saved.get("task")
    if task is None:
        task = ckpt.get("online_task", (ckpt.get("target_task_ids") or [0])[0])
    elif task in names:
        task = names.index(task)
    elif not (str(task).isdigit() and int(task) < agent.cfg.num_tasks):
        raise SystemExit(
            f"--task {task!r}: not a task of {path}; its tasks are {names} (or an index)"
        )
    name = names[int(task)] if int(task) < len(names) else None
    print(f"{path}: {agent.cfg.arch} at {agent.cfg.image_size}px, task {task} ({name})")
    low = ckpt["action_low"]
    high = ckpt["action_high"]
    policy = Policy(agent, low, high, int(task), name, binarize_gripper)
    policy.evaluation = saved
    if saved:
        print(f"{path}: evaluated as exported, {saved} (flags given here take precedence)")
    return policy


def run_episode(
    env, policy, seed, deterministic=True, max_steps=0, stop=None, keep_frames=False, labeler=None
):
    """One episode from env.reset(seed); None when a stop was requested before it ended (the caller
    drops it). Rewards: binary, the env's or the labeler's; success: info["success"] at any step, or
    a labelled reward. stages: {name: reached at any step} from info["stages"], where the env
    reports them (else empty). frames: the env's own images (for videos and the classifier).
    env_rewards: the env's own binary rewards, which a labeler's replace in rewards."""
    obs = env.reset(seed=seed)
    success = False
    done = False
    stages = {}
    images = []
    states = []
    actions = []
    rewards = []
    frames = []
    while True:
        images.append(resize_image(obs["image"], policy.size))
        states.append(np.asarray(obs["state"], np.float32))
        frames.append(obs["image"] if keep_frames or labeler else None)
        if done:
            break
        if stop is not None and stop.requested:
            return None
        raw, scaled = policy(images[-1], states[-1], deterministic)
        obs, reward, terminated, truncated, info = env.step(raw)
        actions.append(scaled)
        rewards.append(float(reward))
        success = success or bool(info.get("success", False))
        for name, reached in info.get("stages", {}).items():
            stages[name] = stages.get(name, False) or bool(reached)
        done = terminated or truncated or (max_steps and len(actions) >= max_steps)
    env_rewards = (np.asarray(rewards) > 0).astype(np.float32)
    if labeler:
        rewards = labeler(frames)
        success = bool(rewards.any())
    else:
        rewards = env_rewards
    return {
        "images": np.stack(images),
        "states": np.stack(states),
        "actions": np.stack(actions).astype(np.float32),
        "rewards": rewards,
        "env_rewards": env_rewards,
        "success": success,
        "stages": stages,
        "return": float(rewards.sum()),
        "length": len(actions),
        "frames": frames,
    }


# --------------------------------------------------------------- success rates, videos, evaluation


def rate_text(count, n, lo, hi):
    """count/n as a percentage with its 95% Wilson interval lo .. hi."""
    return (
        f"{count}/{n} = {100 * count / max(n, 1):.1f}% "
        f"(95% CI, Wilson: {100 * lo:.1f}% .. {100 * hi:.1f}%)"
    )


def stage_summary(episodes):
    """{stage: {count, rate, lo, hi}} over episodes, stages in the order the env reports them:
    count = episodes that reached the stage at any step, lo .. hi its 95% Wilson interval."""
    names = []
    for e in episodes:
        names.extend(name for name in e.get("stages", {}) if name not in names)
    n = len(episodes)
    summary = {}
    for name in names:
        count = sum(bool(e.get("stages", {}).get(name, False)) for e in episodes)
        lo, hi = wilson_interval(count, n)
        summary[name] = {"count": count, "rate": count / max(n, 1), "lo": lo, "hi": hi}
    return summary


def summarize(episodes):
    """Success rate with its Wilson interval, mean return and length, and the stage rates."""
    n = len(episodes)
    k = sum(e["success"] for e in episodes)
    lo, hi = wilson_interval(k, n)
    mean_return = float(np.mean([e["return"] for e in episodes])) if n else float("nan")
    mean_length = float(np.mean([e["length"] for e in episodes])) if n else float("nan")
    return {
        "success": k / max(n, 1),
        "success_lo": lo,
        "success_hi": hi,
        "successes": k,
        "episodes": n,
        "return": mean_return,
        "length": mean_length,
        "stages": stage_summary(episodes),
        "text": f"success {rate_text(k, n, lo, hi)}",
    }


def save_video(frames, path, fmt="gif", fps=5, strip_frames=10):
    """An animated GIF of the episode (Bridge runs at 5 Hz), or a PNG strip of up to 10
    evenly spaced frames."""
    images = [Image.fromarray(np.asarray(f, np.uint8)) for f in frames]
    if fmt == "gif":

        def write(f):
            images[0].save(
                f,
                format="GIF",
                save_all=True,
                append_images=images[1:],
                duration=int(1000 / fps),
                loop=0,
            )

    else:
        count = min(strip_frames, len(images))
        picks = np.unique(np.linspace(0, len(images) - 1, count).round().astype(int))
        strip = Image.new("RGB", (images[0].width * len(picks), images[0].height))
        for i, j in enumerate(picks):
            strip.paste(images[j], (i * images[0].width, 0))

        def write(f):
            strip.save(f, format="PNG")

    atomic_write(path, write)


def no_reset():
    """The simulator resets itself in env.reset()."""


def evaluate(
    env,
    policy,
    episodes,
    seed,
    max_steps=0,
    resetter=no_reset,
    stop=None,
    video=None,
    labeler=None,
    log=print,
    deterministic=True,
):
    """Episodes from env.reset(seed + i): reproducible. deterministic: the actor's mean action
    (False: a sample, drawn from the agent's seeded generator). video: (folder, "gif" | "png").
    Returns [{success, return, length (, stages)}] per episode, or None when stopped."""
    results = []
    for i in range(episodes):
        keep = bool(video)
        ep = run_episode(env, policy, seed + i, deterministic, max_steps, stop, keep, labeler)
        if ep is None:  # stopped: no reset either
            return None
        resetter()
        outcome = "success" if ep["success"] else "fail"
        if video:
            name = f"episode_{i:03d}_{outcome}.{video[1]}"
            save_video(ep["frames"], os.path.join(video[0], name), video[1])
        reached = [name for name, hit in ep["stages"].items() if hit]
        stages = f" (reached: {', '.join(reached)})" if reached else ""
        log(
            f"episode {i:3d} seed {seed + i}: return {ep['return']:.2f}, length {ep['length']}, "
            f"{'success' if ep['success'] else 'failure'}{stages}"
        )
        record = {k: ep[k] for k in ("success", "return", "length")}
        if ep["stages"]:  # an env without stages reports none
            record["stages"] = ep["stages"]
        results.append(record)
    return results


# -------------------------------------------------------------------------- environments and resets


def make_env(
    name,
    image_size,
    task=None,
    max_steps=0,
    port=PORT,
    backend="dynamixel",
    camera="0",
    ood="none",
    terminate_on_success=True,
):
    """binsort: the simulator on `task` when it knows that name (e.g. sort_mug_cube),
    else its target sort task; ood: its out-of-distribution starts (OOD_STARTS);
    terminate_on_success False: episodes run to their step limit, as on the arm, so that a
    classifier's rewards are all a run learns of success (not where the simulator ended it);
    widowx: the real arm (or twin.py's simulated one behind `port`), its images from `camera` (an
    opencv index or path, or twin:<port>); module:Class: a user's environment (env_from_module).
    Imported here, so nothing else needs pybullet or pyserial."""
    if name != "binsort" and ood != "none":
        raise SystemExit(f"--ood {ood}: only the simulator (--env binsort) has such starts")
    if name not in ENVS:
        return env_from_module(name, image_size, max_steps)
    if name == "widowx":
        import robot

        kw = {"max_steps": max_steps} if max_steps else {}  # else robot.py's (40 steps, as Bridge)
        camera = robot.camera_arg(str(camera))
        return robot.WidowXEnv(port, backend=backend, image_size=image_size, camera=camera, **kw)
    import binsort_env

    try:
        binsort_env.parse_task(task)
    except (ValueError, AttributeError):  # not a task the simulator knows (or None): the sort task
        task = "sort"
    starts = "" if ood == "none" else f", out-of-distribution starts: {ood}"
    print(f"environment: simulated bin-sort, task {task}, {image_size}px{starts}")
    return binsort_env.BinSortEnv(
        task=task,
        image_size=image_size,
        max_steps=max_steps or None,
        terminate_on_success=terminate_on_success,
        ood=ood,
    )


def module_env_parts(name):
    """(module, class) of an --env module:Class (e.g. mysim.envs:MyEnv), else None."""
    module, colon, cls = name.partition(":")
    return (module, cls) if colon and module and cls and ":" not in cls else None


def env_from_module(name, image_size, max_steps=0):
    """--env module:Class: a user's environment with SPEC section 2's interface (module docstring),
    made as Class(image_size=image_size), plus max_steps=max_steps when a cap is given (> 0; the
    episodes are capped at it either way). The module is imported here, from sys.path (the
    working directory is searched last). Its own rewards and info["success"] (and info["stages"],
    where given) are the episode's, unless a classifier labels them; it resets itself in reset(),
    and close() is called when it has one. Every way the flag can be wrong is one FlagError."""
    parts = module_env_parts(name)
    if parts is None:
        raise FlagError(f"--env {name}: expected {ENV_FORMS} (e.g. mysim.envs:MyEnv)")
    module_name, class_name = parts
    if os.getcwd() not in sys.path:  # `python online.py` puts the script's folder there, not this
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise FlagError(
            f"--env {name}: cannot import {module_name} ({e}); expected a module on PYTHONPATH "
            f"or in the working directory"
        ) from None
    if not hasattr(module, class_name):
        raise FlagError(f"--env {name}: module {module_name} has no {class_name}")
    factory = getattr(module, class_name)
    if not callable(factory):
        kind = type(factory).__name__
        raise FlagError(f"--env {name}: {module_name}.{class_name} is a {kind}, not a class")
    kw = {"image_size": image_size, **({"max_steps": max_steps} if max_steps else {})}
    try:
        inspect.signature(factory).bind(**kw)
    except TypeError as e:
        given = ", ".join(f"{k}={v}" for k, v in kw.items())
        raise FlagError(f"--env {name}: {class_name}({given}) cannot be made ({e})") from None
    except ValueError:  # no signature to read (a builtin): the call itself will say
        pass
    env = factory(**kw)
    missing = [m for m in ("reset", "step") if not callable(getattr(env, m, None))]
    if missing:
        raise FlagError(
            f"--env {name}: a {type(env).__name__} has no {' or '.join(missing)}(); expected an "
            f"environment with reset(seed=None) -> obs and step(action) -> (obs, reward, "
            f"terminated, truncated, info)"
        )
    print(f"environment: {name}, {image_size}px")
    return env


def close_env(env):
    """env.close(), where the environment has one (a module:Class one need not)."""
    close = getattr(env, "close", None)
    if callable(close):
        close()


def make_resetter(env_name, env, reset_ckpt=None, device="cpu"):
    """After each episode, on the robot: a fixed reset policy, reset_ckpt's actor on `device`
    (Appendix F: a PTR close-door policy), or Enter. The simulator resets itself; so does a
    module:Class environment, unless a reset_ckpt is given."""
    if env_name == "binsort":
        return no_reset
    if reset_ckpt:
        reset_policy = load_policy(reset_ckpt, device)

        def run_reset_policy():
            run_episode(env, reset_policy, None, True)

        return run_reset_policy
    if env_name != "widowx":
        return no_reset

    def wait_for_a_person():
        input("reset the scene, then press Enter ")

    return wait_for_a_person


# ------------------------------------------------------------------------ a checkpoint's evaluation


@dataclass(frozen=True)
class EvalConfig:
    """An evaluation of a checkpoint's actor: `online.py eval`'s flags (the trailing comments are
    their help). None in task, sample_actions, binarize_gripper: as the checkpoint's evaluation
    entry says (online.py export), else the default named."""

    ckpt: str  # a PTR checkpoint of any phase
    episodes: int = 10  # episodes to run (Figure 8: 10 trials)
    seed: int = 0  # episode i resets with seed + i
    video_format: str = "gif"  # animated GIF or PNG film strip
    device: str = "cpu"  # where the actor runs
    task: str | None = None  # task name or index (default: the checkpoint's target task)
    save_video: str | None = None  # folder for one animation per episode
    json: str | None = None  # also write the results to this JSON file
    sample_actions: bool | None = None  # a sample of the actor, not its mean (default: the mean)
    env: str = "binsort"  # binsort, widowx or module:Class (make_env)
    env_image_size: int | None = None  # render size (default: the checkpoint's)
    max_steps: int = 0  # episode length cap (0: the env's own limit)
    port: str = PORT  # widowx: the U2D2 serial port
    camera: str = "0"  # widowx: an opencv camera index or path, or twin:<port>
    ood: str = "none"  # binsort: out-of-distribution starts (OOD_STARTS)
    backend: str = "dynamixel"  # widowx: its driver, dynamixel or interbotix
    reset_ckpt: str | None = None  # widowx: a reset policy run after every episode (else Enter)
    classifier: str | None = None  # rewards from this success classifier (its labeler given)
    binarize_gripper: bool | None = None  # the gripper command executed as 0 or 1


def run_evaluation(cfg, labeler=None, log=print):
    """`online.py eval`: cfg.episodes reproducible episodes of cfg.ckpt's actor (EvalConfig), its
    mean action unless sampled ones are asked for or exported; the summary printed, and written
    with every episode to cfg.json when given. labeler: the rewards of cfg.classifier
    (classifier.load_labeler, a level above this file), or a person's; None: the env's own.
    Returns the summary (summarize)."""
    policy = load_policy(cfg.ckpt, cfg.device, cfg.task, cfg.binarize_gripper)
    sample_actions = cfg.sample_actions
    if sample_actions is None:  # as exported (online.py export --sample_actions), else the mean
        sample_actions = bool(getattr(policy, "evaluation", {}).get("sample_actions", False))
    env = make_env(
        cfg.env,
        cfg.env_image_size or policy.size,
        policy.task_name,
        cfg.max_steps,
        cfg.port,
        cfg.backend,
        cfg.camera,
        ood=cfg.ood,
        terminate_on_success=not cfg.classifier,
    )
    video = (cfg.save_video, cfg.video_format) if cfg.save_video else None
    try:
        resetter = make_resetter(cfg.env, env, cfg.reset_ckpt, cfg.device)
        results = evaluate(
            env,
            policy,
            cfg.episodes,
            cfg.seed,
            cfg.max_steps,
            resetter,
            video=video,
            labeler=labeler,
            log=log,
            deterministic=not sample_actions,
        )
    finally:
        close_env(env)
    s = summarize(results)
    log(f"{s['text']}, mean return {s['return']:.2f}, mean length {s['length']:.1f}")
    for name, stage in s["stages"].items():
        log(f"  stage {name}: {rate_text(stage['count'], s['episodes'], stage['lo'], stage['hi'])}")
    if cfg.json:
        doc = {**s, "ckpt": cfg.ckpt, "sampled_actions": sample_actions, "ood": cfg.ood}
        doc["binarized_gripper"] = bool(getattr(policy, "binarize_gripper", False))
        doc["per_episode"] = results
        atomic_write_json(doc, cfg.json, indent=2)  # null where a number is not finite
    return s


# ---------------------------------------------------------- the flags (online.py eval and finetune)
# EvalConfig's fields that add_dataclass_args makes flags of (the str | None ones literal: a task or
# a file may be called none). The others are written out below: no generated flag is a bool | None
# (--sample_actions), and the environment's (add_env_args) are online.py finetune's too, which
# renames --camera and gives --binarize_gripper another default.
LITERAL_EVAL_FLAGS = ("task", "save_video", "json")
GENERATED_EVAL_FLAGS = ("ckpt", "episodes", "seed", "video_format", "device", *LITERAL_EVAL_FLAGS)


def env_flag(text):
    """--env's values: a name in ENVS or module:Class, which argparse's choices cannot say."""
    if text in ENVS or module_env_parts(text):
        return text
    raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {ENV_FORMS})")


def add_env_args(p, camera_flag="--camera"):
    """The environment's options. camera_flag: finetune also reads data, whose --camera
    (data.add_data_args) names a camera of the stores, so its environment's is --env_camera."""
    p.add_argument(
        "--env",
        default="binsort",
        type=env_flag,
        metavar="{binsort,widowx,module:Class}",
        help="the simulator, the arm, or your own environment: Class(image_size=..., max_steps=... "
        "when given) from an importable module, with reset(seed=None) and step(action)",
    )
    p.add_argument(
        "--env_image_size", type=int, default=None, help="render size (default: the checkpoint's)"
    )
    p.add_argument(
        "--max_steps", type=int, default=0, help="episode length cap (default: the env's own limit)"
    )
    p.add_argument("--port", default=PORT, help="widowx: the U2D2 serial port")
    p.add_argument(
        camera_flag,
        default="0",
        help="widowx: an opencv camera index or path, or twin:<port> (twin.py's rendered frames)",
    )
    p.add_argument(
        "--ood",
        default="none",
        choices=OOD_STARTS,
        help="binsort: start episodes where the data never started them: objects in a strip the "
        "demos never used, the arm at another start pose, or both (binsort_env.OOD_STARTS)",
    )
    p.add_argument(
        "--backend", default="dynamixel", choices=["dynamixel", "interbotix"], help="widowx driver"
    )
    p.add_argument(
        "--reset_ckpt",
        default=None,
        help="widowx: a reset policy run after every episode (else Enter)",
    )
    p.add_argument(
        "--classifier",
        default=None,
        help="rewards from this success classifier (written by classifier.py)",
    )
    p.add_argument(
        "--binarize_gripper",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="execute the gripper command as 0 or 1 (threshold 0.5), as the demos command it",
    )


def add_eval_args(p):
    """`online.py eval`'s flags, one per EvalConfig field (run_evaluation)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    add_dataclass_args(
        p,
        EvalConfig,
        skip=[f.name for f in fields(EvalConfig) if f.name not in GENERATED_EVAL_FLAGS],
        choices={"video_format": VIDEO_FORMATS},
        defaults={"device": device},
        literal=LITERAL_EVAL_FLAGS,
    )
    # An imitating tanh-Gaussian actor's mean gripper command can stall at 0.5-0.8 where the demos
    # close: the arm stands still and the mean action never changes; a sample crosses the threshold.
    p.add_argument(
        "--sample_actions",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="draw each action from the actor (tanh-Gaussian) instead of taking its mean; "
        "a BC policy is deterministic either way (default: as exported, else the mean)",
    )
    add_env_args(p)
    p.set_defaults(binarize_gripper=None)  # as exported, else as predicted
