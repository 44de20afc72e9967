"""Why a pick-and-place policy fails: two offline measurements on a simulator store
(`git show 2ac9c78:results/binsort_round3/report.md`, section 2) and a per-step log of one
simulated episode.

    python scripts/diagnose_bc.py probe  STORE [--arch small --head spatial --lr 1e-4 --steps 400]
    python scripts/diagnose_bc.py valmse STORE CKPT [CKPT ...]
    python scripts/diagnose_bc.py labels STORE
    python scripts/diagnose_bc.py rollout CKPT --task pick_cube_to_left [--seed 1000 --every 2]

probe   Can the encoder find the object at all? Trains an encoder + MLP to regress the object's xy
        from the image alone, on the frames before the demo closes the gripper (the object has not
        moved; its xy is the end-effector's xy at the close, where the scripted policy grasps it),
        and prints the held-out error in cm against the spread of the positions.
valmse  Does a policy use what the image shows? Its action error on the store's val split, in
        normalized units, before the first close and after it, and on the first two steps alone:
        there the arm always starts from the same pose, so the xy action (towards the object)
        depends on the image only, and a policy that ignores the image scores the variance of those
        actions (printed as the baseline).
labels  Does each view get one gripper label? For every demo, how far above the view that first
        commands "close" the view before it (which commanded "open") was: 0 cm means the arm stood
        at the grasp height and the same view was recorded both open and closed (two labels for
        one view); and the demos' mean length.
rollout Where does an episode break? One deterministic episode in the simulator (gripper
        binarized, as the protocol evaluates), a line per step: fingertip position, finger
        opening, the commanded translation and gripper, each goal object's position, what the
        fingers hold and which bin each object lies in.

STORE is a converted store folder (<data>/.ptr_store/<key>, as train.py prints "using store ...").
"""

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import batches  # noqa: E402
import checkpoint  # noqa: E402
import model  # noqa: E402
from store import SPLITS, Store  # noqa: E402

GRIPPER = 6
CLOSED_BELOW = 0.5  # a raw gripper command under this closes


def images(store, frames):
    return torch.from_numpy(np.array(store.images[frames])).permute(0, 3, 1, 2).contiguous()


def first_close(actions):
    """Index of the first step that commands the gripper closed, or None."""
    closed = np.flatnonzero(actions[:, GRIPPER] < CLOSED_BELOW)
    return int(closed[0]) if len(closed) else None


def trajectories(store, split=None):
    """(trajectory id, first frame, first transition, length) of each trajectory (of a split)."""
    for i in store.trajectory_ids(split):
        start = int(store.traj_start[i])
        yield int(i), start + int(i), start, int(store.traj_length[i])


def probe_labels(store):
    """Frames before each demo's grasp, the object's xy there, and the split of each frame."""
    frames = []
    labels = []
    splits = []
    for split in SPLITS:
        for _, frame0, start, length in trajectories(store, split):
            close = first_close(np.asarray(store.actions[start : start + length]))
            if close is None:
                continue
            xy = np.asarray(store.states[frame0 + close, :2])
            for t in range(max(close - 2, 1)):  # the arm above the object, the object unmoved
                frames.append(frame0 + t)
                labels.append(xy)
                splits.append(split)
    return np.array(frames), np.array(labels, np.float32), np.array(splits)


