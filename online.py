"""PTR in an environment: evaluate a policy, fine-tune it online with the Cal-QL bound, and train the success
classifier that labels real-robot rollouts (paper Section V-F and Appendix F; SPEC section 3 "Online").

    python online.py eval --ckpt runs/ft/ckpt_00005000.pt --env binsort --episodes 50 --save_video videos/
    python online.py finetune --ckpt runs/ft/ckpt_00005000.pt --env binsort --prior data/prior \
        --target data/target --env_steps 20000 --out runs/online
    python online.py classifier --pos door_open/ --neg door_closed/ --out clf.pt
    python online.py finetune ... --env widowx --port /dev/ttyUSB0 --classifier clf.pt --reset_ckpt reset.pt

Online fine-tuning alternates (Section IV-A, "Phase 2"): collect ONE trajectory with the current stochastic
policy into a replay buffer (MC returns computed on add), then take --utd (10) gradient steps per transition
collected. Batches mix prior / target / online data 0.35 / 0.15 / 0.5 (Appendix F). Cal-QL is on throughout
(Appendix F, "Method"): the CQL push-down on policy actions is clipped from below by the MC return, on all data.
CQL alpha: --alpha_offline (5) while the buffer is empty, i.e. only in the optional --offline_steps warm-up
(Cal-QL on prior + target mixed 0.7 / 0.3 before the first rollout); --alpha_online (0.5) from the first online
trajectory on. Without a warm-up alpha is 0.5 throughout, the paper's offline phase (alpha 5) being the
finetune.py run that produced --ckpt.
Everything counts in env steps: --env_steps, ckpt_<env step>.pt, progress.csv rows (one per trajectory, plus
deterministic evaluations every --eval_every env steps from step 0). Each online trajectory is written once to
episodes/episode_<n>.npz; a checkpoint lists those its buffer holds, so --resume refills it and continues
exactly. Ctrl-C stops at the next env or gradient step and saves (dropping an unfinished rollout); a second one
aborts. Rewards: the simulator's; on the robot --classifier's label of each next observation, else a person's
answer after each episode. Resets: the simulator resets itself; on the robot --reset_ckpt runs a reset policy after every episode (Section V-F),
otherwise the program waits for Enter.
"""

import argparse
import glob
import json
import math
import os
import sys
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import cql
from cli import run_cli
from data import MixedSampler, ReplayBuffer, Sampler, augment, load_store, unscale_actions
from fileio import atomic_write_text
from finetune import assign_target_slots, open_run, task_samplers
from runfolder import CKPT_PATTERN
from train import (
    CKPT_FORMAT,
    CheckpointError,
    RunLog,
    StopFlag,
    add_data_args,
    add_run_args,
    agent_from_checkpoint,
    atomic_torch_save,
    capture_rng,
    check_finite,
    claim_run_folder,
    load_checkpoint,
    prepare_batch,
    prune_checkpoints,
    restore_rng,
    write_config,
)

ENVS = ("binsort", "widowx")
EPISODE_PATTERN = os.path.join("episodes", "episode_{:06d}.npz")
ACTION_CLIP = (
    0.99  # the data's actions are clipped there too (SPEC section 3); executed == stored action
)
WILSON_Z = 1.959964  # 95%, two-sided
CLF_FORMAT = 1


@dataclass
class OnlineConfig:
    """Online fine-tuning defaults, the paper's unless marked 'ours' (Section V-F, Appendix F)."""

    mix_prior: float = 0.35  # beta split: Bridge prior data ...
    mix_target: float = 0.15  # ... offline target demos; the online buffer gets the rest (0.5)
    utd: int = 10  # gradient steps per collected environment step
    alpha_offline: float = 5.0  # while the buffer is empty (only the --offline_steps warm-up)
    alpha_online: float = 0.5  # from the first online trajectory on
    calql: bool = True  # clip the CQL push-down at the MC return ("Method", Appendix F)
    env_steps: int = 20_000  # Figure 8 runs 20K environment steps,
    eval_every: int = 5_000  # evaluated every 5K environment steps
    eval_episodes: int = 10  # with 10 trials
    save_every: int = 5_000  # ours, in environment steps
    offline_steps: int = 0  # ours: optional Cal-QL warm-up before the first rollout
    buffer_capacity: int = 0  # ours: frames in data.ReplayBuffer's ring; 0 keeps every transition


