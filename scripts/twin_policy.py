"""scripts/twin_policy.py: does a policy succeed as often through the real-robot path as in the
simulator? A committed bin-sort policy, both ways, on the same seeds (SPEC section 6; twin.py).

- simulator: BinSortEnv, as `online.py eval --env binsort` runs it;
- twin: the same scene in twin.py (a fresh twin per episode, built from the episode's seed), driven
  by robot.py's WidowXEnv over the pseudo-terminal at 5 Hz in real time, its images from the twin's
  camera socket. WidowXEnv starts from the simulator's start joints and clips to the simulator's
  workspace, so that the two differ only in what the real-robot path adds: servo profiles and the
  physics between ticks (latency), widowx.py's IK without the simulator's tilt limit, the
  joint-step limit, the PWM gripper. WidowXEnv knows no success, as on the arm: the twin's world
  answers with the simulator's own success test and stages.

Both use the policy's exported evaluation mode; the actor's sampling generator is reseeded with the
episode's seed at every reset on both sides, so a pair differs only by its environment. A twin
episode that ends in a driver error (a servo not answering in time: the twin shares the machine's
cores with everything else) is counted and run again, up to --retries times. Every finished episode
is appended to <out>/episodes.jsonl at once; a rerun with the same --out resumes after the last.
Printed and written to <out>/summary.json: success and stage rates with Wilson intervals, the
paired exact McNemar test, and on the twin the ticks the watchdog held the arm, IK failures and
ticks where the joint-step limit cut the commanded move.
    python scripts/twin_policy.py --episodes 50 --out results/twin
"""

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import binsort_env  # noqa: E402
import robot  # noqa: E402
import twin  # noqa: E402
from arm import DynamixelArm, open_bus  # noqa: E402
from dynamixel import DynamixelError  # noqa: E402
from fileio import atomic_write_json  # noqa: E402
from rollout import load_policy, run_episode  # noqa: E402
from stats import discordant, mcnemar_exact_p, wilson_interval  # noqa: E402

TASK = "sort"
MAX_STEPS = binsort_env.MAX_STEPS["sort"]
ENVS = ("simulator", "twin")


class TwinSort:
    """WidowXEnv on a fresh twin of the sort scene per episode; success and stages from the twin's
    world. counts: this episode's watchdog holds, IK failures and joint-step cuts."""

    def __init__(self, image_size, start_joints, max_joint_step=0.3):
        self.image_size = image_size
        self.start_joints = start_joints
        self.max_joint_step = max_joint_step
        self.twin = None
        self.env = None
        self.counts = {}

    def reset(self, seed=None):
        self.close()
        self.twin = twin.Twin(TASK, int(seed), log=lambda line: None).start()
        bus = open_bus(twin.PtyPort(self.twin.port))
        self.env = robot.WidowXEnv(
            arm=DynamixelArm(bus, log=lambda *a: None),
            camera=f"twin:{self.twin.port}",
            image_size=self.image_size,
            max_steps=MAX_STEPS,
            workspace=(binsort_env.WORKSPACE_LOW, binsort_env.WORKSPACE_HIGH),
            max_joint_step=self.max_joint_step,
            reset_joints=self.start_joints,
            log=lambda *a: None,
        )
        self.counts = {"watchdog": 0, "ik_error": 0, "joint_step_cut": 0}
        return self.env.reset()

    def step(self, action):
        goal = self._uncut_goal(action)
        q_now = self.env._q.copy()
        obs, _, _, truncated, info = self.env.step(action)
        self.counts["watchdog"] += bool(info.get("held_by_watchdog"))
        self.counts["ik_error"] += "ik_error" in info
        if goal is not None and np.any(np.abs(goal - q_now) > self.max_joint_step):
            self.counts["joint_step_cut"] += 1
        with self.twin.lock:
            world = self.twin.world.env.info()
        success = bool(world["success"])
        info = {**info, "success": success, "stages": world["stages"]}
        return obs, float(success), success, truncated and not success, info

    def _uncut_goal(self, action):
        """The joints WidowXEnv's IK asks for this tick before the joint-step limit (None: IK
        fails); WidowXEnv's pose target is left as it was."""
        saved = self.env.max_joint_step, self.env._target.copy()
        self.env.max_joint_step = np.inf
        info = {}
        try:
            goal = self.env._next_joints(np.asarray(action, float), info)
        finally:
            self.env.max_joint_step, self.env._target = saved
        return None if "ik_error" in info else goal

    def close(self):
        if self.env is not None:
            try:
                self.env.close()
            except DynamixelError:  # the bus failed mid-episode; the twin goes anyway
                pass
            self.env = None
        if self.twin is not None:
            self.twin.close()
            self.twin = None