def probe(args):
    store = Store(args.store)
    frames, labels, splits = probe_labels(store)
    train_rows = np.flatnonzero(splits == "train")
    val_rows = np.flatnonzero(splits == "val")
    mean = labels[train_rows].mean(0)
    std = labels[train_rows].std(0)
    target = torch.from_numpy((labels - mean) / std)
    torch.manual_seed(0)
    encoder = model.make_encoder(args.arch, args.head, "group", store.image_size[0], 256)
    head = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 2))
    params = [*encoder.parameters(), *head.parameters()]
    optimizer = torch.optim.Adam(params, lr=args.lr)
    rng = np.random.default_rng(0)
    t0 = time.time()
    print(f"{len(train_rows)} train / {len(val_rows)} val frames; object xy spread (std) ", end="")
    print(f"{100 * std[0]:.1f} / {100 * std[1]:.1f} cm")
    for step in range(1, args.steps + 1):
        rows = rng.choice(train_rows, args.batch_size)
        x = batches.augment(images(store, frames[rows]), pad=args.pad)
        loss = (head(encoder(x)) - target[rows]).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % max(args.steps // 4, 1) == 0:
            encoder.eval()
            head.eval()
            with torch.no_grad():
                chunks = [val_rows[k : k + 256] for k in range(0, len(val_rows), 256)]
                pred = torch.cat([head(encoder(images(store, frames[c]))) for c in chunks])
            encoder.train()
            head.train()
            rmse = np.sqrt(((pred - target[val_rows]).numpy() ** 2).mean(0)) * std * 100
            print(
                f"{args.arch}/{args.head} lr {args.lr} step {step}: train loss {loss.item():.3f}, "
                f"val error x {rmse[0]:.2f} cm, y {rmse[1]:.2f} cm ({time.time() - t0:.0f} s)"
            )


def labels(args):
    store = Store(args.store)
    heights = []
    lengths = []
    for _, frame0, start, length in trajectories(store):
        close = first_close(np.asarray(store.actions[start : start + length]))
        if close is None or close == 0:
            continue
        z = np.asarray(store.states[frame0 + close - 1 : frame0 + close + 1, 2])
        heights.append(100 * (z[0] - z[1]))
        lengths.append(length)
    heights = np.array(heights)
    print(
        f"{len(heights)} demos that close the gripper, {np.mean(lengths):.1f} steps on average; "
        f"the 'open' view before the first 'close' view is {np.median(heights):.2f} cm above it "
        f"(median), under 0.5 cm in {100 * np.mean(heights < 0.5):.0f}% of the demos"
    )


def valmse(args):
    store = Store(args.store)
    first_actions = []
    for path in args.ckpt:
        ckpt = checkpoint.load_checkpoint(path)
        agent = checkpoint.agent_from_checkpoint(ckpt, "cpu", path)
        low = np.asarray(ckpt["action_low"])
        high = np.asarray(ckpt["action_high"])
        before, after, first = [], [], []
        for i, frame0, start, length in trajectories(store, "val"):
            actions = np.asarray(store.actions[start : start + length])
            task = ckpt["task_names"].index(store.task_names[store.traj_task[i]])
            obs = images(store, np.arange(frame0, frame0 + length))
            state = torch.from_numpy(np.array(store.states[frame0 : frame0 + length]))
            pred = agent.act(obs, state, torch.full((length,), task)).numpy()
            wanted = batches.rescale_actions(actions, low, high)  # clipped to +-ACTION_CLIP
            error = (pred - wanted) ** 2
            close = first_close(actions)
            close = length if close is None else close
            before.append(error[:close])
            after.append(error[close:])
            first.append(error[:2, :2])
            if len(first_actions) < len(first):
                first_actions.append(wanted[:2, :2])
        before = np.concatenate(before)
        after = np.concatenate(after)
        everything = np.concatenate([before, after]).mean()
        first_xy = np.concatenate(first).mean()
        baseline = np.concatenate(first_actions).var(0).mean()
        print(
            f"{path}: val MSE {everything:.4f}; before the first close {before.mean():.4f} (xy "
            f"{before[:, :2].mean():.4f}, gripper {before[:, GRIPPER].mean():.4f}); after it "
            f"{after.mean():.4f} (gripper {after[:, GRIPPER].mean():.4f}); first two steps' xy "
            f"{first_xy:.4f} (baseline: their variance {baseline:.4f})"
        )


def rollout(args):
    from rollout import load_policy  # the policy wrapper: only this subcommand needs it
    import binsort_env

    policy = load_policy(args.ckpt, "cpu", task=args.task, binarize_gripper=True)
    env = binsort_env.BinSortEnv(task=args.task, image_size=policy.size)
    obs = env.reset(seed=args.seed)
    actions = "sampled" if args.sample_actions else "the mean"
    print(f"{args.ckpt}: {args.task}, seed {args.seed}, actions {actions}; positions in cm")
    for t in range(env.max_steps):
        raw, _ = policy(obs["image"], obs["state"], deterministic=not args.sample_actions)
        obs, _, terminated, truncated, info = env.step(raw)
        if t % args.every == 0 or terminated or truncated:
            objects = " ".join(
                f"{name} {np.round(env.object_position(name) * 100, 1)} in {info['in_bin'][name]}"
                for name in env.goal
            )
            print(
                f"step {t:3d} fingertips {np.round(obs['state'][:3] * 100, 1)} opening "
                f"{obs['state'][GRIPPER]:.2f} | command {np.round(raw[:3] * 100, 1)} gripper "
                f"{raw[GRIPPER]:.0f} | {objects} | held {info['held']}"
            )
        if terminated or truncated:
            break
    print(f"success {info['success']}, stages {info['stages']}")
    env.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("probe")
    p.add_argument("store")
    p.add_argument("--arch", default="small", choices=model.ARCHS)
    p.add_argument("--head", default="spatial", choices=model.HEADS)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--pad", type=int, default=4, help="random-shift padding, as in training")
    g = sub.add_parser("labels")
    g.add_argument("store")
    v = sub.add_parser("valmse")
    v.add_argument("store")
    v.add_argument("ckpt", nargs="+")
    r = sub.add_parser("rollout")
    r.add_argument("ckpt")
    r.add_argument("--task", required=True, help="e.g. pick_cube_to_left or sort")
    r.add_argument("--seed", type=int, default=1000)
    r.add_argument("--every", type=int, default=1, help="print every N-th step")
    r.add_argument("--sample_actions", action="store_true", help="as online.py eval's")
    args = ap.parse_args()
    torch.set_num_threads(1)
    commands = {"probe": probe, "labels": labels, "valmse": valmse, "rollout": rollout}
    commands[args.cmd](args)


if __name__ == "__main__":
    main()