@dataclass
class ClassifierConfig:
    """Success classifier (Appendix F, "Reward classifier"): ResNet-34 -> small head -> one logit, BCE."""

    arch: str = "resnet34"
    head: str = "spatial"
    norm: str = "group"
    image_size: int = 128
    steps: int = 2_000
    batch_size: int = 64
    lr: float = 1e-4
    val_frac: float = 0.2


# ----------------------------------------------------------------------------- policies and episodes


def resize_image(image, size):
    """Env images come at the env's (camera's) size; networks take their checkpoint's (LANCZOS, as data.py)."""
    image = np.asarray(image, dtype=np.uint8)
    if image.shape[:2] == (size, size):
        return image
    return np.array(Image.fromarray(image).resize((size, size), Image.Resampling.LANCZOS))


class Policy:
    """A checkpoint's actor as a controller: (image at the network's size, state) -> (raw action for env.step,
    [-1, 1] action for the buffer); the [-1, 1] action is clipped to +-0.99 like the data's, then unscaled."""

    def __init__(self, agent, action_low, action_high, task, task_name=None):
        self.agent, self.task, self.task_name, self.size = (
            agent,
            int(task),
            task_name,
            agent.cfg.image_size,
        )
        self.low, self.high = (
            np.asarray(action_low, np.float32),
            np.asarray(action_high, np.float32),
        )

    def __call__(self, image, state, deterministic=True):
        action = self.agent.act(
            torch.from_numpy(image).permute(2, 0, 1)[None],
            torch.from_numpy(state)[None],
            torch.tensor([self.task]),
            deterministic=deterministic,
        )  # act() moves them
        scaled = np.clip(action[0].float().cpu().numpy(), -ACTION_CLIP, ACTION_CLIP)
        return unscale_actions(scaled, self.low, self.high), scaled


def run_episode(
    env, policy, seed, deterministic=True, max_steps=0, stop=None, keep_frames=False, labeler=None
):
    """One episode from env.reset(seed); None when a stop was requested before it ended (the caller drops it).
    Rewards: binary, the env's or the labeler's; success: info["success"] at any step, or a labelled reward.
    frames: the env's own images (for videos and the classifier)."""
    obs, success, done = env.reset(seed=seed), False, False
    images, states, actions, rewards, frames = [], [], [], [], []
    while True:
        (
            images.append(resize_image(obs["image"], policy.size)),
            states.append(np.asarray(obs["state"], np.float32)),
        )
        frames.append(obs["image"] if keep_frames or labeler else None)
        if done:
            break
        if stop is not None and stop.requested:
            return None
        raw, scaled = policy(images[-1], states[-1], deterministic)
        obs, reward, terminated, truncated, info = env.step(raw)
        actions.append(scaled), rewards.append(float(reward))
        success = success or bool(info.get("success", False))
        done = terminated or truncated or (max_steps and len(actions) >= max_steps)
    rewards = labeler(frames) if labeler else (np.asarray(rewards) > 0).astype(np.float32)
    return {
        "images": np.stack(images),
        "states": np.stack(states),
        "actions": np.stack(actions).astype(np.float32),
        "rewards": rewards,
        "success": bool(rewards.any()) if labeler else success,
        "return": float(rewards.sum()),
        "length": len(actions),
        "frames": frames,
    }


def wilson_interval(successes, n, z=WILSON_Z):
    """95% Wilson score interval of a success rate: inside [0, 1] and sensible at 0/n and n/n."""
    if n == 0:
        return 0.0, 1.0
    p, zz = successes / n, z * z
    center, half = (
        (p + zz / (2 * n)) / (1 + zz / n),
        z / (1 + zz / n) * math.sqrt(p * (1 - p) / n + zz / (4 * n * n)),
    )
    return max(0.0, center - half), min(1.0, center + half)


def summarize(episodes):
    k, n = sum(e["success"] for e in episodes), len(episodes)
    mean = lambda key: float(np.mean([e[key] for e in episodes])) if n else float("nan")  # noqa: E731
    lo, hi = wilson_interval(k, n)
    return {
        "success": k / max(n, 1),
        "success_lo": lo,
        "success_hi": hi,
        "successes": k,
        "episodes": n,
        "return": mean("return"),
        "length": mean("length"),
        "text": f"success {k}/{n} = {100 * k / max(n, 1):.1f}% (95% CI, Wilson: {100 * lo:.1f}% .. {100 * hi:.1f}%)",
    }


