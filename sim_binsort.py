"""sim_binsort.py: scripted demos, replay and collection in the simulated bin-sort task of PTR.

Kumar et al., RSS 2023, Appendix A and B.2; SPEC section 2, level 2. The world (the PyBullet scene,
the objects, the tasks, BinSortEnv) is binsort_env.py's; this file drives it: scripted and
teleoperated-looking demos, open-loop replay, collection in the Bridge numpy format, a film strip
and the sim command line. Pre-training data: pick-and-place demos (one of 10 objects into one of
the two bins, about 25 steps); target data: sort demos (two given objects, each into its own bin,
about 60 steps).

Design choices (SPEC sections 2, 5, 7):
- Scripted demos decide from each observation which phase they are in and command that phase on
  the same step: the step that reaches the grasp height closes, the first step holding the object
  lifts. A switch a step late would record "open" and then "close" from the same view at the
  bottom, and a deterministic BC policy averages the two and hovers there.
- Scripted demos add Gaussian noise of std SCRIPTED_NOISE (0.1, --noise) in normalized action units
  (fractions of each half range): 0.1 -> 5 mm, 0.025 rad, 0.05 of the gripper range.
- Collection stops 3 steps after success, so the 3 steps the Bridge relabelling rewards are
  successful; its environment does not end an episode at success (terminate_on_success=False).
- `collect --style teleop` (TeleopStyle, TeleopPolicy): demos that look teleoperated, for prior data
  of mixed quality: noise 0.3, pauses, detours the script corrects, and a fraction of attempts kept
  failed or cut short with their zero rewards (data.py marks them failed, batches.py never
  relabels them). Its random draws come from streams of their own (episode_stream).
- Data: the Bridge numpy format (SPEC 5): <out>/<task>/{train,val}/out.npy, tasks
  "pick_duck_to_left", "sort_mug_cube". Usage:
      python sim_binsort.py collect --task pickplace --n 2000 --out data/binsort/prior
      python sim_binsort.py collect --task sort --n 5 --out data/binsort/target
      python sim_binsort.py show --out strip.png   (speed: scripts/bench_sim.py)
      python sim_binsort.py twin +h                (twin.py: the arm behind a pty)
"""

import argparse
import multiprocessing as mp
import os
import sys
import time
import zlib
from dataclasses import dataclass, fields
from typing import NamedTuple

import numpy as np

from binsort_env import (
    ACTION_HIGH,
    ACTION_LOW,
    BINS,
    DISTRACTORS,
    MAX_STEPS,
    OBJECTS,
    SORT_PAIR,
    BinSortEnv,
    parse_task,
    task_name,
)
from bridge import bridge_trajectory, write_bridge_file
from cli import add_dataclass_args, dataclass_from_args
from fileio import atomic_write
from widowx import R_DOWN, euler_to_mat, mat_to_euler

# ---------------------------------------------------------------- constants and dataclasses
# the scripted demos' default action noise: std in normalized action units (fractions of each half
# range of the action bounds)
SCRIPTED_NOISE = 0.1
# scripted policy heights of the fingertips (m)
HOVER_Z = 0.13
CARRY_Z = 0.13
RELEASE_Z = 0.10
# The parts of an episode that draw from random streams of their own (episode_stream)
TELEOP_STREAM = 1  # the operator's pauses and detours
CUT_STREAM = 2  # the step at which an imperfect attempt is cut short
OUTCOMES = ("success", "failed", "partial")  # what a kept attempt was (collect's summary)
_WORKER = {}  # the environment of this (worker) process, made by its first collection job