def episode(env, policy, seed, deterministic):
    """One evaluation episode, the sampling generator reseeded with its seed -> its record."""
    policy.agent.generator.manual_seed(int(seed))
    ep = run_episode(env, policy, seed, deterministic, MAX_STEPS)
    return {
        "seed": int(seed),
        "success": bool(ep["success"]),
        "length": ep["length"],
        "stages": {k: bool(v) for k, v in ep["stages"].items()},
    }


def rate(records, stage=None):
    """{count, n, rate, lo, hi}: full sorts, or episodes that reached `stage`."""
    hits = [r["success"] if stage is None else r["stages"].get(stage, False) for r in records]
    k, n = sum(hits), len(hits)
    lo, hi = wilson_interval(k, n)
    return {"count": k, "n": n, "rate": k / n, "lo": lo, "hi": hi}


def summarize(records, ckpt, mode):
    """The summary of paired records {env: [record]} (same seeds, same order)."""
    a = [r["success"] for r in records["simulator"]]
    b = [r["success"] for r in records["twin"]]
    only_sim, only_twin = discordant(a, b)
    stages = sorted({k for r in records["simulator"] for k in r["stages"]})
    twin_totals = {
        k: sum(r["counts"][k] for r in records["twin"])
        for k in ("watchdog", "ik_error", "joint_step_cut", "driver_errors")
    }
    return {
        "ckpt": ckpt,
        "evaluation": mode,
        "seeds": [r["seed"] for r in records["simulator"]],
        "success": {name: rate(recs) for name, recs in records.items()},
        "stages": {name: {s: rate(recs, s) for s in stages} for name, recs in records.items()},
        "mcnemar": {
            "only_simulator": only_sim,
            "only_twin": only_twin,
            "p": mcnemar_exact_p(only_sim, only_twin),
        },
        "twin_totals": twin_totals,
        "mean_length": {
            name: float(np.mean([r["length"] for r in recs])) for name, recs in records.items()
        },
        "wall_s": {name: sum(r["wall_s"] for r in recs) for name, recs in records.items()},
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", default="results/binsort/ptr_policy.pt")
    p.add_argument("--episodes", type=int, default=50)
    p.add_argument("--seed", type=int, default=1000, help="the first (development) seed")
    p.add_argument("--retries", type=int, default=3, help="reruns of a twin episode that errs")
    p.add_argument("--out", required=True, help="folder of episodes.jsonl and summary.json")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    log_path = os.path.join(args.out, "episodes.jsonl")
    done = []
    if os.path.exists(log_path):
        with open(log_path) as f:
            done = [json.loads(line) for line in f if line.strip()]
    policy = load_policy(args.ckpt, "cpu")
    mode = policy.evaluation
    deterministic = not mode.get("sample_actions", False)
    sim = binsort_env.BinSortEnv(TASK, image_size=policy.size, max_steps=MAX_STEPS)
    sim.reset(seed=args.seed)
    start = sim._q.copy()  # the simulator's start joints: IK of START_POS, the same every seed
    twin_env = TwinSort(policy.size, start)
    try:
        for seed in range(args.seed + len(done), args.seed + args.episodes):
            row = {"seed": seed}
            for name in ENVS:
                env = sim if name == "simulator" else twin_env
                errors = 0
                while True:
                    t0 = time.time()
                    try:
                        record = episode(env, policy, seed, deterministic)
                        break
                    except DynamixelError as e:
                        errors += 1
                        print(f"{name} seed {seed}: driver error ({e}); attempt {errors + 1}")
                        if errors > args.retries:
                            raise
                record["wall_s"] = time.time() - t0
                record["counts"] = {**getattr(env, "counts", {}), "driver_errors": errors}
                row[name] = record
                print(
                    f"{name} seed {seed}: {'success' if record['success'] else 'failure'}, "
                    f"{record['length']} steps, stages {record['stages']}, {record['counts']}",
                    flush=True,
                )
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            done.append(row)
    finally:
        twin_env.close()
        sim.close()
    records = {name: [row[name] for row in done] for name in ENVS}
    summary = summarize(records, args.ckpt, mode)
    atomic_write_json(summary, os.path.join(args.out, "summary.json"), indent=1)
    for name in ENVS:
        s = summary["success"][name]
        reached = ", ".join(f"{k} {v['count']}" for k, v in summary["stages"][name].items())
        print(
            f"{name}: {s['count']}/{s['n']} = {100 * s['rate']:.0f}% [{100 * s['lo']:.0f}, "
            f"{100 * s['hi']:.0f}] full sorts ({reached}); mean length "
            f"{summary['mean_length'][name]:.1f}; {summary['wall_s'][name]:.0f} s"
        )
    m = summary["mcnemar"]
    print(
        f"paired: {m['only_simulator']} sorted only in the simulator, {m['only_twin']} only on "
        f"the twin, exact McNemar p = {m['p']:.3g}; twin totals {summary['twin_totals']}"
    )


if __name__ == "__main__":
    main()