def save_video(frames, path, fmt="gif", fps=5, strip_frames=10):
    """An animated GIF of the episode (Bridge runs at 5 Hz), or a PNG strip of up to 10 evenly spaced frames."""
    images, tmp = (
        [Image.fromarray(np.asarray(f, np.uint8)) for f in frames],
        f"{path}.tmp-{os.getpid()}",
    )
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if fmt == "gif":
        images[0].save(
            tmp,
            format="GIF",
            save_all=True,
            append_images=images[1:],
            duration=int(1000 / fps),
            loop=0,
        )
    else:
        picks = np.unique(
            np.linspace(0, len(images) - 1, min(strip_frames, len(images))).round().astype(int)
        )
        strip = Image.new("RGB", (images[0].width * len(picks), images[0].height))
        for i, j in enumerate(picks):
            strip.paste(images[j], (i * images[0].width, 0))
        strip.save(tmp, format="PNG")
    os.replace(tmp, path)


def evaluate(
    env,
    policy,
    episodes,
    seed,
    max_steps=0,
    resetter=lambda: None,
    stop=None,
    video=None,
    labeler=None,
    log=print,
):
    """Deterministic episodes, episode i from env.reset(seed + i): reproducible. video: (folder, "gif" | "png").
    Returns [{success, return, length}] per episode, or None when stopped."""
    results = []
    for i in range(episodes):
        ep = run_episode(env, policy, seed + i, True, max_steps, stop, bool(video), labeler)
        if ep is None:  # stopped: no reset either
            return None
        resetter()
        if video:
            name = f"episode_{i:03d}_{'success' if ep['success'] else 'fail'}.{video[1]}"
            save_video(ep["frames"], os.path.join(video[0], name), video[1])
        log(
            f"episode {i:3d} seed {seed + i}: return {ep['return']:.2f}, length {ep['length']}, "
            f"{'success' if ep['success'] else 'failure'}"
        )
        results.append({k: ep[k] for k in ("success", "return", "length")})
    return results


# ----------------------------------------------------------------------------- environments and resets


def make_env(name, image_size, task=None, max_steps=0, port="/dev/ttyUSB0", backend="dynamixel"):
    """binsort: the simulator on `task` when it knows that name (e.g. sort_mug_cube), else its target sort task;
    widowx: the real arm. Imported here, so nothing else needs pybullet or pyserial."""
    if name == "widowx":  # (argparse's choices keep name in ENVS)
        import robot

        kw = {"max_steps": max_steps} if max_steps else {}  # else robot.py's (40 steps, as Bridge)
        return robot.WidowXEnv(port, backend=backend, image_size=image_size, **kw)
    import sim_binsort

    try:
        sim_binsort.parse_task(task)
    except (
        ValueError,
        AttributeError,
    ):  # not a task the simulator knows (or None): its target sort task
        task = "sort"
    print(f"environment: simulated bin-sort, task {task}, {image_size}px")
    return sim_binsort.BinSortEnv(task=task, image_size=image_size, max_steps=max_steps or None)


def make_resetter(args, env):
    """After each episode, on the robot: a fixed reset policy (Appendix F: a PTR close-door policy) or Enter."""
    if args.env == "binsort":
        return lambda: None
    if args.reset_ckpt:
        reset_policy = load_policy(args.reset_ckpt, args.device)
        return lambda: run_episode(env, reset_policy, None, True)
    return lambda: input("reset the scene, then press Enter ")


def load_policy(path, device, task=None):
    """The actor of any PTR checkpoint; task by name or index, default the fine-tuned (or online) target."""
    ckpt = load_checkpoint(path)
    agent, names = agent_from_checkpoint(ckpt, device, path), ckpt["task_names"]
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
    return Policy(agent, ckpt["action_low"], ckpt["action_high"], int(task), name)


# ----------------------------------------------------------------------------- the success classifier


def classifier_loss(images, labels, clf):
    """BCE on the logit of P(success | image); images already augmented."""
    logits = clf(images)
    loss = F.binary_cross_entropy_with_logits(logits, labels)  # raises unless both are (B,)
    return loss, {
        "clf_loss": loss.detach(),
        "clf_acc": ((logits > 0) == (labels > 0.5)).float().mean(),
    }


def build_classifier(cfg):
    return cql.SuccessClassifier(
        cql.make_encoder(cfg["arch"], cfg["head"], cfg["norm"], cfg["image_size"])
    )