@dataclass(frozen=True)
class TeleopStyle:
    """Demos that look like a person at a teleop interface (collect --style teleop; each field is a
    flag of collect). Bridge keeps teleoperated attempts of every quality; scripted demos that all
    succeed are the case where imitation is nearly optimal. These add noisier actions, pauses and
    hesitations, and keep a fraction of the attempts as they end, with their true zero reward."""

    teleop_noise: float = 0.3  # action noise std in normalized action units (scripted: --noise)
    pause_prob: float = 0.05  # chance per step that a pause starts: zero motion, the gripper held
    pause_steps: int = 3  # steps of one pause
    detour_prob: float = 0.05  # chance per step that a hesitation (a detour) starts
    detour_steps: int = 2  # steps of one detour, each detour_size in one random direction
    detour_size: float = 0.02  # metres per detour step (at most 0.05); the script then steers back
    imperfect: float = 0.3  # fraction of the demos (in each split) kept failed or cut short

    def __post_init__(self):
        # (field, lowest, highest value); a pause and a detour share one draw per step, so their
        # chances add up to at most 1, and a detour step stays inside the action bound
        ranges = [
            ("teleop_noise", 0, np.inf),
            ("pause_prob", 0, 1),
            ("pause_steps", 1, np.inf),
            ("detour_prob", 0, 1 - self.pause_prob),
            ("detour_steps", 1, np.inf),
            ("detour_size", 0, ACTION_HIGH[0]),
            ("imperfect", 0, 1),
        ]
        for name, low, high in ranges:
            value = getattr(self, name)
            if not low <= value <= high:
                raise ValueError(
                    f"sim_binsort.py: --{name} {value}: expected a value in [{low}, {high:g}]"
                )


@dataclass(frozen=True)
class CollectOptions:
    """How `collect` makes its demos (collect's arguments; each field is a flag of collect, seed,
    image_size and noise also of show)."""

    seed: int = 0  # every demo's attempts draw from seeds derived from it (demo_seed); show's seed
    image_size: int = 128  # rendered images' size (px)
    noise: float = SCRIPTED_NOISE  # action noise std in normalized units (teleop: --teleop_noise)
    workers: int = 1  # worker processes
    keep_failures: bool = False  # keep failed first attempts (their rewards key is 0)
    val_frac: float = 0.1  # held-out demos per task, as a fraction of its training demos
    min_val: int = 3  # held-out demos per task at least
    sort_pair: str = ",".join(SORT_PAIR)  # a,b: a goes to the left bin, b to the right
    distractors: int = DISTRACTORS  # distractor objects in pick-place scenes
    max_attempts: int = 20  # attempts at one demo before collect gives up
    first: str | None = None  # sort demos: the object placed first (default: sort_pair's first)


SHOW_FLAGS = ("seed", "image_size", "noise")  # CollectOptions' fields that are flags of show too


class _Job(NamedTuple):
    """One demo to collect, a job of the worker pool: collect's arguments and this demo's place."""

    name: str
    split: str
    index: int
    seed: int
    noise: float
    keep_failures: bool
    max_attempts: int
    env_kwargs: dict
    first: str | None
    teleop: TeleopStyle | None  # None: the scripted style
    imperfect: bool  # this demo is kept as a failed or partial attempt (teleop style)


# ---------------------------------------------------------------- scripted demonstrations
def _wrap_half_pi(angle):
    """An angle modulo pi, in [-pi/2, pi/2): the two-finger gripper is symmetric under a half
    turn."""
    return (angle + np.pi / 2) % np.pi - np.pi / 2