def load_labeler(path, device):
    """Rollout rewards from a trained classifier: r_t = 1 when the observation AFTER action t is a success."""
    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"{path}: cannot read the classifier ({e})") from None
    if (
        not isinstance(doc, dict)
        or doc.get("kind") != "classifier"
        or doc.get("format") != CLF_FORMAT
    ):
        raise SystemExit(f"{path}: not a success classifier written by `online.py classifier`")
    clf, size = build_classifier(doc["config"]).to(device).eval(), doc["config"]["image_size"]
    clf.load_state_dict(doc["model"])
    return lambda frames: (
        (
            torch.sigmoid(
                classifier_logits(
                    clf, np.stack([resize_image(f, size) for f in frames[1:]]), device
                )
            )
            > doc["threshold"]
        )
        .float()
        .numpy()
    )


def make_labeler(args):
    """Rewards where the env gives none (the real arm): the classifier, else a person judges each episode."""
    if args.classifier:
        return load_labeler(args.classifier, args.device)
    if args.env != "widowx":
        return None

    def ask(frames):  # success: the last transition gets r = 1
        rewards = np.zeros(len(frames) - 1, np.float32)
        rewards[-1] = float(
            input("episode over: did the robot succeed? [y/N] ").strip().lower().startswith("y")
        )
        return rewards

    return ask


@torch.no_grad()
def classifier_logits(clf, images, device, chunk=256):
    """uint8 (N, H, W, 3) numpy images -> (N,) CPU logits, a chunk at a time."""
    return torch.cat(
        [
            clf(torch.from_numpy(images[i : i + chunk]).permute(0, 3, 1, 2).to(device))
            .float()
            .cpu()
            for i in range(0, len(images), chunk)
        ]
    )


def read_images(src, image_size, last=0, log=print):
    """(uint8 (N, S, S, 3), group per image) from a folder of png/jpg (a group per file) or Bridge-format data
    (every frame, or the last `last` of each trajectory; a group per trajectory, so the held-out split never
    shares a trajectory with training)."""
    files = sorted(
        f
        for f in glob.glob(os.path.join(src, "**", "*"), recursive=True)
        if f.lower().endswith((".png", ".jpg", ".jpeg"))
    )
    if files:
        images = [resize_image(np.asarray(Image.open(f).convert("RGB")), image_size) for f in files]
        return np.stack(images), np.arange(len(files))
    store = load_store(src, image_size=image_size, log=log)
    reader, images, groups = Sampler(store, "train", gamma=0.99), [], []
    for split in ("train", "val"):
        for tid in store.trajectory_ids(split):
            traj = reader.trajectory(int(tid))
            frames = (
                torch.cat([traj["obs"], traj["next_obs"][-1:]]).permute(0, 2, 3, 1).numpy()[-last:]
            )  # 0: all
            groups.extend([len(images)] * len(frames))
            images.append(frames)
    if not images:
        raise SystemExit(f"{src}: no images (png/jpg) and no Bridge trajectories found")
    return np.concatenate(images), np.asarray(groups)


def train_classifier(pos, neg, cfg, device="cpu", seed=0, log=print):
    """pos / neg: (images, groups). A fraction val_frac of each class's groups is held out. Balanced batches,
    augmented like the RL data. Returns the classifier and the held-out accuracy of each class."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    train, held_out = [], []
    for images, groups in (pos, neg):
        ids = rng.permutation(np.unique(groups))
        val = np.isin(groups, ids[: max(1, round(len(ids) * cfg.val_frac)) if len(ids) > 1 else 0])
        train.append(torch.from_numpy(images[~val])), held_out.append(images[val])
    clf = build_classifier(asdict(cfg)).to(device)
    opt, half = torch.optim.Adam(clf.parameters(), lr=cfg.lr), cfg.batch_size // 2
    y = torch.cat([torch.ones(half), torch.zeros(half)]).to(device)
    for step in range(1, cfg.steps + 1):
        x = torch.cat([t[rng.integers(len(t), size=half)] for t in train]).permute(0, 3, 1, 2)
        loss, info = classifier_loss(augment(x.to(device)), y, clf)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == cfg.steps:
            log(
                f"step {step}/{cfg.steps} | loss {info['clf_loss']:.4f} | batch accuracy {info['clf_acc']:.3f}"
            )
    clf.eval()
    return clf, [
        float(((classifier_logits(clf, images, device) > 0) == label).float().mean())
        if len(images)
        else float("nan")
        for images, label in zip(held_out, (True, False))
    ]


# ----------------------------------------------------------------------------- online fine-tuning


def save_episode(path, images, states, actions, rewards, task):
    """Each online trajectory is written once, when collected (the checkpoint lists the ones its buffer holds)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
        np.savez(
            f, images=images, states=states, actions=actions, rewards=rewards, task=np.int64(task)
        )
    os.replace(tmp, path)


def refill_buffer(buffer, run_dir, live):
    """Re-add the trajectories [episode, length] a checkpoint's buffer held, oldest first (its FIFO drops whole)."""
    for episode, _ in live:
        path = os.path.join(run_dir, EPISODE_PATTERN.format(episode))
        if not os.path.isfile(path):
            raise CheckpointError(
                f"{path}: missing, but the checkpoint's replay buffer holds this online trajectory"
            )
        with np.load(path, allow_pickle=False) as z:
            buffer.add_trajectory(
                z["images"], z["states"], z["actions"], z["rewards"], int(z["task"])
            )


def online_loop(
    agent,
    env,
    policy,
    buffer,
    mixed,
    offline,
    args,
    payload,
    loop,
    resetter=lambda: None,
    labeler=None,
):
    """Collect a trajectory, then --utd gradient steps per transition, until --env_steps (module docstring).
    loop: the loop's state, python values only, saved in every checkpoint, so a resumed run continues exactly."""
    log = RunLog(args.out, args.steps, loop["env_steps"], tensorboard=args.tensorboard)

    def update(sampler):
        # alpha_offline only while no online data exists (the warm-up); alpha_online from the first trajectory on
        agent.cfg.alpha = args.alpha_online if len(buffer) else args.alpha_offline
        info = agent.update(prepare_batch(sampler.sample(args.batch_size), agent.device))
        loop["grad_steps"] += 1
        check_finite(info, loop["grad_steps"])
        loop["sums"] = {k: loop["sums"].get(k, 0.0) + float(v) for k, v in info.items()}
        loop["n_updates"], loop["train_keys"] = loop["n_updates"] + 1, sorted(info)

    def write_row(evaluation):
        n, ro = loop["n_updates"], np.array(loop["rollouts"], np.float64).reshape(-1, 3)
        row = {k: v / n for k, v in loop["sums"].items()}
        row.update(
            grad_steps=loop["grad_steps"],
            episodes=loop["episodes"],
            buffer_transitions=len(buffer),
            alpha=agent.cfg.alpha,
            **{
                f"rollout_{k}": ro[:, i].mean() if len(ro) else float("nan")
                for i, k in enumerate(("return", "success", "length"))
            },
            **{
                f"eval_{k}": evaluation[k] if evaluation else float("nan")
                for k in ("success", "success_lo", "success_hi", "return", "length")
            },
        )
        loop["sums"], loop["n_updates"], loop["rollouts"] = {}, 0, []
        loop["held_rows"].append([loop["env_steps"], row])
        if loop[
            "train_keys"
        ]:  # RunLog fixes its columns at the first row: hold rows until the losses are known
            for step, r in loop["held_rows"]:
                log.log(step, {**{k: float("nan") for k in loop["train_keys"]}, **r})
            loop["held_rows"] = []

    def save():
        atomic_torch_save(
            dict(
                payload,
                format=CKPT_FORMAT,
                step=loop["env_steps"],
                grad_steps=loop["grad_steps"],
                agent=agent.state_dict(),
                sampler=mixed.state_dict(),
                rng=capture_rng(),
                loop=json.loads(json.dumps(loop)),
            ),
            os.path.join(args.out, CKPT_PATTERN.format(loop["env_steps"])),
        )
        prune_checkpoints(args.out, args.keep_last, args.keep_steps)

    rng_before_rollout = None
    with StopFlag() as stop:
        while True:
            while loop["offline_done"] < args.offline_steps and not stop.requested:
                update(offline)
                loop["offline_done"] += 1
            while loop["pending"] > 0 and not stop.requested:
                update(mixed)
                loop["pending"] -= 1
            if stop.requested:
                break
            steps, done, evaluation = loop["env_steps"], loop["env_steps"] >= args.steps, None
            if args.eval_every and (
                steps >= loop["next_eval"] or (done and loop["last_eval"] != steps)
            ):
                results = evaluate(
                    env,
                    policy,
                    args.eval_episodes,
                    args.eval_seed,
                    args.max_steps,
                    resetter,
                    stop,
                    labeler=labeler,
                    log=lambda s: None,
                )
                if results is None:
                    break
                evaluation = summarize(results)
                loop["next_eval"], loop["last_eval"] = (
                    (steps // args.eval_every + 1) * args.eval_every,
                    steps,
                )
                print(f"env step {steps}: evaluation {evaluation['text']}", flush=True)
            if evaluation or (loop["rollouts"] and (steps >= loop["next_log"] or done)):
                write_row(evaluation)
                loop["next_log"] = (steps // args.log_every + 1) * args.log_every
            if steps >= loop["next_save"] or done:
                save()
                loop["next_save"] = (steps // args.save_every + 1) * args.save_every
            if done:
                break
            rng_before_rollout = (
                capture_rng(),
                agent.generator.get_state(),
            )  # policy noise comes from the latter
            seed = (
                1_000_003 * (args.seed + 1) + loop["episodes"]
            )  # far from the evaluation seeds (eval_seed + i)
            ep = run_episode(env, policy, seed, False, args.max_steps, stop, labeler=labeler)
            if ep is None:
                break
            resetter()
            traj = (ep["images"], ep["states"], ep["actions"], ep["rewards"], policy.task)
            save_episode(os.path.join(args.out, EPISODE_PATTERN.format(loop["episodes"])), *traj)
            buffer.add_trajectory(*traj)
            loop["live"].append([loop["episodes"], ep["length"]])
            while sum(n for _, n in loop["live"]) > len(
                buffer
            ):  # the buffer dropped its oldest trajectories
                loop["live"].pop(0)
            rng_before_rollout = None
            loop["env_steps"], loop["episodes"] = (
                loop["env_steps"] + ep["length"],
                loop["episodes"] + 1,
            )
            loop["pending"] = args.utd * ep["length"]
            loop["rollouts"].append([ep["return"], float(ep["success"]), ep["length"]])
        if stop.requested:
            if (
                rng_before_rollout is not None
            ):  # the rollout was dropped: rewind the RNGs to before it, so a
                restore_rng(rng_before_rollout[0])  # resumed run collects that same episode again
                agent.generator.set_state(rng_before_rollout[1])
            save()
            print(
                f"stopped at env step {loop['env_steps']}; continue with --resume", file=sys.stderr
            )
            raise SystemExit(stop.exit_status)
    return loop


def cmd_finetune(args):
    with claim_run_folder(args.out, args.resume):
        online_finetune(args)


def online_finetune(args):
    if (
        min(args.mix_prior, args.mix_target, mix_online := 1.0 - args.mix_prior - args.mix_target)
        < 0
    ):
        raise SystemExit(
            f"--mix_prior {args.mix_prior} --mix_target {args.mix_target}: expected a sum <= 1"
        )
    resumed, source, source_path, prior, target = open_run(args)
    size = args.image_size
    agent = agent_from_checkpoint(source, args.device, source_path)
    if agent.cfg.algo == "bc":
        raise SystemExit(
            f"{source_path}: a BC checkpoint has no Q-function to fine-tune online (use a CQL one)"
        )
    if "target_task_ids" in source:  # fine-tuned (or online) already: keep its one-hot assignment
        if list(source["target_tasks"]) != list(target.task_names):
            raise SystemExit(
                f"{source_path} was fine-tuned on {source['target_tasks']}, but --target holds "
                f"{list(target.task_names)}"
            )
        names, target_ids = list(source["task_names"]), list(source["target_task_ids"])
    else:  # a pre-trained checkpoint: the target takes its slots as in finetune.py
        target_ids, names = assign_target_slots(source["task_names"], target.task_names, args.task)
        if len(names) > agent.cfg.num_tasks:
            agent.grow_tasks(len(names))
    low, high, gamma = source["action_low"], source["action_high"], agent.cfg.gamma
    prior_s, target_s = task_samplers(
        prior, target, names, target_ids, source, gamma, args.seed, args.prior
    )
    capacity = (
        args.buffer_capacity or 2 * args.steps + 1000
    )  # >= T + 1 frames per T steps; unused pages cost nothing
    buffer = ReplayBuffer(capacity, size, gamma=gamma, seed=args.seed + 104729)
    offline_prior = args.mix_prior / max(args.mix_prior + args.mix_target, 1e-12)
    offline = MixedSampler([prior_s, target_s], [offline_prior, 1 - offline_prior])
    mixed = MixedSampler([prior_s, target_s, buffer], [args.mix_prior, args.mix_target, mix_online])
    task = target_ids[0]  # the environment runs the (first) target task
    policy = Policy(agent, low, high, task, names[task])
    torch.manual_seed(args.seed)
    loop = {
        "env_steps": 0,
        "grad_steps": 0,
        "episodes": 0,
        "pending": 0,
        "offline_done": 0,
        "next_eval": 0,
        "last_eval": -1,
        "next_save": args.save_every,
        "next_log": 0,
        "sums": {},
        "n_updates": 0,
        "rollouts": [],
        "held_rows": [],
        "train_keys": None,
        "live": [],
    }
    if resumed is not None:
        refill_buffer(buffer, args.out, resumed["loop"]["live"])
        mixed.load_state_dict(resumed["sampler"])
        restore_rng(resumed["rng"])
        loop = resumed["loop"]
    # Cal-QL for the whole run; alpha as the docstring says (and set again before every update)
    agent.cfg.calql, agent.cfg.alpha = (
        args.calql,
        args.alpha_online if len(buffer) else args.alpha_offline,
    )
    payload = {
        "kind": "online",
        "task_names": names,
        "action_low": low,
        "action_high": high,
        "target_task_ids": target_ids,
        "target_tasks": list(target.task_names),
        "online_task": task,
        "source_ckpt": str(source.get("source_ckpt", source_path)),
    }
    write_config(
        args.out,
        args,
        dict(task_names=names, target_task_ids=target_ids, online_task=task, capacity=capacity),
    )
    print(
        f"online fine-tuning task {task} ({names[task]}) in {args.env}: prior/target/online {args.mix_prior}/"
        f"{args.mix_target}/{mix_online:.2f}, UTD {args.utd}, alpha {args.alpha_online}, Cal-QL {args.calql}"
    )
    env = make_env(
        args.env,
        args.env_image_size or size,
        policy.task_name,
        args.max_steps,
        args.port,
        args.backend,
    )
    try:
        labeler = make_labeler(args)
        online_loop(
            agent,
            env,
            policy,
            buffer,
            mixed,
            offline,
            args,
            payload,
            loop,
            make_resetter(args, env),
            labeler,
        )
    except FloatingPointError as e:
        raise SystemExit(f"error: {e}") from None
    finally:
        env.close()


def cmd_eval(args):
    policy = load_policy(args.ckpt, args.device, args.task)
    size = args.env_image_size or policy.size
    env = make_env(args.env, size, policy.task_name, args.max_steps, args.port, args.backend)
    try:
        labeler = make_labeler(args)
        results = evaluate(
            env,
            policy,
            args.episodes,
            args.seed,
            args.max_steps,
            make_resetter(args, env),
            video=(args.save_video, args.video_format) if args.save_video else None,
            labeler=labeler,
        )
    finally:
        env.close()
    s = summarize(results)
    print(f"{s['text']}, mean return {s['return']:.2f}, mean length {s['length']:.1f}")
    if args.json:
        atomic_write_text(
            json.dumps({**s, "ckpt": args.ckpt, "per_episode": results}, indent=2) + "\n", args.json
        )
    return s


def cmd_classifier(args):
    cfg = ClassifierConfig(**{k: getattr(args, k) for k in asdict(ClassifierConfig())})
    pos, neg = (
        read_images(args.pos, cfg.image_size, args.pos_last),
        read_images(args.neg, cfg.image_size),
    )
    print(
        f"{len(pos[0])} positive / {len(neg[0])} negative images; {cfg.arch} at {cfg.image_size}px"
    )
    clf, (acc_pos, acc_neg) = train_classifier(pos, neg, cfg, args.device, args.seed)
    accuracy = (acc_pos + acc_neg) / 2  # balanced: the classes may be of very different sizes
    print(f"held-out accuracy {accuracy:.3f} (positives {acc_pos:.3f}, negatives {acc_neg:.3f})")
    atomic_torch_save(
        {
            "format": CLF_FORMAT,
            "kind": "classifier",
            "threshold": 0.5,
            "val_accuracy": accuracy,
            "config": {k: getattr(cfg, k) for k in ("arch", "head", "norm", "image_size")},
            "model": {k: v.cpu() for k, v in clf.state_dict().items()},
        },
        args.out,
    )
    return accuracy


# ----------------------------------------------------------------------------- CLI


def add_env_args(p):
    p.add_argument("--env", default="binsort", choices=ENVS)
    p.add_argument(
        "--env_image_size", type=int, default=None, help="render size (default: the checkpoint's)"
    )
    p.add_argument(
        "--max_steps", type=int, default=0, help="episode length cap (default: the env's own limit)"
    )
    p.add_argument("--port", default="/dev/ttyUSB0", help="widowx: the U2D2 serial port")
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
        help="rewards from this success classifier (online.py classifier)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser(
        "eval", help="deterministic episodes: success rate with a 95%% Wilson interval"
    )
    e.add_argument("--ckpt", required=True, help="a PTR checkpoint of any phase")
    e.add_argument("--episodes", type=int, default=OnlineConfig.eval_episodes)
    e.add_argument("--seed", type=int, default=0, help="episode i resets with seed + i")
    e.add_argument(
        "--task", default=None, help="task name or index (default: the checkpoint's target task)"
    )
    e.add_argument("--save_video", default=None, help="folder for one animation per episode")
    e.add_argument(
        "--video_format",
        default="gif",
        choices=["gif", "png"],
        help="animated GIF or PNG film strip",
    )
    e.add_argument("--json", default=None, help="also write the results to this JSON file")
    add_env_args(e)

    d = OnlineConfig()
    f = sub.add_parser(
        "finetune", help="online fine-tuning (Section V-F)", conflict_handler="resolve"
    )
    f.add_argument(
        "--ckpt",
        default=None,
        help="a finetune.py (or train.py) checkpoint; not needed with --resume",
    )
    for name in ("prior", "target"):
        f.add_argument(
            f"--{name}", required=True, help=f"the {name} data (Bridge format), as in finetune.py"
        )
        f.add_argument(
            f"--{name}_store", default=None, help="where its store is built (default: inside it)"
        )
    f.add_argument(
        "--task", default="new", help="pre-trained --ckpt only: 'new' slot or a task to re-target"
    )
    add_run_args(f, steps=d.env_steps, save_every=d.save_every, keep_last=0)
    add_data_args(f)
    add_env_args(f)
    # online RL counts in environment steps: these replace add_run_args' gradient-step options
    f.add_argument(
        "--env_steps",
        "--steps",
        dest="steps",
        type=int,
        default=d.env_steps,
        help="environment steps",
    )
    f.add_argument(
        "--save_every", type=int, default=d.save_every, help="checkpoint every N environment steps"
    )
    f.add_argument(
        "--log_every",
        type=int,
        default=1,
        help="a progress row after the trajectory crossing N env steps",
    )
    f.add_argument("--out", default=os.path.join("runs", "online"))
    helps = dict(
        mix_prior="batch fraction of prior data",
        mix_target="... of target demos (online data: the rest)",
        utd="gradient steps per env step",
        alpha_offline="CQL alpha while the buffer is empty",
        alpha_online="CQL alpha once it holds data",
        eval_every="env steps between evaluations (0: none)",
        eval_episodes="episodes per evaluation",
        offline_steps="Cal-QL warm-up steps before the first rollout",
        buffer_capacity="replay buffer size in frames (0: keep everything)",
    )
    for name, text in helps.items():
        f.add_argument(
            f"--{name}", type=type(getattr(d, name)), default=getattr(d, name), help=text
        )
    f.add_argument(
        "--calql", action=argparse.BooleanOptionalAction, default=d.calql, help="the Cal-QL bound"
    )
    f.add_argument(
        "--eval_seed", type=int, default=0, help="evaluation episode i resets with eval_seed + i"
    )

    c = sub.add_parser("classifier", help="train the success classifier (Appendix F)")
    c.add_argument(
        "--pos", required=True, help="success images: a folder of png/jpg, or Bridge-format data"
    )
    c.add_argument("--neg", required=True, help="failure images, the same formats")
    c.add_argument("--out", required=True)
    c.add_argument(
        "--pos_last",
        type=int,
        default=0,
        help="Bridge --pos: only the last N frames of each trajectory",
    )
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    for k, v in asdict(ClassifierConfig()).items():
        c.add_argument(f"--{k}", type=type(v), default=v)
    args = p.parse_args(argv)
    return {"eval": cmd_eval, "finetune": cmd_finetune, "classifier": cmd_classifier}[args.cmd](
        args
    )


if __name__ == "__main__":
    run_cli(main)