class ScriptedPolicy:
    """Pick-and-place from the simulator's state, one (object, bin) after another: approach above
    the object (fingers across an elongated one), descend, close, lift, carry, lower, open, check; a
    missed grasp, a drop or a bounce out of the bin restarts that sub-goal. Noise N(0, noise^2) in
    normalized action units, then clipped to the bounds."""

    def __init__(self, env, noise=SCRIPTED_NOISE, rng=None, max_step=0.025, first=None):
        self.env = env
        self.noise = noise
        self.max_step = max_step
        self.rng = np.random.default_rng(rng)
        # Sort demos place the objects in one fixed order: `first` (an object of the goal), then
        # the other; by default the goal's order (the mug, then the cube). With either order at
        # random, 5 demos would show each second segment (from one bin to the other object) only
        # two or three times, too few for a policy to learn it.
        self.plan = list(env.goal.items())
        if first is not None and len(self.plan) > 1:
            if first not in env.goal:
                raise ValueError(f"sim_binsort.py: first={first!r} is not an object of {env.goal}")
            self.plan.sort(key=lambda item: item[0] != first)
        self.phase = "approach"
        self.count = 0  # steps spent in this phase

    def _next(self, phase):
        self.phase = phase
        self.count = 0

    def _goal(self, obs, name, bin_name):
        """(goal position of the fingertips, gripper command) for the current phase; advances the
        phase."""
        env = self.env
        pos = obs["state"][:3].astype(np.float64)
        obj = env.client.getBasePositionAndOrientation(env.objects[name])[0]
        lo, hi = np.array(env.client.getAABB(env.objects[name]))
        bin_xy = BINS[bin_name]
        held = env.held
        grasp_z = max(
            lo[2] + 0.004, hi[2] - 0.04
        )  # fingertips (the end-effector point) near the bottom
        self.count += 1
        if self.phase == "approach":
            yaw_error = _wrap_half_pi(obs["state"][5] - self.yaw_goal)
            near = np.linalg.norm(pos[:2] - np.array(obj[:2])) < 0.012
            if near and abs(pos[2] - HOVER_Z) < 0.03 and abs(yaw_error) < 0.15:
                self._next("descend")
            return np.array([obj[0], obj[1], HOVER_Z]), 1.0
        if self.phase == "descend":
            if abs(pos[2] - grasp_z) < 0.008:
                self._next("close")
            return np.array([obj[0], obj[1], grasp_z]), 1.0
        if self.phase == "close":
            # held is known after one closed step; without a grasp two closed steps end the try
            if held == name:
                self._next("lift")
            elif self.count >= 3:
                self._next("approach")
            return np.array([obj[0], obj[1], grasp_z]), 0.0
        if self.phase == "release":
            if self.count >= 3:
                if env.info()["in_bin"][name] == bin_name:
                    self.plan.pop(0)
                self._next("approach")
            return np.array([*bin_xy, RELEASE_Z]), 1.0
        # lift, carry, lower: holding the object
        if self.phase == "lift":
            goal = np.array([pos[0], pos[1], CARRY_Z])
        elif self.phase == "carry":
            goal = np.array([*bin_xy, CARRY_Z])
        else:
            goal = np.array([*bin_xy, RELEASE_Z])
        if held != name:
            self._next("approach")
        elif self.phase == "lift" and pos[2] > CARRY_Z - 0.03:
            self._next("carry")
        elif self.phase == "carry" and np.linalg.norm(pos[:2] - bin_xy) < 0.025:
            self._next("lower")
        elif self.phase == "lower" and pos[2] < RELEASE_Z + 0.015:
            self._next("release")
        return goal, 0.0

    def _command(self, obs):
        """(goal, gripper command) of the first sub-goal of the plan; sets yaw_goal."""
        env = self.env
        self.yaw_goal = 0.0
        if not self.plan:  # the plan is done: go up and stay
            pos = obs["state"][:3].astype(np.float64)
            return np.array([pos[0], pos[1], CARRY_Z]), 1.0
        name, bin_name = self.plan[0]
        if env.grasp_yaw[name] is not None:  # any yaw modulo pi: the one nearest to 0
            orn = env.client.getBasePositionAndOrientation(env.objects[name])[1]
            yaw = env.client.getEulerFromQuaternion(orn)[2]
            self.yaw_goal = _wrap_half_pi(yaw + env.grasp_yaw[name])
        return self._goal(obs, name, bin_name)

    def __call__(self, obs):
        env = self.env
        phase = self.phase
        goal, grip = self._command(obs)
        if self.phase != phase:
            # the phase ended on this observation: the next one commands this step, so each view
            # gets one label (the module docstring, "Scripted demos decide ...")
            goal, grip = self._command(obs)
        # the action moves the accumulated target (not the measured pose) towards the goal
        translation = np.clip(goal - env.target_pos, -self.max_step, self.max_step)
        rotation = mat_to_euler(euler_to_mat([0, 0, self.yaw_goal]) @ R_DOWN @ env.target_R.T)
        action = np.concatenate([translation, rotation, [grip]])
        half_range = (ACTION_HIGH - ACTION_LOW) / 2
        action += self.noise * half_range * self.rng.standard_normal(7)  # normalized units
        return np.clip(action, ACTION_LOW, ACTION_HIGH).astype(np.float32)


# ---------------------------------------------------------------- teleoperated-looking demos
class TeleopPolicy:
    """A person at a teleop interface, on top of a ScriptedPolicy (made with TeleopStyle's noise).
    Before each step a pause may start (pause_steps steps of zero motion, the gripper held at its
    last command) or a hesitation (detour_steps steps of detour_size metres in one random
    direction, the gripper held). The scripted policy corrects a detour by itself: it steers the
    accumulated target, wherever the detour left it, towards its goal. These choices come from a
    random stream of their own, so with both chances 0 the actions are the scripted policy's."""

    def __init__(self, scripted, style, rng):
        self.scripted = scripted
        self.style = style
        self.rng = rng
        self.planned = []  # the actions left of the pause or detour under way
        self.gripper = 1.0  # the last gripper command; the arm starts open

    def _held(self, translation):
        """One action that moves by `translation` (m), turns nothing and keeps the gripper."""
        return np.array([*translation, 0.0, 0.0, 0.0, self.gripper], np.float32)

    def _interruption(self):
        """The actions of a pause or a detour that starts now, or [] (the script goes on)."""
        draw = self.rng.random()
        if draw < self.style.pause_prob:
            return [self._held(np.zeros(3))] * self.style.pause_steps
        if draw < self.style.pause_prob + self.style.detour_prob:
            direction = self.rng.standard_normal(3)
            direction /= np.linalg.norm(direction)
            return [self._held(self.style.detour_size * direction)] * self.style.detour_steps
        return []

    def __call__(self, obs):
        if not self.planned:
            self.planned = self._interruption()
        if self.planned:
            action = self.planned.pop(0)
        else:
            action = self.scripted(obs)
        self.gripper = float(action[6])
        return action


# ---------------------------------------------------------------- episodes and replay
def episode_stream(seed, part):
    """A random generator for one part of an episode, derived from the episode's seed as a stream
    of its own: the scripted policy's noise draws stay those of the scripted episode."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(part,)))


def scripted_episode(
    env,
    task,
    seed,
    noise=SCRIPTED_NOISE,
    extra_success_steps=2,
    first=None,
    teleop=None,
    max_steps=None,
):
    """One scripted episode (reset included), stopped `extra_success_steps` steps after the task is
    first solved; seed: int or list of ints; first: see ScriptedPolicy. teleop: a TeleopStyle,
    whose TeleopPolicy wraps the scripted policy (its teleop_noise replaces `noise`); max_steps:
    stop after this many steps at the latest (an attempt cut short; the env's limit holds too).
    Returns (T + 1 observations, actions (T, 7), rewards (T,), success at the end).
    env.reset(seed=env_seed_of(seed)) gives the same world again (replay_actions)."""
    env_seed, policy_seed = np.random.SeedSequence(seed).generate_state(2)
    obs = env.reset(seed=int(env_seed), task=task)
    scripted_noise = noise if teleop is None else teleop.teleop_noise
    policy_rng = np.random.default_rng(int(policy_seed))
    policy = ScriptedPolicy(env, scripted_noise, policy_rng, first=first)
    if teleop is not None:
        policy = TeleopPolicy(policy, teleop, episode_stream(seed, TELEOP_STREAM))
    observations = [obs]
    actions = []
    rewards = []
    streak = 0  # consecutive successful steps
    for _ in range(min(max_steps or env.max_steps, env.max_steps)):
        actions.append(policy(obs))
        obs, reward, terminated, truncated, info = env.step(actions[-1])
        observations.append(obs)
        rewards.append(reward)
        streak = streak + 1 if info["success"] else 0
        if terminated or truncated or streak > extra_success_steps:
            break
    actions = np.array(actions, np.float32)
    rewards = np.array(rewards, np.float32)
    return observations, actions, rewards, bool(rewards[-1] > 0)


def env_seed_of(seed):
    """The env.reset seed that scripted_episode(env, task, seed) used."""
    return int(np.random.SeedSequence(seed).generate_state(2)[0])


def replay_actions(env, task, seed, actions):
    """Open loop: reset as scripted_episode(env, task, seed) did and execute the recorded actions.
    Returns (observations, info of the last step)."""
    observations = [env.reset(seed=env_seed_of(seed), task=task)]
    info = env.info()
    for action in actions:
        obs, _, terminated, truncated, info = env.step(action)
        observations.append(obs)
        if terminated or truncated:
            break
    return observations, info


# ---------------------------------------------------------- data collection (Bridge format, SPEC 5)
def outcome_of(rewards, limit):
    """success: a positive reward somewhere (what the store calls a success); else partial when the
    attempt stopped before the step limit (cut short), failed when it ran out of steps."""
    if (rewards > 0).any():
        return "success"
    return "partial" if len(rewards) < limit else "failed"


def cut_step(seed, limit):
    """The step after which an imperfect attempt is cut short: uniform in 1..limit, from the
    attempt's seed (a cut at the limit is an attempt that fails on its own)."""
    return int(episode_stream(seed, CUT_STREAM).integers(1, limit + 1))


def _collect_job(job):
    """Attempts at one demo until one ends as the demo should: with success at the end, or for an
    imperfect demo without any success (failed, or cut short at a random step). Seeds from (seed,
    task, split, index, attempt) and a world rebuilt at every reset make the data independent of
    --workers. Returns (name, split, trajectory, discarded attempts, steps run, outcome)."""
    if "env" not in _WORKER:
        _WORKER["env"] = BinSortEnv(terminate_on_success=False, **job.env_kwargs)
    env = _WORKER["env"]
    limit = MAX_STEPS[parse_task(job.name, env.sort_pair)[0]]
    steps = 0
    for attempt in range(job.max_attempts):
        key = demo_seed(job.seed, job.name, job.split, job.index, attempt)
        cut = cut_step(key, limit) if job.imperfect else None
        observations, actions, rewards, ok = scripted_episode(
            env, job.name, key, job.noise, first=job.first, teleop=job.teleop, max_steps=cut
        )
        steps += len(actions)
        outcome = outcome_of(rewards, limit)
        wanted = (outcome != "success") if job.imperfect else ok
        if wanted or job.keep_failures:
            trajectory = bridge_trajectory(observations, actions, rewards)
            return job.name, job.split, trajectory, attempt, steps, outcome
    raise RuntimeError(_gave_up(job))


def _gave_up(job):
    """Why _collect_job found no attempt it could keep, in one line."""
    demo = f"{job.name} ({job.split} demo {job.index})"
    if job.imperfect:
        return (
            f"sim_binsort.py: all {job.max_attempts} attempts at an imperfect demo of {demo} "
            "succeeded before their cut; raise --max_attempts"
        )
    noise = "--noise" if job.teleop is None else "--teleop_noise"
    return (
        f"sim_binsort.py: the scripted policy failed {job.max_attempts} times in a row on {demo}; "
        f"raise --max_attempts or lower {noise}"
    )


def demo_seed(seed, name, split, index, attempt=0):
    """The scripted_episode seed of one collected demo."""
    return [seed, zlib.crc32(name.encode()), ("train", "val").index(split), index, attempt]


def imperfect_demos(seed, slots, fraction):
    """Which demos, of slots [(task, split, index)], are imperfect attempts: in each split,
    round(fraction * its demos) of them at random over all its tasks (pick-place has 20 tasks, often
    with a demo or two each). Drawn from the collection's seed, so independent of --workers."""
    rng = np.random.default_rng([seed, zlib.crc32(b"imperfect")])
    chosen = set()
    for split in ("train", "val"):
        in_split = [slot for slot in slots if slot[1] == split]
        picks = rng.choice(len(in_split), int(fraction * len(in_split) + 0.5), replace=False)
        chosen.update(in_split[k] for k in picks)
    return chosen


def collect(task, n, out, options=CollectOptions(), log=sys.stderr, teleop=None):
    """Scripted demos into <out>/<task name>/{train,val}/out.npy. The n training demos are split
    evenly over the tasks; each task also gets max(min_val, round(val_frac * its n)) held-out demos
    (options: CollectOptions). first: the object sort demos place first (ScriptedPolicy), sort_pair
    "a,b" the objects of a sort scene. teleop: a TeleopStyle for demos that
    look teleoperated (--style teleop), a fraction teleop.imperfect of each split's demos imperfect
    attempts kept with their zero rewards (imperfect_demos); None: the scripted style. Returns a
    summary, with the count of each outcome (OUTCOMES) of the kept demos."""
    seed, val_frac, min_val = options.seed, options.val_frac, options.min_val
    sort_pair = tuple(options.sort_pair.split(","))
    parse_task(
        "sort_" + "_".join(sort_pair), sort_pair
    )  # a bad --sort_pair fails here, not in a worker
    if task == "pickplace":  # the 20 tasks
        names = ["pick_%s_to_%s" % (obj, bin_name) for obj in OBJECTS for bin_name in BINS]
    else:
        names = [task_name(*parse_task(task, sort_pair))]
    env_kwargs = {
        "image_size": options.image_size,
        "sort_pair": sort_pair,
        "num_distractors": options.distractors,
    }
    counts = {}
    for k, name in enumerate(names):
        n_train = n // len(names) + (k < n % len(names))
        if n_train > 0:
            counts[name] = {"train": n_train, "val": max(min_val, round(val_frac * n_train))}
    # every demo to collect, by task, split ("train" first) and index: the jobs' order
    slots = [
        (name, split, i)
        for name in counts
        for split in counts[name]
        for i in range(counts[name][split])
    ]
    imperfect = set()
    if teleop is not None:
        imperfect = imperfect_demos(seed, slots, teleop.imperfect)
    jobs = []
    for name, split, i in slots:
        job = _Job(
            name=name,
            split=split,
            index=i,
            seed=seed,
            noise=options.noise,
            keep_failures=options.keep_failures,
            max_attempts=options.max_attempts,
            env_kwargs=env_kwargs,
            first=options.first,
            teleop=teleop,
            imperfect=(name, split, i) in imperfect,
        )
        jobs.append(job)
    # spawn, not fork: a forked PyBullet client is not safe
    workers = options.workers
    pool = mp.get_context("spawn").Pool(workers) if workers > 1 else None
    # imap keeps the job order, whoever ran a job
    results = pool.imap(_collect_job, jobs) if pool else map(_collect_job, jobs)
    t0 = time.time()
    steps = 0
    discarded = 0
    outcomes = dict.fromkeys(OUTCOMES, 0)
    # an imperfect demo discards attempts that succeeded, so the teleop style says "attempts"
    rejected = "failed attempts" if teleop is None else "attempts"
    pending = {}
    try:
        for done, (name, split, trajectory, attempt, job_steps, outcome) in enumerate(results, 1):
            pending.setdefault(name, {"train": [], "val": []})[split].append(trajectory)
            steps += job_steps
            discarded += attempt
            outcomes[outcome] += 1
            complete = all(len(pending[name][s]) == counts[name][s] for s in ("train", "val"))
            if complete:
                for s, trajectories in pending.pop(name).items():
                    write_bridge_file(os.path.join(out, name, s, "out.npy"), trajectories)
            if log is not None:
                elapsed = time.time() - t0
                eta = (len(jobs) - done) * elapsed / done
                end = "\n" if done == len(jobs) else ""
                log.write(
                    f"\rcollect: {done}/{len(jobs)} demos ({name}), {discarded} {rejected} "
                    f"discarded, {steps / elapsed:.0f} steps/s, eta {eta:.0f}s {end}"
                )
    finally:
        if pool is not None:
            pool.terminate()
        _WORKER.clear()
    return {
        "tasks": counts,
        "demos": len(jobs),
        "steps": steps,
        "discarded": discarded,
        "outcomes": outcomes,
        "seconds": time.time() - t0,
    }


def collect_report(summary, out, teleop=None):
    """The line `collect` prints: what it wrote; for the teleop style also each outcome's count."""
    if teleop is None:
        return (
            f"wrote {summary['demos']} demos ({summary['steps']} steps, "
            f"{summary['discarded']} failed attempts discarded) in {summary['seconds']:.0f}s "
            f"for {len(summary['tasks'])} task(s) to {out}"
        )
    kept = ", ".join(f"{summary['outcomes'][o]} {o}" for o in OUTCOMES)
    return (
        f"wrote {summary['demos']} teleop-style demos ({kept}; {summary['steps']} steps, "
        f"{summary['discarded']} attempts discarded) in {summary['seconds']:.0f}s "
        f"for {len(summary['tasks'])} task(s) to {out}"
    )


# ---------------------------------------------------------------- show, command line
@dataclass(frozen=True)
class ShowOptions:
    """The film strip `show` draws (each field is a flag of show)."""

    out: str = "strip.png"  # the PNG to write
    task: str = "sort"  # the episode's task (binsort_env.parse_task)
    frames: int = 12  # frames in the strip, evenly spaced over the episode


def show(strip=ShowOptions(), options=CollectOptions()):
    """A PNG film strip (one row, 2 px white gaps) of one scripted episode; options: its seed,
    image_size and noise."""
    from PIL import Image  # pillow: only this subcommand needs it

    out, task, frames, image_size = strip.out, strip.task, strip.frames, options.image_size
    env = BinSortEnv(task, image_size, terminate_on_success=False)
    observations, actions, _, ok = scripted_episode(env, task, options.seed, options.noise)
    env.close()
    picks = np.unique(np.linspace(0, len(observations) - 1, frames).round().astype(int))
    gap = np.full((image_size, 2, 3), 255, np.uint8)
    tiles = []
    for i in picks:
        tiles += [gap, observations[i]["image"]]
    strip = np.concatenate(tiles[1:], axis=1)
    atomic_write(out, lambda f: Image.fromarray(strip).save(f, format="PNG"))
    print(
        f"{out}: {env.task_name}, {len(actions)} steps, success {ok}, "
        f"frames at steps {picks.tolist()}"
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    collect_only = [f.name for f in fields(CollectOptions) if f.name not in SHOW_FLAGS]
    add_dataclass_args(common, CollectOptions, skip=collect_only)
    c = sub.add_parser(
        "collect", parents=[common], help="scripted demos in the Bridge numpy format"
    )
    c.add_argument(
        "--task", default="pickplace", help="pickplace | sort | pick_<obj>_to_<bin> | sort_<a>_<b>"
    )
    c.add_argument(
        "--n", type=int, required=True, help="training demos in all, split evenly over the tasks"
    )
    c.add_argument("--out", required=True, help="writes OUT/<task name>/{train,val}/out.npy")
    add_dataclass_args(
        c, CollectOptions, skip=SHOW_FLAGS, switches=("keep_failures",), literal=("first",)
    )
    c.add_argument(
        "--style",
        choices=("scripted", "teleop"),
        default="scripted",
        help="scripted demos, or demos that look teleoperated (the TeleopStyle flags below)",
    )
    add_dataclass_args(c.add_argument_group("--style teleop (TeleopStyle)"), TeleopStyle)
    s = sub.add_parser("show", parents=[common], help="PNG film strip of one scripted episode")
    add_dataclass_args(s, ShowOptions)
    # prefix "+": every flag after `twin` is twin.py's, passed on as it is
    t = sub.add_parser("twin", prefix_chars="+", help="python twin.py: the arm behind a pty")
    t.add_argument("twin_args", nargs="*", help="twin.py's flags (python twin.py -h)")
    args = ap.parse_args(argv)
    if args.cmd == "twin":  # imported when asked for: only this subcommand needs twin.py
        import twin
        from cli import run_cli

        run_cli(twin.main, args.twin_args)
    if args.cmd == "collect":
        teleop = dataclass_from_args(TeleopStyle, args) if args.style == "teleop" else None
        options = dataclass_from_args(CollectOptions, args)
        summary = collect(args.task, args.n, args.out, options, teleop=teleop)
        print(collect_report(summary, args.out, teleop))
    else:
        show(dataclass_from_args(ShowOptions, args), dataclass_from_args(CollectOptions, args))


if __name__ == "__main__":
    main()
