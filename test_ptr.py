"""The PTR-torch test suite: CPU only, small networks and images, about a minute on a laptop.

One file, in two parts; the test doubles it shares are fakes.py's (a Dynamixel bus behind a
pseudo-terminal, a camera, Interbotix's API, stand-in policies and environments). First the
builders that every section shares: synthetic Bridge-format trees and stores, tiny agents, run
folders, a fine-tuned checkpoint, arms and twins on fakes.py's servos. Then the tests: the layout
(every file imports only from lower levels, SPEC section 2), then the project's files in import
order: cli.py, fileio.py, runfolder.py, widowx.py, dynamixel.py (fileio.py also through the data,
robot and simulator tests); model.py; cql.py; data.py with store.py and its format readers
bridge.py, rlds.py and lerobot.py; batches.py (tested on data.py's stores); train.py with
checkpoint.py; finetune.py; select_ckpt.py; classifier.py; arm.py and robot.py; twin.py;
binsort_env.py and sim_binsort.py; rollout.py and online.py (which drive robot.py and
binsort_env.py); then bench.py, stats.py and every script's command line. A test sits with the
module whose behaviour it checks, even when it reaches that module through a later one."""

import argparse
import ast
import contextlib
import copy
import csv
import dataclasses
import errno
import importlib.util
import json
import math
import os
import pathlib
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import arm as wxarm
import batches
import bench
import binsort_env as benv
import bridge
import checkpoint
import classifier
import cli
import cql
import data
import dynamixel
import fileio
import finetune
import lerobot
import model
import online
import rlds
import robot
import rollout
import runfolder
import select_ckpt
import servos
import sim_binsort as sb
import stats
import train
import twin
import widowx
from cql import Agent, AgentConfig
from fakes import (
    MECH,
    BrightAtEnv,
    CtrlCAt,
    FakeBus,
    ModuleEnv,
    RecordingPolicy,
    RedCamera,
    ReplayAgent,
    SerialException,
    StagedEnv,
    SucceedAt,
    ZeroPolicy,
    fake_interbotix,
)
from store import FORMAT_VERSION, Store, StoreError

# The networks here are tiny: one thread beats two that spend their time synchronising, and a busy
# machine (CI, a laptop) does not turn a 3-second test into a 100-second one.
torch.set_num_threads(1)


# ==================================================================================================
# Fakes and builders, shared by every section (in the order of the sections that use them)
# ==================================================================================================


# ---- cli.py: a dataclass whose fields become flags -----------------------------------------------
@dataclasses.dataclass
class _Flags:
    """A config whose flags add_dataclass_args generates (the comments are the help)."""

    lr: float = 1e-3  # step size, 100% of it
    wide: int = 4  # a comment on a wrapped line
    flag: bool = False  # on or off
    maybe: float | None = None


# ---- widowx.py: the arm's geometry by hand -------------------------------------------------------
def _planar_fk(q):
    """The tip's (x, z) and pitch by hand, in the arm's x-z plane (waist and rolls at 0).

    The shoulder, elbow and wrist angle turn about y."""
    joints = np.array([[0, 0.11065], [0.04975, 0.36065], [0.29975, 0.36065], [0.458325, 0.36065]])
    p = joints[0].copy()
    phi = 0.0
    for k, angle in enumerate((q[1], q[2], q[4])):
        phi += angle
        d = joints[k + 1] - joints[k]
        p += [d[0] * np.cos(phi) + d[1] * np.sin(phi), -d[0] * np.sin(phi) + d[1] * np.cos(phi)]
    return p, phi


# the joint limits, written out (not widowx.py's): the range the random joints are drawn from
_ARM_LOW = np.deg2rad([-180, -108, -123, -180, -100, -180])
_ARM_HIGH = np.deg2rad([180, 114, 92, 180, 123, 180])


def _rot(axis, angle):
    """The rotation by `angle` about axis 0, 1 or 2 (x, y or z), as a 3 x 3 matrix."""
    c, s = np.cos(angle), np.sin(angle)
    i, j = [(1, 2), (2, 0), (0, 1)][axis]
    R = np.eye(3)
    R[i, i] = c
    R[i, j] = -s
    R[j, i] = s
    R[j, j] = c
    return R


# ---- dynamixel.py, arm.py, robot.py: an arm and an env on fakes.py's servos ----------------------
# generous: the fake's thread shares 2 busy cores; only the timeout test uses a short one
_BUS_TIMEOUT = 0.5


@pytest.fixture
def robot_bus():
    """A FakeBus for one test, closed after it."""
    pytest.importorskip("termios")  # pseudo-terminals: Linux and macOS
    bus = FakeBus()
    yield bus
    bus.close()


def _fake_arm(fake, **kw):
    """A DynamixelArm on the fake bus (kw: the arm's options, e.g. log)."""
    return wxarm.DynamixelArm(wxarm.open_bus(fake.port, timeout=_BUS_TIMEOUT), **kw)


def _fake_env(fake, **kw):
    """A quiet WidowXEnv of 32 px images on the fake bus, fast enough for tests (kw: options)."""
    arm = _fake_arm(fake, log=lambda *a: None)
    arm.velocity_limit = 1e3  # the fake arrives at once: moves need not take the real arm's time
    kw = dict(
        camera=RedCamera((32, 32)),
        image_size=32,
        control_hz=100.0,
        watchdog_s=0,
        move_s=0.05,
        log=lambda *a: None,
        **kw,
    )
    return robot.WidowXEnv(arm=arm, **kw)


def _timed_arm(fake, monkeypatch, clock=None, **kw):
    """A quiet arm on the fake bus and the list of its sleeps -> (arm, slept).

    arm.py's time: its sleep records instead of sleeping, its monotonic runs `clock[0]` s ahead."""
    slept = []
    if clock is None:
        clock = [0.0]
    monkeypatch.setattr(
        wxarm,
        "time",
        types.SimpleNamespace(monotonic=lambda: time.monotonic() + clock[0], sleep=slept.append),
    )
    return _fake_arm(fake, log=lambda *a: None, **kw), slept


def _sync_goals(fake, since=0):
    """The goal positions of every SYNC_WRITE to 116 after packet `since`: [{id: ticks}]."""
    out = []
    for _t, inst, p in fake.packets[since:]:
        if inst == dynamixel.SYNC_WRITE and struct.unpack_from("<H", p)[0] == 116:
            out.append({p[k]: struct.unpack_from("<i", p, k + 1)[0] for k in range(4, len(p), 5)})
    return out


def _packet_index(fake, inst, addr, since, target=None):
    """The index in fake.packets of the first packet from `since` on with this instruction and
    start address (and target)."""
    return next(
        k
        for k, (t, i, p) in enumerate(fake.packets)
        if k >= since
        and i == inst
        and struct.unpack_from("<H", p)[0] == addr
        and target in (None, t)
    )


def _moving_packets(fake, since):
    """The packets after `since` that can move or reconfigure a servo: WRITE, SYNC_WRITE, REBOOT."""
    moving = (dynamixel.WRITE, dynamixel.SYNC_WRITE, dynamixel.REBOOT)
    return [(t, i, p) for t, i, p in fake.packets[since:] if i in moving]


def _main_on(fake, monkeypatch, **options):
    """robot.main() on the fake bus; the fake's port stays open when main closes its bus."""
    port = types.SimpleNamespace(
        name=fake.port.name,
        read=fake.port.read,
        write=fake.port.write,
        reset_input_buffer=fake.port.reset_input_buffer,
        close=lambda: None,
    )

    def open_bus(path, baud):
        return dynamixel.DynamixelBus(
            port, baud, names=wxarm.SERVO_NAMES, **{"timeout": _BUS_TIMEOUT, **options}
        )

    # check opens its bus in robot.py, the other commands through arm.make_arm
    monkeypatch.setattr(robot, "open_bus", open_bus)
    monkeypatch.setattr(wxarm, "open_bus", open_bus)
    return port


def _run_robot_cli(argv, capsys):
    """cli.run_cli(robot.main, argv) -> (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as e:
        cli.run_cli(robot.main, argv)
    out, err = capsys.readouterr()
    return e.value.code, out, err


# ---- twin.py: the simulated arm behind a pseudo-terminal -----------------------------------------
# the twin's world runs 10 x real time, and robot.py's clock is the twin's: a 2 s move takes 0.2 s
_TWIN_SPEED = 10.0


@pytest.fixture
def make_twin(monkeypatch):
    """-> start(**options of twin.Twin): a running twin at _TWIN_SPEED whose clock the sleeps and
    timestamps of robot.py and arm.py follow. Every twin started is closed after the test."""
    pytest.importorskip("termios")  # pseudo-terminals: Linux and macOS
    twins = []

    def start(**options):
        arm = twin.Twin(speed=_TWIN_SPEED, log=lambda line: None, **options).start()
        twins.append(arm)
        clock = types.SimpleNamespace(monotonic=arm.clock, sleep=arm.sleep)
        monkeypatch.setattr(robot, "time", clock)
        monkeypatch.setattr(wxarm, "time", clock)
        return arm

    yield start
    for arm in twins:
        arm.close()


def _twin_bus(arm, timeout=0.1, retries=3):
    """A DynamixelBus on the twin's port (a path, as robot.py opens a U2D2)."""
    port = twin.PtyPort(arm.port)
    return dynamixel.DynamixelBus(port, timeout=timeout, retries=retries, names=wxarm.SERVO_NAMES)


def _twin_cli(monkeypatch):
    """robot.py's commands open their bus on the twin's port without pyserial."""

    def open_bus(path, baud):
        return _twin_bus(types.SimpleNamespace(port=path))

    monkeypatch.setattr(robot, "open_bus", open_bus)
    monkeypatch.setattr(wxarm, "open_bus", open_bus)


def _twin_env(arm, **options):
    """A quiet WidowXEnv on the twin, with the twin's camera: 32 px, 0.5 s moves, no watchdog."""
    driver = wxarm.DynamixelArm(_twin_bus(arm), log=lambda *a: None)
    kw = dict(image_size=32, watchdog_s=0, move_s=0.5, log=lambda *a: None, **options)
    return robot.WidowXEnv(arm=driver, camera=f"twin:{arm.port}", **kw)


def _twin_state(arm):
    """The twin's joint angles (rad), finger opening (m) and torques, once it has handled every
    packet sent before: writes get no reply, a PING's round trip comes after them."""
    bus = _twin_bus(arm)
    bus.ping(1)
    bus.close()
    with arm.lock:
        torques = [servo.torque for servo in arm.servos.values()]
        return arm.world.q.copy(), arm.world.width, torques


# ---- model.py, cql.py: tiny networks and agents --------------------------------------------------
def _tiny_config(**kw):
    """The AgentConfig of a tiny agent: 'small' encoder, 32 px, 3 tasks, width 32 (kw: changes)."""
    base = dict(arch="small", image_size=32, num_tasks=3, hidden=32, embed_dim=32, seed=0)
    base.update(kw)
    return AgentConfig(**base)


def _random_images(b, size=32, seed=0):
    """A batch of b random uint8 images, (b, 3, size, size)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, size, size), generator=generator, dtype=torch.uint8)


def _tiny_qnet(every_layer):
    """A QNetwork of 3 hidden layers of 32 on a 16-d 'small' embedding, 3 tasks, 7-d actions."""
    torch.manual_seed(0)
    encoder = model.make_encoder("small", image_size=32, embed_dim=16)
    return model.QNetwork(encoder, 3, 7, 32, 3, every_layer)


def _act_on(agent, batch):
    """agent.act() on a batch's images, states and tasks."""
    return agent.act(batch["obs"], batch["state"], batch["task"])


def _policy_mean(pi, z, state, onehot):
    """The pre-tanh mean of a TanhGaussianPolicy, or a BCPolicy's action."""
    if isinstance(pi, model.TanhGaussianPolicy):
        return pi.dist(z, state, onehot)[0]
    return pi.head(z, state, onehot)


def _loss_entries(info):
    """The losses, Q-values and gradient norms of an update's info dict."""
    return {k: v for k, v in info.items() if "loss" in k or k.startswith(("q_", "cql_", "grad"))}


# ---- data.py: Bridge-format trees and stores, good and broken ------------------------------------
def _write_tree(root, tasks, n_traj=4, T=5, H=8, n_val=1, cameras=("images0",), seed=0):
    """A tiny Bridge-format tree: root/<task path>/train/out.npy (+ val/out.npy when n_val > 0).

    tasks: task paths like "kitchen1/put_a_in_b" (the task name is the last part). T: an int or a
    list of lengths, cycled over each file's trajectories. cameras: e.g. ("images0", "images1").
    Images are random uint8 (H, H, 3), actions in the release's raw ranges. seed: an int or a
    np.random.Generator (to continue one stream over several calls). Returns
    {task path: {"train": [...], "val": [...]}}."""
    rng = np.random.default_rng(seed)
    lengths = np.atleast_1d(T)
    written = {}
    for task in tasks:
        written[task] = {}
        for split, n in (("train", n_traj), ("val", n_val)):
            if n:
                trajs = [
                    bridge.synthetic_trajectory(int(lengths[i % len(lengths)]), H, rng, cameras)
                    for i in range(n)
                ]
                bridge.write_bridge_file(os.path.join(root, task, split, "out.npy"), trajs)
                written[task][split] = trajs
    return written


def _tree_store(tmp_path, tasks=("k1/task_a",), **kw):
    """A tree under tmp_path/tree (kw: _write_tree's) and its store -> (store, what was written)."""
    tree = _write_tree(tmp_path / "tree", tasks, **kw)
    return data.load_store(tmp_path / "tree", log=lambda *_: None), tree


def _nhwc(images):
    """A (N, C, H, W) tensor of images as a (N, H, W, C) numpy array."""
    return images.permute(0, 2, 3, 1).numpy()


def _good_trajectory(T=3):
    """A valid T-step Bridge trajectory of 8 px images, the same one for every call."""
    return bridge.synthetic_trajectory(T, 8, np.random.default_rng(0))


def _bridge_frames(traj):
    """A Bridge trajectory's T + 1 camera images and states, each stacked into one array."""
    steps = [*traj["observations"], traj["next_observations"][-1]]
    return np.stack([o["images0"] for o in steps]), np.stack([o["state"] for o in steps])


def _save_npy(path, obj):
    """An .npy file of anything (a list: as an object array), as a broken release file would be."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    arr = np.empty(len(obj), dtype=object) if isinstance(obj, list) else obj
    if isinstance(obj, list):
        arr[:] = obj
    np.save(path, arr, allow_pickle=True)


def _assert_bad_input(tmp_path, trajectories, match, **kw):
    """Converting an out.npy of these trajectories fails with `match` and the file's path, and
    leaves no store and no temporary folder (kw: load_store's options)."""
    path = str(tmp_path / "bad" / "k" / "a" / "train" / "out.npy")
    _save_npy(path, trajectories)
    with pytest.raises(bridge.BridgeFormatError, match=match) as e:
        data.load_store(tmp_path / "bad", store=tmp_path / "s", log=lambda *_: None, **kw)
    assert path in str(e.value)
    leftovers = [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    assert not os.path.exists(tmp_path / "s") and not leftovers


def _damage_store(store, case):
    """Damage a store the way a crash, a full disk or a careless hand does (case: a _DAMAGE key)."""
    meta = json.loads((store / "meta.json").read_text())
    frames = meta["num_transitions"] + len(np.load(store / "trajectories.npz")["length"])
    if case == "truncated images":
        (store / "images.npy").write_bytes((store / "images.npy").read_bytes()[:-100])
    elif case == "truncated states":
        (store / "states.npy").write_bytes((store / "states.npy").read_bytes()[:200])
    elif case == "deleted actions":
        (store / "actions.npy").unlink()
    elif case == "bad trajectories":
        (store / "trajectories.npz").write_bytes(b"PK\x03\x04 not a zip archive")
    elif case == "garbage meta":
        (store / "meta.json").write_text("{'not': json")
    elif case == "fewer rows":
        np.save(store / "actions.npy", np.zeros((meta["num_transitions"] - 1, 7), np.float32))
    elif case == "more rows":
        np.save(store / "states.npy", np.zeros((frames + 1, 7), np.float32))


# case -> (the damaged file, what the error says about it); the store: 9 transitions, 11 frames
_DAMAGE = {
    "truncated images": ("images.npy", r"truncated or unreadable"),
    "truncated states": ("states.npy", r"truncated or unreadable"),
    "deleted actions": ("actions.npy", r"missing"),
    "bad trajectories": ("trajectories.npz", r"unreadable"),
    "garbage meta": ("meta.json", r"unreadable \(JSONDecodeError"),
    "fewer rows": ("actions.npy", r"expected a float32 array of shape \(9, 7\) .* shape \(8, 7\)"),
    "more rows": ("states.npy", r"expected a float32 array of shape \(11, 7\) .* shape \(12, 7\)"),
}


# ---- rlds.py, lerobot.py: smooth episodes in other formats ---------------------------------------
# mean |error| per pixel (of 255) on the smooth fixture images, after JPEG q95 / video at crf 18
# (measured: ~1.5 for JPEG, ~1.7 for h264 and AV1)
JPEG_TOLERANCE = 3.0
VIDEO_TOLERANCE = 4.0
# brightness between consecutive frames: a frame read off by one is far outside the tolerances
FRAME_STEP = 8


def _smooth_trajectory(T, H, rng, cameras=2, episode=0):
    """A Bridge trajectory of T actions with smooth images (JPEG and video keep them within the
    tolerances above) whose brightness tells camera, episode and step apart (FRAME_STEP a step)."""
    y, x = np.mgrid[0:H, 0:H] / H
    ramp = np.stack([x, y, (x + y) / 2], -1) * 60
    obs = []
    for t in range(T + 1):
        o = {"state": rng.normal(size=7).astype(np.float32)}
        for c in range(cameras):
            level = (20 + 40 * c + 17 * episode + FRAME_STEP * t) % 120
            o[f"images{c}"] = (ramp + level).astype(np.uint8)
        obs.append(o)
    actions = rng.uniform(-1, 1, (T, 7)).astype(np.float32)
    return {
        "observations": obs[:-1],
        "next_observations": obs[1:],
        "actions": actions,
        "terminals": np.zeros(T),
    }


def _stored_steps(traj):
    """What a T-step RLDS / LeRobot episode made from traj holds, as a Bridge trajectory: the T
    observations and T - 1 actions (the release's final next observation is not stored)."""
    obs = [{"image": o["images0"], "state": o["state"]} for o in traj["observations"]]
    return bridge.bridge_trajectory(obs, traj["actions"][:-1])


def _write_rlds(folder, n=5, T=(4, 6, 5), H=16, num_shards=2, split="train", seed=0):
    """An RLDS folder of n smooth episodes of 3 tasks -> [(trajectory, file path, instruction)]."""
    rng = np.random.default_rng(seed)
    episodes = []
    for k in range(n):
        traj = _smooth_trajectory(T[k % len(T)], H, rng, episode=k)
        path = f"/data/bridge_data_v2/toykitchen{k % 2}/task_{k % 3}/{k}/{split}/out.npy"
        episodes.append((traj, path, f"put the {k % 3} in the pot"))
    rlds.write_bridge_rlds(folder, episodes, num_shards=num_shards, split=split)
    return episodes


def _store_trajectories(st):
    """(task name, split, frames, states, actions) of each trajectory of a store, in store order."""
    images = np.asarray(st.images)
    states = np.asarray(st.states)
    out = []
    for k, (start, length) in enumerate(zip(st.traj_start, st.traj_length)):
        frames = slice(start + k, start + k + length + 1)  # T + 1 frames, see store.py's docstring
        out.append(
            (
                st.task_names[st.traj_task[k]],
                int(st.traj_split[k]),
                images[frames],
                states[frames],
                np.asarray(st.actions[start : start + length]),
            )
        )
    return out


def _rewrite_record(shard, index, change):
    """Rewrite record `index` of a shard: change(features dict) edits the decoded Example."""
    records = list(rlds.read_tfrecords(shard))
    features = rlds.parse_example(records[index])
    change(features)
    records[index] = rlds.encode_example(features)
    rlds.write_tfrecords(shard, records)


# ---- train.py, finetune.py, select_ckpt.py: command lines, run folders, checkpoints --------------
HERE = os.path.dirname(os.path.abspath(__file__))
# a tiny learner on the CPU; finetune.py takes TINY[2:] (the architecture is the checkpoint's)
TINY = "--arch small --image_size 32 --batch_size 8 --log_every 1 --device cpu".split()


def _run_script(script, *args, expect_ok=True):
    """Run one of the scripts as a user would -> the finished process (stdout, stderr as text).

    One thread, so that parallel tests do not fight for the cores; expect_ok: fail on a non-zero
    exit status."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, script), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f"{script} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def pipe_data(tmp_path_factory):
    """A prior tree (pick_a, pick_b, open_door) and a target tree (sort_ab) of 40 px images
    -> (root, prior, target)."""
    root = tmp_path_factory.mktemp("pipe")
    prior = root / "prior"
    target = root / "target"
    _write_tree(prior, ["k1/pick_a", "k1/pick_b", "k2/open_door"], n_traj=4, T=8, H=40)
    _write_tree(target, ["sort_ab"], n_traj=4, T=10, H=40)
    return root, prior, target


@pytest.fixture(scope="module")
def pipe_pretrained(pipe_data):
    """A pre-training run folder on pipe_data's prior: 4 steps, checkpoints 2 and 4, one reserved
    task slot."""
    root, prior, _ = pipe_data
    out = root / "pre"
    args = ["--data", str(prior), "--out", str(out), "--steps", "4", "--save_every", "2"]
    train.main([*args, "--extra_tasks", "1", "--seed", "3", *TINY])
    return out


def _finetune_args(ckpt, prior, target, out, *flags):
    """finetune.py's argv: a tiny fine-tuning run of ckpt on prior and target data into out."""
    paths = ["--ckpt", ckpt, "--prior", prior, "--target", target, "--out", out]
    return [*map(str, paths), *flags, *TINY[2:]]


def _ckpt_agent(path):
    """The agent's state of a checkpoint file, as a dict."""
    return {k: v for k, v in checkpoint.load_checkpoint(str(path))["agent"].items()}


def _deep_equal(a, b):
    """Whether two nests of dicts, lists, tuples and tensors are equal, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_deep_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_deep_equal(x, y) for x, y in zip(a, b))
    return a == b


def _dead_pid():
    """The pid of an ended (reaped) process: what a kill -9 leaves in a lock or tmp name."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_qtraces(folder, traces, g, reward=()):
    """A fine-tuning run folder for select_ckpt.py: an empty checkpoint and a Q-value trace per
    step of traces {step: Q along held-out trajectory 5 (head 1; head 2 is Q + 1)}, MC returns g."""
    for step, q in traces.items():
        (folder / runfolder.CKPT_PATTERN.format(step)).write_bytes(b"")
        trajectory = {
            "traj_id": 5,
            "q": [list(q), [v + 1 for v in q]],
            "mc_return": list(g),
            "reward": list(reward),
        }
        doc = {"step": step, "task": 0, "trajectories": [trajectory]}
        (folder / runfolder.QTRACE_PATTERN.format(step)).write_text(json.dumps(doc))


# ---- rollout.py, online.py: a fine-tuned checkpoint, short runs, wrapped environments ------------
_ONLINE_FLAGS = (
    "--env_steps 8 --max_steps 4 --utd 2 --batch_size 10 --eval_every 4 --eval_episodes 1 "
    "--save_every 4 --device cpu"
).split()
_ONLINE_GAMMA = 0.98


@pytest.fixture(scope="module")
def online_setup(tmp_path_factory):
    """A synthetic prior (pick_a, pick_b) and target (sort_mug_cube, a task the simulator knows)
    at 32 px, and ft.pt: a fine-tuned-looking checkpoint of a 'small' agent whose target task
    takes one-hot slot 2 -> the root folder."""
    root = tmp_path_factory.mktemp("online")
    rng = np.random.default_rng(0)  # one stream over both trees
    _write_tree(
        root, ["prior/k1/pick_a", "prior/k1/pick_b"], n_traj=2, n_val=2, T=6, H=32, seed=rng
    )
    _write_tree(root, ["target/sort_mug_cube"], n_traj=2, n_val=2, T=8, H=32, seed=rng)
    prior = data.load_store(str(root / "prior"), log=lambda *a: None)
    cfg = AgentConfig(num_tasks=3, arch="small", image_size=32, gamma=_ONLINE_GAMMA, alpha=1.0)
    ckpt = {
        "format": checkpoint.CKPT_FORMAT,
        "kind": "finetune",
        "step": 0,
        "agent": checkpoint.agent_state(Agent(cfg)),
        "task_names": ["pick_a", "pick_b", "sort_mug_cube"],
        "action_low": prior.action_low.tolist(),
        "action_high": prior.action_high.tolist(),
        "target_task_ids": [2],
        "target_tasks": ["sort_mug_cube"],
    }
    checkpoint.atomic_torch_save(ckpt, str(root / "ft.pt"))
    return root


def _online_finetune_args(root, out, *extra):
    """online.py finetune's argv for online_setup's checkpoint and data, a short run into out."""
    paths = ["--ckpt", root / "ft.pt", "--prior", root / "prior", "--target", root / "target"]
    return ["finetune", *map(str, paths), "--out", str(out), *_ONLINE_FLAGS, *extra]


def _record_updates(monkeypatch):
    """Every Agent.update call: (alpha, calql, task ids, mc returns) of its batch, then the real
    update -> the list of calls."""
    calls = []
    real = Agent.update

    def update(self, batch):
        calls.append(
            (self.cfg.alpha, self.cfg.calql, batch["task"].tolist(), batch["mc_return"].tolist())
        )
        return real(self, batch)

    monkeypatch.setattr(Agent, "update", update)
    return calls


def _wrap_env(monkeypatch, wrap):
    """online.make_env builds its environment as it does unpatched, then hands back
    wrap(environment)."""
    real = online.make_env
    monkeypatch.setattr(online, "make_env", lambda *a, **k: wrap(real(*a, **k)))


def _write_png_folder(folder, value, n, rng):
    """A new folder of n noisy 40 px PNG images around the grey level `value`."""
    folder.mkdir()
    for i in range(n):
        img = np.clip(value + rng.integers(-20, 21, (40, 40, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{i}.png")


def _progress_rows(path):
    """The rows of a progress.csv as dicts, without the columns that depend on the clock (online
    runs: wall_<part>_s too)."""
    clock = ("time", "steps_per_s")
    with open(path) as f:
        return [
            {k: v for k, v in r.items() if k not in clock and not k.startswith("wall_")}
            for r in csv.DictReader(f)
        ]


# ==================================================================================================
# the layout: every file in its level (SPEC section 2)
# ==================================================================================================
LEVELS = {
    **dict.fromkeys(["model", "widowx", "dynamixel", "cli", "fileio", "stats"], 0),
    **dict.fromkeys(["bridge", "cql", "arm", "binsort_env", "runfolder", "servos"], 1),
    **dict.fromkeys(["batches", "rlds", "lerobot", "checkpoint", "robot", "sim_binsort"], 2),
    "store": 2,
    **dict.fromkeys(["data", "rollout", "select_ckpt", "bench", "twin"], 3),
    **dict.fromkeys(["train", "classifier"], 4),
    "finetune": 5,
    "online": 6,
}
# the world's side: the arm and the simulator, their environments and their tools
WORLD = {"arm", "binsort_env", "robot", "servos", "sim_binsort", "twin"}
COMMAND_HANDOFFS = {("sim_binsort", "twin", "main")}  # (file, imported, function)
ENV_FACTORY = ("rollout", "make_env")
UNLEVELLED = {"test_ptr", "fakes"}  # level -: they may import anything, as scripts/ may


def _project_imports(path, stems):
    """(imported project file, line, innermost enclosing function or None) of every `import x` and
    `from x import y` in the file, at module level and inside functions, except under
    `if TYPE_CHECKING:`."""
    found = []

    def visit(node, function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names = [child.module]
            else:
                names = []
            found.extend((n.split(".")[0], child.lineno, function) for n in names)
            inner = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            visit(child, child.name if inner else function)

    with open(path) as f:
        visit(ast.parse(f.read(), path), None)
    return [(stem, line, function) for stem, line, function in found if stem in stems]


def test_layout_every_file_imports_only_lower_levels():
    """SPEC section 2's levels, read from the code. Every import of a project file, at module level
    or inside a function, goes to a strictly lower level, so a level-0 file imports nothing from
    the project. The world's side (WORLD: arm, binsort_env, robot, servos, sim_binsort, twin) builds
    on itself under that rule alone; any other file imports it only lazily, inside rollout.make_env
    ("Environments are imported lazily by the env factory only"), so that training, fine-tuning and
    evaluation import neither PyBullet nor the serial bus until an environment is made. test_ptr.py
    and fakes.py (and scripts/) may import anything. Every .py file at the root has a level: a new
    file must be placed in LEVELS. One command hand-off is allowed upward (COMMAND_HANDOFFS):
    `python sim_binsort.py twin`, the documented way to start the twin, runs twin.main; twin is
    imported in main() only, and no code of sim_binsort uses it."""
    stems = {p.stem for p in pathlib.Path(HERE).glob("*.py")}
    assert stems - UNLEVELLED == set(LEVELS), (
        f"files without a level (add them to LEVELS): {sorted(stems - UNLEVELLED - set(LEVELS))}; "
        f"levels of files that do not exist: {sorted(set(LEVELS) - stems)}"
    )
    broken = []
    for stem, level in LEVELS.items():
        for imported, line, function in _project_imports(os.path.join(HERE, f"{stem}.py"), stems):
            where = f"{stem}.py:{line} (level {level}) imports {imported}"
            if imported in UNLEVELLED:
                broken.append(f"{where}, a test file")
            elif (stem, imported, function) in COMMAND_HANDOFFS:
                continue
            elif LEVELS[imported] >= level:
                broken.append(f"{where} (level {LEVELS[imported]}): not a lower level")
            elif imported in WORLD and stem not in WORLD and (stem, function) != ENV_FACTORY:
                inside = f"in {function}()" if function else "at module level"
                broken.append(f"{where} {inside}: only rollout.make_env imports the world's side")
    assert not broken, "\n".join(broken)


# ==================================================================================================
# cli.py
# ==================================================================================================


def test_cli_literal_str_or_none_flag_takes_the_word_none_as_its_text():
    # a task or a file may be called none: a literal `str | None` flag's None is the flag left out
    fields = dict(path=(str | None, None), size=(int | None, None))
    config = dataclasses.make_dataclass("Config", [(k, *v) for k, v in fields.items()])
    p = argparse.ArgumentParser()
    cli.add_dataclass_args(p, config, literal=("path",))
    assert (p.parse_args([]).path, p.parse_args(["--path", "none"]).path) == (None, "none")
    assert p.parse_args(["--size", "none"]).size is None  # not literal: the word none is None
    with pytest.raises(TypeError, match="Config.size: only a `str | None` field can be literal"):
        cli.add_dataclass_args(argparse.ArgumentParser(), config, literal=("size",))


def test_pipeline_flags_are_generated_from_the_dataclasses():
    assert cli.field_comments(_Flags) == {
        "lr": "step size, 100% of it",
        "wide": "a comment on a wrapped line",
        "flag": "on or off",
    }
    p = argparse.ArgumentParser()
    cli.add_dataclass_args(p, _Flags)
    assert cli.dataclass_from_args(_Flags, p.parse_args([])) == _Flags()
    args = p.parse_args(["--lr", "0.5", "--wide", "2", "--flag", "--maybe", "none"])
    assert cli.dataclass_from_args(_Flags, args) == _Flags(0.5, 2, True, None)
    assert p.parse_args(["--maybe", "2"]).maybe == 2.0
    assert "step size, 100% of it (default: 0.001)" in " ".join(p.format_help().split())
    # every AgentConfig field but those the run sets is a train.py flag, with AgentConfig's default
    p = argparse.ArgumentParser()
    train.add_agent_args(p)
    given = dict(num_tasks=1, image_size=128, seed=0)
    assert cli.dataclass_from_args(AgentConfig, p.parse_args([]), **given) == AgentConfig()
    args = p.parse_args(["--critic_lr", "0", "--action_input_only", "--calql", "--polyak", "0.01"])
    cfg = cli.dataclass_from_args(AgentConfig, args, **given)
    got = (cfg.critic_lr, cfg.action_every_layer, cfg.calql, cfg.polyak)
    assert got == (0.0, False, True, 0.01)
    with pytest.raises(SystemExit):
        p.parse_args(["--arch", "resnet99"])  # choices: model.ARCHS


def test_cli_list_fields_get_flags_and_a_field_without_one_fails_at_build_time(tmp_path):
    """A list field is a flag taking any number of values (it used to be skipped, or to get the
    MISSING default of a default_factory); a field no flag can give is a TypeError naming it."""

    @dataclasses.dataclass
    class Listed:
        words: list = dataclasses.field(default_factory=list)  # any words
        sizes: tuple[int, ...] = (1, 2)  # some sizes

    @dataclasses.dataclass
    class Unflaggable:
        table: dict = dataclasses.field(default_factory=dict)

    p = argparse.ArgumentParser()
    assert cli.add_dataclass_args(p, Listed) == ["words", "sizes"]
    assert cli.dataclass_from_args(Listed, p.parse_args([])) == Listed()
    args = p.parse_args(["--words", "a", "b", "--sizes", "3"])
    assert (args.words, args.sizes) == (["a", "b"], [3])
    with pytest.raises(TypeError, match=r"Unflaggable\.table"):
        cli.add_dataclass_args(argparse.ArgumentParser(), Unflaggable)
    # the data flags of every training phase and `data.py convert`, written once (DataOptions)
    p = argparse.ArgumentParser()
    data.add_data_args(p)
    assert cli.dataclass_from_args(data.DataOptions, p.parse_args([])) == data.DataOptions()
    args = p.parse_args(["--include", "a", "b", "--skip_bad", "--image_size", "64"])
    got = cli.dataclass_from_args(data.DataOptions, args)
    assert got == data.DataOptions(64, include=["a", "b"], skip_bad=True)
    # binsort_experiment.py: every Protocol field is a flag; --extra reaches every train.py job
    be = _binsort_experiment()
    assert be.parse_args([])[0] == be.Protocol()
    p, _ = be.parse_args(["--n_prior", "9", "--extra", "--prefetch", "--compile", "default"])
    assert p == dataclasses.replace(
        be.Protocol(), n_prior=9, extra=["--prefetch", "--compile", "default"]
    )
    train_cmds = [job.cmd for job in be.build_jobs(p, str(tmp_path)) if "train.py" in job.cmd]
    assert train_cmds and all("--prefetch" in cmd for cmd in train_cmds)


# ==================================================================================================
# fileio.py
# ==================================================================================================


@pytest.mark.parametrize(
    "kind, described", [("symlink", "a symbolic link"), ("fifo", "a FIFO"), ("dir", "a directory")]
)
def test_fileio_atomic_write_replaces_regular_files_only(tmp_path, kind, described):
    """A FIFO, a device or a directory at the destination is refused, and so is a symbolic link
    (never followed, even to a regular file): it and what it points to stay as they were."""
    regular = tmp_path / "results.json"
    regular.write_text("old")
    path = tmp_path / "out"
    if kind == "symlink":
        path.symlink_to(regular)
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
    before = os.lstat(path)
    with pytest.raises(OSError, match=re.escape(f"{path}: {described}, not a regular file")):
        fileio.atomic_write_text("new", str(path))
    after = os.lstat(path)
    assert (after.st_mode, after.st_ino) == (before.st_mode, before.st_ino)
    assert regular.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "results.json"]
    fileio.atomic_write_text("new", str(regular))  # a regular file there is still replaced
    assert regular.read_text() == "new"


def test_fileio_disk_full_is_one_line_naming_the_file(tmp_path):
    """torch.save meets a full disk as an OSError (ENOSPC) inside its writer and raises a
    RuntimeError from it: the save names the file and the cause, the old file stays whole."""
    path = tmp_path / "ckpt_00000004.pt"
    path.write_bytes(b"previous checkpoint")

    def write_like_torch_on_a_full_disk(f):
        f.write(b"partial")
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as full:
            raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos") from full

    with pytest.raises(OSError) as e:
        fileio.atomic_write(str(path), write_like_torch_on_a_full_disk)
    reason = "No space left on device; not written (any earlier version is intact)"
    assert cli.one_line(e.value) == f"{path}: {reason}"
    assert path.read_bytes() == b"previous checkpoint" and os.listdir(tmp_path) == [path.name]


def test_fileio_json_holds_null_where_a_number_is_not_finite(tmp_path):
    path = tmp_path / "eval.json"
    doc = {"success": 0.5, "return": float("nan"), "per_episode": [{"length": float("inf")}]}
    fileio.atomic_write_json(doc, str(path), indent=2)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"success": 0.5, "return": None, "per_episode": [{"length": None}]}


# ==================================================================================================
# runfolder.py
# ==================================================================================================


def test_pipeline_retention_keeps_the_newest_and_the_marked(pipe_data, tmp_path):
    assert runfolder.steps_to_delete([1, 2, 3, 4, 5], 2, [1]) == [2, 3]
    assert runfolder.steps_to_delete([1, 2, 3], 0) == []  # 0 keeps everything
    _, prior, _ = pipe_data
    out = tmp_path / "run"
    common = ["--data", str(prior), "--out", str(out), "--save_every", "1", *TINY]
    train.main([*common, "--steps", "5", "--keep_last", "2", "--keep_steps", "2"])
    assert [s for s, _ in runfolder.list_checkpoints(out)] == [2, 4, 5]
    # the phases' defaults: pre-training keeps its newest 5, fine-tuning all (select_ckpt.py needs
    # them)
    assert train.PRETRAIN_KEEP_LAST == 5 and finetune.FINETUNE_KEEP_LAST == 0


# ==================================================================================================
# widowx.py: the arm's kinematics
# ==================================================================================================


def test_widowx_is_the_one_kinematics_of_the_sim_and_the_robot():
    # one owner: the simulator and the robot use widowx.py's objects, not copies
    # (the simulator's arm model, arm_urdf, is built in widowx.py from the same screw axes)
    for name in ("R_DOWN", "FINGER_MAX", "ARM_JOINTS", "GRIPPER_CLOSED_BELOW"):
        assert getattr(benv, name) is getattr(widowx, name), name
    for name in ("euler_to_mat", "mat_to_euler", "solve_ik", "arm_urdf"):
        assert getattr(benv, name) is getattr(widowx, name), name
    for name in ("JOINT_LOW", "JOINT_HIGH", "SLEEP_JOINTS", "VELOCITY_LIMIT"):
        assert getattr(wxarm, name) is getattr(widowx, name), name
    for name in ("R_DOWN", "SLEEP_JOINTS", "euler_to_mat"):
        assert getattr(robot, name) is getattr(widowx, name), name
    assert robot.inverse_kinematics is widowx.inverse_kinematics
    assert robot.forward_kinematics is widowx.forward_kinematics
    # SPEC 6's checks
    zero = widowx.forward_kinematics(np.zeros(6))
    np.testing.assert_allclose(zero[:3, 3], [0.458325, 0, 0.36065])
    sleep = widowx.forward_kinematics([0, -1.80, 1.55, 0, 0.8, 0])
    np.testing.assert_allclose(sleep[:3, 3], [0.123, 0, 0.081], atol=1e-3)


def test_robot_forward_kinematics_at_zero_and_sleep():
    T = widowx.forward_kinematics(np.zeros(6))
    np.testing.assert_allclose(T[:3, 3], widowx.M_HOME, atol=1e-12)
    np.testing.assert_allclose(T[:3, :3], np.eye(3), atol=1e-12)
    T = widowx.forward_kinematics(widowx.SLEEP_JOINTS)
    (x, z), phi = _planar_fk(widowx.SLEEP_JOINTS)
    np.testing.assert_allclose(T[:3, 3], [x, 0, z], atol=1e-9)
    np.testing.assert_allclose(T[:3, 3], [0.123, 0, 0.081], atol=1e-3)  # SPEC 6
    np.testing.assert_allclose(
        T[:3, :3],
        [[np.cos(phi), 0, np.sin(phi)], [0, 1, 0], [-np.sin(phi), 0, np.cos(phi)]],
        atol=1e-9,
    )
    T = widowx.forward_kinematics([np.pi / 2, 0, 0, 0, 0, 0])  # the waist turns the arm onto +y
    np.testing.assert_allclose(T[:3, 3], [0, 0.458325, 0.36065], atol=1e-9)
    state = robot.pose_to_state(widowx.forward_kinematics(robot.RESET_JOINTS), 1.0)
    # pointing down = zero euler
    np.testing.assert_allclose(state, [0.25, 0, 0.18, 0, 0, 0, 1], atol=2e-4)
    # Rz(90) Rx(90): x turns first, about the world axes
    R = widowx.euler_to_mat([np.pi / 2, 0, np.pi / 2])
    np.testing.assert_allclose(R, [[0, 0, 1], [1, 0, 0], [0, 1, 0]], atol=1e-12)
    e = np.array([0.1, -0.2, 0.3])
    T = np.eye(4)
    T[:3, :3] = widowx.euler_to_mat(e) @ widowx.R_DOWN
    np.testing.assert_allclose(robot.pose_to_state(T, 0.5)[3:], [*e, 0.5], atol=1e-6)


def test_robot_inverse_kinematics_round_trips():
    rng = np.random.default_rng(0)
    for _ in range(15):
        q = rng.uniform(-1, 1, 6) * [2.5, 1.2, 1.2, 2.0, 1.2, 2.5]
        T = widowx.forward_kinematics(q)
        q_ik = widowx.inverse_kinematics(T, q + rng.normal(0, 0.15, 6))
        T_ik = widowx.forward_kinematics(q_ik)
        assert np.linalg.norm(T_ik[:3, 3] - T[:3, 3]) < 1e-4
        assert widowx.rotation_angle(T_ik[:3, :3] @ T[:3, :3].T) < 1e-3
        assert np.all(q_ik >= widowx.JOINT_LOW) and np.all(q_ik <= widowx.JOINT_HIGH)
    q = np.array([0.3, -0.4, 0.5, 0.2, 0.6, -0.1])
    eps = 1e-6  # the Jacobian against finite differences
    R, p, J = widowx.fk_and_jacobian(q)
    for i in range(6):
        R_i, p_i, _ = widowx.fk_and_jacobian(q + eps * np.eye(6)[i])
        np.testing.assert_allclose(J[3:, i], (p_i - p) / eps, atol=1e-5)
        dR = R_i @ R.T  # a small rotation: I + [w] eps
        w = np.array([dR[2, 1] - dR[1, 2], dR[0, 2] - dR[2, 0], dR[1, 0] - dR[0, 1]]) / 2
        np.testing.assert_allclose(J[:3, i], w / eps, atol=1e-5)
    far = widowx.forward_kinematics(np.zeros(6))
    far[:3, 3] = [0.9, 0, 0.3]
    with pytest.raises(widowx.IKError, match=r"did not converge in 100 iterations: .* mm"):
        widowx.inverse_kinematics(far, np.zeros(6))


# ==================================================================================================
# dynamixel.py: the protocol
# ==================================================================================================


def test_robot_packets_match_the_spec_vectors(robot_bus):
    ping = bytes.fromhex("FF FF FD 00 01 03 00 01 19 4E")
    read = bytes.fromhex("FF FF FD 00 01 07 00 02 84 00 04 00 1D 15")
    assert dynamixel.make_packet(1, dynamixel.PING) == ping
    assert dynamixel.make_packet(1, dynamixel.READ, bytes([0x84, 0, 4, 0])) == read
    assert dynamixel.crc16(bytes.fromhex("FF FF FD 00 01 03 00 01")) == 0x4E19
    bus = wxarm.open_bus(robot_bus.port, timeout=_BUS_TIMEOUT)
    assert bus.read(1, dynamixel.PRESENT_POSITION) == 2048  # waist at 0 rad
    assert robot_bus.raw_in == read  # on the wire
    assert bus.ping(9) == 1060 and bus.ping(4) == 1020


def test_robot_byte_stuffing_both_ways():
    params = bytes([0x74, 0x00, 0xFF, 0xFF, 0xFD, 0x01])
    packet = dynamixel.make_packet(3, dynamixel.WRITE, params)
    assert b"\xff\xff\xfd\xfd\x01" in packet
    assert struct.unpack_from("<H", packet, 5)[0] == 1 + len(params) + 1 + 2  # LEN counts the FD
    # junk before, half a header after
    got, rest, need = dynamixel.split_packet(b"\x00\xff" + packet + b"\xff\xff")
    assert got == (3, dynamixel.WRITE, params) and rest == b"\xff\xff" and need == 0
    # the partial header waits for the rest
    assert dynamixel.split_packet(rest) == (None, b"\xff\xff", 9)
    header_like = b"\xff\xff\xfd\xfd\xff\xff\xfd"
    assert dynamixel.unstuff(dynamixel.stuff(header_like)) == header_like
    assert dynamixel.split_packet(packet[:9]) == (None, packet[:9], len(packet) - 9)
    with pytest.raises(dynamixel.PacketError, match="bad CRC"):
        dynamixel.split_packet(packet[:-1] + bytes([packet[-1] ^ 1]))


# ==================================================================================================
# model.py
# ==================================================================================================


def test_core_resnet34_structure():
    enc = model.make_encoder("resnet34", "spatial", "group", 128, 256)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in enc.modules())
    norms = [m for m in enc.trunk.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(m.num_groups == 4 for m in norms)
    conv = sum(
        p.numel() for m in enc.trunk.modules() if isinstance(m, nn.Conv2d) for p in m.parameters()
    )
    assert abs(conv - 21.3e6) < 0.1e6, conv  # SPEC section 4: 21.3 M parameters
    with torch.no_grad():
        f = enc.trunk(torch.zeros(1, 3, 128, 128))
        assert f.shape == (1, 512, 16, 16) and enc.feature_shape == (512, 16, 16)
        z = enc.proj(enc.pool(f))
    assert z.shape == (1, 256) and z.abs().max() <= 1  # tanh output
    # (C, H, W, K): K = 8 learned spatial maps per channel
    assert enc.pool.kernel.shape == (512, 16, 16, 8)


@pytest.mark.parametrize("arch", ["small", "impala", "resnet18"])
def test_core_encoders_any_size(arch):
    for head in model.HEADS:
        for size in (32, 48):
            enc = model.make_encoder(arch, head, "group", size, 16)
            assert enc(_random_images(2, size)).shape == (2, 16)
    batch_norm = model.make_encoder(arch, norm="batch", image_size=32)
    assert any(isinstance(m, nn.BatchNorm2d) for m in batch_norm.modules())


def test_core_encoder_errors():
    with pytest.raises(ValueError, match="model.py: arch='vgg'"):
        model.make_encoder("vgg")
    with pytest.raises(ValueError, match="head='max'"):
        model.make_encoder("small", head="max")
    with pytest.raises(ValueError, match="norm='layer'"):
        model.make_encoder("small", norm="layer")
    with pytest.raises(ValueError, match="image_size=16"):
        model.make_encoder("small", image_size=16)
    with pytest.raises(ValueError, match="uint8"):
        model.make_encoder("small", image_size=32)(torch.zeros(1, 3, 32, 32))


def test_core_spatial_embedding_by_hand():
    """Figure 2: each channel's map times K learned (H, W) maps, summed over H, W; output index
    c * K + k."""
    emb = model.SpatialEmbedding(2, 2, 3, 2)
    f = torch.arange(12.0).reshape(1, 2, 2, 3)
    with torch.no_grad():
        emb.kernel.copy_(torch.arange(24.0).reshape(2, 2, 3, 2) / 10)
    kernel = emb.kernel.detach()
    want = [
        sum(float(f[0, c, h, w] * kernel[c, h, w, k]) for h in range(2) for w in range(3))
        for c in range(2)
        for k in range(2)
    ]
    assert torch.allclose(emb(f)[0], torch.tensor(want))


@pytest.mark.parametrize("every_layer", [True, False])
def test_core_action_reaches_every_layer(every_layer):
    q = _tiny_qnet(every_layer)
    z = torch.randn(5, 16)
    a = torch.rand(5, 7) * 2 - 1
    t = torch.eye(3)[[0, 1, 2, 0, 1]]
    q.heads(z, a, t).sum().backward()
    assert len(q.layers) == 4  # 3 hidden + output
    for i, layer in enumerate(q.layers):
        cols = q.action_columns(i)
        if every_layer or i == 0:
            assert layer.weight.grad[:, cols].abs().sum(-1).min() > 0, (
                f"layer {i} gets no action gradient"
            )
        else:
            assert cols is None and layer.weight.shape[1] == 32 + 16  # [hidden, embedding]
    # cut the action's input path: the action still matters only when it is fed to the later
    # layers
    with torch.no_grad():
        q.layers[0].weight[:, q.action_columns(0)] = 0
    a.requires_grad_(True)
    (g,) = torch.autograd.grad(q.heads(z, a, t).sum(), a)
    assert (g.abs().sum() > 0) == every_layer


def test_core_qnetwork_shapes_and_detached_heads():
    q = _tiny_qnet(True)
    z = torch.randn(4, 16)
    t = torch.eye(3)[[0, 1, 2, 0]]
    a = torch.rand(4, 5, 7) * 2 - 1
    many = q.heads(z, a, t)
    assert many.shape == (4, 5, 2)
    assert torch.allclose(many[:, 3], q.heads(z, a[:, 3], t), atol=1e-6)  # N actions == one by one
    assert not torch.equal(many[..., 0], many[..., 1])  # 2 independently initialised heads
    a.requires_grad_(True)
    q.heads(z, a, t, detach_params=True).sum().backward()
    assert a.grad.abs().sum() > 0 and all(p.grad is None for p in q.parameters())
    with pytest.raises(AssertionError, match="task one-hot"):
        q.heads(z, a, torch.eye(4))


@pytest.mark.parametrize("every_layer", [True, False])
def test_core_factored_heads_equal_the_concatenated_form(every_layer):
    """The per-state factoring of the Q heads is the same function with the same
    gradients, to 1e-5, for the 1 + 2N actions of a CQL update."""
    q = _tiny_qnet(every_layer)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(6, 16, generator=g, requires_grad=True)
    a = (torch.rand(6, 9, 7, generator=g) * 2 - 1).requires_grad_(True)
    t = torch.eye(3)[[0, 1, 2, 0, 1, 2]]
    ours = q.heads(z, a, t)
    ref = q.heads_concatenated(z, a, t)
    assert ours.shape == ref.shape == (6, 9, 2)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5)
    weights = torch.randn(ref.shape, generator=g)  # a loss that weights every output differently
    params = [z, a, *q.layers.parameters()]
    g_ours = torch.autograd.grad((ours * weights).sum(), params)
    g_ref = torch.autograd.grad((ref * weights).sum(), params)
    for mine, theirs in zip(g_ours, g_ref):
        assert torch.allclose(mine, theirs, atol=1e-5, rtol=1e-4)


def test_core_tanh_gaussian_log_prob():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(64, 7, generator=g) * 0.5
    log_std = torch.rand(64, 7, generator=g) - 1.0
    a, logp = model.tanh_gaussian_sample(mean, log_std, generator=g)
    ref = torch.distributions.TransformedDistribution(
        torch.distributions.Normal(mean, log_std.exp()), [torch.distributions.TanhTransform()]
    )
    assert torch.allclose(logp, ref.log_prob(a).sum(-1), atol=1e-3)
    assert torch.allclose(model.tanh_gaussian_log_prob(mean, log_std, a), logp, atol=1e-3)
    other = model.tanh_gaussian_log_prob(mean, log_std, a.flip(0))
    assert (other - logp).abs().min() > 0  # depends on the action
    a4, logp4 = model.tanh_gaussian_sample(mean, log_std, num_samples=4, generator=g)
    assert a4.shape == (64, 4, 7) and logp4.shape == (64, 4) and a4.abs().max() <= 1
    u = torch.tensor([[20.0, -20.0, 0.0]])  # stable where 1 - tanh^2 underflows
    by_hand = torch.tensor(4 * math.log(2) - 80.0 + 0.0)
    assert torch.allclose(model.tanh_log_det(u), by_hand, atol=1e-4)


def test_core_policy_log_std_clip_and_deterministic():
    torch.manual_seed(0)
    encoder = model.make_encoder("small", image_size=32, embed_dim=16)
    pi = model.TanhGaussianPolicy(encoder, 2, 7, 7, 32, 2)
    with torch.no_grad():
        pi.net[-1].bias[7:] = 100.0
    z = torch.randn(3, 16)
    s = torch.randn(3, 7)
    t = torch.eye(2)[[0, 1, 1]]
    mean, log_std = pi.dist(z, s, t)
    assert torch.all(log_std == model.LOG_STD_MAX)
    with torch.no_grad():
        pi.net[-1].bias[7:] = -100.0
    assert torch.all(pi.dist(z, s, t)[1] == model.LOG_STD_MIN)
    assert torch.equal(pi.deterministic(z, s, t), torch.tanh(pi.dist(z, s, t)[0]))


def test_core_policies_normalize_the_state_with_the_data_statistics():
    torch.manual_seed(0)
    mean = torch.tensor([0.25, 0.0, 0.1, 0.0, 0.0, 0.0, 0.8])
    std = torch.tensor([0.03, 0.1, 0.05, 0.02, 0.02, 0.5, 0.0])  # the gripper constant here
    z = torch.randn(3, 16)
    onehot = torch.eye(2)[[0, 1, 1]]
    state = mean + std * torch.randn(3, 7)
    by_hand = (state - mean) / torch.tensor([0.03, 0.1, 0.05, 0.02, 0.02, 0.5, 1e-3])
    for make in (model.TanhGaussianPolicy, model.BCPolicy):
        pi = make(model.make_encoder("small", image_size=32, embed_dim=16), 2, 7, 7, 32, 2).eval()
        unnormalized = pi.net(torch.cat([z, state, onehot], -1))[:, :7]
        assert torch.equal(_policy_mean(pi, z, state, onehot), unnormalized)  # until set
        pi.state_norm.set_statistics(mean, std)
        assert pi.state_norm.std[-1] == model.STATE_STD_MIN  # a constant dimension is centred
        assert torch.allclose(pi.state_norm(state), by_hand)
        expected = pi.net(torch.cat([z, by_hand, onehot], -1))[:, :7]
        assert torch.allclose(_policy_mean(pi, z, state, onehot), expected, atol=1e-6)
        assert {"state_norm.mean", "state_norm.std"} <= set(pi.state_dict())
    with pytest.raises(ValueError, match=r"shape \(6,\) / \(7,\), expected \(7,\) each"):
        pi.state_norm.set_statistics(mean[:6], std)
    with pytest.raises(ValueError, match="finite, with std >= 0"):
        pi.state_norm.set_statistics(mean, -std)


# ==================================================================================================
# cql.py
# ==================================================================================================


# ---- the losses ----------------------------------------------------------------------------------
def test_core_importance_logsumexp_closed_form():
    c = 3.0
    log_pi = torch.tensor([[-1.0, 0.5, 2.0, -3.0]])
    q_pi = torch.full((1, 4, 2), c)
    q_rand = torch.full((1, 4, 2), c)
    log_rand = cql.uniform_log_density(7)
    assert log_rand == pytest.approx(7 * math.log(0.5))
    # temp * log( sum_j exp((c - l_j) / temp) + N exp((c - 7 log 0.5) / temp) )
    for temp in (1.0, 2.0):
        s = sum(math.exp(-lp / temp) for lp in log_pi[0].tolist()) + 4 * 2 ** (7 / temp)
        got = cql.importance_logsumexp(q_pi, log_pi, q_rand, log_rand, temp)
        assert torch.allclose(got, torch.full((1, 2), c + temp * math.log(s)), atol=1e-5)


def test_core_penalty_gradients():
    g = torch.Generator().manual_seed(1)
    q_data = torch.randn(1, 2, generator=g).requires_grad_(True)
    q_pi = (torch.randn(1, 4, 2, generator=g) * 3).requires_grad_(True)
    q_rand = (torch.randn(1, 4, 2, generator=g) * 3).requires_grad_(True)
    log_pi = torch.randn(1, 4, generator=g)
    pen, _ = cql.cql_penalty(q_data, q_pi, log_pi, q_rand, cql.uniform_log_density(7), 1.0)
    assert pen.shape == (2,)
    pen.sum().backward()
    sampled = q_pi.grad.sum(1) + q_rand.grad.sum(1)  # per head: softmax weights sum to 1
    assert torch.allclose(sampled, torch.ones(1, 2), atol=1e-6)
    assert torch.allclose(q_data.grad, -torch.ones(1, 2))
    assert q_pi.grad.min() > 0 and q_rand.grad.min() > 0


def test_core_calql_bound_zero_gradient_below():
    q_pi = torch.tensor([[[-30.0, 5.0], [0.0, -40.0]]], requires_grad=True)  # (B=1, N=2, heads=2)
    mc = torch.tensor([-25.0])
    log_pi = torch.zeros(1, 2)
    q_rand = torch.zeros(1, 2, 2)
    pen, _ = cql.cql_penalty(torch.zeros(1, 2), q_pi, log_pi, q_rand, 0.0, 1.0, mc_return=mc)
    pen.sum().backward()
    below = q_pi.detach() < mc
    assert torch.all(q_pi.grad[below] == 0) and torch.all(q_pi.grad[~below] > 0)
    clipped = torch.tensor([[[-25.0, 5.0], [0.0, -25.0]]])
    ref, _ = cql.cql_penalty(torch.zeros(1, 2), clipped, log_pi, q_rand, 0.0, 1.0)
    assert torch.allclose(pen, ref)


def test_core_td_target_hand_values():
    next_q = torch.tensor(
        [
            [[1.0, 2.0], [5.0, 3.0], [0.0, 9.0]],  # min over heads: 1, 3, 0 -> max 3
            [[4.0, 4.0], [-1.0, 7.0], [2.0, 2.5]],  # 4, -1, 2 -> max 4
        ]
    )
    reward = torch.tensor([-1.0, 10.0])
    mask = torch.tensor([1.0, 0.0])
    target = cql.td_target(reward, mask, next_q, 0.5)
    assert torch.allclose(target, torch.tensor([-1.0 + 1.5, 10.0]))
    first = cql.td_target(reward, torch.ones(2), next_q, 0.5, max_backup=False)
    assert torch.allclose(first, torch.tensor([-0.5, 12.0]))


def test_core_actor_temperature_bc_losses():
    q = torch.tensor([[[1.0, 3.0], [2.0, 0.0]]])  # min over heads: 1, 0
    # mean(0.5 * [-2, 4] - [1, 0]) = 0
    loss, _ = cql.actor_loss(q, torch.tensor([[-2.0, 4.0]]), 0.5)
    assert loss.item() == pytest.approx(0.0)
    log_temp = torch.zeros((), requires_grad=True)
    # entropy -6, target -7
    loss, info = cql.temperature_loss(log_temp, torch.tensor([[5.0, 7.0]]), -7.0)
    loss.backward()
    # entropy above target -> temperature goes down
    assert loss.item() == pytest.approx(1.0) and log_temp.grad > 0
    pred = torch.zeros(2, 2)
    act = torch.tensor([[1.0, 1.0], [2.0, 0.0]])
    assert cql.bc_loss(pred, act)[0].item() == pytest.approx((1 + 1 + 4 + 0) / 4)
    # min, max over N: 1; 1
    q_samples = torch.tensor([[[1.0, 2.0], [-1.0, 0.0]], [[0.0, 0.0], [1.0, 1.0]]])
    w = cql.awbc_weights(torch.tensor([[0.0, 1.0], [5.0, 6.0]]), q_samples, 20.0)
    # exp(0 - 1); exp(5 - 1) clipped at 20
    assert torch.allclose(w, torch.tensor([math.exp(-1.0), 20.0]))
    weighted = (math.exp(-1.0) * 1.0 + 20.0 * 2.0) / 2
    assert cql.bc_loss(pred, act, w)[0].item() == pytest.approx(weighted)


def test_core_actor_imitation_warm_up():
    # by hand: mean(0.5 * [-2, 4]) - mean([-1, -3]) = 0.5 + 2 = 2.5
    loss, info = cql.actor_imitation_loss(
        torch.tensor([[-2.0, 4.0]] * 2), torch.tensor([-1.0, -3.0]), 0.5
    )
    assert loss.item() == pytest.approx(2.5) and info["entropy"].item() == pytest.approx(-1.0)
    # weighted (actor_awbc): mean(0.5 * [-2, 4]) - mean([1.5 * -1, 0.5 * -3]) = 0.5 + 1.5 = 2.0
    loss, info = cql.actor_imitation_loss(
        torch.tensor([[-2.0, 4.0]] * 2), torch.tensor([-1.0, -3.0]), 0.5, torch.tensor([1.5, 0.5])
    )
    assert loss.item() == pytest.approx(2.0) and info["actor_weight_max"].item() == 1.5
    # bc_steps: the first updates raise the policy's likelihood of the data actions and leave the
    # critic's gradient out of the actor; afterwards the actor follows Q again
    cfg = _tiny_config(bc_steps=3, actor_lr=1e-3)
    agent = Agent(cfg)
    batch = bench.random_batch(cfg, 8)

    def z():
        return agent.policy.embed(batch["obs"])

    onehot = agent._onehot(batch["task"])
    with torch.no_grad():
        before = agent.policy.log_prob(z(), batch["state"], onehot, batch["action"]).mean()
    infos = [agent.update(batch) for _ in range(3)]
    with torch.no_grad():
        after = agent.policy.log_prob(z(), batch["state"], onehot, batch["action"]).mean()
    assert after > before
    twin = Agent(_tiny_config(bc_steps=3, actor_lr=1e-3))
    twin_infos = [twin.update(batch) for _ in range(3)]
    assert all(torch.equal(a["actor_loss"], b["actor_loss"]) for a, b in zip(infos, twin_infos))
    reference = Agent(
        _tiny_config(actor_lr=1e-3)
    )  # bc_steps 0: the paper's actor from the first step
    assert not torch.equal(reference.update(batch)["actor_loss"], infos[0]["actor_loss"])
    saved = checkpoint.agent_state(agent)
    still_imitating = checkpoint.agent_from_state(
        {**saved, "config": {**saved["config"], "bc_steps": 10}}
    )
    never_imitated = checkpoint.agent_from_state(
        {**saved, "config": {**saved["config"], "bc_steps": 0}}
    )
    fourth = agent.update(batch)["actor_loss"]  # update 4: the Q-maximising loss again
    assert torch.equal(fourth, never_imitated.update(batch)["actor_loss"])
    assert not torch.equal(fourth, still_imitating.update(batch)["actor_loss"])
    # actor_awbc: the same first update but for the critic's weights on the data actions, which
    # differ between data actions and average 1
    weighted = Agent(_tiny_config(bc_steps=3, actor_lr=1e-3, actor_awbc=True)).update(batch)
    assert weighted["actor_weight_max"] > 1.0
    assert not torch.equal(weighted["actor_loss"], infos[0]["actor_loss"])
    assert torch.equal(weighted["critic_loss"], infos[0]["critic_loss"])
    # every weight clipped to the same tiny value: divided by their mean they are all 1, and the
    # loss is plain imitation's (without the division it would be 1e-6 times the likelihood term)
    cfg_flat = _tiny_config(bc_steps=3, actor_lr=1e-3, actor_awbc=True, awbc_max_weight=1e-6)
    flat = Agent(cfg_flat).update(batch)
    assert flat["actor_weight_max"].item() == pytest.approx(1.0)
    assert torch.allclose(flat["actor_loss"], infos[0]["actor_loss"], atol=1e-6)


def test_core_actor_q_term_and_awr_weights_by_hand():
    # min over heads: Q(s, a~pi) = 1, 0 (mean 0.5); Q(s, a_data) = 2, -6 (mean |.| 4)
    q_pi = torch.tensor([[[1.0, 3.0]], [[2.0, 0.0]]])
    q_data = torch.tensor([[2.0, 4.0], [-6.0, 1.0]])
    loss, info = cql.actor_q_term(q_pi, q_data, 2.0)
    assert loss.item() == pytest.approx(-2.0 * 0.5 / 4.0) and info["actor_q_scale"].item() == 4.0
    assert cql.actor_q_term(q_pi, q_data, 0.0)[0].item() == 0.0
    # advantages: state 0: 0 - mean(-1, 1) = 0; state 1: 2 - mean(0, 0) = 2; population std 1
    q_data = torch.tensor([[0.0, 5.0], [2.0, 3.0]])
    q_samples = torch.tensor([[[-1.0, 0.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 4.0]]])
    w, info = cql.awr_weights(q_data, q_samples, 1.0, 100.0)
    raw = torch.tensor([1.0, math.exp(2.0)])
    assert torch.allclose(w, raw / raw.mean())
    ess = raw.sum() ** 2 / (2 * (raw**2).sum())
    assert info["awr_ess"].item() == pytest.approx(ess.item()) and w.mean().item() == 1.0
    # clipped at 2 before the division by the mean: [1, 2] -> [2/3, 4/3]
    w, _ = cql.awr_weights(q_data, q_samples, 1.0, 2.0)
    assert torch.allclose(w, torch.tensor([2 / 3, 4 / 3]))
    # beta scales the normalised advantage: doubling the rewards' scale leaves the weights alone
    assert torch.allclose(
        cql.awr_weights(3 * q_data, 3 * q_samples, 1.0, 100.0)[0], raw / raw.mean()
    )


def test_core_imitating_actor_with_lambda_zero_is_imitation_exactly():
    batch = bench.random_batch(_tiny_config(), 8)

    def run(**kw):
        agent = Agent(_tiny_config(bc_steps=10, actor_lr=1e-3, **kw))
        return agent, [agent.update(batch) for _ in range(3)]

    _, plain = run()
    _, zero = run(actor_q_weight=0.0, actor_awr_beta=0.0)
    for a, b in zip(plain, zero):
        assert all(torch.equal(a[k], b[k]) for k in ("actor_loss", "critic_loss", "temperature"))
    with_q, infos = run(actor_q_weight=1.0)
    # the critic's first update does not see the actor's objective; the actor's loss does
    assert torch.equal(infos[0]["critic_loss"], plain[0]["critic_loss"])
    assert not torch.equal(infos[0]["actor_loss"], plain[0]["actor_loss"])
    term = infos[0]["actor_q_term"].item()
    expected = -infos[0]["actor_q"].item() / infos[0]["actor_q_scale"].item()
    assert term == pytest.approx(expected, rel=1e-5)
    # AWR weights: the same critic update, weights of mean 1 and an effective sample size <= 1
    _, awr = run(actor_awr_beta=3.0)
    assert torch.equal(awr[0]["critic_loss"], plain[0]["critic_loss"])
    assert 0 < awr[0]["awr_ess"].item() <= 1.0 and awr[0]["awr_weight_max"].item() > 1.0


def test_core_actor_q_term_ramp_and_gradient_stops():
    agent = Agent(_tiny_config(bc_steps=100, actor_q_weight=2.0, actor_q_start=10, actor_q_ramp=4))
    weights = []
    for updates in (0, 9, 10, 11, 13, 50):
        agent.updates = updates
        weights.append(agent.actor_q_weight())
    assert weights == [0.0, 0.0, 0.5, 1.0, 2.0, 2.0]
    batch = bench.random_batch(agent.cfg, 4)
    onehot = agent._onehot(batch["task"])
    z = agent.policy.embed(batch["obs"])
    a_pi = torch.zeros(4, 2, 7, requires_grad=True)
    agent.cfg.actor_q_gripper = False
    agent._q_term_actions(a_pi, z, batch["state"], onehot).sum().backward()
    assert torch.all(a_pi.grad[..., :-1] == 1) and torch.all(a_pi.grad[..., -1] == 0)
    # no encoder gradient: the term's actions are drawn from the detached embedding
    agent.cfg.actor_q_encoder = False
    agent._q_term_actions(a_pi, z, batch["state"], onehot).sum().backward()
    assert all(p.grad is None for p in agent.policy.encoder.parameters())
    assert any(p.grad is not None for p in agent.policy.net.parameters())


def test_core_zero_task_slots_makes_a_slot_task_agnostic_as_grow_tasks_does():
    cfg = _tiny_config(actor_lr=1e-3)
    agent = Agent(cfg)
    batch = bench.random_batch(cfg, 6)
    batch["task"] = torch.tensor([0, 1, 2, 2, 1, 0])
    for _ in range(2):  # Adam moments on every slot's columns
        agent.update(batch)
    z_q = agent.critic.embed(batch["obs"])
    z_pi = agent.policy.embed(batch["obs"])
    onehot = torch.eye(3)[batch["task"]]

    def outputs(task_onehot):
        with torch.no_grad():
            q = agent.critic.heads(z_q, batch["action"], task_onehot)
            return q, agent.policy.dist(z_pi, batch["state"], task_onehot)[0]

    q_before, mean_before = outputs(onehot)
    agent.zero_task_slots([2])
    q_after, mean_after = outputs(onehot)
    q_none, mean_none = outputs(torch.zeros(6, 3))
    rows = batch["task"] == 2
    assert torch.allclose(q_after[rows], q_none[rows]) and torch.allclose(
        mean_after[rows], mean_none[rows]
    )
    assert torch.equal(q_after[~rows], q_before[~rows]) and not torch.allclose(q_before, q_after)
    assert torch.equal(mean_after[~rows], mean_before[~rows])
    policy_in = agent.policy.net[0].weight
    moments = agent.optimizers["actor"].state[policy_in]
    column = policy_in.shape[1] - 3 + 2
    assert torch.all(moments["exp_avg"][:, column] == 0) and torch.any(
        moments["exp_avg"][:, column - 1] != 0
    )
    assert torch.all(agent.target_critic.layers[0].weight[:, 2] == 0)


def test_core_gaussian_bc_agent_is_the_imitating_actor_without_a_critic():
    cfg = _tiny_config(algo="gbc", actor_lr=1e-3)
    agent = Agent(cfg)
    assert set(agent.nets) == {"policy"} and set(agent.optimizers) == {"actor", "temp"}
    batch = bench.random_batch(cfg, 8)
    onehot = agent._onehot(batch["task"])
    generator = torch.Generator().set_state(agent.generator.get_state())
    with torch.no_grad():  # the first update's loss, by hand from the same sampling stream
        z = agent.policy.embed(batch["obs"])
        _, log_pi = agent.policy.sample(z, batch["state"], onehot, cfg.num_actions, generator)
        log_pi_data = agent.policy.log_prob(z, batch["state"], onehot, batch["action"])
        expected, _ = cql.actor_imitation_loss(log_pi, log_pi_data, 1.0)
    infos = [agent.update(batch) for _ in range(10)]
    assert infos[0]["actor_loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    with torch.no_grad():
        z = agent.policy.embed(batch["obs"])
        after = agent.policy.log_prob(z, batch["state"], onehot, batch["action"])
    assert after.mean() > log_pi_data.mean()
    assert _act_on(agent, batch).shape == (8, 7)
    with pytest.raises(ValueError, match="algo='gbc' has none"):
        agent.q_values(batch)
    again = checkpoint.agent_from_state(checkpoint.agent_state(agent))
    assert torch.equal(_act_on(again, batch), _act_on(agent, batch))
    agent.cfg.algo = "cql"
    with pytest.raises(ValueError, match="algo='cql' trains critic networks"):
        agent.update(batch)


def test_core_tabular_cql_fixed_point():
    """One state, two actions a0, a1, each once in the data, both looping back to the state
    (mask 1); the 'sampled' actions are the two actions themselves, with density 1/2 (uniform on
    [-1, 1], action_dim 1). Per head, the gradient of TD + alpha * penalty wrt Q(a) is
    (Q(a) - y(a)) + alpha (p(a) - 1/2) with p = softmax(Q) and y(a) = r(a) + gamma Q(a0).
    Choosing r0 - r1 = log 3 + alpha / 2 makes p = (3/4, 1/4) consistent:
    Q(a0) = (r0 - alpha / 4) / (1 - gamma), Q(a1) = r1 + gamma Q(a0) + alpha / 4."""
    alpha = 2.0
    gamma = 0.5
    r1 = 0.0
    r0 = math.log(3) + alpha / 2
    cfg = AgentConfig(alpha=alpha, gamma=gamma, action_dim=1, num_actions=2)
    table = torch.zeros(2, 2, requires_grad=True)  # (heads, actions)
    with torch.no_grad():
        # heads start apart; min over heads must not matter at the end
        table[1] = torch.tensor([1.0, -1.0])
    batch = {"reward": torch.tensor([r0, r1]), "mask": torch.ones(2), "mc_return": torch.zeros(2)}
    log_pi = torch.full((2, 2), math.log(0.5))
    opt = torch.optim.SGD([table], lr=0.5)
    for _ in range(400):
        q_sa = table.T[None].expand(2, 2, 2)  # (B, N, heads): every action at the one state
        q_next = table.detach().T[None].expand(2, 2, 2)
        loss, _ = cql.critic_loss(table.T, q_sa, log_pi, q_sa, q_next, batch, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
    q0 = (r0 - alpha / 4) / (1 - gamma)
    want = torch.tensor([q0, r1 + gamma * q0 + alpha / 4])
    assert torch.allclose(table.detach(), want.expand(2, 2), atol=1e-4), (table, want)
    assert torch.softmax(table.detach()[0], 0)[0].item() == pytest.approx(0.75, abs=1e-4)


# ---- the agent -----------------------------------------------------------------------------------
def test_core_update_runs_each_encoder_once():
    agent = Agent(_tiny_config(algo="awbc"))
    calls = {}
    for name, net in agent.nets.items():

        def count(*_, n=name):
            calls[n] = calls.get(n, 0) + 1

        net.encoder.register_forward_hook(count)
    info = agent.update(bench.random_batch(agent.cfg, 4))
    assert calls == {"critic": 1, "target_critic": 1, "policy": 2, "bc_policy": 1}
    keys = "critic_loss td_loss cql_penalty q_data cql_gap actor_loss temperature alpha bc_loss"
    for key in keys.split() + ["grad_norm_critic", "grad_norm_actor", "grad_norm_bc"]:
        value = info[key]
        assert value.dim() == 0 and not value.requires_grad and torch.isfinite(value), key


def test_core_conservatism_after_training():
    """One action per state in the data: CQL must rank the data action above random ones."""
    cfg = _tiny_config(num_tasks=1, critic_lr=1e-3, actor_lr=1e-3)
    agent = Agent(cfg)
    g = torch.Generator().manual_seed(3)
    images = _random_images(4, seed=3).repeat(4, 1, 1, 1)
    data_actions = (torch.rand(4, 7, generator=g) * 1.6 - 0.8).repeat(4, 1)
    batch = {
        "obs": images,
        "next_obs": images.roll(1, 0),
        "state": torch.zeros(16, 7),
        "next_state": torch.zeros(16, 7),
        "action": data_actions,
        "reward": torch.full((16,), -1.0),
        "mask": torch.ones(16),
        "mc_return": torch.full((16,), -25.0),
        "task": torch.zeros(16, dtype=torch.int64),
    }
    for _ in range(60):
        agent.update(batch)
    q_data = agent.q_values(batch).mean(-1)
    random_actions = [{**batch, "action": torch.rand(16, 7, generator=g) * 2 - 1} for _ in range(8)]
    q_rand = torch.stack([agent.q_values(b).mean(-1) for b in random_actions]).mean(0)
    assert torch.all(q_data > q_rand), (q_data, q_rand)


def test_core_save_load_continue_identical(tmp_path):
    cfg = _tiny_config()
    batches = [bench.random_batch(cfg, 6, seed=s) for s in range(4)]
    a = Agent(cfg)
    for b in batches[:2]:
        a.update(b)
    torch.save(checkpoint.agent_state(a), tmp_path / "agent.pt")
    d = torch.load(tmp_path / "agent.pt", weights_only=True)
    b_agent = Agent(_tiny_config(seed=7))  # different init: everything must come from the file
    checkpoint.load_agent_state(b_agent, d)
    x = batches[0]
    assert torch.equal(a.q_values(x), b_agent.q_values(x))
    assert torch.equal(_act_on(a, x), _act_on(b_agent, x))
    for b in batches[2:]:
        ia = a.update(b)
        ib = b_agent.update(b)
        assert all(torch.equal(ia[k], ib[k]) for k in ia)
    for name, net in a.nets.items():
        for (k, p), q in zip(net.state_dict().items(), b_agent.nets[name].state_dict().values()):
            assert torch.equal(p, q), (name, k)
    assert torch.equal(a.log_temp, b_agent.log_temp) and a.updates == b_agent.updates == 4
    with pytest.raises(ValueError, match="num_tasks: checkpoint 3, agent 5"):
        checkpoint.load_agent_state(Agent(_tiny_config(num_tasks=5)), d)
    no_bc = r"checkpoint \(algo='cql'\) has no \['bc_policy', 'bc optimizer'\]"
    with pytest.raises(ValueError, match=no_bc):
        checkpoint.load_agent_state(Agent(_tiny_config(algo="awbc")), d)
    aw = Agent(_tiny_config(algo="awbc", seed=7))  # AW-BC on a PTR checkpoint: critic from the file
    assert checkpoint.load_agent_state(aw, d, strict=False) == ["bc_policy", "bc optimizer"]
    assert torch.equal(aw.q_values(x), checkpoint.agent_from_state(d).q_values(x))


def test_core_grow_tasks_keeps_old_outputs():
    cfg = _tiny_config(algo="awbc", num_tasks=2)
    agent = Agent(cfg)
    batch = bench.random_batch(cfg, 6)
    agent.update(batch)
    q_before = agent.q_values(batch)
    a_before = _act_on(agent, batch)
    z = agent.policy.embed(batch["obs"])
    mean_before = agent.policy.dist(z, batch["state"], agent._onehot(batch["task"]))[0]
    agent.grow_tasks(5)
    assert agent.cfg.num_tasks == 5
    # zero weights on the new one-hot slots: the same numbers up to float summation order
    assert torch.allclose(agent.q_values(batch), q_before, rtol=0, atol=1e-6)
    assert torch.allclose(_act_on(agent, batch), a_before, rtol=0, atol=1e-6)
    with torch.no_grad():
        z = agent.policy.embed(batch["obs"])
        mean_after = agent.policy.dist(z, batch["state"], agent._onehot(batch["task"]))[0]
    assert torch.allclose(mean_after, mean_before.detach(), rtol=0, atol=1e-6)
    for name, params in agent.params.items():  # Adam state moved to the widened parameters
        for p in params:
            st = agent.optimizers[name].state[p]
            assert st["exp_avg"].shape == st["exp_avg_sq"].shape == p.shape, name
    w0 = agent.nets["critic"].layers[0].weight  # (heads, [task 5, action, z], hidden)
    st = agent.optimizers["critic"].state[w0]
    assert torch.all(st["exp_avg"][:, 2:5] == 0) and st["exp_avg"][:, :2].abs().sum() > 0
    new = {**batch, "task": torch.tensor([4, 3, 2, 1, 0, 4])}
    agent.update(new)  # new slots train
    assert agent.nets["critic"].layers[0].weight[:, 2:5].abs().sum() > 0
    target_w0 = agent.nets["target_critic"].layers[0].weight
    assert target_w0.shape == agent.nets["critic"].layers[0].weight.shape
    with pytest.raises(ValueError, match="cannot shrink"):
        agent.grow_tasks(3)


def test_core_bc_agent():
    cfg = _tiny_config(algo="bc", actor_lr=1e-3)
    agent = Agent(cfg)
    dropout = agent.nets["bc_policy"].net[2]  # after the first ReLU
    assert set(agent.nets) == {"bc_policy"} and dropout.p == 0.4
    batch = bench.random_batch(cfg, 8)
    losses = [agent.update(batch)["bc_loss"].item() for _ in range(15)]
    assert losses[-1] < losses[0]
    act = _act_on(agent, batch)
    assert act.shape == (8, 7) and act.abs().max() <= 1
    with pytest.raises(ValueError, match="algo='bc'"):
        agent.q_values(batch)
    with pytest.raises(ValueError, match="AgentConfig.algo='sac'"):
        AgentConfig(algo="sac")


def test_core_switch_cql_to_awbc():
    """finetune.py switches an agent built from a cql checkpoint to algo awbc (set_config): the BC
    policy appears then; edited in place, cfg.algo = 'awbc' is refused at the next update."""
    cfg = _tiny_config()
    agent = Agent(cfg)
    batch = bench.random_batch(cfg, 6)
    a_cql = _act_on(agent, batch)
    agent.cfg.algo = "awbc"
    with pytest.raises(ValueError, match="needs the BC policy set_config adds"):
        agent.update(batch)
    agent.set_config(dataclasses.replace(agent.cfg, algo="awbc"))
    info = agent.update(batch)
    assert agent.bc_policy is not None and "awbc_weight" in info
    assert 0 < info["awbc_weight"] <= cfg.awbc_max_weight
    a_bc = _act_on(agent, batch)
    assert a_bc.shape == a_cql.shape and not torch.allclose(a_bc, a_cql)
    again = checkpoint.agent_from_state(checkpoint.agent_state(agent))
    assert again.cfg.algo == "awbc" and torch.equal(_act_on(again, batch), a_bc)
    bc = Agent(_tiny_config(algo="bc"))
    bc.cfg.algo = "cql"
    with pytest.raises(ValueError, match="algo='cql' trains critic networks"):
        bc.update(batch)


def test_core_state_statistics_travel_with_checkpoints_and_old_ones_load_as_identity():
    cfg = _tiny_config()
    agent = Agent(cfg)
    mean = torch.linspace(-1.0, 1.0, 7)
    std = torch.linspace(0.1, 0.7, 7)
    agent.set_state_statistics(mean, std)
    saved = checkpoint.agent_state(agent)
    again = checkpoint.agent_from_state(saved)
    assert torch.equal(again.policy.state_norm.mean, mean)
    assert torch.equal(again.policy.state_norm.std, std)
    # the BC policy created later sees the state as the policy does
    agent.set_config(dataclasses.replace(agent.cfg, algo="awbc"))
    agent.update(bench.random_batch(cfg, 4))
    assert torch.equal(agent.bc_policy.state_norm.mean, mean)
    # a checkpoint written before the normalizer existed: identity, so its policy acts as it did
    old = copy.deepcopy(saved)
    for net in old["nets"].values():
        net.pop("state_norm.mean", None)
        net.pop("state_norm.std", None)
    legacy = checkpoint.agent_from_state(checkpoint.upgrade_agent_state(old))
    assert torch.equal(legacy.policy.state_norm.mean, torch.zeros(7))
    assert torch.equal(legacy.policy.state_norm.std, torch.ones(7))
    x = bench.random_batch(cfg, 4, seed=1)
    unnormalized = checkpoint.agent_from_state(saved)
    unnormalized.set_state_statistics(torch.zeros(7), torch.ones(7))
    assert torch.equal(_act_on(legacy, x), _act_on(unnormalized, x))
    assert not torch.equal(_act_on(again, x), _act_on(legacy, x))


def test_core_optimizer_state_takes_the_parameters_layout_on_load():
    """A GPU checkpoint holds channels_last Adam moments; loading it elsewhere must give the
    parameter's layout."""
    cfg = _tiny_config()
    a = Agent(cfg)
    batch = bench.random_batch(cfg, 4)
    a.update(batch)
    # as torch.load gives it: no tensor shared with a's live optimizer
    sd = copy.deepcopy(checkpoint.agent_state(a))
    for st in sd["optimizers"]["critic"]["state"].values():
        for k, v in st.items():
            if torch.is_tensor(v) and v.dim() == 4:
                st[k] = v.contiguous(memory_format=torch.channels_last)
    b = Agent(cfg)
    c = Agent(cfg)
    checkpoint.load_agent_state(b, sd)
    checkpoint.load_agent_state(c, copy.deepcopy(checkpoint.agent_state(a)))
    for opt in b.optimizers.values():
        for p, st in opt.state.items():
            moments = [v for v in st.values() if torch.is_tensor(v) and v.shape == p.shape]
            assert all(v.stride() == p.stride() for v in moments)
    b.update(batch)
    c.update(batch)
    for (name, x), (_, y) in zip(b.critic.named_parameters(), c.critic.named_parameters()):
        assert torch.allclose(x, y, atol=1e-6), name


def test_pipeline_a_phase_switch_is_one_config_change():
    cfg = _tiny_config()
    agent = Agent(cfg)
    frozen = dataclasses.replace(cfg, critic_lr=0.0, alpha=3.0)
    agent.set_config(frozen)
    assert agent.cfg == frozen and agent.cfg is not frozen
    assert [g["lr"] for g in agent.optimizers["critic"].param_groups] == [0.0]
    before = {k: v.clone() for k, v in agent.critic.state_dict().items()}
    agent.update(bench.random_batch(cfg, 4))
    assert all(torch.equal(v, agent.critic.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match=r"set_config cannot change \['hidden'\]"):
        agent.set_config(dataclasses.replace(cfg, hidden=cfg.hidden * 2))
    online_cfg = online.OnlineConfig()
    assert online.online_learner(cfg, online_cfg, buffer_filled=False).alpha == 5.0
    assert online.online_learner(cfg, online_cfg, buffer_filled=True).alpha == 0.5
    assert online.online_learner(cfg, online_cfg, buffer_filled=True).calql
    with pytest.raises(SystemExit, match="--algo bc cannot fine-tune a cql checkpoint"):
        finetune.finetune_config(cfg, {"algo": "bc"})


def test_perf_compiled_update_equals_eager():
    """Agent.compile captures update()'s passes and losses and gives the eager losses and weights,
    within rtol 1e-5 / atol 1e-6 (float reassociation; inductor differed by 5e-7 here). The backend
    is aot_eager: it checks the capture and the autograd of the captured graph in ~4 s, where
    inductor compiles C++ for ~90 s on a 2-core CPU (measured, this config). The agent's random
    stream (resume) must be the eager one. (Dropout, in the BC policy, draws other numbers from
    torch's RNG when compiled: not compared here.)"""
    from torch._dynamo.testing import CompileCounterWithBackend

    cfg = _tiny_config()
    eager = Agent(cfg)
    compiled = Agent(copy.deepcopy(cfg))
    counter = CompileCounterWithBackend("aot_eager")
    compiled.compile(backend=counter)
    for seed in range(2):
        batch = bench.random_batch(cfg, 6, seed=seed)
        want = _loss_entries(eager.update(batch))
        got = _loss_entries(compiled.update(batch))
        assert want.keys() == got.keys() and "critic_loss" in want
        for k in want:
            assert torch.allclose(got[k], want[k], rtol=1e-5, atol=1e-6), (seed, k)
    assert counter.frame_count >= 1 and sum(len(g.graph.nodes) for g in counter.graphs) > 100
    for name, net in eager.nets.items():
        for (p, x), (_, y) in zip(net.named_parameters(), compiled.nets[name].named_parameters()):
            assert torch.allclose(x, y, rtol=1e-5, atol=1e-6), (name, p)
    assert torch.equal(eager.generator.get_state(), compiled.generator.get_state())
    with pytest.raises(ValueError, match=r"compile mode='fast', expected one of \('default'"):
        compiled.compile("fast")


# ==================================================================================================
# data.py
# ==================================================================================================


def test_data_release_split_kept_and_90_10_split(tmp_path):
    store, _ = _tree_store(tmp_path, ("k1/with_val", "k2/train_only"), n_traj=20, n_val=0)
    names = store.task_names
    assert names == ["train_only", "with_val"]
    val = store.trajectory_ids("val")
    assert len(val) == 4 and set(store.traj_task[val]) == {0, 1}  # 10 % of 20 per task
    assert len(set(val) | set(store.trajectory_ids("train"))) == 40
    again = data.load_store(tmp_path / "tree", store=tmp_path / "other", log=lambda *_: None)
    assert np.array_equal(again.trajectory_ids("val"), val)  # fixed seed
    _write_tree(tmp_path / "t2", ["k/a"], n_traj=6, n_val=3)
    st = data.load_store(tmp_path / "t2", log=lambda *_: None)
    assert st.trajectory_ids("val").tolist() == [6, 7, 8]  # the release's val/, nothing moved
    assert st.num_transitions("train") == 30 and st.num_transitions() == 45


def test_data_aliases_and_task_ids(tmp_path):
    _write_tree(tmp_path / "tree", ["k1/open_drawer_a", "k2/open_drawer_b", "k2/put_x"], n_traj=1)
    aliases = {"open_drawer_a": "open_drawer", "open_drawer_b": "open_drawer"}
    st = data.load_store(tmp_path / "tree", aliases=aliases, log=lambda *_: None)
    assert st.task_names == ["open_drawer", "put_x"]
    assert np.bincount(st.traj_task).tolist() == [4, 2]
    (tmp_path / "aliases.json").write_text(json.dumps(aliases))
    aliases_file = str(tmp_path / "aliases.json")
    from_file = data.load_store(tmp_path / "tree", aliases=aliases_file, log=lambda *_: None)
    assert from_file.path == st.path
    ids, n = batches.target_task_ids(["a", "b", "c"], ["new1", "new2"], "new")
    assert ids.tolist() == [3, 4] and n == 5
    ids, n = batches.target_task_ids(["a", "b", "c"], ["new1", "new2"], "b")
    assert ids.tolist() == [1, 1] and n == 3
    with pytest.raises(ValueError, match=r"\['a', 'b', 'c'\]"):
        batches.target_task_ids(["a", "b", "c"], ["new1"], "zzz")
    sampler = batches.Sampler(st, None, gamma=0.9, task_ids=[7, 9])
    assert set(sampler.sample(32)["task"].tolist()) <= {7, 9}


def test_data_images_round_trip_and_cameras(tmp_path):
    store, tree = _tree_store(tmp_path, n_traj=2, n_val=0, T=[3, 4], cameras=("images0", "images1"))
    traj = tree["k1/task_a"]["train"][1]
    for camera in ("images0", "images1"):
        st = data.load_store(tmp_path / "tree", camera=camera, log=lambda *_: None)
        t = batches.Sampler(st, None, gamma=0.9).trajectory(1)
        observations = traj["observations"]
        next_observations = traj["next_observations"]
        assert np.array_equal(_nhwc(t["obs"]), np.stack([o[camera] for o in observations]))
        assert np.array_equal(
            _nhwc(t["next_obs"]), np.stack([o[camera] for o in next_observations])
        )
        assert np.allclose(t["next_state"], np.stack([o["state"] for o in next_observations]))
    both = data.load_store(tmp_path / "tree", camera="all", log=lambda *_: None)
    assert both.num_transitions() == 2 * store.num_transitions() == 14
    images = np.load(os.path.join(both.path, "images.npy"), allow_pickle=False)
    assert images.shape == (2 * 9, 8, 8, 3)


def test_data_resize(tmp_path):
    _, tree = _tree_store(tmp_path, n_traj=1, n_val=0, T=2, H=16)
    st = data.load_store(tmp_path / "tree", image_size=8, log=lambda *_: None)
    img = tree["k1/task_a"]["train"][0]["observations"][1]["images0"]
    expected = np.asarray(Image.fromarray(img).resize((8, 8), Image.Resampling.LANCZOS))
    assert st.image_size == (8, 8) and np.array_equal(st.images[1], expected)


def test_data_cache_reuse_and_rebuild(tmp_path):
    _write_tree(tmp_path / "tree", ["k/a"], n_traj=2, n_val=0)
    logs = []
    st = data.load_store(tmp_path / "tree", log=logs.append)
    assert logs[0].startswith("converting") and ".ptr_store" in st.path
    data.load_store(tmp_path / "tree", log=logs.append)
    assert logs[-1].startswith("using store")  # unchanged sources: reused
    src = tmp_path / "tree" / "k" / "a" / "train" / "out.npy"
    os.utime(src, ns=(os.stat(src).st_atime_ns, os.stat(src).st_mtime_ns + 10**9))  # touched
    data.load_store(tmp_path / "tree", log=logs.append)
    assert logs[-2].startswith("converting")
    _write_tree(tmp_path / "tree", ["k/b"], n_traj=3, n_val=0)  # a new out.npy
    st2 = data.load_store(tmp_path / "tree", log=logs.append)
    assert logs[-2].startswith("converting")
    assert st2.path == st.path and st2.task_names == ["a", "b"]
    other = data.load_store(tmp_path / "tree", image_size=4, log=logs.append)
    assert other.path != st.path and other.image_size == (4, 4)  # options are part of the key
    # asking for the size the images already have (as finetune.py does) reuses the native store:
    # no second copy
    assert data.load_store(tmp_path / "tree", image_size=8, log=logs.append).path == st.path
    assert logs[-1].startswith("using store")
    # a built store opens as it is
    assert data.load_store(st.path, log=logs.append).num_transitions() == 25


def test_data_killed_conversion_leaves_no_store(tmp_path):
    _write_tree(tmp_path / "tree", ["k/a"], n_traj=2, n_val=0)
    store = tmp_path / "store"
    kill = (
        "import os, signal, sys; sys.path.insert(0, sys.argv[1]); import data; "
        "data.resize_images = lambda f, s: os.kill(os.getpid(), signal.SIGKILL); "
        "data.load_store(sys.argv[2], store=sys.argv[3])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", kill, os.path.dirname(data.__file__), tmp_path / "tree", store]
    )
    assert proc.returncode == -signal.SIGKILL
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith("store.tmp-")]
    assert not store.exists() and leftovers
    # starts clean, removes the leftover
    st = data.load_store(tmp_path / "tree", store=store, log=lambda *_: None)
    assert st.num_transitions() == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store", "tree"]
    bad = str(tmp_path / "tree" / "k" / "b" / "train" / "out.npy")
    _save_npy(bad, [{"actions": np.zeros((2, 7))}])
    # a bad file: the old store is left as it was, no tmp folder
    with pytest.raises(bridge.BridgeFormatError):
        data.load_store(tmp_path / "tree", store=store, log=lambda *_: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store", "tree"]


def test_data_two_processes_converting_the_same_files(tmp_path, monkeypatch):
    _write_tree(tmp_path / "tree", ["k/a"], n_traj=2, n_val=0)
    store = tmp_path / "store"
    st = data.load_store(tmp_path / "tree", store=store, log=lambda *_: None)  # the first one's
    (store / "first").write_text("")
    root, sources = data.find_sources(tmp_path / "tree")

    def exists_but_the_store(p, exists=os.path.exists):
        return os.fspath(p) != str(store) and exists(p)

    # the second one looked before the first renamed its store into place
    with monkeypatch.context() as m:
        m.setattr(os.path, "exists", exists_but_the_store)
        data.convert(
            sources, root, str(store), st.meta["key"], st.meta["options"], log=lambda *_: None
        )
    # kept, no ENOTEMPTY
    assert (store / "first").exists() and Store(store).num_transitions() == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store", "tree"]  # our tmp folder is gone
    data.convert(sources, root, str(store), "other", st.meta["options"], log=lambda *_: None)
    # an old store is replaced
    assert not (store / "first").exists() and Store(store).meta["key"] == "other"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store", "tree"]


def test_data_empty_split_file_counts_as_absent(tmp_path):
    # robot.py record writes an empty val/out.npy until the 5th kept episode: the 90/10 split
    # still holds one out
    _write_tree(tmp_path / "tree", ["k/a"], n_traj=4, n_val=0)
    _write_tree(tmp_path / "tree", ["k/b"], n_traj=0, n_val=4)
    bridge.write_bridge_file(str(tmp_path / "tree" / "k" / "a" / "val" / "out.npy"), [])
    bridge.write_bridge_file(str(tmp_path / "tree" / "k" / "b" / "train" / "out.npy"), [])
    st = data.load_store(tmp_path / "tree", log=lambda *_: None)
    assert st.task_names == ["a", "b"]
    assert np.bincount(st.traj_task[st.trajectory_ids("val")]).tolist() == [1, 1]
    assert np.bincount(st.traj_task[st.trajectory_ids("train")]).tolist() == [3, 3]


def _with_step(traj, key, step, **fields):
    """A copy of traj whose observation `step` of `key` (observations, next_observations) has
    `fields` changed."""
    steps = list(traj[key])
    steps[step] = dict(steps[step], **fields)
    return dict(traj, **{key: steps})


def _without(traj, key):
    return {k: v for k, v in traj.items() if k != key}


# id, the out.npy's content made from a good trajectory t, the error, load_store's options
BAD_INPUTS = [
    (
        "actions-missing",
        lambda t: [t, _without(t, "actions")],
        r"trajectory 1: field 'actions': expected a key",
        {},
    ),
    (
        "next-observations-short",
        lambda t: [dict(t, next_observations=t["next_observations"][:2])],
        r"trajectory 0: field 'next_observations': expected a list of 3 .* got 2 entries",
        {},
    ),
    (
        "image-other-size",
        lambda t: [_with_step(t, "observations", 1, images0=np.zeros((8, 9, 3), np.uint8))],
        r"field 'observations\[1\].images0': expected a uint8 image of shape \(8, 8, 3\)",
        {},
    ),
    (
        "image-float",
        lambda t: [_with_step(t, "observations", 0, images0=np.zeros((8, 8, 3), np.float32))],
        r"'observations\[0\].images0': expected a uint8 image .* got float32",
        {},
    ),
    (
        "final-state-6d",
        lambda t: [_with_step(t, "next_observations", -1, state=np.zeros(6))],
        r"'next_observations\[2\].state': expected 7 floats",
        {},
    ),
    (
        "no-steps",
        lambda t: [t, _good_trajectory(0)],
        r"trajectory 1: field 'actions': .* got float64 array of shape \(0, 7\)",
        {},
    ),
    (
        "actions-ragged",
        lambda t: [dict(t, actions=[list(a) for a in t["actions"]][:2] + [[0.0] * 6])],
        r"trajectory 0: field 'actions': expected a \(T, 7\) float .* got a ragged list",
        {},
    ),
    (
        "state-words",
        lambda t: [_with_step(t, "observations", 2, state=["up"] * 7)],
        r"'observations\[2\].state': expected 7 floats .* got <U2 array of shape \(7,\)",
        {},
    ),
    (
        "state-ragged",
        lambda t: [_with_step(t, "observations", 0, state=[[0.0] * 3, [0.0] * 4])],
        r"'observations\[0\].state': expected 7 floats .* got a ragged list",
        {},
    ),
    (
        "terminals-none",
        lambda t: [dict(t, terminals=[None] * 3)],
        r"'terminals': expected 3 numbers, got object array",
        {},
    ),
    (
        "trajectory-not-a-dict",
        lambda t: [t, ["not", "a", "dict"]],
        r"trajectory 1: field '<trajectory>': expected a dict",
        {},
    ),
    (
        "file-not-a-list",
        lambda t: np.zeros(3),
        r"field '<file>': expected a list of trajectory dicts, got float64 array",
        {},
    ),
    (
        "camera-missing",
        lambda t: [t],
        r"field 'observations\[0\].images1': expected .*camera missing",
        {"camera": "images1"},
    ),
]


@pytest.mark.parametrize(
    "content, match, options",
    [pytest.param(*case, id=name) for name, *case in BAD_INPUTS],
)
def test_data_bad_input_errors(tmp_path, content, match, options):
    _assert_bad_input(tmp_path, content(_good_trajectory()), match, **options)


def test_data_truncated_file_error(tmp_path):
    path = tmp_path / "bad" / "k" / "a" / "train" / "out.npy"
    _save_npy(str(path), [_good_trajectory(), _good_trajectory()])
    path.write_bytes(path.read_bytes()[:-500])  # truncated
    truncated = r"out.npy: field '<file>': expected a complete .* unreadable"
    with pytest.raises(bridge.BridgeFormatError, match=truncated):
        data.load_store(tmp_path / "bad", store=tmp_path / "s", log=lambda *_: None)


def test_data_skip_bad_and_cli(tmp_path):
    rng = np.random.default_rng(0)
    bad = bridge.synthetic_trajectory(3, 8, rng)
    del bad["observations"]
    ragged = bridge.synthetic_trajectory(3, 8, rng)
    words = bridge.synthetic_trajectory(3, 8, rng)
    # numpy raises a bare ValueError
    ragged["actions"] = [list(a) for a in ragged["actions"]][:2] + [[0.0] * 6]
    words["next_observations"][-1] = dict(words["next_observations"][-1], state=["x"] * 7)
    first = bridge.synthetic_trajectory(3, 8, rng)
    third = bridge.synthetic_trajectory(4, 8, rng)
    _save_npy(
        str(tmp_path / "tree" / "k" / "a" / "train" / "out.npy"), [first, bad, third, ragged, words]
    )
    logs = []
    st = data.load_store(tmp_path / "tree", skip_bad=True, log=logs.append)
    assert st.num_transitions() == 7 and st.meta["skipped"] == 3 and "skipped 3 bad" in logs[-1]
    assert "trajectory 3: field 'actions'" in logs[-1]
    assert "4: field 'next_observations[2].state'" in logs[-1]
    convert = ["convert", tmp_path / "tree", "--out", tmp_path / "s"]
    proc = _run_script("data.py", *convert, expect_ok=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "trajectory 1: field 'observations': expected a key" in proc.stderr
    proc = _run_script("data.py", *convert, "--skip_bad", expect_ok=False)
    assert proc.returncode == 0 and "skipped 3 bad" in proc.stdout
    proc = _run_script("data.py", "info", tmp_path / "s", expect_ok=False)
    assert proc.returncode == 0
    assert "2 trajectories, 7 transitions" in proc.stdout and " a" in proc.stdout


def test_data_store_marks_failed_attempts_by_their_rewards(tmp_path, capsys):
    """A trajectory whose rewards have no positive entry is a failed attempt; one without rewards
    (the Bridge release) or with a positive reward succeeded. A store of format version 1, which
    has no success array, is converted again with the usual notice."""
    rng = np.random.default_rng(0)
    demo, succeeded, failed = (bridge.synthetic_trajectory(4, 8, rng) for _ in range(3))
    succeeded["rewards"] = np.array([0, 0, 1, 1], np.float32)
    failed["rewards"] = np.zeros(4, np.float32)
    source = tmp_path / "tree" / "k" / "a" / "train" / "out.npy"
    bridge.write_bridge_file(str(source), [demo, succeeded, failed])
    st = data.load_store(tmp_path / "tree", log=lambda *_: None)
    assert st.traj_success.tolist() == [True, True, False]
    data.info(st.path)
    assert "0 skipped, 1 failed attempts;" in capsys.readouterr().out
    # rewards that are not one number per step: an error naming the file, trajectory and field
    bad = bridge.synthetic_trajectory(4, 8, rng)
    bad["rewards"] = np.zeros(3)
    _assert_bad_input(tmp_path, [bad], r"trajectory 0: field 'rewards': expected 4 numbers")
    # the store as format version 1 wrote it, in the place its key gave it
    meta = json.loads((pathlib.Path(st.path) / "meta.json").read_text())
    meta["format_version"] = meta["options"]["format_version"] = 1
    meta["key"] = data.options_key(meta["options"])
    old = tmp_path / "tree" / data.STORE_DIR / meta["key"]
    shutil.move(st.path, old)
    (old / "meta.json").write_text(json.dumps(meta))
    with np.load(old / "trajectories.npz") as z:
        index = {name: z[name] for name in z.files if name != "success"}
    np.savez(old / "trajectories.npz", **index)
    version = f"'format_version': expected {FORMAT_VERSION}, got 1"
    with pytest.raises(StoreError, match=version):
        Store(old)
    logs = []
    again = data.load_store(tmp_path / "tree", log=logs.append)
    assert logs[0].startswith("converting 1 files") and again.traj_success.tolist() == [1, 1, 0]


# ---- non-finite values, damaged stores, one-line failures -----------------------------
def _with_action(traj, step, dim, value):
    """A copy of traj with one entry of its actions changed."""
    actions = np.array(traj["actions"])
    actions[step, dim] = value
    return dict(traj, actions=actions)


# id, the out.npy's content made from a good trajectory t, the error
NON_FINITE_INPUTS = [
    (
        "action-nan",
        lambda t: [t, _with_action(t, 1, 4, np.nan)],
        r"trajectory 1: field 'actions': expected finite numbers, got nan at step 1, dimension 4",
    ),
    (
        "state-inf",
        lambda t: [_with_step(t, "observations", 2, state=np.r_[np.inf, np.zeros(6)])],
        r"field 'observations\[2\].state': expected finite numbers, got inf in dimension 0",
    ),
    (
        "final-state-minus-inf",
        lambda t: [_with_step(t, "next_observations", -1, state=np.r_[np.zeros(6), -np.inf])],
        r"'next_observations\[2\].state': .* got -inf in dimension 6",
    ),
    (
        "terminal-nan",
        lambda t: [dict(t, terminals=[0.0, np.nan, 0.0])],
        r"'terminals': .* got nan at step 1",
    ),
    (
        "action-beyond-float32",  # a float64 that the store's float32 would keep as inf
        lambda t: [_with_action(t, 2, 0, 1e39)],
        r"'actions': expected finite numbers, got inf at step 2, dimension 0",
    ),
]


@pytest.mark.parametrize(
    "content, match", [pytest.param(*case, id=name) for name, *case in NON_FINITE_INPUTS]
)
def test_data_non_finite_values_rejected(tmp_path, content, match):
    _assert_bad_input(tmp_path, content(_good_trajectory()), match)


def test_data_non_finite_values_skipped(tmp_path):
    # --skip_bad skips them like any other bad trajectory: the action bounds stay finite
    bad = _good_trajectory(4)
    bad["actions"][0, 0] = np.nan
    _save_npy(
        str(tmp_path / "tree" / "k" / "a" / "train" / "out.npy"),
        [_good_trajectory(), bad, _good_trajectory(2)],
    )
    logs = []
    st = data.load_store(tmp_path / "tree", skip_bad=True, log=logs.append)
    assert st.num_transitions() == 5 and st.meta["skipped"] == 1
    assert "trajectory 1: field 'actions': expected finite numbers, got nan at step 0" in logs[-1]
    assert np.isfinite(st.action_low).all() and np.isfinite(st.action_high).all()


def test_data_damaged_store_given_is_an_error_with_the_rebuild_command(tmp_path):
    _write_tree(tmp_path / "tree", ["k/a"], n_traj=2, n_val=0, T=[4, 5])
    built = tmp_path / "built"
    data.load_store(tmp_path / "tree", store=built, log=lambda *_: None)
    for case, (file, problem) in _DAMAGE.items():
        store = tmp_path / case.replace(" ", "_")
        match = re.escape(str(store / file)) + ": " + problem  # the message starts with the file
        shutil.copytree(built, store)
        _damage_store(store, case)
        rebuild = f"rebuild the store: python data.py convert {tmp_path / 'tree'} --out {store}"
        with pytest.raises(StoreError, match=match) as e:
            data.load_store(tmp_path / "tree", store=store, log=lambda *_: None)
        assert str(e.value).startswith(str(store)) and str(e.value).endswith(rebuild), case
        with pytest.raises(StoreError, match=match):  # a store passed as data
            data.load_store(store, log=lambda *_: None)
        # the command it names rebuilds it
        data.main(["convert", str(tmp_path / "tree"), "--out", str(store)])
        assert Store(store).num_transitions() == 9, case
    proc = _run_script("data.py", "info", built, expect_ok=False)
    assert proc.returncode == 0
    # a garbage meta.json was misread as a source tree: "expected at least one out.npy"
    _damage_store(built, "garbage meta")
    proc = _run_script("data.py", "info", built, expect_ok=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith(f"data.py: error: {built / 'meta.json'}: unreadable")


def test_data_damaged_default_store_is_rebuilt_from_its_sources(tmp_path):
    _write_tree(tmp_path / "tree", ["k/a"], n_traj=2, n_val=0, T=[4, 5])
    store = data.load_store(tmp_path / "tree", log=lambda *_: None)
    images = np.array(store.images)
    for case in _DAMAGE:
        _damage_store(pathlib.Path(store.path), case)
        logs = []
        again = data.load_store(tmp_path / "tree", log=logs.append)
        assert again.path == store.path and np.array_equal(again.images, images), case
        notice = logs[0]
        assert notice.startswith(f"store {store.path} is damaged (") and "\n" not in notice
        assert notice.endswith(f"rebuilding it from {tmp_path / 'tree'}")
        assert f"is damaged ({_DAMAGE[case][0]}: " in notice, (case, notice)
    assert sorted(os.listdir(os.path.dirname(store.path))) == [os.path.basename(store.path)]


def test_data_bridge_reader_copied_alone_reads_and_checks_without_torch(tmp_path):
    """bridge.py with the leaves it imports (cli, fileio) is the whole Bridge reader: it unpickles,
    checks and reports a bad field, and never loads torch."""
    for name in ("bridge.py", "cli.py", "fileio.py"):
        (tmp_path / name).write_text(open(os.path.join(HERE, name)).read())
    path = tmp_path / "out.npy"
    trajectory = bridge.synthetic_trajectory(3, 8, np.random.default_rng(0))
    bridge.write_bridge_file(str(path), [trajectory, {**trajectory, "actions": np.zeros((3, 6))}])
    script = (
        "import sys, bridge\n"
        f"good, bad = bridge.read_bridge_file({str(path)!r})\n"
        "images, states, actions, terminals = bridge.parse_trajectory(good, 'out.npy', 0)\n"
        "print(images['images0'].shape, actions.shape)\n"
        "try:\n"
        "    bridge.parse_trajectory(bad, 'out.npy', 1)\n"
        "except bridge.BridgeFormatError as e:\n"
        "    print(e)\n"
        "print('torch' in sys.modules)\n"
    )
    alone = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True
    )
    assert alone.returncode == 0, alone.stderr
    shapes, error, torch_loaded = alone.stdout.strip().split("\n")
    assert shapes == "(4, 8, 8, 3) (3, 7)"
    assert error.startswith("out.npy: trajectory 1: field 'actions'") and "(T, 7)" in error
    assert torch_loaded == "False"


def test_data_source_reader_seam(tmp_path, monkeypatch):
    # a reader may yield trajectory dicts lazily and fail part-way: what it yielded before stays
    rng = np.random.default_rng(0)
    path = tmp_path / "tree" / "k" / "a" / "train" / "out.npy"
    bridge.write_bridge_file(str(path), [])

    def reader(source):
        yield bridge.synthetic_trajectory(3, 8, rng)
        yield bridge.synthetic_trajectory(2, 8, rng)
        raise bridge.BridgeFormatError(source, 2, "<record>", "a complete record", "end of file")

    monkeypatch.setattr(data, "read_source", reader)
    logs = []
    st = data.load_store(tmp_path / "tree", skip_bad=True, log=logs.append)
    assert st.traj_length.tolist() == [3, 2] and "trajectory 2: field '<record>'" in logs[-1]
    with pytest.raises(bridge.BridgeFormatError, match="end of file"):
        data.load_store(tmp_path / "tree", store=tmp_path / "s", log=lambda *_: None)


def test_data_one_line_failures_and_nothing_half_written(tmp_path):
    assert issubclass(bridge.BridgeFormatError, cli.ExpectedError)
    assert issubclass(bridge.BridgeFormatError, ValueError)
    _write_tree(tmp_path / "tree", ["k/b"], n_traj=2, n_val=0)
    os.makedirs(tmp_path / "tree" / "k" / "a" / "train" / "out.npy")  # a folder, not a file
    a_folder = r"a/train/out.npy: field '<file>': expected a file.* got a directory"
    with pytest.raises(bridge.BridgeFormatError, match=a_folder):
        data.load_store(tmp_path / "tree", log=lambda *_: None)
    logs = []
    st = data.load_store(tmp_path / "tree", skip_bad=True, log=logs.append)
    assert st.num_transitions() == 10 and st.meta["skipped"] == 1
    assert "skipped 1 bad" in logs[-1] and "got a directory" in logs[-1]
    # --out naming a folder that is not a store: refused, nothing deleted
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="mine: exists and is not a store"):
        data.load_store(tmp_path / "tree", store=tmp_path / "mine", skip_bad=True, log=logs.append)
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]
    # a missing path and Ctrl-C during a conversion: one line each, no store, no tmp folder
    proc = _run_script("data.py", "convert", tmp_path / "missing", expect_ok=False)
    assert proc.returncode == 2
    assert proc.stderr == f"data.py: error: {tmp_path / 'missing'}: no such file or folder\n"
    interrupt = (
        "import sys; sys.path.insert(0, sys.argv[1]); import cli, data; sys.argv[0] = 'data.py'\n"
        "def interrupted(frames, size):\n    raise KeyboardInterrupt\n"
        "data.resize_images = interrupted\n"
        "cli.run_cli(data.main, ['convert', sys.argv[2], '--out', sys.argv[3], '--skip_bad'])"
    )
    folder = os.path.dirname(data.__file__)
    proc = subprocess.run(
        [sys.executable, "-c", interrupt, folder, tmp_path / "tree", tmp_path / "s"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 130 and proc.stderr == "data.py: interrupted\n"
    assert not [p for p in os.listdir(tmp_path) if p.startswith("s")]


@pytest.mark.parametrize("unbuffered", ["", "1"])
def test_data_info_exits_quietly_when_stdout_closes(tmp_path, unbuffered):
    """`python data.py info STORE | head -1`: the reader of stdout goes away (here before the first
    line) and data.py exits 0 without a word, its stdout buffered (a pipe's default) or not."""
    st, _ = _tree_store(tmp_path)
    command = [sys.executable, os.path.join(HERE, "data.py"), "info", st.path]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED=unbuffered)
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) as proc:
        proc.stdout.close()
        assert proc.stderr.read() == b"" and proc.wait(timeout=60) == 0


# ---- rlds.py and lerobot.py: RLDS / TFDS and LeRobot datasets into the store ----------
def test_formats_crc32c_and_example_wire_format():
    assert rlds.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    rng = np.random.default_rng(0)
    for n in (0, 3, 63, 64, 1000, 40_001):  # below, at and above the vectorized path
        buf = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        c = 0xFFFFFFFF
        for b in buf:  # bit by bit, reflected polynomial 0x82F63B78
            c ^= b
            for _ in range(8):
                c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)
        assert rlds.crc32c(buf) == c ^ 0xFFFFFFFF, n
    # Example{features{feature{key "a" value{int64_list{value: [1]}}}}}, as TensorFlow serializes it
    hand = bytes.fromhex("0a0c0a0a0a016112051a030a0101")
    assert rlds.encode_example({"a": np.array([1])}) == hand
    assert {k: v.tolist() for k, v in rlds.parse_example(hand).items()} == {"a": [1]}
    features = {"i": np.array([-3, 2**40]), "f": np.array([1.5, -2.0]), "s": [b"xy", b""]}
    got = rlds.parse_example(rlds.encode_example(features))
    assert got["i"].tolist() == [-3, 2**40] and got["f"].tolist() == [1.5, -2.0]
    assert got["s"] == [b"xy", b""]
    # floats and ints one field per value (wire types 5 and 0), as older writers do
    unpacked = bytes.fromhex("0a130a110a0166120c120a0d0000c03f0d000000c0")
    assert rlds.parse_example(unpacked)["f"].tolist() == [1.5, -2.0]


def test_formats_rlds_round_trip_tasks_and_cameras(tmp_path):
    episodes = _write_rlds(tmp_path / "ds", n=5, num_shards=2)
    features, cameras = rlds.read_schema(tmp_path / "ds")
    assert cameras == ["steps/observation/image_0", "steps/observation/image_1"]
    shards = rlds.find_shards(tmp_path / "ds")
    assert [os.path.basename(p) for p, _ in shards] == [
        "bridge_dataset-train.tfrecord-00000-of-00002",
        "bridge_dataset-train.tfrecord-00001-of-00002",
    ]
    read = []
    for camera, c in (("images0", 0), ("images1", 1), ("image_1", 1)):
        read = [
            (task, source, load())
            for path, _ in shards
            for _, task, source, load in rlds.read_shard(path, features, cameras, camera)
        ]
        assert len(read) == len(episodes)  # episode boundaries: one trajectory per record
        for (task, source, traj), (ref, file_path, _) in zip(read, episodes):
            # task_k, not the number
            assert source == file_path and task == file_path.split("/")[-4]
            assert len(traj["actions"]) == len(ref["actions"]) - 1
            assert np.array_equal(traj["actions"], ref["actions"][:-1])
            got = np.stack(
                [o["images0"] for o in traj["observations"]]
                + [traj["next_observations"][-1]["images0"]]
            )
            want = np.stack([o[f"images{c}"] for o in ref["observations"]])
            assert got.shape == want.shape
            assert np.abs(got.astype(float) - want).mean() < JPEG_TOLERANCE
            states = [o["state"] for o in traj["observations"] + traj["next_observations"][-1:]]
            assert np.array_equal(states, [o["state"] for o in ref["observations"]])
    by_instruction = [
        task
        for path, _ in shards
        for _, task, _, _ in rlds.read_shard(path, features, cameras, task_source="instruction")
    ]
    assert by_instruction == [instruction for *_, instruction in episodes]
    file_path = "/a/bridge/toykitchen2/put_sushi_in_pot/train/out.npy"
    assert rlds.task_from_file_path(file_path) == "put_sushi_in_pot"
    with pytest.raises(bridge.FormatError, match=r"features.json: field 'camera': expected one of"):
        next(rlds.read_shard(shards[0][0], features, cameras, "wrist"))


def test_formats_rlds_store_equals_numpy_store(tmp_path):
    """The same episodes as an RLDS folder (train and val shards) and as a numpy tree of out.npy
    give the same store: tasks, splits, lengths and actions / states exactly, images within JPEG
    error."""
    train = _write_rlds(tmp_path / "ds", n=6, num_shards=2, split="train", seed=1)
    val = _write_rlds(tmp_path / "ds", n=2, num_shards=1, split="val", seed=2)
    for split, episodes in (("train", train), ("val", val)):
        by_file = {}
        for traj, file_path, _ in episodes:
            by_file.setdefault(file_path.split("/")[-4], []).append(_stored_steps(traj))
        for task, trajs in by_file.items():
            path = tmp_path / "tree" / "k" / task / split / "out.npy"
            bridge.write_bridge_file(str(path), trajs)
    quiet = {"image_size": 8, "log": lambda *_: None}
    from_rlds = _store_trajectories(data.load_store(tmp_path / "ds", **quiet))
    from_numpy = _store_trajectories(data.load_store(tmp_path / "tree", **quiet))

    def order(t):  # the stores list files in other orders
        return (t[0], t[1], t[4][0].tolist())

    assert len(from_rlds) == len(from_numpy) == 8
    for a, b in zip(sorted(from_rlds, key=order), sorted(from_numpy, key=order)):
        assert a[:2] == b[:2] and a[2].shape == b[2].shape
        assert np.array_equal(a[3], b[3]) and np.array_equal(a[4], b[4])
        assert np.abs(a[2].astype(float) - b[2]).mean() < JPEG_TOLERANCE
    assert {t[1] for t in from_rlds} == {0, 1}  # the shards' train / val split is kept


def test_formats_rlds_bad_input_and_skip_bad(tmp_path, capsys):
    _write_rlds(tmp_path / "ds", n=6, num_shards=2)
    shard0, shard1 = (str(p) for p, _ in rlds.find_shards(tmp_path / "ds"))
    store = tmp_path / "store"

    def fails(pattern, **kw):
        with pytest.raises(bridge.FormatError, match=pattern):
            data.load_store(tmp_path / "ds", store=store, log=lambda *_: None, **kw)
        assert not os.path.exists(store)  # nothing half-written

    _rewrite_record(shard0, 1, lambda f: f.pop(rlds.STATE_KEY))
    fails(
        r"00000-of-00002: episode 1: field 'steps/observation/state': expected a feature of every"
    )
    _write_rlds(tmp_path / "ds", n=6, num_shards=2)

    def break_image_3(features):
        features["steps/observation/image_0"][3] = b"\xff\xd8 not a jpeg"

    _rewrite_record(shard0, 2, break_image_3)
    fails(r"episode 2: field 'steps/observation/image_0\[3\]': expected a JPEG or PNG image")
    with open(shard1, "r+b") as f:  # the second shard ends in the middle of its last record
        f.truncate(os.path.getsize(shard1) - 100)
    logs = []
    st = data.load_store(tmp_path / "ds", store=store, skip_bad=True, log=logs.append)
    assert st.meta["skipped"] == 2 and len(st.traj_length) == 4
    assert "episode 2: field 'steps/observation/image_0[3]'" in logs[-1]
    assert (
        "00001-of-00002: episode 2: field '<record>': expected " in logs[-1]
        and "(truncated)" in logs[-1]
    )
    blob = bytearray(open(shard0, "rb").read())
    blob[40] ^= 1  # one flipped bit inside the first record
    open(shard0, "wb").write(bytes(blob))
    store = tmp_path / "store2"
    fails(r"00000-of-00002: episode 0: field '<record>': expected a matching CRC32C")
    # the command line, in this process: one line and exit status 2, then --skip_bad, then info
    convert = ["convert", str(tmp_path / "ds"), "--out", str(store), "--task_source", "instruction"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_status:
        cli.run_cli(data.main, convert)
    err = capsys.readouterr().err
    assert exit_status.value.code == 2 and err.count("\n") == 1 and "CRC32C" in err
    with pytest.raises(SystemExit) as exit_status:
        cli.run_cli(data.main, convert + ["--skip_bad"])
    assert exit_status.value.code == 0
    assert "skipped 2 bad" in capsys.readouterr().out  # the rest of shard 0, shard 1's end
    data.main(["info", str(store)])
    out = capsys.readouterr().out
    assert "2 trajectories" in out and "put the 0 in the pot" in out and "put the 1 in" in out


def _cut_shard(shard, keep):
    """Rewrite a shard with its first `keep` records: cut at a record boundary."""
    rlds.write_tfrecords(shard, list(rlds.read_tfrecords(shard))[:keep])


def _huge_record(shard):
    """After a shard's first record, a header claiming a 2^40-byte record (its CRC intact)."""
    _cut_shard(shard, 1)
    length = struct.pack("<Q", 2**40)
    with open(shard, "ab") as f:
        f.write(length + struct.pack("<I", rlds.masked_crc(length)) + b"16 bytes of data")


def _undecodable_record(shard):
    """Record 1 of a shard becomes bytes that are no tf.train.Example (framing and CRC intact)."""
    records = list(rlds.read_tfrecords(shard))
    records[1] = b"\x0a\x05abc"  # a field of 5 bytes, 3 of them there
    rlds.write_tfrecords(shard, records)


def _edit_dataset_info(folder, edit):
    """Rewrite a TFDS dataset_info.json: edit(its list of splits) changes them."""
    path = os.path.join(folder, "dataset_info.json")
    with open(path) as f:
        info = json.load(f)
    edit(info["splits"])
    with open(path, "w") as f:
        json.dump(info, f)


def _without_shard_lengths(folder, shard):
    """An empty shard in a dataset_info.json that lists no shardLengths (older writers)."""
    _edit_dataset_info(folder, lambda splits: splits[0].pop("shardLengths", None))
    _cut_shard(shard, 0)


# damage(dataset folder, [shard 0, shard 1] of 3 episodes each) -> the error it gives, and the
# (shard, record) of each episode that --skip_bad keeps (None: a missing file is refused even then)
RLDS_DAMAGE = {
    "features.json missing": (
        lambda folder, shards: os.remove(folder / "features.json"),
        r"ds/features.json: field '<file>': expected a TFDS file beside the shards, got missing",
        None,
    ),
    "shard missing": (
        lambda folder, shards: os.remove(shards[1]),
        r"train.tfrecord-00001-of-00002: field '<file>': expected a shard .* \(1 of 2 shards\)",
        None,
    ),
    "split listed, its shards missing": (
        lambda folder, shards: _edit_dataset_info(
            folder, lambda splits: splits.append({"name": "val", "shardLengths": ["2"]})
        ),
        r"val.tfrecord-00000-of-00001: field '<file>': expected a shard .* \(1 of 3 shards\)",
        None,
    ),
    "shard empty": (
        lambda folder, shards: _cut_shard(shards[1], 0),
        r"00001-of-00002: field '<records>': expected 3 \(dataset_info.json's shardLengths\), "
        r"got 0",
        [(0, 0), (0, 1), (0, 2)],
    ),
    "shard cut at a record boundary": (
        lambda folder, shards: _cut_shard(shards[1], 2),
        r"00001-of-00002: field '<records>': expected 3 \(dataset_info.json's shardLengths\), "
        r"got 2",
        [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)],
    ),
    "shard empty, no shardLengths": (
        lambda folder, shards: _without_shard_lengths(folder, shards[1]),
        r"00001-of-00002: field '<records>': expected at least one record \(an episode\), got 0",
        [(0, 0), (0, 1), (0, 2)],
    ),
    "record of 2^40 bytes": (
        lambda folder, shards: _huge_record(shards[1]),
        r"00001-of-00002: episode 1: field '<record>': expected 1099511627780 bytes, "
        r"got 16 \(truncated\)",
        [(0, 0), (0, 1), (0, 2), (1, 0)],
    ),
    "undecodable Example": (
        lambda folder, shards: _undecodable_record(shards[0]),
        r"00000-of-00002: episode 1: field '<record>': expected a serialized tf.train.Example",
        [(0, 0), (0, 2), (1, 0), (1, 1), (1, 2)],
    ),
}


@pytest.mark.parametrize("case", RLDS_DAMAGE)
def test_formats_rlds_incomplete_or_damaged_shards(tmp_path, case):
    """An interrupted download or a damaged record is an error naming the file (and the episode),
    never a smaller dataset without a word; --skip_bad keeps every intact episode and counts the
    bad record or shard."""
    damage, error, kept = RLDS_DAMAGE[case]
    _write_rlds(tmp_path / "ds", n=6, num_shards=2)
    damage(tmp_path / "ds", [path for path, _ in rlds.find_shards(tmp_path / "ds")])
    quiet = {"store": tmp_path / "store", "log": lambda *_: None}
    with pytest.raises(bridge.FormatError, match=error):
        data.load_store(tmp_path / "ds", **quiet)
    if kept is None:
        with pytest.raises(bridge.FormatError, match=error):
            data.load_store(tmp_path / "ds", skip_bad=True, **quiet)
        return
    st = data.load_store(tmp_path / "ds", skip_bad=True, **quiet)
    with np.load(tmp_path / "store" / "trajectories.npz") as z:
        assert list(zip(z["source"].tolist(), z["index"].tolist())) == kept
    assert st.meta["skipped"] == 1


def test_formats_lerobot_v21_and_v30_round_trip(tmp_path):
    pytest.importorskip("pyarrow")
    pytest.importorskip("av")
    rng = np.random.default_rng(0)
    episodes = [
        (_smooth_trajectory(T, 32, rng, episode=k), f"task {k % 2}")
        for k, T in enumerate((4, 6, 5, 3, 5))
    ]
    for version in ("v2.1", "v3.0"):
        folder = tmp_path / version
        lerobot.write_lerobot(folder, episodes, version=version, episodes_per_file=3)
        ds = lerobot.Dataset(folder)
        assert ds.tasks == {0: "task 0", 1: "task 1"}
        assert len(ds.data_files()) == (5 if version == "v2.1" else 2)
        for camera, c in (("images1", 1), ("observation.images.image_0", 0)):
            read = [
                (e, task, load())
                for path in ds.data_files()
                for e, task, _, load in lerobot.read_data_file(ds, path, camera)
            ]
            assert [(e, task) for e, task, _ in read] == [
                (k, t) for k, (_, t) in enumerate(episodes)
            ]
            for (_, _, traj), (ref, _) in zip(read, episodes):
                assert np.array_equal(traj["actions"], ref["actions"][:-1])
                states = [o["state"] for o in traj["observations"] + traj["next_observations"][-1:]]
                assert np.array_equal(states, [o["state"] for o in ref["observations"]])
                got = [o["images0"] for o in traj["observations"] + traj["next_observations"][-1:]]
                want = [o[f"images{c}"] for o in ref["observations"]]
                errors = np.abs(np.array(got, float) - np.array(want)).mean((1, 2, 3))
                assert errors.max() < VIDEO_TOLERANCE, (version, camera, errors)
        st = data.load_store(folder, log=lambda *_: None)
        assert st.task_names == ["task 0", "task 1"]
        assert st.traj_length.tolist() == [3, 5, 4, 2, 4]
    # cameras of dtype image: PNG bytes in the frame table, read back exactly
    lerobot.write_lerobot(tmp_path / "png", episodes, version="v2.1", video=False)
    st = data.load_store(tmp_path / "png", camera="image_1", log=lambda *_: None)
    for (ref, _), got in zip(episodes, _store_trajectories(st), strict=True):
        assert np.array_equal(got[2], [o["images1"] for o in ref["observations"]])


def test_formats_lerobot_bad_input_and_skip_bad(tmp_path):
    pytest.importorskip("pyarrow")
    pytest.importorskip("av")
    rng = np.random.default_rng(0)
    episodes = [(_smooth_trajectory(4, 32, rng, episode=k), "wipe") for k in range(3)]
    lerobot.write_lerobot(tmp_path / "le", episodes, version="v2.1")
    videos = tmp_path / "le" / "videos" / "chunk-000"
    video = videos / "observation.images.image_0" / "episode_000001.mp4"
    video.write_bytes(video.read_bytes()[:200])
    with pytest.raises(
        bridge.FormatError, match=r"episode_000001.mp4: episode 1: field '<video>': expected"
    ):
        data.load_store(tmp_path / "le", log=lambda *_: None)
    st = data.load_store(tmp_path / "le", skip_bad=True, log=lambda *_: None)
    assert st.meta["skipped"] == 1 and st.traj_length.tolist() == [3, 3]
    info = tmp_path / "le" / "meta" / "info.json"
    info.write_text(info.read_text().replace('"v2.1"', '"v1.6"'))
    old_version = (
        r"info.json: field 'codebase_version': expected one of \('v2.0', 'v2.1', 'v3.0'\), "
        r"got 'v1.6'"
    )
    with pytest.raises(bridge.FormatError, match=old_version):
        data.load_store(tmp_path / "le", skip_bad=True, log=lambda *_: None)
    with pytest.raises(cli.MissingPackageError, match="needs no_such_package: pip install no_"):
        lerobot._require("no_such_package")
    assert issubclass(cli.MissingPackageError, cli.ExpectedError)  # one line from run_cli


# the fixture of LEROBOT_DAMAGE: 3 episodes of 4 frames at 10 fps (v3.0: all in one file)
V21_TABLE = "data/chunk-000/episode_{:06d}.parquet"
V21_VIDEO = "videos/chunk-000/observation.images.image_0/episode_{:06d}.mp4"
V30_TABLE = "data/chunk-000/file-000.parquet"
V30_EPISODES = "meta/episodes/chunk-000/file-000.parquet"


def _edit_table(path, edit):
    """Rewrite a parquet table: edit(its columns, {name: list of values}) changes them."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    columns = pq.read_table(path).to_pydict()
    edit(columns)
    pq.write_table(pa.table(columns), path)


def _reorder_rows(path, order):
    """Rewrite a parquet table with its rows in `order` (row numbers; a row left out is dropped)."""

    def edit(columns):
        for values in columns.values():
            values[:] = [values[row] for row in order]

    _edit_table(path, edit)


def _extra_row(folder, counted):
    """Episode 0 of a v3.0 table gets a fifth row, frame 4, whose image in the video is episode
    1's first; counted: its length in meta/episodes says 5 as well."""

    def add_row(columns):
        for name, values in columns.items():
            values.insert(4, {"frame_index": 4, "timestamp": 0.4}.get(name, values[3]))

    def count_it(columns):
        columns["length"][0] = 5

    _edit_table(folder / V30_TABLE, add_row)
    if counted:
        _edit_table(folder / V30_EPISODES, count_it)


def _set_fps(folder, fps):
    info = folder / "meta" / "info.json"
    info.write_text(info.read_text().replace('"fps": 10,', f'"fps": {fps},'))


def _video_at_rate(path, fps):
    """Re-encode an mp4 at another frame rate: the same frames at other times."""
    av = pytest.importorskip("av")
    with av.open(str(path)) as container:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    lerobot.write_video(str(path), frames, fps, "h264")


# version, damage(dataset folder) -> the error it gives, and the episodes that --skip_bad keeps
LEROBOT_DAMAGE = {
    "row missing": (
        "v2.1",
        lambda folder: _reorder_rows(folder / V21_TABLE.format(1), [0, 1, 3]),
        r"episode_000001.parquet: episode 1: field 'frame_index': expected 0..2 in order, got 3 at",
        [0, 2],
    ),
    "rows split in two places": (
        "v3.0",
        lambda folder: _reorder_rows(folder / V30_TABLE, [0, 1, 4, 5, 6, 7, 2, 3, *range(8, 12)]),
        r"file-000.parquet: episode 0: field 'episode_index': expected its rows in one run, "
        r"got rows 0..1 and 6..7",
        [1, 2],
    ),
    "row extra": (
        "v3.0",
        lambda folder: _extra_row(folder, counted=False),
        r"file-000.parquet: episode 0: field '<rows>': expected 4 \(its length in .*/meta/episodes"
        r"\), got 5",
        [1, 2],
    ),
    "row extra, counted in meta/episodes": (
        "v3.0",
        lambda folder: _extra_row(folder, counted=True),
        r"file-000.parquet: episode 0: field 'timestamp': expected times in \[0, 0.4000\) s, the "
        r"episode's span in its video .*, got 0.0000..0.4000 s",
        [1, 2],
    ),
    "fps in info.json": (
        "v2.1",
        lambda folder: _set_fps(folder, 20),
        r"episode_000000.parquet: episode 0: field 'timestamp': expected steps of 1 / fps = 0.0500 "
        r"s \(info.json: 20 fps\), got 0.1000 s before frame 1",
        [],
    ),
    "video at another rate": (
        "v2.1",
        lambda folder: _video_at_rate(folder / V21_VIDEO.format(1), 20),
        r"episode_000001.mp4: episode 1: field '<video>': expected frame 1 at 0.1000 s .*, got a "
        r"frame at 0.0500 s \(the video runs at 20 fps\)",
        [0, 2],
    ),
}


@pytest.mark.parametrize("case", LEROBOT_DAMAGE)
def test_formats_lerobot_rows_and_frames_must_agree(tmp_path, case):
    """Rows that disagree with their frame numbers, the episode table, info.json's fps or the video
    are an error naming the file, the episode and the field, never states and actions stored
    beside another step's image; --skip_bad skips that episode alone and counts it."""
    pytest.importorskip("pyarrow")
    pytest.importorskip("av")
    version, damage, error, kept = LEROBOT_DAMAGE[case]
    rng = np.random.default_rng(0)
    episodes = [(_smooth_trajectory(4, 32, rng, episode=k), "wipe") for k in range(3)]
    lerobot.write_lerobot(tmp_path / "le", episodes, version=version, episodes_per_file=3)
    damage(tmp_path / "le")
    with pytest.raises(bridge.FormatError, match=error):
        data.load_store(tmp_path / "le", log=lambda *_: None)
    if not kept:
        with pytest.raises(bridge.FormatError, match="expected at least one valid trajectory"):
            data.load_store(tmp_path / "le", skip_bad=True, log=lambda *_: None)
        return
    st = data.load_store(tmp_path / "le", skip_bad=True, log=lambda *_: None)
    with np.load(os.path.join(st.path, "trajectories.npz")) as z:
        assert z["index"].tolist() == kept
    assert st.meta["skipped"] == 1


# ==================================================================================================
# batches.py (its samplers are tested on data.py's stores)
# ==================================================================================================


def test_batches_rewards_masks_and_mc_returns_by_hand(tmp_path):
    store, _ = _tree_store(tmp_path, n_traj=1, n_val=0, T=5)
    t = batches.Sampler(store, None, gamma=0.9).trajectory(0)
    assert t["reward"].tolist() == [-1, -1, 10, 10, 10] and t["mask"].tolist() == [1, 1, 0, 0, 0]
    # G4 = G3 = G2 = 10 (terminal), G1 = -1 + 0.9 * 10 = 8, G0 = -1 + 0.9 * 8 = 6.2
    assert np.allclose(t["mc_return"], [6.2, 8, 10, 10, 10])
    last_step = batches.RewardConfig(n_last=1, scale=1, shift=0)
    t = batches.Sampler(store, None, gamma=0.9, reward=last_step).trajectory(0)
    assert t["reward"].tolist() == [0, 0, 0, 0, 1] and t["mask"].tolist() == [1, 1, 1, 1, 0]
    assert np.allclose(t["mc_return"], [0.9**4, 0.9**3, 0.9**2, 0.9, 1])
    # stored terminals (all 0 in the release) as the done mask: bootstrap everywhere
    terminals = batches.RewardConfig(use_terminals=True)
    t = batches.Sampler(store, None, gamma=0.9, reward=terminals).trajectory(0)
    assert t["mask"].tolist() == [1] * 5
    assert np.allclose(t["mc_return"], [20.051, 23.39, 27.1, 19, 10])
    # no success: the constant R / (1 - gamma) = -1 / 0.1
    t = batches.Sampler(store, None, gamma=0.9, reward=batches.RewardConfig(n_last=0)).trajectory(0)
    assert t["reward"].tolist() == [-1] * 5 and np.allclose(t["mc_return"], -10)
    assert t["task"].dtype == torch.int64
    assert t["obs"].dtype == torch.uint8 and t["obs"].shape == (5, 3, 8, 8)


def test_batches_failed_attempt_is_never_relabelled_by_hand(tmp_path):
    """A failed attempt (rewards without success) gets r = 0 on every step: reward -1, mask 1 and
    the constant MC return of a trajectory without success, -1 / (1 - gamma); the success next to
    it keeps the last-3-steps labels."""
    rng = np.random.default_rng(0)
    succeeded, failed = (bridge.synthetic_trajectory(T, 8, rng) for T in (5, 4))
    failed["rewards"] = np.zeros(4, np.float32)
    source = tmp_path / "tree" / "k" / "a" / "train" / "out.npy"
    bridge.write_bridge_file(str(source), [succeeded, failed])
    store = data.load_store(tmp_path / "tree", log=lambda *_: None)
    sampler = batches.Sampler(store, None, gamma=0.9)
    t = sampler.trajectory(1)
    assert t["reward"].tolist() == [-1] * 4 and t["mask"].tolist() == [1] * 4
    assert np.allclose(t["mc_return"], -10)
    t = sampler.trajectory(0)
    assert t["reward"].tolist() == [-1, -1, 10, 10, 10] and t["mask"].tolist() == [1, 1, 0, 0, 0]
    assert np.allclose(t["mc_return"], [6.2, 8, 10, 10, 10])
    # the binary r itself: 0 on every step, and so is its return
    binary = batches.RewardConfig(scale=1, shift=0)
    t = batches.Sampler(store, None, gamma=0.9, reward=binary).trajectory(1)
    assert t["reward"].tolist() == [0] * 4 and t["mask"].tolist() == [1] * 4
    assert np.allclose(t["mc_return"], 0)


def test_batches_all_success_data_gives_the_batches_of_relabelling_every_trajectory(tmp_path):
    """Data without failed attempts, the Bridge release's (no rewards) and the scripted sim demos'
    (rewards that end in success), give bit for bit the rewards, masks and MC returns of the rule
    that relabels the last n_last steps of every trajectory, so the same batches."""
    rng = np.random.default_rng(0)
    trajectories = [bridge.synthetic_trajectory(T, 8, rng) for T in (5, 3, 7)]
    bridge.write_bridge_file(str(tmp_path / "plain" / "k" / "a" / "out.npy"), trajectories)
    for traj in trajectories:  # as sim collection stores them: 1 on the steps that succeed
        T = len(traj["actions"])
        traj["rewards"] = (np.arange(T) >= T - 3).astype(np.float32)
    bridge.write_bridge_file(str(tmp_path / "sim" / "k" / "a" / "out.npy"), trajectories)
    configs = [
        batches.RewardConfig(),
        batches.RewardConfig(n_last=1, scale=1, shift=0),
        batches.RewardConfig(use_terminals=True),
    ]
    drawn = {}
    for tree in ("plain", "sim"):
        store = data.load_store(tmp_path / tree, log=lambda *_: None)
        assert store.traj_success.all()
        lengths = store.traj_length
        step = np.concatenate([np.arange(n) for n in lengths])
        for k, cfg in enumerate(configs):
            r = (step >= np.repeat(lengths, lengths) - cfg.n_last).astype(np.float32)
            reward = (cfg.scale * r + cfg.shift).astype(np.float32)
            mask = 1 - (np.asarray(store.terminals, np.float32) if cfg.use_terminals else r)
            mc_return = batches.mc_returns(r, reward, mask, lengths, 0.9)
            sampler = batches.Sampler(store, None, gamma=0.9, reward=cfg, seed=k)
            for i, start in enumerate(store.traj_start):
                t = sampler.trajectory(i)
                steps = slice(start, start + lengths[i])
                assert t["reward"].numpy().tobytes() == reward[steps].tobytes()
                assert t["mask"].numpy().tobytes() == mask[steps].tobytes()
                assert t["mc_return"].numpy().tobytes() == mc_return[steps].tobytes()
            drawn.setdefault(k, []).append(sampler.sample(16))
    for plain, sim in drawn.values():
        assert all(torch.equal(plain[key], sim[key]) for key in plain)


def test_batches_mc_returns_several_trajectories():
    r = np.array([0, 1, 0, 0, 0], np.float32)  # a success of 2 steps, then a failure of 3
    R = 11 * r - 1
    G = batches.mc_returns(r, R, 1 - r, [2, 3], gamma=0.5)
    assert np.allclose(G, [-1 + 0.5 * 10, 10, -2, -2, -2])


def test_batches_mixing_counts(tmp_path):
    store, _ = _tree_store(tmp_path, ("k/a", "k/b", "k/c"), n_traj=2)
    samplers = [
        batches.Sampler(store, "train", gamma=0.9, task_ids=np.full(3, k)) for k in range(3)
    ]
    assert batches.MixedSampler(samplers[:2], [0.9, 0.1]).counts(64) == [57, 7]
    assert batches.MixedSampler(samplers[:2], [0.7, 0.3]).counts(10) == [7, 3]
    mixed = batches.MixedSampler(samplers, [0.35, 0.15, 0.5])
    assert mixed.counts(64) == [22, 9, 33] and mixed.counts(100) == [35, 15, 50]
    batch = mixed.sample(64)
    assert torch.bincount(batch["task"], minlength=3).tolist() == [22, 9, 33]
    assert batch["obs"].shape == (64, 3, 8, 8) and batch["reward"].shape == (64,)
    with pytest.raises(ValueError, match="summing to 1"):
        batches.MixedSampler(samplers[:2], [0.9, 0.2])
    # a 0 fraction draws nothing, even last (online.py with no online data): the rest goes to the
    # last f > 0
    empty = batches.ReplayBuffer(10, 8, gamma=0.9)  # sampling it raises
    no_online = batches.MixedSampler(samplers[:2] + [empty], [0.35, 0.65, 0])
    assert no_online.counts(64) == [22, 42, 0] and len(no_online.sample(64)["task"]) == 64
    assert batches.MixedSampler(samplers[:2], [1, 0]).counts(7) == [7, 0]


def test_batches_augment(tmp_path):
    torch.manual_seed(0)
    # channels-last, like a batch
    x = torch.randint(0, 256, (16, 12, 10, 3), dtype=torch.uint8).permute(0, 3, 1, 2)
    assert torch.equal(batches.augment(x, pad=0, p_jitter=0), x)
    y = batches.augment(x, p_jitter=0)
    padded = torch.nn.functional.pad(x.float(), (4, 4, 4, 4), mode="replicate").to(torch.uint8)
    shifts = set()
    for i in range(16):  # each crop is a 12x10 window of the edge-padded image
        found = [
            (dy, dx)
            for dy in range(9)
            for dx in range(9)
            if torch.equal(padded[i, :, dy : dy + 12, dx : dx + 10], y[i])
        ]
        assert found, i
        shifts.add(found[0])
    assert len(shifts) > 4  # independent offsets per image
    same = x[:1].expand(64, -1, -1, -1)
    torch.manual_seed(1)
    z = batches.augment(same, pad=0)
    assert z.shape == (64, 3, 12, 10) and z.dtype == torch.uint8
    changed = [not torch.equal(z[i], same[i]) for i in range(64)]
    # p_jitter 0.8: most images jittered (the others untouched), each its own way
    assert 32 < sum(changed) < 64
    colours = {tuple(z[i].float().mean((1, 2)).tolist()) for i in range(64) if changed[i]}
    assert len(colours) == sum(changed)
    torch.manual_seed(1)
    assert torch.equal(batches.augment(same, pad=0), z)  # deterministic given the seed
    g = torch.Generator().manual_seed(3)
    first = batches.augment(x, generator=g)
    assert torch.equal(first, batches.augment(x, generator=torch.Generator().manual_seed(3)))
    bright = batches.augment(same, pad=0, contrast=0, saturation=0, hue=0, p_jitter=1)
    ratio = bright.float().sum((1, 2, 3)) / same.float().sum((1, 2, 3))
    # brightness factors in [0.8, 1.2]
    assert ((ratio > 0.75) & (ratio < 1.25)).all() and ratio.std() > 0.01


def test_batches_replay_buffer_fifo_and_mc_returns():
    rb = batches.ReplayBuffer(20, 4, gamma=0.5, seed=0)

    def add(T, success, tag):  # frame t of this trajectory has all pixels = tag * 10 + t
        levels = (tag * 10 + np.arange(T + 1)).astype(np.uint8)
        images = levels[:, None, None, None] * np.ones((1, 4, 4, 3), np.uint8)
        rewards = np.r_[np.zeros(T - 1), success]
        rb.add_trajectory(images, np.zeros((T + 1, 7)), np.zeros((T, 7)), rewards, tag)

    add(5, 1, 1)
    add(7, 0, 2)
    assert len(rb) == 12
    add(9, 1, 3)  # 6 + 8 + 10 frames > 20: the oldest trajectory goes
    assert len(rb) == 16 and list(rb._lengths) == [7, 9]
    b = rb.sample(200)
    assert set(b["task"].tolist()) == {2, 3}
    # next obs = the following frame, same trajectory
    assert torch.equal(b["next_obs"].int(), b["obs"].int() + 1)
    step = b["obs"][:, 0, 0, 0].int() % 10
    fail = b["task"] == 2
    ok = b["task"] == 3
    assert torch.allclose(b["mc_return"][fail], torch.tensor(-2.0))  # no success: -1 / (1 - 0.5)
    last = ok & (step == 8)
    assert torch.allclose(b["mc_return"][last], torch.tensor(10.0)) and (b["mask"][last] == 0).all()
    seven = ok & (step == 7)
    assert torch.allclose(b["mc_return"][seven], torch.tensor(4.0))  # -1 + 0.5 * 10
    with pytest.raises(ValueError, match="rewards"):
        images = np.zeros((3, 4, 4, 3), np.uint8)
        rb.add_trajectory(images, np.zeros((3, 7)), np.zeros((2, 7)), [0, 0.5], 0)
    with pytest.raises(ValueError, match="empty"):
        batches.ReplayBuffer(10, 4, gamma=0.9).sample(2)


def test_batches_action_rescale(tmp_path):
    low = np.array([-0.05] * 3 + [-0.25] * 3 + [0.0])
    high = np.array([0.05] * 3 + [0.25] * 3 + [1.0])
    a = np.array(
        [[0.0, 0.025, -0.025, 0.1, -0.1, 0.2, 0.5], [0.06, -0.06, 0.05, 0.3, -0.3, 0.25, 1.0]]
    )
    s = batches.rescale_actions(a, low, high)
    assert np.allclose(s[0], [0, 0.5, -0.5, 0.4, -0.4, 0.8, 0])
    assert np.allclose(s[1], [0.99, -0.99] + [0.99] * 2 + [-0.99, 0.99, 0.99])
    assert np.allclose(batches.unscale_actions(s[0], low, high), a[0], atol=1e-7)
    t = batches.rescale_actions(torch.tensor(a, dtype=torch.float32), low, high)
    assert isinstance(t, torch.Tensor) and np.allclose(t.numpy(), s)
    assert np.allclose(batches.unscale_actions(t, low, high)[0].numpy(), a[0], atol=1e-7)
    store, tree = _tree_store(tmp_path, n_traj=3, n_val=0)
    raw = np.concatenate([t["actions"] for t in tree["k1/task_a"]["train"]])
    assert np.allclose(store.action_low, raw.min(0)) and np.allclose(store.action_high, raw.max(0))
    t0 = batches.Sampler(store, None, gamma=0.9).trajectory(0)["action"]
    scaled = batches.rescale_actions(raw[:5], store.action_low, store.action_high)
    assert np.allclose(t0.numpy(), scaled)
    prior_bounds = batches.Sampler(store, None, gamma=0.9, action_low=low, action_high=high)
    other = prior_bounds.trajectory(0)["action"]
    assert np.allclose(other.numpy(), batches.rescale_actions(raw[:5], low, high))


def test_batches_sampler_resume_is_exact(tmp_path):
    store, _ = _tree_store(tmp_path)
    s = batches.Sampler(store, "train", gamma=0.9, seed=3)
    s.sample(4)
    state = json.loads(json.dumps(s.state_dict()))  # python ints and strings only
    first = s.sample(16)
    s.load_state_dict(state)
    again = s.sample(16)
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_perf_prefetcher_batches_and_resume_are_exact(tmp_path):
    """The prefetched batches are the sampler's own, bit for bit, and state_dict() is the state
    after the batches handed out, not after those drawn ahead, so a resume continues with the next
    batch."""
    store, _ = _tree_store(tmp_path, n_traj=6, T=7)
    plain = batches.Sampler(store, "train", gamma=0.9, seed=5)
    want = [plain.sample(4) for _ in range(5)]
    sampler = batches.Sampler(store, "train", gamma=0.9, seed=5)
    pre = batches.Prefetcher(sampler, 4, depth=2)
    got = [pre.sample(4), pre.sample(4)]
    state = json.loads(json.dumps(pre.state_dict()))  # python values only, as in a checkpoint
    for future in list(pre._pending):  # let the thread finish its 2 draws ahead of the loop
        future.result()
    assert state != sampler.state_dict()  # the sampler itself is now 2 batches further
    resumed = batches.Prefetcher(batches.Sampler(store, "train", gamma=0.9, seed=0), 4)
    resumed.load_state_dict(state)
    got += [resumed.sample(4) for _ in range(3)]
    for a, b in zip(want, got):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    pre.load_state_dict(state)  # again on the prefetcher that has drawn ahead: those are dropped
    again = pre.sample(4)
    assert all(torch.equal(again[k], want[2][k]) for k in want[2])
    with pytest.raises(ValueError, match=r"Prefetcher.sample\(8\): .* draws batches of 4"):
        pre.sample(8)
    pre.close()
    resumed.close()


# ==================================================================================================
# train.py
# ==================================================================================================


def test_pipeline_pretrain_writes_run_folder(pipe_pretrained):
    out = pipe_pretrained
    assert [s for s, _ in runfolder.list_checkpoints(out)] == [2, 4]
    config = json.loads((out / "config.json").read_text())
    assert config["arch"] == "small" and config["num_tasks"] == 4 and config["image_size"] == 32
    assert len(config["task_names"]) == 4 and config["task_names"][3] == "<reserved 0>"
    rows = (out / "progress.csv").read_text().strip().splitlines()
    steps = [r.split(",")[0] for r in rows[1:]]
    assert rows[0].startswith("step,time,steps_per_s") and steps == ["1", "2", "3", "4"]
    ckpt = checkpoint.load_checkpoint(str(out / "ckpt_00000004.pt"))
    assert ckpt["step"] == 4 and checkpoint.ckpt_config(ckpt)["num_tasks"] == 4
    assert len(ckpt["action_low"]) == 7


def test_pipeline_policy_state_statistics_are_the_train_split_s(pipe_data, pipe_pretrained):
    """train.py normalizes the policy's state with the mean / std over every frame of the prior
    data's train trajectories (the val split left out), computed here from the source files."""
    _, prior, _ = pipe_data
    states = []
    for path in sorted(prior.glob("*/*/train/out.npy")):
        for traj in bridge.read_bridge_file(str(path)):
            frames = [*traj["observations"], traj["next_observations"][-1]]
            states += [step["state"] for step in frames]
    states = np.array(states, np.float64)
    ckpt = checkpoint.load_checkpoint(str(pipe_pretrained / "ckpt_00000004.pt"))
    norm = ckpt["agent"]["nets"]["policy"]
    assert len(states) == 3 * 4 * 9  # 3 tasks x 4 train trajectories x (8 + 1) frames
    np.testing.assert_allclose(norm["state_norm.mean"].numpy(), states.mean(0), rtol=1e-5)
    np.testing.assert_allclose(norm["state_norm.std"].numpy(), states.std(0), rtol=1e-5)


def test_pipeline_resume_equals_uninterrupted(pipe_data, tmp_path):
    _, prior, _ = pipe_data
    common = ["--data", str(prior), "--save_every", "3", *TINY]
    train.main([*common, "--out", str(tmp_path / "whole"), "--steps", "6"])
    train.main([*common, "--out", str(tmp_path / "split"), "--steps", "3"])
    train.main([*common, "--out", str(tmp_path / "split"), "--steps", "6", "--resume"])
    a = _ckpt_agent(tmp_path / "whole" / "ckpt_00000006.pt")
    b = _ckpt_agent(tmp_path / "split" / "ckpt_00000006.pt")
    assert _deep_equal(a, b)
    # and the weights did move, so equality is not trivially true
    assert not _deep_equal(_ckpt_agent(tmp_path / "whole" / "ckpt_00000003.pt"), a)
    rows = (tmp_path / "split" / "progress.csv").read_text().strip().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4", "5", "6"]


def test_perf_train_prefetch_and_compile_resume_like_a_plain_run(pipe_data, tmp_path, monkeypatch):
    """train.py --prefetch --compile: the same data stream as a plain run, checkpoint for
    checkpoint, and weights within float reassociation of it (compile patched to aot_eager, see
    test_perf_compiled_update_equals_eager)."""
    _, prior, _ = pipe_data
    modes = []
    original = Agent.compile

    def compile_aot_eager(agent, mode):
        modes.append(mode)
        original(agent, mode, backend="aot_eager")

    monkeypatch.setattr(Agent, "compile", compile_aot_eager)
    common = ["--data", str(prior), "--save_every", "2", *TINY]
    train.main([*common, "--out", str(tmp_path / "plain"), "--steps", "4"])
    split = ["--out", str(tmp_path / "split"), "--prefetch"]
    train.main([*common, *split, "--steps", "2"])
    train.main([*common, *split, "--steps", "4", "--resume", "--compile"])
    assert modes == ["default"]
    for step in (2, 4):
        name = runfolder.CKPT_PATTERN.format(step)
        a = checkpoint.load_checkpoint(str(tmp_path / "plain" / name))
        b = checkpoint.load_checkpoint(str(tmp_path / "split" / name))
        assert _deep_equal(a["sampler"], b["sampler"]) and _deep_equal(a["rng"], b["rng"])
        for net, weights in a["agent"]["nets"].items():
            for k, x in weights.items():
                y = b["agent"]["nets"][net][k]
                assert torch.equal(x, y) if step == 2 else torch.allclose(x, y, atol=1e-5), (net, k)


def test_pipeline_torchrun_two_processes_gloo(pipe_data, tmp_path):
    _, prior, _ = pipe_data
    env = dict(os.environ, OMP_NUM_THREADS="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    for attempt in range(2):
        out = tmp_path / f"ddp{attempt}"
        args = ["--data", str(prior), "--out", str(out), "--steps", "2", "--save_every", "2"]
        proc = subprocess.run(
            [*torchrun, os.path.join(HERE, "train.py"), *args, *TINY],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        # Rarely (seen 2 in ~20 runs of a loaded 2-core machine) a rank aborts in gloo's C++
        # teardown after the run has finished ("terminate called without an active exception"):
        # one more try for that case only.
        teardown = "terminate called without an active exception"
        if proc.returncode == 0 or teardown not in proc.stderr:
            break
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    assert [s for s, _ in runfolder.list_checkpoints(out)] == [2]
    # every rank's random streams are kept (an exact torchrun resume), and they differ: data
    # parallel
    states = checkpoint.load_checkpoint(str(out / "ckpt_00000002.pt"))["rank_states"]
    assert len(states) == 2 and states[0]["sampler"] != states[1]["sampler"]


def test_pipeline_joint_training_records_the_target_slot(pipe_data, tmp_path):
    """A joint run (COG, BC joint: train.py --target) says which one-hot slot is the target, so
    that online.py evaluates the target task by default, as it does for a fine-tuned checkpoint."""
    _, prior, target = pipe_data
    out = tmp_path / "joint"
    args = ["--data", str(prior), "--target", str(target), "--out", str(out), "--steps", "1"]
    train.main([*args, "--save_every", "1", "--algo", "bc", *TINY])
    ckpt = checkpoint.load_checkpoint(str(out / "ckpt_00000001.pt"))
    assert ckpt["task_names"][ckpt["target_task_ids"][0]] == "sort_ab"
    policy = rollout.load_policy(str(out / "ckpt_00000001.pt"), "cpu")
    assert policy.task_name == "sort_ab"


def test_pipeline_progress_line_hides_nan_losses_and_never_reads_160_of_100(tmp_path, capsys):
    log = runfolder.RunLog(str(tmp_path), 100, 0)
    log.log(0, {"critic_loss": float("nan"), "eval_success": 0.0})  # a row before any update
    log.log(160, {"critic_loss": 2.5, "eval_success": 0.0})  # the last trajectory ran past 100
    first, last = capsys.readouterr().out.splitlines()
    assert first.startswith("step 0/100 |") and "nan" not in first
    assert last.startswith("step 160 (done, 100 requested) |") and "critic_loss 2.5" in last


def test_pipeline_progress_csv_gains_a_column_that_starts_mid_run(tmp_path):
    log = runfolder.RunLog(str(tmp_path), 100, 0)
    log.log(10, {"actor_loss": 1.0})
    log.log(20, {"actor_loss": 0.5, "actor_q": 3.0})  # the Q term starts after its warm-up
    with open(tmp_path / "progress.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["actor_q"] for r in rows] == ["", "3.0"] and rows[0]["actor_loss"] == "1.0"


# ---- faults: NaN, Ctrl-C, SIGTERM, a busy or full run folder --------------------------
def test_pipeline_nan_loss_stops_with_the_step_and_keeps_last_checkpoint(
    pipe_data, tmp_path, monkeypatch
):
    _, prior, _ = pipe_data
    real_update = train.Agent.update
    calls = []

    def update(self, batch):
        info = real_update(self, batch)
        calls.append(1)
        if len(calls) == 3:
            info = dict(info, critic_loss=torch.tensor(float("nan")))
        return info

    monkeypatch.setattr(train.Agent, "update", update)
    out = tmp_path / "nan"
    with pytest.raises(FloatingPointError, match="critic_loss became nan at step 3"):
        train.main(
            ["--data", str(prior), "--out", str(out), "--steps", "5", "--save_every", "2", *TINY]
        )
    assert [s for s, _ in runfolder.list_checkpoints(out)] == [2]


def test_pipeline_ctrl_c_saves_a_checkpoint_and_resume_continues(pipe_data, tmp_path, monkeypatch):
    _, prior, _ = pipe_data
    real_update = train.Agent.update
    calls = []

    def update(self, batch):
        calls.append(1)
        if len(calls) == 3:  # Ctrl-C arrives during the third update: the last finished step is 2
            raise KeyboardInterrupt
        return real_update(self, batch)

    monkeypatch.setattr(train.Agent, "update", update)
    run = tmp_path / "run"
    args = ["--data", str(prior), "--out", str(run), "--steps", "4", "--save_every", "10", *TINY]
    with pytest.raises(SystemExit) as e:
        train.main(args)
    assert e.value.code == 130 and [s for s, _ in runfolder.list_checkpoints(run)] == [2]
    monkeypatch.setattr(train.Agent, "update", real_update)
    train.main([*args, "--resume"])
    assert [s for s, _ in runfolder.list_checkpoints(tmp_path / "run")] == [2, 4]


@contextlib.contextmanager
def _sigterm_during_update(monkeypatch, n=3):
    """Inside the block, train.Agent.update sends this process a SIGTERM during its n-th call, as a
    job scheduler stopping the job would; a SIGTERM that reaches the test's own handler (a run that
    ignores it) raises instead of killing pytest. Yields that handler; afterwards the real update
    and the previous handler are back."""
    real_update = train.Agent.update
    calls = []

    def update(self, batch):
        calls.append(1)
        if len(calls) == n:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_update(self, batch)

    def unhandled(signum, frame):
        raise RuntimeError("SIGTERM reached the test's handler")

    monkeypatch.setattr(train.Agent, "update", update)
    previous = signal.signal(signal.SIGTERM, unhandled)
    try:
        yield unhandled
    finally:
        signal.signal(signal.SIGTERM, previous)
        monkeypatch.setattr(train.Agent, "update", real_update)


def test_pipeline_sigterm_saves_a_checkpoint_like_ctrl_c(pipe_data, tmp_path, monkeypatch):
    _, prior, _ = pipe_data
    args = ["--data", str(prior), "--out", str(tmp_path / "run"), "--steps", "5", *TINY]
    with _sigterm_during_update(monkeypatch) as unhandled:
        with pytest.raises(SystemExit) as e:
            train.main([*args, "--save_every", "10"])
        assert signal.getsignal(signal.SIGTERM) is unhandled  # the run put the handler back
    # the third update finishes, is saved, and the exit status is the shell's for SIGTERM (128 + 15)
    assert e.value.code == 143
    assert [s for s, _ in runfolder.list_checkpoints(tmp_path / "run")] == [3]
    train.main([*args, "--save_every", "10", "--resume"])
    assert [s for s, _ in runfolder.list_checkpoints(tmp_path / "run")] == [3, 5]


def test_pipeline_a_second_run_on_the_same_out_stops(pipe_data, tmp_path):
    _, prior, _ = pipe_data
    out = tmp_path / "run"
    out.mkdir()
    args = ["--data", str(prior), "--out", str(out), "--steps", "1", "--save_every", "1", *TINY]
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / "run.lock").write_text(f"{other.pid}\n")
        busy = f"in use by another run \\(pid {other.pid}"
        with pytest.raises(runfolder.RunFolderBusy, match=busy):
            train.main(args)
        assert not runfolder.list_checkpoints(out)
    finally:
        other.kill()
        other.wait()
    train.main(args)  # the owner died: its lock is stale and taken over, then released at the end
    assert [s for s, _ in runfolder.list_checkpoints(out)] == [1]
    assert not (out / "run.lock").exists()
    assert issubclass(runfolder.RunFolderBusy, cli.ExpectedError)


def test_pipeline_failed_saves_leave_no_temporary_files(pipe_data, tmp_path, monkeypatch):
    _, prior, _ = pipe_data
    out = tmp_path / "run"
    out.mkdir()
    stale = out / f"ckpt_00000002.pt.tmp-{_dead_pid()}"  # a save killed by kill -9
    stale.write_bytes(b"partial")
    real_save = torch.save

    def disk_full(obj, f):
        real_save(obj, f)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    args = ["--data", str(prior), "--out", str(out), "--steps", "2", "--save_every", "1", *TINY]
    with pytest.raises(OSError, match="No space left"):
        train.main(args)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "progress.csv"]


@pytest.mark.parametrize(
    "script, flags, message",
    [
        ("train", ["--batch_size", "0"], "--batch_size 0: expected a positive integer"),
        ("train", ["--batch_size", "-8"], "--batch_size -8: expected a positive integer"),
        ("train", ["--save_every", "0"], "--save_every 0: expected a positive integer"),
        ("train", ["--log_every", "0"], "--log_every 0: expected a positive integer"),
        ("train", ["--mix", "-0.1"], "--mix -0.1: expected a fraction in [0, 1]"),
        ("finetune", ["--mix", "1.5"], "--mix 1.5: expected a fraction in [0, 1]"),
        ("finetune", ["--mix", "nan"], "--mix nan: expected a fraction in [0, 1]"),
        ("finetune", ["--save_every", "0"], "--save_every 0: expected a positive integer"),
    ],
)
def test_pipeline_flags_out_of_range_are_one_line_errors(
    pipe_data, pipe_pretrained, tmp_path, capsys, script, flags, message
):
    """A value no run can use stops the script before it opens the data or makes --out, in one
    line that names the flag."""
    _, prior, target = pipe_data
    out = tmp_path / "run"
    if script == "train":
        main = train.main
        argv = ["--data", str(prior), "--out", str(out), "--steps", "2", *TINY, *flags]
    else:
        main = finetune.main
        ckpt = pipe_pretrained / "ckpt_00000004.pt"
        argv = [*_finetune_args(ckpt, prior, target, out, "--steps", "2"), *flags]
    with pytest.raises(SystemExit) as e:
        cli.run_cli(main, argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == cli.EXIT_ERROR and not out.exists()
    assert len(lines) == 1 and lines[0].endswith(f"error: {message}")


@pytest.mark.parametrize("change", ["data", "mix"])
def test_pipeline_resume_refuses_other_data(pipe_data, tmp_path, change):
    """--resume continues a run on its own data: another --data of as many tasks (the target's one
    and two reserved slots) would rename the tasks mid-run, another --mix change the batches. Both
    stop before anything is written, naming what differs."""
    _, prior, target = pipe_data
    joint = ["--data", str(prior), "--target", str(target)]
    runs = {  # the first run's data, the resume's, and the difference the error names
        "data": (
            ["--data", str(prior)],
            ["--data", str(target), "--extra_tasks", "2"],
            "--data tasks ['sort_ab'] (checkpoint: [",
        ),
        "mix": (joint, [*joint, "--mix", "0.5"], "--mix 0.5 (checkpoint: 0.9)"),
    }
    first, again, differs = runs[change]
    out = tmp_path / "run"
    common = ["--out", str(out), "--save_every", "2", *TINY]
    train.main([*first, "--steps", "2", *common])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(checkpoint.CheckpointError, match=re.escape(differs)):
        train.main([*again, "--steps", "4", "--resume", *common])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# ==================================================================================================
# finetune.py
# ==================================================================================================


def test_pipeline_cli_finetune_new_retarget_and_select(pipe_data, pipe_pretrained):
    root, prior, target = pipe_data
    ckpt = pipe_pretrained / "ckpt_00000004.pt"
    ft_new = root / "ft_new"
    flags = ["--task", "new", "--steps", "4", "--save_every", "2"]
    _run_script("finetune.py", *_finetune_args(ckpt, prior, target, ft_new, *flags))
    new = checkpoint.load_checkpoint(str(ft_new / "ckpt_00000004.pt"))
    # the target takes the slot reserved at pre-training: the one-hot size does not change
    assert new["task_names"][3] == "sort_ab" and new["target_task_ids"] == [3]
    assert checkpoint.ckpt_config(new)["num_tasks"] == 4 and new["kind"] == "finetune"
    traces = json.loads((ft_new / "qvalues_00000002.json").read_text())
    n_val = len(traces["trajectories"])
    assert n_val >= 1 and len(traces["trajectories"][0]["q"]) == 2
    assert len(traces["trajectories"][0]["q"][0]) == len(traces["trajectories"][0]["mc_return"])
    diagnostics = traces["diagnostics"]
    assert len(diagnostics["dq_da"]) == 7 and min(diagnostics["sigma"]) > 0
    q0 = [min(t["q"][0][0], t["q"][1][0]) - t["mc_return"][0] for t in traces["trajectories"]]
    assert diagnostics["q_minus_mc_at_t0"] == pytest.approx(float(np.mean(q0)))

    ft_re = root / "ft_retarget"
    flags = ["--task", "pick_b", "--steps", "2", "--save_every", "2"]
    _run_script("finetune.py", *_finetune_args(ckpt, prior, target, ft_re, *flags))
    retarget = checkpoint.load_checkpoint(str(ft_re / "ckpt_00000002.pt"))
    assert retarget["target_task_ids"] == [2]
    assert retarget["task_names"] == new["task_names"][:3] + ["<reserved 0>"]

    proc = _run_script("select_ckpt.py", ft_new)
    chosen = proc.stdout.strip().splitlines()[-1]
    selection = json.loads((ft_new / "selection.json").read_text())
    assert chosen == selection["chosen"] and os.path.exists(chosen)
    assert sorted(r["step"] for r in selection["ranking"]) == [2, 4]
    assert (ft_new / "qvalues.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pipeline_finetune_grows_one_hot_without_reserved_slot(pipe_data, tmp_path):
    root, prior, target = pipe_data
    pre = tmp_path / "pre"
    train.main(
        ["--data", str(prior), "--out", str(pre), "--steps", "1", "--save_every", "1", *TINY]
    )
    out = tmp_path / "ft"
    flags = ["--steps", "1", "--save_every", "1"]
    finetune.main(_finetune_args(pre / "ckpt_00000001.pt", prior, target, out, *flags))
    ckpt = checkpoint.load_checkpoint(str(out / "ckpt_00000001.pt"))
    assert checkpoint.ckpt_config(ckpt)["num_tasks"] == 4 and ckpt["target_task_ids"] == [3]


def test_pipeline_seed_reaches_the_networks_and_bc_finetune_runs(pipe_data, tmp_path):
    _, prior, target = pipe_data
    for seed in ("0", "1"):
        out = tmp_path / f"s{seed}"
        args = ["--data", str(prior), "--out", str(out), "--steps", "1", "--save_every", "1"]
        train.main([*args, "--seed", seed, *TINY])
    w0 = _ckpt_agent(tmp_path / "s0" / "ckpt_00000001.pt")["nets"]["critic"]
    w1 = _ckpt_agent(tmp_path / "s1" / "ckpt_00000001.pt")["nets"]["critic"]
    assert not all(torch.equal(w0[k], w1[k]) for k in w0)  # --seed changes the initial weights too
    bc = tmp_path / "bc"
    args = ["--data", str(prior), "--out", str(bc), "--steps", "1", "--save_every", "1"]
    train.main([*args, "--algo", "bc", *TINY])
    flags = ["--steps", "2", "--save_every", "1"]
    finetune.main(
        _finetune_args(bc / "ckpt_00000001.pt", prior, target, tmp_path / "bc_ft", *flags)
    )
    assert [s for s, _ in runfolder.list_checkpoints(tmp_path / "bc_ft")] == [1, 2]
    # a BC learner has no Q-values to trace; its rule is the validation error on the held-out demos
    assert not list((tmp_path / "bc_ft").glob("qvalues_*.json"))
    losses = {}
    for step in (1, 2):
        doc = json.loads((tmp_path / "bc_ft" / runfolder.VALLOSS_PATTERN.format(step)).read_text())
        assert doc["step"] == step and doc["metric"] == "mse" and doc["val_loss"] > 0
        losses[step] = doc["val_loss"]
    # the lower one is chosen; rewriting the losses reverses the choice
    for order in ((1, 2), (2, 1)):
        for step, value in zip(order, (0.5, 0.25)):
            doc = {"step": step, "val_loss": value, "metric": "mse"}
            path = tmp_path / "bc_ft" / runfolder.VALLOSS_PATTERN.format(step)
            path.write_text(json.dumps(doc))
        select_ckpt.main([str(tmp_path / "bc_ft"), "--by", "val_loss"])
        chosen = json.loads((tmp_path / "bc_ft" / "selection.json").read_text())
        assert chosen["step"] == order[1] and chosen["chosen"].endswith(f"{order[1]:08d}.pt")
    # Gaussian BC: pre-training and fine-tuning without a critic, ranked by likelihood
    gbc = tmp_path / "gbc"
    args = ["--data", str(prior), "--out", str(gbc), "--steps", "1", "--save_every", "1"]
    train.main([*args, "--algo", "gbc", *TINY])
    assert set(_ckpt_agent(gbc / "ckpt_00000001.pt")["nets"]) == {"policy"}
    finetune.main(_finetune_args(gbc / "ckpt_00000001.pt", prior, target, tmp_path / "gft", *flags))
    doc = json.loads((tmp_path / "gft" / runfolder.VALLOSS_PATTERN.format(2)).read_text())
    assert doc["metric"] == "nll" and math.isfinite(doc["val_loss"])
    with pytest.raises(SystemExit, match="--algo cql cannot fine-tune a gbc checkpoint"):
        finetune.main(
            _finetune_args(gbc / "ckpt_00000001.pt", prior, target, tmp_path / "x", "--algo", "cql")
        )


def test_pipeline_errors_are_clear_and_overwrite_nothing(pipe_data, pipe_pretrained, tmp_path):
    root, prior, target = pipe_data
    ckpt = pipe_pretrained / "ckpt_00000002.pt"
    ft = tmp_path / "ft"
    with pytest.raises(checkpoint.CheckpointError, match="no such checkpoint"):
        finetune.main(_finetune_args(tmp_path / "missing.pt", prior, target, ft, "--steps", "1"))
    cut = tmp_path / "cut.pt"
    cut.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    with pytest.raises(checkpoint.CheckpointError, match="truncated"):
        finetune.main(_finetune_args(cut, prior, target, ft, "--steps", "1"))
    other_size = ["--steps", "1", "--image_size", "48", "--batch_size", "8"]
    paths = ["--ckpt", str(ckpt), "--prior", str(prior), "--target", str(target), "--out", str(ft)]
    with pytest.raises(checkpoint.CheckpointError, match="image_size=32 but --image_size is 48"):
        finetune.main([*paths, *other_size])
    native = data.load_store(prior, log=lambda *_: None).path  # a store of the 40x40 images
    with pytest.raises(SystemExit, match="a store of 40x40 images, but 32x32 are needed"):
        finetune.main(_finetune_args(ckpt, native, target, tmp_path / "ft3", "--steps", "1"))
    empty = tmp_path / "empty_task"
    empty.mkdir()
    args = _finetune_args(ckpt, prior, empty, tmp_path / "ft2")
    proc = _run_script("finetune.py", *args, expect_ok=False)
    assert proc.returncode != 0 and str(empty) in proc.stderr and "Traceback" not in proc.stderr
    # resuming with another architecture or task count is refused, and the run's files stay as
    # they were
    before = {p.name: p.read_bytes() for p in pipe_pretrained.iterdir() if p.suffix == ".pt"}
    args = ["--data", str(prior), "--out", str(pipe_pretrained), "--steps", "6", "--resume", *TINY]
    arch = "arch='small' but this run uses arch='impala'"
    with pytest.raises(checkpoint.CheckpointError, match=arch):
        train.main([*args, "--arch", "impala"])
    tasks = "num_tasks=4 but this run uses num_tasks=5"
    with pytest.raises(checkpoint.CheckpointError, match=tasks):
        train.main([*args, "--extra_tasks", "2"])
    with pytest.raises(SystemExit, match="already holds checkpoints"):
        train.main([*args[: -len(TINY) - 1], *TINY])
    after = {p.name: p.read_bytes() for p in pipe_pretrained.iterdir() if p.suffix == ".pt"}
    assert before == after


def test_pipeline_finetune_resume_writes_missing_q_traces(pipe_data, pipe_pretrained, tmp_path):
    _, prior, target = pipe_data
    out = tmp_path / "ft"
    flags = ["--steps", "4", "--save_every", "2"]
    args = _finetune_args(pipe_pretrained / "ckpt_00000004.pt", prior, target, out, *flags)
    finetune.main(args)
    trace = out / finetune.QTRACE_PATTERN.format(4)
    written = json.loads(trace.read_text())
    trace.unlink()  # killed between the checkpoint's rename and its trace
    finetune.main([*args, "--resume"])
    assert json.loads(trace.read_text()) == written
    assert [r["step"] for r in select_ckpt.rank(str(out))[0]] != []


@pytest.mark.parametrize("change", ["target", "mix", "task"])
def test_pipeline_finetune_resume_refuses_other_data(pipe_data, pipe_pretrained, tmp_path, change):
    """A fine-tuning run resumed with another --target would train the new demos in the old task's
    slot, another --mix or --task would change what it trains: refused before anything is written
    (config.json and the checkpoints stay), naming what differs."""
    _, prior, target = pipe_data
    other = tmp_path / "other"
    _write_tree(other, ["wipe_table"], n_traj=4, T=10, H=40)
    ckpt = pipe_pretrained / "ckpt_00000004.pt"
    out = tmp_path / "ft"
    finetune.main(_finetune_args(ckpt, prior, target, out, "--steps", "2", "--save_every", "2"))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    changes = {  # the resume's target data, its other flags, and the difference the error names
        "target": (other, [], "--target tasks ['wipe_table'] (checkpoint: ['sort_ab'])"),
        "mix": (target, ["--mix", "0.5"], "--mix 0.5 (checkpoint: 0.9)"),
        "task": (target, ["--task", "pick_b"], "--task 'pick_b' (checkpoint: 'new')"),
    }
    again, flags, differs = changes[change]
    with pytest.raises(checkpoint.CheckpointError, match=re.escape(differs)):
        finetune.main(_finetune_args(ckpt, prior, again, out, "--steps", "4", "--resume", *flags))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_pipeline_finetune_stop_checkpoint_is_no_candidate(
    pipe_data, pipe_pretrained, tmp_path, monkeypatch
):
    """A SIGTERM saves the step to resume from, marked stopped, with no Q-value trace nor
    validation loss (the resume adds none either): select_ckpt.py chooses among the checkpoints an
    uninterrupted run writes."""
    _, prior, target = pipe_data
    out = tmp_path / "ft"
    flags = ["--steps", "4", "--save_every", "2"]
    args = _finetune_args(pipe_pretrained / "ckpt_00000004.pt", prior, target, out, *flags)
    with _sigterm_during_update(monkeypatch), pytest.raises(SystemExit):
        finetune.main(args)
    assert [s for s, _ in runfolder.list_checkpoints(out)] == [2, 3]
    stopped = checkpoint.load_checkpoint(str(out / runfolder.CKPT_PATTERN.format(3)))
    assert stopped["stopped"] is True
    finetune.main([*args, "--resume"])
    assert [s for s, _ in runfolder.list_checkpoints(out)] == [2, 3, 4]
    for pattern in (runfolder.QTRACE_PATTERN, runfolder.VALLOSS_PATTERN):
        assert [p.name for p in out.glob(pattern.replace("{:08d}", "*"))] != []
        assert not (out / pattern.format(3)).exists()
    assert sorted(r["step"] for r in select_ckpt.rank(str(out))[0]) == [2, 4]


def test_finetune_warns_when_it_writes_non_finite_q_values(tmp_path, capsys):
    class Agent:  # Q(s_t, a_t) of 2 heads along a 3-step trajectory, one of them NaN
        device = "cpu"

        def q_values(self, batch):
            return torch.tensor([[1.0, 1.0], [2.0, float("nan")], [3.0, 3.0]])

        def critic_diagnostics(self, batch):
            return {"dq_da": [0.0] * 7, "sigma": [1.0] * 7}

    class Sampler:
        def trajectory(self, tid):
            return {"reward": torch.zeros(3), "mc_return": torch.zeros(3), "obs": torch.zeros(3)}

    finetune.write_q_traces(Agent(), Sampler(), [4], 10, str(tmp_path), task=0)
    err = capsys.readouterr().err
    assert (
        "warning: step 10: Q-values of held-out trajectory 4 are not finite (head 1, time step 1)"
        in err
    )
    doc = json.loads((tmp_path / finetune.QTRACE_PATTERN.format(10)).read_text())
    assert math.isnan(doc["trajectories"][0]["q"][1][1])


# ==================================================================================================
# select_ckpt.py
# ==================================================================================================


def test_select_ckpt_score_prefers_rising_over_flat_and_falling(tmp_path):
    assert select_ckpt.spearman([0, 1, 2, 3], [1, 3, 2, 4]) == pytest.approx(0.8)  # 1 - 6*2/(4*15)
    assert np.allclose(select_ckpt.rankdata([3, 1, 3, 2]), [2.5, 0, 2.5, 1])
    g = np.array([-3.0, -2.0, 0.0, 10.0])
    assert select_ckpt.trajectory_score([1, 2, 3, 4], g) == pytest.approx((1 * 3 / 13, 1.0, 3 / 13))
    assert select_ckpt.trajectory_score(g, g)[0] == pytest.approx(1.0)
    assert select_ckpt.trajectory_score(g[::-1], g)[0] == pytest.approx(-1.0)
    curves = {10: g * 0.9, 20: g * 0.01, 30: g[::-1]}  # good, flat (over-trained), falling
    _write_qtraces(tmp_path, curves, g, reward=[0, 0, 1, 1])
    rows, _ = select_ckpt.rank(str(tmp_path))
    assert [r["step"] for r in rows] == [10, 20, 30]
    (tmp_path / finetune.QTRACE_PATTERN.format(10)).write_text("{}")
    with pytest.raises(SystemExit, match="not a Q-value trace file"):
        select_ckpt.rank(str(tmp_path))
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(SystemExit, match="no checkpoint with Q-value traces"):
        select_ckpt.rank(str(tmp_path / "empty_run"))


def test_select_ckpt_never_chooses_a_non_finite_trace(tmp_path, capsys):
    g = [-3.0, -2.0, 0.0, 10.0]
    traces = {
        3: [-2.7, -1.8, 0.0, 9.0],  # rising, spread 11.7 of 13: score 0.9
        6: [-2.7, float("nan"), 0.0, 9.0],  # today: nan flatness -> 1.0, tied with step 3
        9: [float("nan")] * 4,  # today: all-NaN scores 1.000 and ranks first
    }
    _write_qtraces(tmp_path, traces, g)
    rows, _ = select_ckpt.rank(str(tmp_path))
    assert [(r["step"], r["score"]) for r in rows] == [
        (3, pytest.approx(0.9)),
        (6, None),
        (9, None),
    ]
    assert rows[1]["rejected"] == "q of held-out trajectory 5 holds nan"
    select_ckpt.main([str(tmp_path)])
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1].endswith("ckpt_00000003.pt")
    assert "rejected, never chosen: q of held-out trajectory 5 holds nan" in out
    assert json.loads((tmp_path / "selection.json").read_text())["step"] == 3
    for step in (3, 6):
        (tmp_path / finetune.QTRACE_PATTERN.format(step)).unlink()
    with pytest.raises(SystemExit, match="no checkpoint has finite Q-value traces.*step 9: q of"):
        select_ckpt.rank(str(tmp_path))


# ==================================================================================================
# classifier.py
# ==================================================================================================


def test_online_classifier_separates_bright_from_dark_and_labels_rollouts(
    online_setup, tmp_path, monkeypatch
):
    rng = np.random.default_rng(0)
    _write_png_folder(tmp_path / "pos", 220, 10, rng)
    _write_png_folder(tmp_path / "neg", 30, 10, rng)
    clf = tmp_path / "clf.pt"
    folders = ["--pos", str(tmp_path / "pos"), "--neg", str(tmp_path / "neg")]
    flags = "--arch small --image_size 32 --steps 40 --batch_size 16 --lr 1e-3 --device cpu"
    accuracy = classifier.main([*folders, "--out", str(clf), *flags.split()])
    assert accuracy >= 0.9
    labeler = classifier.load_labeler(str(clf), "cpu")
    dark = np.full((40, 40, 3), 30, np.uint8)
    bright = np.full((40, 40, 3), 220, np.uint8)
    # r_t labels the observation after action t: frames (dark, bright, dark) -> rewards (1, 0)
    assert labeler([dark, bright, dark]).tolist() == [1.0, 0.0]
    # rollouts labelled by the classifier (images resized 40 -> 32 for both networks): rewards
    # (0, 1, 0)
    for module in (rollout, online):  # eval's env factory, then online fine-tuning's
        monkeypatch.setattr(module, "make_env", lambda *a, **k: BrightAtEnv(2))
    root = online_setup
    ev = str(tmp_path / "ev.json")
    ckpt = str(root / "ft.pt")
    online.main(["eval", "--ckpt", ckpt, "--episodes", "1", "--classifier", str(clf), "--json", ev])
    per_episode = json.loads(open(ev).read())["per_episode"]
    assert per_episode == [{"success": True, "return": 1.0, "length": 3}]
    flags = ["--env_steps", "3", "--utd", "1", "--eval_every", "0", "--classifier", str(clf)]
    online.main(_online_finetune_args(root, tmp_path / "run", *flags))
    with np.load(tmp_path / "run" / "episodes" / "episode_000000.npz") as z:
        assert z["rewards"].tolist() == [0.0, 1.0, 0.0]
    # Bridge-format input: one group per trajectory, the last N frames of each with --pos_last N
    _write_tree(tmp_path / "bridge", ["t"], n_traj=3, n_val=0, T=5, H=32, seed=rng)
    bridge = str(tmp_path / "bridge")
    images, groups = classifier.read_images(bridge, 32, last=2, log=lambda *a: None)
    assert images.shape == (6, 32, 32, 3) and groups.tolist() == [0, 0, 1, 1, 2, 2]


# ==================================================================================================
# arm.py, robot.py: the servo-level driver and the environment, on fakes.py's servos
# ==================================================================================================


# ---- the arm on the simulated bus ----------------------------------------------------------------
def test_robot_setup_configures_the_arm_like_interbotix(robot_bus):
    arm = _fake_arm(robot_bus)
    arm.setup()
    g = robot_bus.get
    present = robot_bus.present
    # drive modes: reverse 3, 5, 7; time profile
    assert [g(i, 10, 1) for i in wxarm.ALL_IDS] == [4, 4, 5, 4, 5, 4, 5, 4, 0]
    assert [g(i, 12, 1) for i in wxarm.ALL_IDS] == [255, 255, 2, 255, 4, 255, 255, 255, 255]
    assert [g(i, 11, 1) for i in wxarm.ALL_IDS] == [3] * 8 + [16]
    assert [g(i, 64, 1) for i in wxarm.ALL_IDS] == [1] * 9 and g(1, 9, 1) == 0
    assert (g(2, 52, 4), g(2, 48, 4)) == (819, 3344)  # shoulder -108..114 deg in ticks
    assert (g(3, 52, 4), g(3, 48, 4)) == (819, 3344)  # a shadow takes its master's limits
    assert (g(3, 20, 4), g(5, 20, 4)) == (-7, 5)  # reversed shadows: offset = shadow - master
    assert present(3) == present(2) and present(5) == present(4)
    assert g(2, 108, 4) == 500 and g(2, 112, 4) == 2000  # a slow 2 s profile until told otherwise
    n = len(robot_bus.packets)
    arm.setup()  # configured already: no EEPROM register written again
    writes = [p for t, i, p in robot_bus.packets[n:] if i == dynamixel.WRITE]
    assert all(struct.unpack_from("<H", p)[0] >= 64 for p in writes)
    assert robot_bus.fights == []


def test_robot_sync_read_and_write_move_masters_and_shadows(robot_bus):
    arm = _fake_arm(robot_bus)
    arm.setup()
    q = np.array([0.3, -0.5, 0.7, -0.2, 1.0, 0.4])
    arm.command(q, seconds=0.2)
    joints, grip = arm.read()  # a round trip: the fake has handled the SYNC_WRITE before it
    ticks = dynamixel.rad_to_ticks(q)
    assert [robot_bus.present(i) for i in wxarm.JOINT_IDS] == ticks.tolist()
    # shadows followed their IDs
    assert robot_bus.present(3) == ticks[1] and robot_bus.present(5) == ticks[2]
    assert robot_bus.fights == []
    np.testing.assert_allclose(joints, q, atol=np.pi / 2048)
    positions_of_all = struct.pack("<HH", 132, 4) + bytes(range(1, 10))
    assert robot_bus.sent(dynamixel.SYNC_READ)[-1][1] == positions_of_all
    # beyond the elbow and wrist-rotate limits: clipped, never sent
    arm.command([0, 0, 3.0, 0, 0, -4.0])
    arm.read()
    elbow_high = dynamixel.rad_to_ticks(widowx.JOINT_HIGH[2])
    assert robot_bus.present(4) == elbow_high and robot_bus.present(8) == 0
    arm.set_gripper(-1)
    assert arm.read()[1] == 0.0 and robot_bus.get(9, 100, 2) == -350
    arm.set_gripper(-1)  # closed on nothing: the motor stops at the end of the travel
    assert robot_bus.get(9, 100, 2) == 0


def test_robot_error_and_timeout_paths(robot_bus):
    short = wxarm.open_bus(robot_bus.port, timeout=0.02, retries=2)
    robot_bus.silent.add(4)
    n = len(robot_bus.packets)
    with pytest.raises(dynamixel.NoStatusError) as e:
        short.read(4, dynamixel.PRESENT_POSITION)
    for part in ("ID 4", "/dev/pts/fake", "1000000 baud", "READ", "latency_timer", "power"):
        assert part in str(e.value)
    assert len(robot_bus.packets) - n == 2  # bounded retry
    with pytest.raises(dynamixel.NoStatusError, match="servo ID 4 "):
        short.sync_read(wxarm.JOINT_IDS, dynamixel.PRESENT_POSITION)
    robot_bus.silent.clear()
    bus = wxarm.open_bus(robot_bus.port, timeout=_BUS_TIMEOUT)
    robot_bus.corrupt = 1  # one corrupted reply: the driver asks again
    assert bus.read(2, dynamixel.DRIVE_MODE) == 0 and robot_bus.corrupt == 0
    bus.write(1, dynamixel.TORQUE_ENABLE, 1)
    locked = r"ID 1 \(waist\) answered WRITE with access error"
    with pytest.raises(dynamixel.ServoError, match=locked):
        bus.write(1, dynamixel.DRIVE_MODE, 1)
    with pytest.raises(dynamixel.ServoError, match="data limit error"):
        bus.write(1, dynamixel.GOAL_POSITION, 5000)
    robot_bus.fail(4, 0x20)
    # data still valid, alert noted
    assert bus.read(4, dynamixel.PRESENT_POSITION) > 0 and bus.alerts == {4}
    messages = dynamixel.hardware_messages(bus.read(4, dynamixel.HARDWARE_ERROR))
    assert messages == ["overload (too much load for too long)"]
    lines = []
    assert wxarm.check(bus, reboot=True, log=lines.append) is True
    assert "XM430-W350" in lines[0] and "XL430-W250" in lines[8]
    assert "overload" in lines[3] and "rebooted" in lines[3]
    assert robot_bus.table[4][70] == 0 and bus.alerts == set()
    robot_bus.silent.add(6)
    lines.clear()
    slow = wxarm.open_bus(robot_bus.port, timeout=0.3, retries=1)
    assert wxarm.check(slow, log=lines.append) is False
    assert "ID 6 forearm_roll" in lines[5] and "no reply" in lines[5]
    assert "latency_timer" in lines[5]


def test_robot_setup_never_drops_a_holding_arm(robot_bus, monkeypatch):
    arm, slept = _timed_arm(robot_bus, monkeypatch)
    arm.setup()
    arm.command(robot.HOME_JOINTS, seconds=0.5)  # where `python robot.py home` leaves it: torque on
    # a round trip: sync writes get no reply, so only now has the fake surely applied them
    arm.read()
    home = [robot_bus.present(i) for i in wxarm.ALL_IDS]
    n = len(robot_bus.packets)
    arm.setup()  # configured: reads only, the torque stays on, the arm stays up
    sync_writes = [p for t, i, p in robot_bus.packets[n:] if i == dynamixel.SYNC_WRITE]
    assert not [p for p in sync_writes if p[:2] == b"\x40\x00"]
    assert [robot_bus.present(i) for i in wxarm.ALL_IDS] == home and slept == []
    # the waist lost its time profile (another tool): EEPROM to write, torque on
    robot_bus.table[1][10] = 0
    n = len(robot_bus.packets)
    arm.setup()
    goal = _packet_index(robot_bus, dynamixel.SYNC_WRITE, 116, n)
    off = _packet_index(robot_bus, dynamixel.SYNC_WRITE, 64, n)
    # sleep pose, torque off, write
    assert goal < off < _packet_index(robot_bus, dynamixel.WRITE, 10, n, target=1)
    sleep_goals = dict(zip(wxarm.JOINT_IDS, dynamixel.rad_to_ticks(widowx.SLEEP_JOINTS)))
    assert _sync_goals(robot_bus, n)[0] == sleep_goals
    # the waist's velocity profile: 20 x 0.229 rpm = 0.48 rad/s, so the shoulder's 1.80 rad take
    # 1.80 / 0.48 + 0.5 s
    assert slept == [pytest.approx(1.1 * (1.80 / 0.48 + 0.5), rel=1e-3)]
    p = next(
        p
        for t, i, p in robot_bus.packets[n:]
        if i == dynamixel.SYNC_WRITE and struct.unpack_from("<H", p)[0] == 108
    )
    profile = {p[k]: struct.unpack_from("<ii", p, k + 1) for k in range(4, len(p), 9)}
    assert profile[1] == (5, 20) and profile[2][1] == round(1000 * slept[0] / 1.1)
    torque = [robot_bus.get(i, 64, 1) for i in wxarm.ALL_IDS]
    assert robot_bus.get(1, 10, 1) == 4 and torque == [1] * 9
    shoulder_asleep = dynamixel.rad_to_ticks(widowx.SLEEP_JOINTS[1])
    assert robot_bus.present(2) == shoulder_asleep and robot_bus.fights == []


def test_robot_shadow_offset_sign_checks_itself(robot_bus, monkeypatch):
    arm, slept = _timed_arm(robot_bus, monkeypatch)
    present = robot_bus.present
    # a firmware that adds the offset after the mirroring: SPEC 6's sign
    robot_bus.offset_mode = "after"
    arm.setup()

    def written(i):  # the Homing Offsets written to servo i
        offsets = robot_bus.sent(dynamixel.WRITE, 20)
        return [struct.unpack_from("<i", p, 2)[0] for t, p in offsets if t == i]

    # Interbotix's sign first, checked, the other
    assert written(3) == [0, -7, 7] and written(5) == [0, 5, -5]
    assert present(3) == present(2) and present(5) == present(4)
    monkeypatch.setitem(MECH, 3, 7 + 4)  # a horn that flexed by 4 ticks: within the tolerance
    robot_bus._couple()
    n = len(robot_bus.packets)
    arm.setup()
    writes = [p for t, i, p in robot_bus.packets[n:] if i == dynamixel.WRITE]
    assert not [p for p in writes if struct.unpack_from("<H", p)[0] < 64]
    monkeypatch.setitem(MECH, 3, 7 + 9)  # 9 ticks: calibrated again (torque on: via the sleep pose)
    robot_bus._couple()
    arm.setup()
    assert written(3)[3:] == [0, -16, 16] and present(3) == present(2) and len(slept) == 1
    robot_bus.offset_mode = "ignored"  # neither sign helps: stop, with the numbers
    monkeypatch.setitem(MECH, 3, 30)
    robot_bus._couple()
    with pytest.raises(
        dynamixel.DynamixelError,
        match=r"shadow servo ID 3 \(shoulder_shadow\) does not follow master "
        r"ID 2: they read (\d+) and (\d+) ticks",
    ) as e:
        arm.setup()
    assert f"read {robot_bus.present(2)} and {robot_bus.present(2) - 30} ticks" in str(e.value)


def test_robot_gripper_stall_guard(robot_bus, monkeypatch):
    clock = [0.0]
    logs = []
    arm, _ = _timed_arm(robot_bus, monkeypatch, clock, stall_s=10.0)
    arm.log = logs.append
    robot_bus.grip_stops = (-0.3, 0.8)  # this gripper's stops come before Interbotix's 0 and 1
    arm.setup()
    arm.set_gripper(1)
    assert 0.7 < arm.read()[1] < 1.0 and robot_bus.get(9, 100, 2) == 350  # it moved: not a stall
    clock[0] = 6.0
    arm.read()
    assert robot_bus.get(9, 100, 2) == 350  # still, but not for stall_s yet
    clock[0] = 12.0
    arm.read()
    assert robot_bus.get(9, 100, 2) == 0 and "stalled at 0.77 with PWM 350" in logs[-1]
    arm.set_gripper(1)  # the policy keeps asking to open: the PWM stays off
    assert robot_bus.get(9, 100, 2) == 0
    arm.set_gripper(-1)
    assert 0.0 < arm.read()[1] < 0.1 and robot_bus.get(9, 100, 2) == -350
    clock[0] = 30.0
    arm.read()
    arm.set_gripper(-1)
    assert robot_bus.get(9, 100, 2) == -150  # closed on something (or a stop): it holds, less PWM
    arm.set_gripper(1)
    assert robot_bus.get(9, 100, 2) == 350  # a new direction: full PWM again


def test_robot_moves_respect_the_velocity_limit(robot_bus, monkeypatch):
    assert wxarm.move_seconds(np.full(6, 0.3), np.zeros(6), 2.0) == 2.0
    waist_only = [3.0, 0, 0, 0, 0, 0]
    back = [-3.0, 0, 0, 0, 0, 0]
    assert wxarm.move_seconds(waist_only, back, 2.0) == pytest.approx(1.5 * 6 / np.pi)
    far = [4.0, 0, 0, 0, 0, 0]
    assert wxarm.move_seconds(far, np.zeros(6), 1.0) == pytest.approx(1.5)  # clipped to pi
    arm, slept = _timed_arm(robot_bus, monkeypatch)
    arm.setup()
    arm.command([-3.0, 0, 0, 0, 0, 0])
    arm.move([3.0, 0, 0, 0, 0, 0])  # a long waist move: longer than the 2 s asked
    arm.read()  # a round trip, so that the fake has applied the profile write
    ms = robot_bus.get(1, 112, 4)
    waist = float(np.diff(dynamixel.ticks_to_rad(dynamixel.rad_to_ticks([-3.0, 3.0])))[0])
    assert ms == round(1000 * 1.5 * waist / np.pi)
    assert slept == [pytest.approx(1.1 * ms / 1000, abs=1e-3)]
    assert robot_bus.get(1, 108, 4) == ms // 4


# ---- the environment -----------------------------------------------------------------------------
def test_robot_env_moves_the_target_clips_and_limits(robot_bus):
    env = _fake_env(robot_bus, max_steps=3, max_joint_step=0.3)
    obs = env.reset()
    image = obs["image"]
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8 and image[0, 0, 0] == 200
    assert obs["state"].dtype == np.float32
    # reset pose, open
    np.testing.assert_allclose(obs["state"], [0.25, 0, 0.18, 0, 0, 0, 1], atol=2e-3)
    obs, reward, terminated, truncated, info = env.step([0.02, -0.01, 0, 0, 0, 0.1, 1])
    np.testing.assert_allclose(obs["state"][:6], [0.27, -0.01, 0.18, 0, 0, 0.1], atol=2e-3)
    assert (reward, terminated, truncated, info["success"]) == (0.0, False, False, False)
    before = env._q.copy()
    n = len(robot_bus.packets)
    # a big yaw: at most 0.3 rad per joint a tick
    obs, _, _, truncated, info = env.step([0, 0, 0, 0, 0, 1.2, 1])
    (goal,) = _sync_goals(robot_bus, n)
    moved = dynamixel.ticks_to_rad([goal[i] for i in wxarm.JOINT_IDS]) - before
    # IK wanted more: clipped
    assert "ik_error" not in info and abs(np.abs(moved).max() - 0.3) < 2e-3
    assert not truncated
    # through the table: clipped at z = 0
    obs, _, _, truncated, _ = env.step([0, 0, -0.25, 0, 0, 0, 1])
    assert truncated and env._target[2, 3] == 0.0 and obs["state"][2] >= -2e-3
    # a broken policy output stops the arm too
    with pytest.raises(ValueError, match="7 finite numbers"):
        env.step([0, 0, 0, np.nan, 0, 0, 1])
    env.arm.bus.ping(1)  # a round trip: the fake has handled every packet before it
    assert [robot_bus.get(i, 64, 1) for i in wxarm.ALL_IDS] == [0] * 9


def test_robot_env_holds_when_ik_fails_and_on_the_watchdog(robot_bus):
    env = _fake_env(robot_bus)
    env.reset()
    q = env._q.copy()
    # clipped to (0.41, 0, 0.30) pointing down: the wrist would be 0.54 m from the shoulder, the
    # arm reaches 0.50
    env._target[:3, 3] = [0.9, 0, 0.3]
    n = len(robot_bus.packets)
    _, _, _, _, info = env.step([0, 0, 0, 0, 0, 0, 1])
    assert "did not converge" in info["ik_error"]
    (goal,) = _sync_goals(robot_bus, n)
    # held where it was
    assert [goal[i] for i in wxarm.JOINT_IDS] == dynamixel.rad_to_ticks(q).tolist()
    env._target = widowx.forward_kinematics(q)
    env.step([0, 0, 0, 0, 0, 0, 0])  # closing
    # pretend the gripper is opening half way
    env.arm.pwm = 350
    env.arm.grip = 0.5
    n = len(robot_bus.packets)
    env.watchdog_tick(time.monotonic() + 1.0)
    # held, gripper stopped
    assert len(_sync_goals(robot_bus, n)) == 1 and robot_bus.get(9, 100, 2) == 0
    env.watchdog_tick(time.monotonic() + 2.0)
    assert len(_sync_goals(robot_bus, n)) == 1  # once per stall
    assert env.step([0, 0, 0, 0, 0, 0, 1])[4]["held_by_watchdog"]


def test_robot_safe_stop_on_an_injected_hardware_error(robot_bus):
    env = _fake_env(robot_bus)
    env.reset()
    env.step([0, 0, 0, 0, 0, 0, 0])  # close the gripper
    assert robot_bus.get(9, 100, 2) == -350
    # the elbow's shadow overheats: its reply to the tick's SYNC_READ carries the alert
    robot_bus.fail(5, 0x04)
    n = len(robot_bus.packets)
    overheating = r"ID 5 \(elbow_shadow\): overheating.*--reboot"
    with pytest.raises(dynamixel.HardwareError, match=overheating):
        env.step([0.01, 0, 0, 0, 0, 0, 0])
    env.arm.bus.ping(1)  # a round trip: the fake has handled every packet before it
    after = [(t, i, p) for t, i, p in robot_bus.packets[n:]]
    pwm = [
        k
        for k, (t, i, p) in enumerate(after)
        if i == dynamixel.WRITE and t == 9 and p == struct.pack("<Hh", 100, 350)
    ]
    sleep = dynamixel.rad_to_ticks(widowx.SLEEP_JOINTS).tolist()
    goals = [
        k
        for k, (t, i, p) in enumerate(after)
        if i == dynamixel.SYNC_WRITE
        and p[:2] == b"\x74\x00"
        and [struct.unpack_from("<i", p, 5 + 5 * j)[0] for j in range(6)] == sleep
    ]
    all_off = struct.pack("<HH", 64, 1) + b"".join(bytes([j, 0]) for j in wxarm.ALL_IDS)
    torque_off = [
        k for k, (t, i, p) in enumerate(after) if i == dynamixel.SYNC_WRITE and p == all_off
    ]
    # open, sleep pose, torque off
    assert pwm and goals and torque_off and pwm[0] < goals[0] < torque_off[-1]
    assert [robot_bus.get(i, 64, 1) for i in wxarm.ALL_IDS] == [0] * 9
    with pytest.raises(RuntimeError, match="reset"):
        env.step([0, 0, 0, 0, 0, 0, 1])


def test_robot_ctrl_c_inside_step_stops_safely(robot_bus, monkeypatch):
    env = _fake_env(robot_bus)
    env.reset()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(env.arm, "command", interrupted)
    with pytest.raises(KeyboardInterrupt):
        env.step([0, 0, 0, 0, 0, 0, 1])
    env.arm.bus.ping(1)
    assert [robot_bus.get(i, 64, 1) for i in wxarm.ALL_IDS] == [0] * 9 and not env._ready


def test_robot_record_writes_the_bridge_format(robot_bus, tmp_path):
    env = _fake_env(robot_bus)
    episode_1 = ["w", "w", " ", "", "\n"]  # 4 steps, kept
    episode_2 = ["a", "\x7f"]  # discarded
    episode_3 = ["r", "\n"]  # 1 step, kept
    script = iter(episode_1 + episode_2 + episode_3)
    task = str(tmp_path / "task")
    two = robot.RecordOptions(episodes=2, val_every=2)
    kept = robot.record(env, task, lambda: next(script), two, log=lambda *a: None)
    assert kept == 2
    train_trajs = np.load(tmp_path / "task" / "train" / "out.npy", allow_pickle=True)
    val_trajs = np.load(tmp_path / "task" / "val" / "out.npy", allow_pickle=True)
    assert len(train_trajs) == 1 and len(val_trajs) == 1
    assert os.listdir(tmp_path / "task" / "train") == ["out.npy"]
    t = train_trajs[0]
    assert len(t["observations"]) == len(t["next_observations"]) == 4
    assert t["actions"].shape == (4, 7)
    np.testing.assert_allclose(t["actions"][0], [0.02, 0, 0, 0, 0, 0, 1])
    np.testing.assert_allclose(t["actions"][2:, 6], [0, 0])  # space closed the gripper
    assert t["next_observations"][0]["state"] is t["observations"][1]["state"]
    first = t["observations"][0]
    assert first["images0"].shape == (32, 32, 3) and first["state"].shape == (7,)
    # moved forward
    assert t["next_observations"][1]["state"][0] > t["observations"][0]["state"][0] + 0.03
    np.testing.assert_array_equal(t["terminals"], np.zeros(4))
    np.testing.assert_allclose(val_trajs[0]["actions"], [[0, 0, 0.02, 0, 0, 0, 1]])
    script = iter(["s", "\n"])
    one = robot.RecordOptions(episodes=1, val_every=2)
    robot.record(env, task, lambda: next(script), one, log=lambda *a: None)
    assert len(np.load(tmp_path / "task" / "train" / "out.npy", allow_pickle=True)) == 2  # appended


def test_robot_ctrl_c_during_record_keeps_completed_demos_and_no_partial_one(robot_bus, tmp_path):
    env = _fake_env(robot_bus)
    keys = iter(["w", "\n", "w", "w"])  # one demo kept, then Ctrl-C two steps into the next

    def key():
        try:
            return next(keys)
        except StopIteration:
            raise KeyboardInterrupt from None

    task = tmp_path / "task"
    with pytest.raises(KeyboardInterrupt):
        robot.record(env, str(task), key, robot.RecordOptions(episodes=3), log=lambda *a: None)
    kept = np.load(task / "train" / "out.npy", allow_pickle=True)
    assert len(kept) == 1 and kept[0]["actions"].shape == (1, 7)
    assert os.listdir(task / "train") == ["out.npy"]  # no temporary file of a half-written save
    assert len(np.load(task / "val" / "out.npy", allow_pickle=True)) == 0


def test_robot_missing_optional_parts_say_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "serial", None)
    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(ImportError, match="pip install pyserial"):
        wxarm.open_bus("/dev/ttyUSB0")
    with pytest.raises(ImportError, match="pip install opencv-python"):
        robot.open_camera(0)
    with pytest.raises(ImportError, match="interbotix_xs_modules"):
        wxarm.InterbotixArm()
    with pytest.raises(ValueError, match="'dynamixel' or 'interbotix'"):
        wxarm.make_arm("ros")
    with pytest.raises(SystemExit):
        robot.main(["record", "--help"])
    assert "w/s forward/back" in capsys.readouterr().out


# ---- faults and the command line ---------------------------------------
def test_robot_home_and_sleep_refuse_to_move_with_a_latched_hardware_error(
    robot_bus, monkeypatch, capsys
):
    # today's bug: home moved the other joints while the overloaded elbow hung limp, and exited 0
    env = _fake_env(robot_bus)
    _main_on(robot_bus, monkeypatch)
    robot_bus.fail(4, 0x20)
    for command in ("home", "sleep"):
        n = len(robot_bus.packets)
        status, _, err = _run_robot_cli([command], capsys)
        assert status == 2 and err.count("\n") == 1
        assert "error: not moving the arm: servo hardware error: ID 4 (elbow): overload" in err
        assert "reboot it with: python robot.py check --port /dev/pts/fake --reboot" in err
        assert _moving_packets(robot_bus, n) == []  # pings and reads only
    n = len(robot_bus.packets)  # the environment refuses the same way, and does not safe-stop
    with pytest.raises(wxarm.RefusedToMove, match=r"ID 4 \(elbow\): overload"):
        env.reset()
    # not ready: close() moves nothing
    assert _moving_packets(robot_bus, n) == [] and not env._ready


def test_robot_env_reset_refuses_on_a_ready_arm(robot_bus):
    env = _fake_env(robot_bus)
    env.reset()
    robot_bus.fail(1, 0x01 | 0x08)  # between episodes: the waist's supply dips, its encoder fails
    n = len(robot_bus.packets)
    with pytest.raises(
        wxarm.RefusedToMove,
        match=r"ID 1 \(waist\): input voltage out of range \(check the 12 V supply\), motor "
        r"encoder error\. .*check --port /dev/pts/fake --reboot",
    ):
        env.reset()
    # no safe stop: it would move the arm
    assert _moving_packets(robot_bus, n) == [] and not env._ready


def test_robot_check_exits_nonzero_until_the_error_is_rebooted(robot_bus, monkeypatch, capsys):
    _main_on(robot_bus, monkeypatch)
    robot_bus.fail(4, 0x20)
    status, out, _ = _run_robot_cli(["check"], capsys)
    lines = out.splitlines()
    assert status == 1 and "ID 4 elbow" in lines[3] and "overload" in lines[3]
    assert lines[9] == (
        "hardware error on ID 4 (elbow): the arm will not move until it is rebooted with "
        "python robot.py check --port /dev/pts/fake --reboot"
    )
    status, out, _ = _run_robot_cli(["check", "--reboot"], capsys)
    assert status == 0 and "overload (too much load for too long) -> rebooted" in out
    assert robot_bus.table[4][70] == 0
    status, out, _ = _run_robot_cli(["check"], capsys)
    assert status == 0 and out.count("no errors") == 9


def test_robot_missing_port_gives_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "serial", None)  # pyserial not installed
    status, _, err = _run_robot_cli(["check", "--port", "/nonexistent/ttyUSB9"], capsys)
    assert status == 2 and err.count("\n") == 1
    needs = (
        "error: opening the serial port /nonexistent/ttyUSB9 needs pyserial: pip install pyserial"
    )
    assert needs in err

    def serial_port(path, baud, timeout):  # pyserial's behaviour on a missing device
        raise SerialException(2, f"could not open port {path}: No such file or directory")

    module = types.ModuleType("serial")
    module.Serial = serial_port
    monkeypatch.setitem(sys.modules, "serial", module)
    for command in ("check", "home", "sleep"):
        status, _, err = _run_robot_cli([command, "--port", "/nonexistent/ttyUSB9"], capsys)
        assert status == 2 and err.count("\n") == 1
        assert "error: [Errno 2] could not open port /nonexistent/ttyUSB9: No such file" in err


def test_robot_bus_dying_mid_command_gives_one_line(robot_bus, monkeypatch, capsys):
    port = _main_on(robot_bus, monkeypatch)
    writes = []

    def write(data):  # the U2D2 unplugged after 3 packets
        writes.append(data)
        if len(writes) > 3:
            raise SerialException("write failed: [Errno 5] Input/output error")
        robot_bus.port.write(data)

    port.write = write
    status, _, err = _run_robot_cli(["home"], capsys)
    assert status == 2 and err.count("\n") == 1
    failed = "error: the serial port /dev/pts/fake failed: write failed: [Errno 5] Input/output"
    assert failed in err
    _main_on(robot_bus, monkeypatch, timeout=0.1, retries=1)
    robot_bus.silent.update(wxarm.ALL_IDS)  # the 12 V supply off: no servo answers
    status, _, err = _run_robot_cli(["sleep"], capsys)
    assert status == 2 and err.count("\n") == 1
    assert "error: no status packet from servo ID 1 (waist) on /dev/pts/fake" in err


def test_robot_env_on_a_dead_port_logs_one_line(robot_bus, monkeypatch):
    env = _fake_env(robot_bus)
    env.reset()
    logs = []
    env.log = logs.append

    def dead(data):
        raise SerialException("write failed: [Errno 5] Input/output error")

    monkeypatch.setattr(env.arm.bus.port, "write", dead)
    with pytest.raises(dynamixel.PortError, match="/dev/pts/fake failed: write failed"):
        env.step([0, 0, 0, 0, 0, 0, 1])
    # the safe stop cannot reach a servo: one line, not one failure per part
    no_stop = "robot: no safe stop: the port is gone; the servos keep holding their last goal"
    assert logs == [no_stop]
    assert not env._ready


@pytest.mark.parametrize(
    "fault, error, message, how",
    [
        (
            "silent",
            dynamixel.NoStatusError,
            r"no status packet from servo ID 4 \(elbow\) on ",
            "no reply",
        ),
        (
            "garbled",
            dynamixel.PacketError,
            r"every status packet from servo ID 4 \(elbow\) on /dev/pts/fake failed its CRC",
            "bad CRC",
        ),
    ],
    ids=["silent", "garbled"],
)
def test_robot_safe_stop_reaches_sleep_without_the_failed_servo(
    robot_bus, fault, error, message, how
):
    """A servo that stops answering mid-episode, or whose replies keep failing their CRC, is named
    alone with how it failed; the safe stop still opens the gripper and puts the arm to sleep
    before the torque goes off (goal writes need no reply; the move starts from the last known
    joints), so no servo goes limp with the arm reaching over the table."""
    env = _fake_env(robot_bus)
    logs = []
    env.log = logs.append
    env.reset()
    env.step([0.02, 0, 0, 0, 0, 0, 0])  # reaching out, the gripper closing
    env.arm.bus.timeout = 0.1  # a silent servo's 3 tries take 0.3 s
    getattr(robot_bus, fault).add(4)
    n = len(robot_bus.packets)
    with pytest.raises(error, match=message) as e:
        env.step([0.01, 0, 0, 0, 0, 0, 0])
    assert re.findall(r"ID \d", str(e.value)) == ["ID 4"]  # not the other eight
    env.arm.bus.ping(1)  # a round trip: the fake has handled every packet before it
    after = robot_bus.packets[n:]
    opened = [
        k
        for k, (t, i, p) in enumerate(after)
        if i == dynamixel.WRITE and t == 9 and p == struct.pack("<Hh", 100, 350)
    ]
    goals = [
        k for k, (t, i, p) in enumerate(after) if i == dynamixel.SYNC_WRITE and p[:2] == b"\x74\x00"
    ]
    all_off = struct.pack("<HH", 64, 1) + b"".join(bytes([j, 0]) for j in wxarm.ALL_IDS)
    off = [k for k, (t, i, p) in enumerate(after) if i == dynamixel.SYNC_WRITE and p == all_off]
    # open, sleep pose, torque off
    assert opened and off and opened[0] < goals[-1] < off[-1]
    sleep = dict(zip(wxarm.JOINT_IDS, dynamixel.rad_to_ticks(widowx.SLEEP_JOINTS).tolist()))
    assert _sync_goals(robot_bus, n)[-1] == sleep
    # the arm rests asleep (the failed elbow too: it still obeys), open, torque off
    assert {i: robot_bus.present(i) for i in wxarm.JOINT_IDS} == sleep
    assert robot_bus.raw[9] == dynamixel.rad_to_ticks(robot_bus.grip_stops[1])
    assert [robot_bus.get(i, 64, 1) for i in wxarm.ALL_IDS] == [0] * 9
    assert not [line for line in logs if "sleep pose failed" in line]
    lines = []
    assert wxarm.check(env.arm.bus, log=lines.append) is False
    assert [line.split()[2] for line in lines if how in line] == ["elbow"]


def test_robot_joint_beyond_its_limit_is_reported_and_never_driven(robot_bus, monkeypatch, capsys):
    """A joint past its software limit (pushed there by hand, torque off) makes `check` exit 1 with
    a line naming it, its position and the limit; home and reset() refuse before anything moves,
    until it is back inside."""
    env = _fake_env(robot_bus)
    arm = _fake_arm(robot_bus, log=lambda *a: None)
    arm.setup()
    arm.torque(False)  # configured, then powered off and on
    elbow = int(dynamixel.rad_to_ticks(1.75))  # its limit: 92 deg, +1.606 rad
    robot_bus.raw[4] = elbow
    robot_bus._couple()
    angle = f"{float(dynamixel.ticks_to_rad(elbow)):+.3f}"
    beyond = f"joint beyond its software limit: ID 4 (elbow) at {angle} rad, limit +1.606 rad."
    _main_on(robot_bus, monkeypatch)
    status, out, _ = _run_robot_cli(["check"], capsys)
    lines = out.splitlines()
    assert status == 1 and lines[3].endswith("beyond its limit +1.606 rad")
    assert lines[9].startswith(beyond) and "check --port /dev/pts/fake" in lines[9]
    n = len(robot_bus.packets)
    status, _, err = _run_robot_cli(["home"], capsys)
    assert status == 2 and err.count("\n") == 1
    assert f"error: not moving the arm: {beyond}" in err
    with pytest.raises(wxarm.RefusedToMove, match=re.escape(beyond)):
        env.reset()
    assert _moving_packets(robot_bus, n) == [] and robot_bus.raw[4] == elbow and not env._ready
    robot_bus.raw[4] = int(dynamixel.rad_to_ticks(1.5))  # moved back inside by hand
    robot_bus._couple()
    status, out, _ = _run_robot_cli(["check"], capsys)
    assert status == 0 and out.count("no errors") == 9
    env.reset()
    assert env._ready


def test_robot_record_onto_a_damaged_file_says_one_line_and_keeps_it(
    robot_bus, monkeypatch, capsys, tmp_path
):
    """record reads the task's out.npy files through bridge.py's checks before the arm moves: a
    damaged one ends it with one line naming the file (the trajectory and the field where it can)
    and stays as it was."""
    task = tmp_path / "task"
    train = task / "train" / "out.npy"
    trajectory = bridge.synthetic_trajectory(3, 32, np.random.default_rng(0))
    bridge.write_bridge_file(str(train), [trajectory])
    damaged = train.read_bytes()[:-100]  # a copy cut short
    train.write_bytes(damaged)
    env = _fake_env(robot_bus)
    _main_on(robot_bus, monkeypatch)
    monkeypatch.setattr(robot, "open_camera", lambda camera, size=(0, 0): RedCamera((32, 32)))

    def no_keys():
        raise AssertionError("no episode may start on a damaged task folder")

    monkeypatch.setattr(robot, "terminal_keys", lambda: contextlib.nullcontext(no_keys))
    status, _, err = _run_robot_cli(["record", "--out", str(task), "--episodes", "1"], capsys)
    assert status == 2 and err.count("\n") == 1
    assert f"error: {train}: field '<file>': expected a complete np.save'd list" in err
    assert train.read_bytes() == damaged and not (task / "val").exists()
    val = task / "val" / "out.npy"
    broken = {k: v for k, v in trajectory.items() if k != "actions"}
    bridge.write_bridge_file(str(train), [trajectory])
    bridge.write_bridge_file(str(val), [trajectory, broken])
    written = val.read_bytes()
    where = re.escape(f"{val}: trajectory 1: field 'actions'")
    with pytest.raises(bridge.BridgeFormatError, match=where):
        robot.record(env, str(task), no_keys, robot.RecordOptions(episodes=1), log=lambda *a: None)
    assert val.read_bytes() == written and not env._ready
    assert _moving_packets(robot_bus, 0) == []


def test_robot_interbotix_backend_through_a_fake_api(monkeypatch):
    calls = fake_interbotix(monkeypatch)
    env = robot.WidowXEnv(
        backend="interbotix",
        camera=None,
        image_size=16,
        control_hz=100.0,
        watchdog_s=0,
        move_s=0.01,
        log=lambda *a: None,
    )
    env.arm.velocity_limit = 1e3  # the fake arrives at once
    obs = env.reset()
    assert obs["image"].shape == (16, 16, 3) and not obs["image"].any()
    np.testing.assert_allclose(obs["state"], [0.25, 0, 0.18, 0, 0, 0, 1], atol=1e-3)
    assert calls[:2] == [("torque", "group", "all", True), ("release", 0)]
    env.step([0.01, 0, 0, 0, 0, 0, 0.0])
    assert calls[-1] == ("grasp", 0) and calls[-2][2] == 0.01  # one tick per command
    np.testing.assert_allclose(env._observe()["state"][0], 0.26, atol=1e-3)
    env.close()
    assert calls[-1] == ("torque", "group", "all", False)
    np.testing.assert_allclose(calls[-2][1], widowx.SLEEP_JOINTS)


def test_robot_env_keeps_5_hz_and_gives_the_arm_half_a_tick(monkeypatch):
    fake_interbotix(monkeypatch)
    clock = [100.0]
    slept = []

    def sleep(seconds):
        slept.append(round(seconds, 6))
        clock[0] += seconds

    fake_time = types.SimpleNamespace(monotonic=lambda: clock[0], sleep=sleep)
    monkeypatch.setattr(robot, "time", fake_time)
    monkeypatch.setattr(wxarm, "time", fake_time)
    env = robot.WidowXEnv(
        backend="interbotix",
        camera=None,
        image_size=8,
        watchdog_s=0,
        move_s=0.5,
        log=lambda *a: None,
    )
    env.reset()
    for policy_s in (0.0, 0.05, 0.3):  # in time, in time, late
        clock[0] += policy_s
        env.step([0, 0, 0, 0, 0, 0, 1])
    # the reset move: the shoulder's 1.609 rad from sleep at pi rad/s takes 1.5 x 1.609 / pi >
    # move_s, +10 %; then the rest of each tick; half a tick after a late one
    assert slept == [round(1.1 * 1.5 * (1.80 - 0.191) / np.pi, 6), 0.2, 0.15, 0.1]


# ==================================================================================================
# twin.py, servos.py: the simulated arm behind a pseudo-terminal, driven by robot.py unchanged
# ==================================================================================================


def test_online_widowx_env_takes_the_camera_flag(monkeypatch):
    """online.py eval/finetune --camera reaches WidowXEnv: an opencv index as an int, twin:<port>
    as it is."""
    seen = []
    monkeypatch.setattr(robot, "WidowXEnv", lambda port, **kw: seen.append((port, kw["camera"])))
    rollout.make_env("widowx", 64, port="/dev/pts/9", camera="twin:/dev/pts/9")
    rollout.make_env("widowx", 64, camera="2")
    assert seen == [("/dev/pts/9", "twin:/dev/pts/9"), ("/dev/ttyUSB0", 2)]
    parser = online.argparse.ArgumentParser()
    online.add_env_args(parser)
    assert parser.parse_args(["--camera", "twin:/dev/pts/4"]).camera == "twin:/dev/pts/4"


def test_twin_answers_the_protocol_from_its_control_table(make_twin):
    arm = make_twin()
    # SPEC 6's instruction vectors, byte for byte: ping ID 1, read its Present Position
    waist = arm.present(arm.servos[1])  # the arm lies still, torque off
    for vector, reply in (
        ("FF FF FD 00 01 03 00 01 19 4E", struct.pack("<HB", 1020, servos.FIRMWARE)),
        ("FF FF FD 00 01 07 00 02 84 00 04 00 1D 15", struct.pack("<i", waist)),
    ):
        instruction, _, _ = dynamixel.split_packet(bytes.fromhex(vector))
        [(_, status)] = arm.answer(*instruction)
        assert status == dynamixel.make_packet(1, dynamixel.STATUS, b"\x00" + reply)
    bus = _twin_bus(arm, timeout=0.05, retries=1)
    assert [bus.ping(i) for i in wxarm.ALL_IDS] == [1020] * 7 + [1060] * 2  # XM430, XL430
    with pytest.raises(dynamixel.NoStatusError, match="servo ID 10 "):
        bus.ping(10)
    # the arm at rest on its sleep pose, the shadows calibrated onto their masters
    ticks = dynamixel.rad_to_ticks(widowx.SLEEP_JOINTS)
    position = bus.sync_read(wxarm.ALL_IDS, dynamixel.PRESENT_POSITION)
    assert np.abs(np.array([position[i] for i in wxarm.JOINT_IDS]) - ticks).max() <= 2
    assert (position[3], position[5]) == (position[2], position[4])
    # a value holding FF FF FD travels stuffed both ways
    bus.write(1, (112, 4), 0x00FDFFFF)
    assert bus.read(1, (112, 4)) == 0x00FDFFFF
    # SYNC_WRITE: the shadows take their masters' entries through their Secondary IDs
    bus.sync_write((112, 4), {1: 100, 2: 200, 4: 400})
    assert bus.sync_read((1, 2, 3, 4, 5), (112, 4)) == {1: 100, 2: 200, 3: 200, 4: 400, 5: 400}
    # the XM430's write rules, as status packet errors
    bus.write(1, dynamixel.TORQUE_ENABLE, 1)
    with pytest.raises(dynamixel.ServoError, match=r"ID 1 \(waist\) answered WRITE with access"):
        bus.write(1, dynamixel.DRIVE_MODE, 0)  # EEPROM with the torque on
    with pytest.raises(dynamixel.ServoError, match="data length error"):
        bus.write(1, (116, 2), 2048)  # half of Goal Position
    with pytest.raises(dynamixel.ServoError, match="data limit error"):
        bus.write(2, dynamixel.GOAL_POSITION, 4000)  # beyond the shoulder's 114 deg
    bus.write(1, dynamixel.TORQUE_ENABLE, 0)
    bus.write(1, dynamixel.DRIVE_MODE, 4)  # with the torque off it is accepted
    # a latched hardware error: alert bit, torque kept off, cleared by REBOOT
    arm.inject("overload", 4)
    assert bus.read(4, dynamixel.HARDWARE_ERROR) == 0x20 and bus.alerts == {4}
    bus.write(4, dynamixel.TORQUE_ENABLE, 1)
    assert bus.read(4, dynamixel.TORQUE_ENABLE) == 0
    bus.reboot(4)
    assert bus.read(4, dynamixel.HARDWARE_ERROR) == 0 and bus.alerts == set()


def test_twin_check_home_and_sleep_move_the_simulated_arm(make_twin, monkeypatch, capsys):
    """robot.py's commands, unchanged, on the twin's port: the joints they leave the arm at (read
    back over the bus) give the home and sleep poses by widowx.py's kinematics, as PyBullet's arm
    does."""
    arm = make_twin()
    _twin_cli(monkeypatch)
    status, out, _ = _run_robot_cli(["check", "--port", arm.port], capsys)
    assert status == 0 and out.count("no errors") == 9
    for command, pose in (("home", widowx.M_HOME), ("sleep", [0.1227, 0, 0.0813])):
        assert _run_robot_cli([command, "--port", arm.port], capsys)[0] == 0
        bus = _twin_bus(arm)
        ticks = bus.sync_read(wxarm.JOINT_IDS, dynamixel.PRESENT_POSITION)
        bus.close()
        q = dynamixel.ticks_to_rad([ticks[i] for i in wxarm.JOINT_IDS])
        np.testing.assert_allclose(widowx.forward_kinematics(q)[:3, 3], pose, atol=2e-3)
        with arm.lock:
            np.testing.assert_allclose(arm.world.env.ee_pose()[0], pose, atol=2e-3)
    assert not any(_twin_state(arm)[2])  # sleep: torque off


def test_twin_widowx_env_episode_sees_the_simulated_scene(make_twin):
    arm = make_twin()
    env = _twin_env(arm, max_steps=3)
    first = env.reset()["image"]
    for _ in range(3):
        obs, _, _, truncated, _ = env.step([0.02, 0, -0.02, 0, 0, 0, 0])  # forward, down, close
    assert truncated
    # 3 steps from the reset pose (0.25, 0, 0.18): the state read on the last tick shows the arm on
    # its way (how far depends on how fast the physics thread ran on a loaded machine), then it
    # stops at the target
    x, _, z = obs["state"][:3]
    assert 0.27 < x < 0.32 and 0.11 < z < 0.16, obs["state"][:3]
    arm.sleep(0.5)
    with arm.lock:
        np.testing.assert_allclose(arm.world.env.ee_pose()[0], [0.31, 0, 0.12], atol=2e-3)
    assert obs["state"][6] < 0.5 and arm.world.width < 0.01  # the gripper closing
    # the twin's camera: the scene, with the arm moved in it
    assert obs["image"].shape == (32, 32, 3) and obs["image"].std() > 10
    assert np.abs(obs["image"].astype(int) - first).mean() > 0.5
    env.close()
    assert not any(_twin_state(arm)[2])


@pytest.mark.parametrize(
    "kind, servo, error",
    [
        ("silent", 4, dynamixel.NoStatusError),
        ("crc", 4, dynamixel.PacketError),
        ("slow", 4, dynamixel.NoStatusError),
        ("overload", 4, dynamixel.HardwareError),
        ("overheat", 7, dynamixel.HardwareError),
    ],
)
def test_twin_faults_end_in_the_safe_state(make_twin, kind, servo, error):
    """A fault struck mid-episode ends it with a one-line error naming the servo alone, the arm
    asleep, the gripper open and every torque off. The silent, garbled and slow servos still obey
    goal writes; the overloaded elbow's shadow carries the joint to sleep alone; the overheated
    wrist (no shadow) stays where it was."""
    arm = make_twin(slow_s=0.5)  # later than the driver's 3 tries of 0.1 s
    env = _twin_env(arm)
    env.reset()
    env.step([0.02, 0, 0, 0, 0, 0, 0])  # reaching out, the gripper closing
    arm.inject(kind, servo)
    held = _twin_state(arm)[0]
    with pytest.raises(error) as e:
        env.step([0.01, 0, 0, 0, 0, 0, 0])
    name = f"ID {servo} ({wxarm.SERVO_NAMES[servo]})"
    assert "\n" not in str(e.value) and re.findall(r"ID \d \(\w+\)", str(e.value)) == [name]
    q, width, torques = _twin_state(arm)
    asleep = widowx.SLEEP_JOINTS.copy()
    if servo == 7:
        asleep[4] = held[4]
    np.testing.assert_allclose(q, asleep, atol=0.01)
    assert width == pytest.approx(widowx.FINGER_MAX, abs=1e-3) and not any(torques)  # open, off


def test_twin_joint_started_beyond_its_limit_is_reported_and_never_driven(
    make_twin, monkeypatch, capsys
):
    arm = make_twin(beyond=[2])  # the shoulder leans back past -108 deg
    _twin_cli(monkeypatch)
    status, out, _ = _run_robot_cli(["check", "--port", arm.port], capsys)
    assert status == 1 and out.splitlines()[1].endswith("beyond its limit -1.885 rad")
    status, _, err = _run_robot_cli(["home", "--port", arm.port], capsys)
    beyond = r"not moving the arm: joint beyond its software limit: ID 2 \(shoulder\) at -2\.18\d"
    assert status == 2 and err.count("\n") == 1 and re.search(beyond, err)
    q, _, torques = _twin_state(arm)
    assert q[1] == pytest.approx(widowx.JOINT_LOW[1] - twin.BEYOND_LIMIT, abs=1e-3)
    assert not any(torques)


@pytest.mark.parametrize("command", [["twin.py"], ["sim_binsort.py", "twin"]])
def test_twin_command_prints_its_port_first_and_stops_on_sigterm(command):
    """The port is the first line of stdout; a fault strikes at its time; the camera serves
    frames; SIGTERM stops it with status 0 and removes the camera's socket."""
    script = [sys.executable, os.path.join(HERE, command[0]), *command[1:]]
    proc = subprocess.Popen(
        [*script, "--fault", "overheat:9@0.3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        port = proc.stdout.readline().strip()
        bus = _twin_bus(types.SimpleNamespace(port=port), timeout=0.5)
        assert bus.ping(9) == 1060
        deadline = time.monotonic() + 10
        while bus.read(9, dynamixel.HARDWARE_ERROR) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert bus.read(9, dynamixel.HARDWARE_ERROR) == 0x04  # overheating
        bus.close()
        camera = robot.open_camera(f"twin:{port}", (16, 24))
        ok, frame = camera.read()
        camera.release()
        assert ok and frame.shape == (16, 24, 3)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0 and out == ""
    assert "overheat fault on servo ID 9 (gripper)" in err
    assert not os.path.exists(robot.twin_camera_socket(port))


# ==================================================================================================
# binsort_env.py, sim_binsort.py: the simulated world; scripted demos, replay and collection
# ==================================================================================================


def test_sim_fk_matches_poe_at_random_joints():
    # the reference is widowx.py's product of exponentials (robot.forward_kinematics), itself
    # checked against hand-derived poses
    env = benv.BinSortEnv("sort", image_size=8)
    env.reset(seed=0)
    for q in np.random.default_rng(0).uniform(_ARM_LOW, _ARM_HIGH, (25, 6)):
        for j, qj in zip(env.arm_joints, q):
            env.client.resetJointState(env.arm, j, qj)
        pos, R = env.ee_pose()
        T = robot.forward_kinematics(q)
        # the issue asks for 1 mm; exact up to rounding is better
        assert np.abs(pos - T[:3, 3]).max() < 1e-5, q
        assert np.abs(R - T[:3, :3]).max() < 1e-5, q
        q_ik = benv.solve_ik(T[:3, 3], T[:3, :3], q + 0.05)  # IK from a nearby start: the same pose
        assert np.abs(robot.forward_kinematics(q_ik)[:3, 3] - T[:3, 3]).max() < 1e-3
    env.close()


def test_sim_reset_step_shapes_and_action_semantics():
    env = benv.BinSortEnv("pick_cube_to_left", image_size=24, max_steps=8)
    obs = env.reset(seed=1)
    image = obs["image"]
    assert image.dtype == np.uint8 and image.shape == (24, 24, 3) and image.std() > 5
    assert obs["state"].dtype == np.float32 and obs["state"].shape == (7,)
    at_reset = np.allclose(obs["state"][:6], [0.22, 0, 0.18, 0, 0, 0], atol=3e-3)
    assert at_reset and obs["state"][6] > 0.95
    # translation in the base frame, yaw about the world z axis through the end effector
    obs, reward, terminated, truncated, info = env.step(np.array([0.03, -0.02, 0, 0, 0, 0.25, 1.0]))
    assert (reward, terminated, truncated) == (0.0, False, False) and isinstance(reward, float)
    assert info["success"] is False and info["task"] == "pick_cube_to_left" and info["held"] is None
    assert set(info["in_bin"]) == set(env.objects) and "cube" in info["in_bin"]
    assert len(env.objects) == 1 + benv.DISTRACTORS
    assert np.allclose(obs["state"][:3], [0.25, -0.02, 0.18], atol=3e-3)
    assert np.allclose(obs["state"][3:6], [0, 0, 0.25], atol=5e-3)
    # then roll about the WORLD x axis: R = Rx(0.25) @ Rz(0.25) (pitch -0.061; composing the other
    # way gives 0), and move along the BASE x axis although the gripper is now turned (in its own
    # frame y would change by 7 mm)
    obs = env.step(np.array([0.03, 0, 0, 0.25, 0, 0, 1.0]))[0]
    expected = benv.mat_to_euler(_rot(0, 0.25) @ _rot(2, 0.25))
    assert abs(expected[1] + 0.0612) < 1e-3 and np.allclose(obs["state"][3:6], expected, atol=5e-3)
    assert np.allclose(obs["state"][:3], [0.28, -0.02, 0.18], atol=3e-3)
    # gripper absolute: closing on nothing shuts the fingers; the target is clipped to the workspace
    for _ in range(4):
        obs, _, _, truncated, _ = env.step(np.array([0, 0, 0.05, 0, 0, 0, 0.0]))
    assert obs["state"][6] < 0.05 and env.target_pos[2] == pytest.approx(0.33) and not truncated
    for _ in range(2):
        obs, _, terminated, truncated, _ = env.step(np.array([0, 0, 0.05, 0, 0, 0, 0.0]))
    assert obs["state"][2] < 0.335 and truncated and not terminated  # 8 steps: the limit
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros(7))
    env.close()


def test_sim_bad_action_errors():
    env = benv.BinSortEnv("sort", image_size=8)
    env.reset(seed=0)
    short = r"binsort_env.py: action must have shape \(7,\).*got shape \(6,\)"
    with pytest.raises(ValueError, match=short):
        env.step(np.zeros(6))
    with pytest.raises(ValueError, match=r"got shape \(1, 7\)"):
        env.step(np.zeros((1, 7)))
    with pytest.raises(ValueError, match=r"action\[3\] \(droll\) must be finite, got nan"):
        env.step([0, 0, 0, np.nan, 0, 0, 1])
    with pytest.raises(ValueError, match=r"action\[6\] \(gripper\) must be finite, got inf"):
        env.step([0, 0, 0, 0, 0, 0, np.inf])
    with pytest.raises(ValueError, match="7-d numeric vector"):
        env.step(["a"] * 7)
    with pytest.raises(ValueError, match="task must be.*'duck'"):
        benv.BinSortEnv("pick_dragon_to_left")
    env.close()


def test_sim_scenes_never_hold_the_sort_pair_in_pickplace():
    rng = np.random.default_rng(0)
    pair = benv.SORT_PAIR
    for target in benv.OBJECTS:
        for k in range(60):
            scene = benv.choose_scene(rng, {target: "left"}, 1 + k % 3, pair)
            assert scene[0] == target and len(set(scene)) == len(scene) == 2 + k % 3
            assert not set(pair) <= set(scene), scene
    sort_bins = dict(zip(pair, ("left", "right")))
    assert benv.choose_scene(rng, sort_bins, 1, pair) == list(pair)
    assert benv.parse_task("sort") == ("sort", {pair[0]: "left", pair[1]: "right"})
    assert benv.parse_task("pick_duck_to_right") == ("pick", {"duck": "right"})
    assert benv.parse_task("pickplace")[1] is None
    assert benv.task_name(*benv.parse_task("sort_lego_ball")) == "sort_lego_ball"


def test_sim_scripted_pickplace_succeeds():
    env = benv.BinSortEnv("pickplace", image_size=8, terminate_on_success=False)
    wins = [sb.scripted_episode(env, "pickplace", seed, noise=0.1)[3] for seed in range(5)]
    assert sum(wins) >= 4, wins
    # the default env ends the episode at its first successful step, with reward 1 and the object
    # in its bin
    env = benv.BinSortEnv("pick_lego_to_right", image_size=8)
    obs = env.reset(seed=5)
    policy = sb.ScriptedPolicy(env, 0.1, np.random.default_rng(5))
    for _ in range(40):
        obs, reward, terminated, truncated, info = env.step(policy(obs))
        if terminated or truncated:
            break
    assert terminated and reward == 1.0 and info["in_bin"]["lego"] == "right" and info["success"]
    env.close()


def test_sim_scripted_sort_succeeds():
    env = benv.BinSortEnv("sort", image_size=8, terminate_on_success=False)
    wins = []
    for seed in range(3):
        observations, actions, rewards, ok = sb.scripted_episode(env, "sort", seed, noise=0.1)
        wins.append(ok)
        assert len(actions) > 40  # two pick-and-places: longer than any pick-place demo
    assert sum(wins) >= 2, wins
    in_their_bins = {benv.SORT_PAIR[0]: "left", benv.SORT_PAIR[1]: "right"}
    assert env.info()["in_bin"] == in_their_bins or not wins[-1]
    env.close()


def test_sim_scripted_demo_gives_each_view_one_gripper_label():
    """The scripted demo closes on the view that reaches the grasp height, not one step later, and
    lifts on the first view that holds the object. With the switch a step late the arm would stand
    at the bottom, "open" was recorded there and "close" from the same view a step later, and
    a deterministic policy averaged the two and hovered."""
    env = benv.BinSortEnv("pick_cube_to_left", image_size=8)
    for seed in range(3):
        observations, actions, _, ok = sb.scripted_episode(
            env, "pick_cube_to_left", seed, noise=0.0
        )
        assert ok
        states = np.stack([o["state"] for o in observations])
        close = int(np.flatnonzero(actions[:, 6] < 0.5)[0])
        # every "open" before the close was commanded from at least 1 cm away from where it was
        apart = np.linalg.norm(states[:close, :3] - states[close, :3], axis=1)
        assert apart.min() > 0.01, (seed, apart.min())
        # one closed step grasps the cube; the next command lifts it, still closed
        assert actions[close + 1, 2] > 0.01 and actions[close + 1, 6] < 0.5, actions[close + 1]
    env.close()


def test_sim_grasp_yaw_turns_only_for_objects_too_long_for_the_opening():
    # the opening is 2 * FINGER_MAX = 7.4 cm; with 7 mm a side an object up to 6.0 cm long fits
    assert benv.grasp_yaw([0.060, 0.020, 0.01]) is None
    assert benv.grasp_yaw([0.045, 0.045, 0.04]) is None
    # longer along x: the fingers (closing along y at yaw 0) go across its short side
    assert benv.grasp_yaw([0.065, 0.020, 0.01]) == 0.0
    assert benv.grasp_yaw([0.020, 0.065, 0.01]) == pytest.approx(np.pi / 2)


def test_sim_every_object_fits_the_opening_at_any_yaw():
    """The sizes in OBJECTS are chosen so that no demo has to turn the gripper (binsort_env.py,
    OBJECTS): every object's long side, as loaded, is at most 6 cm."""
    env = benv.BinSortEnv(image_size=16)
    try:
        for name in benv.OBJECTS:
            env.reset(seed=0, task=f"pick_{name}_to_left")
            assert env.grasp_yaw[name] is None, name
    finally:
        env.close()


def test_sim_episodes_are_deterministic():
    """Same seed, same episode (collection with several workers relies on it); another seed,
    another scene."""
    env = benv.BinSortEnv("pickplace", image_size=24)  # large enough to show where the object is
    runs = []
    for seed in (7, 7, 8):
        obs = env.reset(seed=seed)
        policy = sb.ScriptedPolicy(env, 0.1, np.random.default_rng(seed))
        frames = [obs]
        for _ in range(6):
            frames.append(env.step(policy(frames[-1]))[0])
        states = np.stack([f["state"] for f in frames])
        runs.append((env.task_name, states, np.stack([f["image"] for f in frames])))
    assert runs[0][0] == runs[1][0]
    assert np.array_equal(runs[0][1], runs[1][1]) and np.array_equal(runs[0][2], runs[1][2])
    assert not np.array_equal(runs[0][2][0], runs[2][2][0])
    env.close()


def test_sim_ood_starts_lie_outside_the_datas_and_default_resets_are_unchanged():
    def inside(point, low, high):
        return bool(np.all(low <= point) and np.all(point <= high))

    # the default scenes are those of before the option (object positions after settling)
    env = benv.BinSortEnv("sort", image_size=8)
    before = {0: ([0.2728, -0.0276], [0.1921, 0.0376]), 1: ([0.2565, 0.0541], [0.3133, -0.0226])}
    for seed, (mug, cube) in before.items():
        obs = env.reset(seed=seed)
        assert env.object_position("mug")[:2] == pytest.approx(mug, abs=1e-4)
        assert env.object_position("cube")[:2] == pytest.approx(cube, abs=1e-4)
        assert obs["state"][:3] == pytest.approx(benv.START_POS, abs=1e-4)
    # many resets: the data's objects spawn in SPAWN_LOW..HIGH, the OOD ones never do
    ood = benv.BinSortEnv("sort", image_size=8, ood="both")
    assert benv.OOD_SPAWN_LOW[0] > benv.SPAWN_HIGH[0]  # the regions are apart in x
    assert inside(benv.OOD_SPAWN_LOW, benv.WORKSPACE_LOW[:2], benv.WORKSPACE_HIGH[:2])
    assert inside(benv.OOD_SPAWN_HIGH, benv.WORKSPACE_LOW[:2], benv.WORKSPACE_HIGH[:2])
    for seed in range(25):
        env.reset(seed=seed)
        obs = ood.reset(seed=seed)
        for name in ("mug", "cube"):
            assert inside(env.spawn_xy[name], benv.SPAWN_LOW, benv.SPAWN_HIGH)
            assert inside(ood.spawn_xy[name], benv.OOD_SPAWN_LOW, benv.OOD_SPAWN_HIGH)
            assert not inside(ood.spawn_xy[name], benv.SPAWN_LOW, benv.SPAWN_HIGH)
        # the arm starts in its box, above the data's start height, and is there
        assert inside(ood.target_pos, benv.OOD_ARM_LOW, benv.OOD_ARM_HIGH)
        assert ood.target_pos[2] > benv.START_POS[2] + 0.03
        assert obs["state"][:3] == pytest.approx(ood.target_pos, abs=2e-3)
    env.close()
    ood.close()
    assert rollout.OOD_STARTS == benv.OOD_STARTS
    with pytest.raises(ValueError, match="ood must be one of"):
        benv.BinSortEnv(ood="far")
    with pytest.raises(SystemExit, match="--ood objects: only the simulator"):
        rollout.make_env("widowx", 8, ood="objects")


def test_sim_collect_writes_bridge_format(tmp_path):
    out = str(tmp_path)
    options = sb.CollectOptions(seed=3, image_size=16, min_val=1)
    summary = sb.collect("pick_duck_to_left", 2, out, options, log=None)
    assert summary["tasks"] == {"pick_duck_to_left": {"train": 2, "val": 1}}
    for split, n in (("train", 2), ("val", 1)):
        folder = tmp_path / "pick_duck_to_left" / split
        assert os.listdir(folder) == ["out.npy"]  # no temporary files left behind
        trajs = np.load(folder / "out.npy", allow_pickle=True)
        assert trajs.dtype == object and trajs.shape == (n,)
        for traj in trajs:
            assert {"observations", "next_observations", "actions", "terminals"} <= set(traj)
            T = len(traj["actions"])
            assert 15 <= T <= benv.MAX_STEPS["pick"]
            assert len(traj["observations"]) == len(traj["next_observations"]) == T
            actions = traj["actions"]
            assert actions.dtype == np.float32 and actions.shape == (T, 7)
            assert np.all(benv.ACTION_LOW - 1e-6 <= actions) and np.all(
                actions <= benv.ACTION_HIGH + 1e-6
            )
            assert traj["terminals"].shape == (T,) and not traj["terminals"].any()
            # ends 3 steps in
            assert np.array_equal(traj["rewards"][-3:], [1, 1, 1]) and traj["rewards"][0] == 0
            for t, (o, o2) in enumerate(zip(traj["observations"], traj["next_observations"])):
                assert o["images0"].dtype == np.uint8 and o["images0"].shape == (16, 16, 3)
                state = o["state"]
                assert state.dtype == np.float32 and state.shape == (7,) and 0 <= state[6] <= 1
                if t + 1 < T:
                    assert np.array_equal(o2["images0"], traj["observations"][t + 1]["images0"])
                    assert np.array_equal(o2["state"], traj["observations"][t + 1]["state"])
            dz = traj["next_observations"][0]["state"][2] - traj["observations"][0]["state"][2]
            assert abs(dz - traj["actions"][0][2]) < 5e-3  # the state moves by the action (base)
    # and data.py reads what the simulator wrote: same frames, same actions, the task name from the
    # folder
    store = data.load_store(tmp_path, log=lambda *_: None)
    assert store.task_names == ["pick_duck_to_left"]
    assert store.num_transitions("val") == len(trajs[0]["actions"])
    traj = batches.Sampler(store, "val", gamma=0.98).trajectory(store.trajectory_ids("val")[0])
    first = trajs[0]["observations"][0]["images0"]
    assert np.array_equal(traj["obs"][0].permute(1, 2, 0).numpy(), first)
    raw = batches.unscale_actions(traj["action"].numpy(), store.action_low, store.action_high)
    # rescaling clips to +-0.99, so an action at a bound comes back within 1% of the half range
    tolerance = 0.005 * (store.action_high - store.action_low) + 1e-6
    assert np.all(np.abs(raw - trajs[0]["actions"]) <= tolerance)


def test_sim_default_style_is_the_scripted_demos(tmp_path):
    """collect's default style writes for each demo the first successful scripted episode of its
    seeds (demo_seed), attempt after attempt, as it always has; the teleop wrapper without pauses,
    detours or extra noise acts as the scripted policy, draw for draw."""
    name = "pick_cube_to_left"
    sb.collect(
        name, 2, str(tmp_path), sb.CollectOptions(seed=4, image_size=16, min_val=1), log=None
    )
    env = benv.BinSortEnv(name, image_size=16, terminate_on_success=False)
    for split in ("train", "val"):
        written = np.load(tmp_path / name / split / "out.npy", allow_pickle=True)
        for i, traj in enumerate(written):
            seeds = (sb.demo_seed(4, name, split, i, attempt) for attempt in range(20))
            episodes = (sb.scripted_episode(env, name, key) for key in seeds)
            observations, actions, rewards, _ = next(e for e in episodes if e[3])
            want = bridge.bridge_trajectory(observations, actions, rewards)
            for got, expected in zip(_bridge_frames(traj), _bridge_frames(want)):
                assert np.array_equal(got, expected)
            assert np.array_equal(traj["actions"], actions)
            assert np.array_equal(traj["rewards"], rewards)
    plain = sb.TeleopStyle(teleop_noise=0.1, pause_prob=0, detour_prob=0)
    key = sb.demo_seed(4, name, "train", 0)
    scripted = sb.scripted_episode(env, name, key)
    teleop = sb.scripted_episode(env, name, key, teleop=plain)
    assert np.array_equal(scripted[1], teleop[1]) and np.array_equal(scripted[2], teleop[2])
    env.close()


def test_sim_teleop_style_keeps_imperfect_attempts_with_zero_reward_and_pauses(tmp_path, capsys):
    """--style teleop: the requested fraction of each split's demos are failed or partial attempts
    with rewards all 0 (the store marks them failed, the sampler gives them -1 and the constant MC
    return); pauses are steps of zero motion that hold the gripper; detours move detour_size."""
    flags = ["--task", "pick_duck_to_left", "--n", "4", "--min_val", "2", "--image_size", "16"]
    flags += ["--seed", "1", "--out", str(tmp_path), "--style", "teleop"]
    quirks = ["--pause_prob", "0.15", "--detour_prob", "0.15", "--imperfect", "0.5"]
    sb.main(["collect", *flags, *quirks])
    report = capsys.readouterr().out
    assert report.startswith("wrote 6 teleop-style demos (3 success, ")
    trajectories = []
    for split, n_imperfect in (("train", 2), ("val", 1)):
        kept = np.load(tmp_path / "pick_duck_to_left" / split / "out.npy", allow_pickle=True)
        imperfect = [t for t in kept if not (t["rewards"] > 0).any()]
        assert len(imperfect) == n_imperfect
        assert all(len(t["actions"]) <= benv.MAX_STEPS["pick"] for t in imperfect)
        succeeded = [t for t in kept if (t["rewards"] > 0).any()]
        assert all(t["rewards"][-1] == 1 for t in succeeded)  # success at the end, as scripted
        trajectories += list(kept)
    paused = detoured = 0
    for traj in trajectories:
        actions = traj["actions"]
        still = (actions[:, :6] == 0).all(1)
        previous_gripper = np.r_[1.0, actions[:-1, 6]]  # the arm starts open
        assert np.array_equal(actions[still, 6], previous_gripper[still])
        paused += still.sum()
        unturned = (actions[:, 3:6] == 0).all(1) & ~still
        detoured += np.isclose(np.linalg.norm(actions[unturned, :3], axis=1), 0.02).sum()
    assert paused >= 3 and detoured >= 2
    store = data.load_store(tmp_path, log=lambda *_: None)
    assert (~store.traj_success).sum() == 3
    sampler = batches.Sampler(store, None, gamma=0.98)
    for k in np.flatnonzero(~store.traj_success):
        t = sampler.trajectory(k)
        assert (t["reward"] == -1).all() and (t["mask"] == 1).all()
        assert torch.allclose(t["mc_return"], torch.tensor(-50.0))


def test_sim_recorded_actions_replayed_open_loop_reproduce_the_success():
    """The scripted demos' recorded actions, executed open loop from the same reset seed, give the
    same episode again: the data's actions ARE what was executed (at the size training uses)."""
    env = benv.BinSortEnv("pick_cube_to_left", image_size=64, terminate_on_success=False)
    for seed in range(3):
        observations, actions, _, ok = sb.scripted_episode(env, "pick_cube_to_left", seed)
        assert ok
        replayed, info = sb.replay_actions(env, "pick_cube_to_left", seed, actions)
        assert info["success"] and info["stages"] == {"grasped": False, "placed": True}
        assert len(replayed) == len(observations)
        for recorded, again in zip(observations, replayed):
            assert np.array_equal(recorded["image"], again["image"])
            assert np.array_equal(recorded["state"], again["state"])
    env.close()


def test_sim_stages_on_a_scripted_sort():
    """info["stages"] of a scripted sort: grasped before either object is in its bin, first_in_bin
    before both_in_bins, and both_in_bins == success at the end. The demo sorts in the goal's order
    (the mug is in its bin first) unless told which object goes first."""
    env = benv.BinSortEnv("sort", image_size=8, terminate_on_success=False)
    for first_object, in_bin_first in ((None, {"mug": "left"}), ("cube", {"cube": "right"})):
        obs = env.reset(seed=3)
        assert list(env.goal) == list(benv.SORT_PAIR)
        none = {"grasped": False, "first_in_bin": False, "both_in_bins": False}
        assert env.info()["stages"] == none
        policy = sb.ScriptedPolicy(env, 0.0, np.random.default_rng(3), first=first_object)
        first = {}
        for t in range(80):
            obs, reward, _, _, info = env.step(policy(obs))
            for stage, holds in info["stages"].items():
                if holds:
                    first.setdefault(stage, t)
            if info["stages"]["first_in_bin"] and "in_bin_first" not in first:
                first["in_bin_first"] = {k: v for k, v in info["in_bin"].items() if v}
            if reward:
                break
        assert first["in_bin_first"] == in_bin_first
        assert info["success"] and info["stages"]["both_in_bins"]
        assert first["grasped"] < first["first_in_bin"] < first["both_in_bins"]
    with pytest.raises(ValueError, match="first='duck' is not an object of"):
        sb.ScriptedPolicy(env, first="duck")
    placed = benv.task_stages("pick", {"cube": "left"}, {"cube": "left", "duck": None}, None)
    assert placed == {"grasped": False, "placed": True}
    assert benv.task_stages("pick", {"cube": "left"}, {"cube": None}, "cube")["grasped"]
    env.close()


# ==================================================================================================
# rollout.py, online.py: episodes, rates and the env factory; online fine-tuning, eval, export
# ==================================================================================================


def test_online_wilson_interval_matches_hand_values():
    # z = 1.96, n = 10: center = (p + z^2/20) / (1 + z^2/10),
    # half = z / (1 + z^2/10) * sqrt(p(1-p)/10 + z^2/400)
    assert rollout.wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert rollout.wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert rollout.wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    won = {"success": True, "return": 1.0, "length": 3}
    lost = {"success": False, "return": 0.0, "length": 5}
    s = rollout.summarize([won, lost])
    assert (s["successes"], s["success"], s["return"], s["length"]) == (1, 0.5, 0.5, 4.0)


def test_online_eval_in_sim_is_reproducible_resizes_and_saves_strips(online_setup, tmp_path):
    root = online_setup
    # the env renders 48 px, the policy takes 32 px
    flags = "--episodes 2 --max_steps 3 --seed 7 --env_image_size 48 --device cpu".split()
    args = ["eval", "--ckpt", str(root / "ft.pt"), *flags]
    video = ["--save_video", str(tmp_path / "v"), "--video_format", "png"]
    a = online.main([*args, "--json", str(tmp_path / "a.json"), *video])
    b = online.main([*args, "--json", str(tmp_path / "b.json")])
    ja = json.loads((tmp_path / "a.json").read_text())
    jb = json.loads((tmp_path / "b.json").read_text())
    assert a == b and ja["per_episode"] == jb["per_episode"] and ja["episodes"] == 2
    assert [e["length"] for e in ja["per_episode"]] == [3, 3] and ja["successes"] == 0
    strips = sorted(os.listdir(tmp_path / "v"))
    assert strips == ["episode_000_fail.png", "episode_001_fail.png"]
    # obs 0..3 of a 3-step episode, env size
    assert Image.open(tmp_path / "v" / strips[0]).size == (48 * 4, 48)
    with pytest.raises(SystemExit, match="not a task of"):
        online.main([*args, "--task", "open_door"])


def test_online_finetune_in_sim_mixes_batches_and_writes_run(online_setup, tmp_path, monkeypatch):
    root = online_setup
    out = tmp_path / "run"
    calls = _record_updates(monkeypatch)
    online.main(_online_finetune_args(root, out))
    assert len(calls) == 2 * 8  # UTD 2 per collected transition, 2 trajectories of 4 steps
    for alpha, calql, task, mc in calls:
        assert alpha == 0.5 and calql  # online alpha from the first trajectory on, Cal-QL always
        # 0.35 / 0.15 / 0.5 of 10: floor 3 prior, floor 1 target, the rest (6) online, in that order
        assert set(task[:3]) <= {0, 1} and task[3:] == [2] * 7
        # a failed online episode has the constant MC return R / (1 - gamma) = -1 / 0.02 at every
        # step
        assert mc[4:] == pytest.approx([-50.0] * 6) and mc[3] != pytest.approx(-50.0)
    assert [s for s, _ in runfolder.list_checkpoints(out)] == [4, 8]
    ckpt = checkpoint.load_checkpoint(str(out / "ckpt_00000008.pt"))
    assert ckpt["kind"] == "online" and ckpt["grad_steps"] == 16 and ckpt["online_task"] == 2
    assert checkpoint.ckpt_config(ckpt)["calql"] and ckpt["target_task_ids"] == [2]
    assert ckpt["loop"]["live"] == [[0, 4], [1, 4]]  # the buffer holds both trajectories
    assert sorted(os.listdir(out / "episodes")) == ["episode_000000.npz", "episode_000001.npz"]
    with np.load(out / "episodes" / "episode_000001.npz") as z:
        assert z["images"].shape == (5, 32, 32, 3) and z["actions"].shape == (4, 7)
        assert not z["rewards"].any()
        assert np.abs(z["actions"]).max() <= 0.99 and int(z["task"]) == 2
    rows = _progress_rows(out / "progress.csv")
    grad_steps = [r["grad_steps"] for r in rows]
    assert [r["step"] for r in rows] == ["0", "4", "8"] and grad_steps == ["0.0", "8.0", "16.0"]
    assert all(r["eval_success"] == "0.0" for r in rows) and rows[0]["critic_loss"] == "nan"
    assert rows[2]["buffer_transitions"] == "8.0" and float(rows[2]["critic_loss"]) > 0
    assert rollout.load_policy(str(out / "ckpt_00000008.pt"), "cpu").task == 2


def test_online_calql_bound_uses_mc_returns_of_online_successes(
    online_setup, tmp_path, monkeypatch
):
    root = online_setup
    out = tmp_path / "run"
    calls = _record_updates(monkeypatch)
    _wrap_env(monkeypatch, lambda env: SucceedAt(env, 3))
    flags = ["--env_steps", "6", "--offline_steps", "2", "--eval_every", "0"]
    capacity = ["--buffer_capacity", "5"]  # room for one 3-step trajectory, not two
    online.main(_online_finetune_args(root, out, *flags, *capacity))
    # the warm-up runs before any online data: alpha_offline, prior / target only at 0.7 / 0.3
    assert [c[0] for c in calls] == [5.0, 5.0] + [0.5] * 12 and all(c[1] for c in calls)
    assert set(calls[0][2][:7]) <= {0, 1} and calls[0][2][7:] == [2, 2, 2]
    live = checkpoint.load_checkpoint(str(out / "ckpt_00000006.pt"))["loop"]["live"]
    assert live == [[1, 3]]  # the first trajectory was dropped from the buffer (its file stays)
    with np.load(out / "episodes" / "episode_000000.npz") as z:
        assert z["rewards"].tolist() == [0, 0, 1]
    buffer = batches.ReplayBuffer(100, 32, gamma=_ONLINE_GAMMA)
    online.refill_buffer(buffer, str(out), live)
    assert len(buffer) == 3
    batch = buffer.sample(64)
    # R = (-1, -1, 10), done = r: G2 = 10, G1 = -1 + 0.98 * 10 = 8.8, G0 = -1 + 0.98 * 8.8 = 7.624
    expected = {-1.0: (7.624, 8.8), 10.0: (10.0,)}
    for r, g in zip(batch["reward"].tolist(), batch["mc_return"].tolist()):
        assert min(abs(g - e) for e in expected[r]) < 1e-4
    assert sorted({round(g, 3) for g in batch["mc_return"].tolist()}) == [7.624, 8.8, 10.0]


def test_online_ctrl_c_then_resume_equals_uninterrupted(online_setup, tmp_path, monkeypatch):
    root = online_setup
    online.main(_online_finetune_args(root, tmp_path / "whole"))
    with monkeypatch.context() as m:
        # step calls: evaluation at env step 0 (1-4), rollout 1 (5-8), evaluation at 4 (9-12),
        # Ctrl-C in rollout 2
        _wrap_env(m, lambda env: CtrlCAt(env, 14))
        with pytest.raises(SystemExit) as stopped:
            online.main(_online_finetune_args(root, tmp_path / "split"))
    saved = [s for s, _ in runfolder.list_checkpoints(tmp_path / "split")]
    assert stopped.value.code == 130 and saved == [4]
    online.main(_online_finetune_args(root, tmp_path / "split", "--resume"))
    _assert_same_online_run(tmp_path / "whole", tmp_path / "split", 8)


def _assert_same_online_run(whole, split, step):
    """Two online runs of the same flags, one of them interrupted and resumed, ended alike at env
    step `step`: the critic's weights, the loop state (the trajectories the buffer holds), the
    samplers, progress.csv, and the same episode files, byte for byte: none lost, none twice."""
    a = checkpoint.load_checkpoint(str(whole / runfolder.CKPT_PATTERN.format(step)))
    b = checkpoint.load_checkpoint(str(split / runfolder.CKPT_PATTERN.format(step)))
    for k, v in a["agent"]["nets"]["critic"].items():
        assert torch.equal(v, b["agent"]["nets"]["critic"][k]), k
    assert a["loop"] == b["loop"] and a["sampler"] == b["sampler"]
    assert _progress_rows(whole / "progress.csv") == _progress_rows(split / "progress.csv")
    names = sorted(os.listdir(whole / "episodes"))
    assert sorted(os.listdir(split / "episodes")) == names and len(names) == a["loop"]["episodes"]
    for name in names:
        with np.load(whole / "episodes" / name) as x, np.load(split / "episodes" / name) as y:
            assert x.files == y.files and all(np.array_equal(x[k], y[k]) for k in x.files)


def test_online_kill_9_then_resume_equals_uninterrupted(online_setup, tmp_path):
    """SIGKILL saves nothing: the resumed run starts from the newest checkpoint and collects the
    episodes after it again, over the files the killed run left."""
    root = online_setup
    flags = ["--env_steps", "12"]  # 3 episodes of 4 steps, checkpoints at 4, 8 and 12
    online.main(_online_finetune_args(root, tmp_path / "whole", *flags))
    split = tmp_path / "split"
    argv = _online_finetune_args(root, split, *flags)
    # the same thread count as this process, so that the two compute alike
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "online.py"), *argv],
            cwd=HERE,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        # episode 1 is written after checkpoint 4, before checkpoint 8: kill -9 it there
        while proc.poll() is None and not (split / "episodes" / "episode_000001.npz").exists():
            time.sleep(0.005)
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-2000:]
    saved = [s for s, _ in runfolder.list_checkpoints(split)]
    assert saved and saved[-1] < 12  # killed mid-run (the next checkpoint is 8, on a slow machine)
    online.main(_online_finetune_args(root, split, *flags, "--resume"))
    _assert_same_online_run(tmp_path / "whole", split, 12)


def test_online_filtered_bc_imitates_target_demos_and_own_successes_only(
    online_setup, tmp_path, monkeypatch, capsys
):
    root = online_setup
    out = tmp_path / "bc"
    calls = _record_updates(monkeypatch)
    # rollouts: a failure (4 steps), a success at step 3, a failure, a success
    _wrap_env(monkeypatch, lambda env: SucceedAt(env, 3, episodes={1, 3}))
    flags = ["--env_steps", "14", "--eval_every", "0", "--filtered_bc"]
    online.main(_online_finetune_args(root, out, *flags))
    summary = capsys.readouterr().out.splitlines()[-1]
    assert len(calls) == 2 * 14  # the RL run's UTD: 2 updates per env step
    # before any success the demos alone; then 0.15 / 0.65 of 10 demos, floor 2, 8 successes
    for _, _, task, mc in calls:
        assert task == [2] * 10  # no prior data
        assert min(abs(g + 50.0) for g in mc) > 1e-3  # no failed trajectory: G = -1 / 0.02
    for _, _, _, mc in calls[8:]:
        # the successful 3-step rollouts: G = 7.624, 8.8, 10 (test_online_calql_bound...)
        assert all(min(abs(g - e) for e in (7.624, 8.8, 10.0)) < 1e-4 for g in mc[2:])
    ckpt = checkpoint.load_checkpoint(str(out / "ckpt_00000014.pt"))
    assert ckpt["agent"]["config"]["algo"] == "gbc" and "critic" not in ckpt["agent"]["nets"]
    assert ckpt["loop"]["live"] == [[1, 3], [3, 3]]  # the buffer: the successes only
    assert len(os.listdir(out / "episodes")) == 4  # every episode is written
    assert rollout.load_policy(str(out / "ckpt_00000014.pt"), "cpu").task == 2
    # where the wall time went: progress.csv columns, summed over the run, and a summary line
    with open(out / "progress.csv") as f:
        last = {k: float(v) for k, v in list(csv.DictReader(f))[-1].items()}
    parts = ("rollouts", "evaluation", "updates")
    rollouts, evaluation, updates = (last[f"wall_{k}_s"] for k in parts)
    assert rollouts > 0 and evaluation == 0 and updates > 0  # (no evaluation: --eval_every 0)
    assert last["wall_total_s"] >= rollouts + updates
    assert summary.startswith("wall time ") and "28 at " in summary  # updates


def test_online_errors_name_the_problem(online_setup, tmp_path):
    root = online_setup
    with pytest.raises(SystemExit, match="already holds checkpoints"):
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "ckpt_00000004.pt").write_bytes(b"")
        online.main(_online_finetune_args(root, tmp_path / "run"))
    other_target = (
        r"was fine-tuned on \['sort_mug_cube'\], but --target holds \['pick_a', 'pick_b'\]"
    )
    with pytest.raises(SystemExit, match=other_target):
        paths = ["--ckpt", root / "ft.pt", "--prior", root / "prior", "--target", root / "prior"]
        online.main(["finetune", *map(str, paths), "--out", str(tmp_path / "x"), "--device", "cpu"])
    missing = "episode_000003.npz: missing, but the checkpoint's replay buffer"
    with pytest.raises(checkpoint.CheckpointError, match=missing):
        online.refill_buffer(batches.ReplayBuffer(10, 32, gamma=0.9), str(tmp_path), [[3, 4]])


def test_online_real_arm_without_classifier_asks_a_person(monkeypatch):
    answers = iter(["y", "", "no"])
    monkeypatch.setattr("builtins.input", lambda prompt: next(answers))
    ask = classifier.make_labeler("widowx", classifier=None, device="cpu")
    frames = [None] * 5  # 4 transitions
    assert ask(frames).tolist() == [0, 0, 0, 1] and ask(frames).tolist() == [0, 0, 0, 0]
    assert ask(frames).sum() == 0
    assert classifier.make_labeler("binsort", classifier=None, device="cpu") is None


# ---- the loop between the data and the environment ----------------------------
@pytest.mark.parametrize("store_size", [64, 32])
def test_sim_policy_sees_what_collection_stored_and_its_actions_reach_the_env(tmp_path, store_size):
    """Collect one demo, convert it (at the env's size, and resized to 32 px), then drive
    rollout.py's Policy with the demo's stored [-1, 1] actions: the policy is shown exactly the
    stored images and states, the actions go rescale -> Policy (clip +-0.99) -> unscale -> env
    with the gripper on the same side of 0.5 at every step, and the episode succeeds again."""
    options = sb.CollectOptions(image_size=64, min_val=0)
    sb.collect("pick_cube_to_left", 1, str(tmp_path), options, log=None)
    store = data.load_store(str(tmp_path), image_size=store_size, log=lambda *a: None)
    sampler = batches.Sampler(store, "train", gamma=0.98)
    demo = sampler.trajectory(0)
    raw = np.asarray(store.actions[: len(demo["action"])])
    executed = batches.unscale_actions(demo["action"].numpy(), store.action_low, store.action_high)
    # 0 closed .. 1 open, grasp below 0.5
    assert np.array_equal(executed[:, 6] < 0.5, raw[:, 6] < 0.5)
    one_percent = 0.01 * (store.action_high - store.action_low).max()
    assert np.abs(executed[:, :6] - raw[:, :6]).max() < one_percent
    agent = ReplayAgent(demo["action"].numpy(), store_size)
    policy = rollout.Policy(agent, store.action_low, store.action_high, task=0)
    env = benv.BinSortEnv("pick_cube_to_left", image_size=64, terminate_on_success=False)
    seed = sb.env_seed_of(sb.demo_seed(0, "pick_cube_to_left", "train", 0))
    episode = rollout.run_episode(env, policy, seed, max_steps=len(raw))
    env.close()
    assert episode["success"]
    stored_images = _nhwc(demo["obs"])
    stored_states = demo["state"].numpy()
    # after the reset: the same simulator state as the stored first frame
    image, state = agent.seen[0]
    assert np.array_equal(image, stored_images[0]) and np.array_equal(state, stored_states[0])
    # later frames follow actions clipped at +-0.99 of the range: the same scene within a few pixels
    images = np.stack([img for img, _ in agent.seen])
    assert np.abs(images.astype(int) - stored_images[: len(images)]).mean() < 2.0


# ---- stage-wise success ----------------------------------------------------
def test_online_eval_reports_stages_with_wilson_intervals(tmp_path, monkeypatch, capsys):
    results = rollout.evaluate(StagedEnv(), ZeroPolicy(), 4, seed=0, log=print)
    # a stage counts when it was reached at any step, even if lost again
    reached = [{"grasped": True, "placed": s % 2 == 0} for s in range(4)]
    assert [r["stages"] for r in results] == reached
    stages = rollout.summarize(results)["stages"]
    assert list(stages) == ["grasped", "placed"]
    # Wilson by hand, n = 4, z = 1.96: 2/4 -> 0.5 +- 0.35, 4/4 -> center 0.755, half 0.245
    placed = {"count": 2, "rate": 0.5, "lo": 0.150, "hi": 0.850}
    assert stages["placed"] == pytest.approx(placed, abs=1e-3)
    grasped = {"count": 4, "rate": 1.0, "lo": 0.510, "hi": 1.0}
    assert stages["grasped"] == pytest.approx(grasped, abs=1e-3)
    episode_1 = "episode   1 seed 1: return 0.00, length 4, failure (reached: grasped)"
    assert episode_1 in capsys.readouterr().out
    # the CLI prints each stage and writes them to the JSON; an env without stages reports none
    monkeypatch.setattr(rollout, "load_policy", lambda *a: ZeroPolicy())
    for has_stages in (True, False):
        monkeypatch.setattr(rollout, "make_env", lambda *a, s=has_stages, **k: StagedEnv(s))
        path = tmp_path / f"eval_{has_stages}.json"
        args = ["eval", "--ckpt", "x.pt", "--episodes", "4", "--json", path, "--device", "cpu"]
        online.main([str(a) for a in args])
        out = capsys.readouterr().out
        doc = json.loads(path.read_text())
        if has_stages:
            assert "  stage placed: 2/4 = 50.0% (95% CI, Wilson: 15.0% .. 85.0%)" in out
            assert doc["stages"]["grasped"]["count"] == 4
        else:
            assert "stage" not in out and doc["stages"] == {}
            assert all("stages" not in e for e in doc["per_episode"])


@pytest.mark.parametrize("episodes", ["0", "-3"])
def test_online_eval_refuses_fewer_than_one_episode(tmp_path, monkeypatch, capsys, episodes):
    """No episode is no success rate (0% of nothing, NaN means): one line naming --episodes, no
    JSON."""
    monkeypatch.setattr(rollout, "load_policy", lambda *a: ZeroPolicy())
    monkeypatch.setattr(rollout, "make_env", lambda *a, **k: StagedEnv())
    path = tmp_path / "eval.json"
    args = ["eval", "--ckpt", "x.pt", "--episodes", episodes, "--json", str(path)]
    with pytest.raises(SystemExit) as e:
        cli.run_cli(online.main, [*args, "--device", "cpu"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == cli.EXIT_ERROR and not path.exists()
    assert len(lines) == 1
    assert lines[0].endswith(f"error: --episodes {episodes}: expected a positive integer")


def test_online_export_keeps_the_actor_that_eval_loads_and_refuses_training(online_setup, tmp_path):
    """online.py export: the actors alone, a fraction of the checkpoint; the policy loaded from it
    acts exactly as the original's; fine-tuning from it stops with a one-line error."""
    root = online_setup
    small = tmp_path / "policy.pt"
    online.main(["export", "--ckpt", str(root / "ft.pt"), "--out", str(small)])
    ckpt = checkpoint.load_checkpoint(str(small))
    assert ckpt["kind"] == "policy" and list(ckpt["agent"]["nets"]) == ["policy"]
    assert ckpt["agent"]["optimizers"] == {} and "sampler" not in ckpt
    assert os.path.getsize(small) < 0.5 * os.path.getsize(root / "ft.pt")
    original = rollout.load_policy(str(root / "ft.pt"), "cpu")
    exported = rollout.load_policy(str(small), "cpu")
    assert (
        (exported.task, exported.task_name)
        == (original.task, original.task_name)
        == (2, "sort_mug_cube")
    )
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    state = rng.normal(size=7).astype(np.float32)
    for a, b in zip(original(image, state), exported(image, state)):
        assert np.array_equal(a, b)
    # the evaluation mode travels with an exported policy; flags given to eval take precedence
    mode = tmp_path / "mode.pt"
    flags = ["--sample_actions", "--binarize_gripper", "--task", "sort_mug_cube"]
    online.main(["export", "--ckpt", str(root / "ft.pt"), "--out", str(mode), *flags])
    policy = rollout.load_policy(str(mode), "cpu")
    assert (policy.task_name, policy.binarize_gripper) == ("sort_mug_cube", True)
    assert policy.evaluation["sample_actions"] is True
    policy = rollout.load_policy(str(mode), "cpu", task=0, binarize_gripper=False)
    assert (policy.task, policy.binarize_gripper) == (0, False)
    assert rollout.load_policy(str(small), "cpu").binarize_gripper is False
    with pytest.raises(checkpoint.CheckpointError, match="task 'nope': not a task of"):
        online.main(["export", "--ckpt", str(root / "ft.pt"), "--out", str(mode), "--task", "nope"])
    argv = _online_finetune_args(root, tmp_path / "run")
    argv[argv.index("--ckpt") + 1] = str(small)
    proc = _run_script("online.py", *argv, expect_ok=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr
    assert "policy-only checkpoint" in lines[0] and "not trained" in lines[0]


def test_online_eval_samples_actions_only_when_asked(tmp_path, monkeypatch):
    policy = RecordingPolicy()
    rollout.evaluate(StagedEnv(), policy, 2, seed=0, log=lambda line: None)
    assert policy.flags == [True] * 8  # 2 episodes of 4 steps, the actor's mean
    for flag, expected in ((["--sample_actions"], False), ([], True)):
        policy = RecordingPolicy()
        monkeypatch.setattr(rollout, "load_policy", lambda *a, p=policy: p)
        monkeypatch.setattr(rollout, "make_env", lambda *a, **k: StagedEnv())
        path = tmp_path / f"eval_{expected}.json"
        args = ["eval", "--ckpt", "x.pt", "--episodes", "2", "--json", str(path), *flag]
        online.main(args + ["--device", "cpu"])
        assert policy.flags == [expected] * 8
        assert json.loads(path.read_text())["sampled_actions"] is not expected


def test_online_eval_and_finetune_in_an_env_of_ones_own_module(online_setup, tmp_path):
    """--env module:Class: the factory imports the module and makes Class(image_size=<render
    size>), plus max_steps=<--max_steps> when one is given; its own rewards and success count, it
    resets itself, and it need not have close()."""
    root = online_setup
    ModuleEnv.made.clear()
    path = tmp_path / "eval.json"
    argv = ["eval", "--ckpt", str(root / "ft.pt"), "--env", "fakes:ModuleEnv", "--episodes", "2"]
    online.main([*argv, "--json", str(path), "--device", "cpu"])
    per_episode = json.loads(path.read_text())["per_episode"]
    # seed 0 succeeds at step 2, seed 1 runs to the env's own limit (5 steps)
    assert per_episode == [
        {"success": True, "return": 1.0, "length": 2},
        {"success": False, "return": 0.0, "length": 5},
    ]
    online.main([*argv, "--max_steps", "3", "--env_image_size", "48", "--device", "cpu"])
    online.main(_online_finetune_args(root, tmp_path / "run", "--env", "fakes:ModuleEnv"))
    assert ModuleEnv.made == [
        {"image_size": 32, "max_steps": None},
        {"image_size": 48, "max_steps": 3},
        {"image_size": 32, "max_steps": 4},
    ]
    # the run's last checkpoint: its trajectories ended at steps 2 or 4
    assert sorted(p.name for p in (tmp_path / "run").glob("ckpt_*.pt"))[-1] == "ckpt_00000010.pt"


def test_online_env_module_class_errors_name_the_flag(tmp_path, monkeypatch, capsys):
    expected = "expected an environment with reset(seed=None) -> obs and step(action) -> (obs,"
    for spec, message in (
        ("mysim", "--env mysim: expected binsort, widowx or module:Class"),
        ("fakes:", "--env fakes:: expected binsort, widowx or module:Class"),
        ("no_such_module_xyz:Env", "--env no_such_module_xyz:Env: cannot import no_such_module_"),
        ("fakes:NoSuchEnv", "--env fakes:NoSuchEnv: module fakes has no NoSuchEnv"),
        ("fakes:MECH", "--env fakes:MECH: fakes.MECH is a dict, not a class"),
        ("fakes:StagedEnv", "StagedEnv(image_size=8) cannot be made (got an unexpected keyword"),
        ("types:SimpleNamespace", f"a SimpleNamespace has no reset or step(); {expected}"),
    ):
        with pytest.raises(cli.FlagError) as e:
            rollout.make_env(spec, 8)
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(SystemExit, match="--ood arm: only the simulator"):
        rollout.make_env("fakes:ModuleEnv", 8, ood="arm")
    # the command line: a name that is neither is argparse's usage error, a module:Class that
    # cannot be made one line (exit status 2)
    with pytest.raises(SystemExit):
        online.main(["eval", "--ckpt", "x.pt", "--env", "mysim"])
    refused = "argument --env: invalid choice: 'mysim' (choose from binsort, widowx or module:"
    assert refused in capsys.readouterr().err
    monkeypatch.setattr(rollout, "load_policy", lambda *a: ZeroPolicy())
    with pytest.raises(SystemExit) as e:
        argv = ["eval", "--ckpt", "x.pt", "--env", "fakes:NoSuchEnv", "--device", "cpu"]
        cli.run_cli(online.main, argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == cli.EXIT_ERROR and len(lines) == 1
    assert lines[0].endswith("error: --env fakes:NoSuchEnv: module fakes has no NoSuchEnv")


def test_online_binarized_gripper_executes_zero_or_one():
    """A regression policy's 0.38 near a grasp is executed as closed (0) with --binarize_gripper,
    0.62 as open (1); the buffer gets the executed action rescaled like the data's; the arm
    dimensions are kept."""
    low = np.array([-0.05] * 3 + [-0.25] * 3 + [0.0], np.float32)
    high = np.array([0.05] * 3 + [0.25] * 3 + [1.0], np.float32)
    for gripper, executed in ((0.38, 0.0), (0.62, 1.0)):
        raw_action = np.array([0.01, 0, 0, 0, 0, 0, gripper], np.float32)
        action = batches.rescale_actions(raw_action, low, high)
        agent = ReplayAgent(action[None], 8)
        plain = rollout.Policy(agent, low, high, task=0)
        raw, _ = plain(np.zeros((8, 8, 3), np.uint8), np.zeros(7, np.float32))
        assert raw[6] == pytest.approx(gripper, abs=1e-6)
        agent.seen.clear()
        binary = rollout.Policy(agent, low, high, task=0, binarize_gripper=True)
        raw, scaled = binary(np.zeros((8, 8, 3), np.uint8), np.zeros(7, np.float32))
        assert raw[6] == executed and raw[0] == pytest.approx(0.01, abs=1e-6)
        assert scaled[6] == pytest.approx(0.99 if executed else -0.99)


# ==================================================================================================
# benchmarks and every script's command line
# ==================================================================================================


def test_perf_cql_bench_prints_eager_compiled_and_their_ratio(tmp_path):
    """`python bench.py`: the figures printed agree with each other."""
    flags = "--arch small --batch 4 --image_size 32 --num_tasks 3 --steps 1 --warmup 0"
    proc = _run_script("bench.py", *flags.split(), "--backend", "aot_eager", expect_ok=False)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    gflop = float(re.search(r"counted ([\d.]+) GFLOP/update", out).group(1))
    rates = {}
    for k in ("eager", "compiled"):
        m = re.search(
            k + r" +([\d.]+) updates/s +([\d.]+) ms/update +([\d.]+) GFLOP/s = ([\d.]+)%", out
        )
        rates[k] = float(m.group(1))
        assert float(m.group(2)) == pytest.approx(1e3 / rates[k], rel=1e-2)
        assert float(m.group(3)) == pytest.approx(gflop * rates[k], rel=1e-2)
        # 1 thread
        assert float(m.group(4)) == pytest.approx(100 * gflop * rates[k] / 96.0, rel=1e-2)
    ratio = float(re.search(r"compiled / eager ([\d.]+)x", out).group(1))
    assert ratio == pytest.approx(rates["compiled"] / rates["eager"], rel=1e-2)
    assert gflop > 0 and "overhead ratio (eager)" in out
    # bench.py imports cql, never the reverse (SPEC section 2): cql.py copied with model.py
    # alone imports
    assert "import bench" not in open(os.path.join(HERE, "cql.py")).read()
    for name in ("cql.py", "model.py"):
        (tmp_path / name).write_text(open(os.path.join(HERE, name)).read())
    alone = subprocess.run(
        [sys.executable, "-c", "import cql"], cwd=tmp_path, capture_output=True, text=True
    )
    assert alone.returncode == 0, alone.stderr


def test_pipeline_every_script_reports_expected_failures_in_one_line(tmp_path):
    assert issubclass(checkpoint.CheckpointError, cli.ExpectedError)
    assert train.run_cli is cli.run_cli
    missing = tmp_path / "missing.pt"
    runs = [
        (
            "online.py",
            ["eval", "--ckpt", missing, "--device", "cpu"],
            f"{missing}: no such checkpoint",
        ),
        ("train.py", ["--data", tmp_path / "nowhere", "--out", tmp_path / "r"], "no such file"),
        ("select_ckpt.py", [tmp_path / "nowhere"], "no such run folder"),
    ]
    for script, args, message in runs:
        proc = _run_script(script, *args, expect_ok=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode != 0 and len(lines) == 1 and message in lines[0], proc.stderr


def test_stats_mcnemar_holm_fisher_and_wilson_by_hand():
    # 1 discordant pair one way, 6 the other: p = 2 * (C(7,0) + C(7,1)) / 2^7 = 0.125
    assert stats.mcnemar_exact_p(1, 6) == pytest.approx(0.125)
    assert stats.mcnemar_exact_p(6, 1) == stats.mcnemar_exact_p(1, 6)
    assert stats.mcnemar_exact_p(0, 0) == 1.0 and stats.mcnemar_exact_p(3, 3) == 1.0
    assert stats.mcnemar_exact_p(0, 10) == pytest.approx(2 / 1024)
    assert stats.discordant([1, 1, 0, 0, 1], [1, 0, 1, 0, 0]) == (2, 1)
    with pytest.raises(ValueError, match="different lengths, 2 and 3"):
        stats.discordant([1, 0], [1, 0, 1])
    # R: p.adjust(c(0.01, 0.04, 0.03), "holm") = 0.03 0.06 0.06
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0]) and stats.holm([]) == []
    # Fisher: 3 of 3 against 0 of 3, each extreme table has probability 1 / C(6, 3)
    assert stats.fisher_exact_p(3, 3, 0, 3) == pytest.approx(2 / 20)
    assert stats.fisher_exact_p(8, 50, 0, 50) == pytest.approx(
        2 * math.comb(50, 8) / math.comb(100, 8)
    )
    assert stats.fisher_exact_p(5, 10, 5, 10) == pytest.approx(1.0)
    assert stats.wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert rollout.wilson_interval is stats.wilson_interval


def _binsort_experiment():
    spec = importlib.util.spec_from_file_location(
        "binsort_experiment", os.path.join(HERE, "scripts", "binsort_experiment.py")
    )
    be = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(be)
    return be


def _fake_eval(path, outcomes):
    """An online.py eval JSON with these per-episode successes."""
    k, n = sum(outcomes), len(outcomes)
    lo, hi = stats.wilson_interval(k, n)
    stages = {"grasped": {"count": n}, "first_in_bin": {"count": k}}
    doc = {"episodes": n, "successes": k, "success": k / n, "success_lo": lo, "success_hi": hi}
    doc.update(stages=stages, per_episode=[{"success": bool(x)} for x in outcomes])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))


def test_binsort_experiment_dev_and_test_seeds_and_each_runs_flags(tmp_path):
    be = _binsort_experiment()
    p = be.Protocol(cql_pre_steps=100, ft_steps=20, ft_save_every=10, q_weights="0,2")
    jobs = {job.name: job.cmd for job in be.build_jobs(p, str(tmp_path))}

    def flag(cmd, name):
        return cmd[cmd.index(name) + 1]

    # lambda 0 is plain imitation; lambda 2 starts after q_warmup fine-tuning updates
    assert flag(jobs["s0/ptr_q0"], "--actor_q_weight") == "0"
    assert flag(jobs["s0/ptr_q2"], "--actor_q_start") == str(100 + p.q_warmup)
    assert flag(jobs["s0/ptr_q2"], "--bc_steps") == "120"  # imitating through fine-tuning
    assert flag(jobs["s0/ptr_awr3"], "--actor_awr_beta") == "3"
    assert flag(jobs["s0/gbc_pre"], "--algo") == "gbc"
    assert flag(jobs["s0/bc_pre_d0"], "--bc_dropout") == "0"
    assert flag(jobs["s0/bc_ft_d0_m0.9"], "--mix") == "0.9"
    assert flag(jobs["s0/bc_ft_d0_m0.9"], "--ckpt").endswith("bc_pre_d0/ckpt_00007500.pt")
    # PTR's rule is the Q-values; the baselines' the validation error
    assert "--by" not in jobs["s0/select_ptr_q2"]
    assert flag(jobs["s0/select_gbc_ft_m0.7"], "--by") == "val_loss"
    # development evaluations reset with the development seeds; Gaussian actors sample, BC not
    dev = jobs["s0/eval_dev_ptr_q2"]
    assert flag(dev, "--seed") == "1000" and "--sample_actions" in dev
    assert "--sample_actions" not in jobs["s0/eval_dev_bc_ft_d0.4_m0.7"]
    assert flag(jobs["s0/eval_dev_ptr_q0_step_000010"], "--ckpt").endswith("ckpt_00000010.pt")
    assert not [name for name in jobs if "test_" in name]
    # every training seed collects its own data and trains with its own seed
    collect = jobs["s0/collect"][2].split(" && ")
    assert "--seed 0" in collect[0] and collect[1].endswith("--first cube")
    # the Q-maximising study: one suspected cause changed per run, Q-values choose, never tested
    study = {job.name: job.cmd for job in be.build_jobs(be.Protocol(qmax_study=1), str(tmp_path))}
    assert flag(study["s0/qmax"], "--bc_steps") == "7500" and "--by" not in study["s0/select_qmax"]
    assert flag(study["s0/qmax_warm"], "--bc_steps") == str(7500 + p.q_warmup)
    assert "--no-zero_target_slot" in study["s0/qmax_random_slot"]
    assert "--no-actor_q_gripper" in study["s0/qmax_gripper"] and "s0/qmax" not in jobs
    with pytest.raises(SystemExit, match="overlap"):
        be.build_jobs(be.Protocol(test_seed=1010), str(tmp_path))
    with pytest.raises(SystemExit, match="needs the development evaluations of seed 0"):
        be.build_jobs(be.Protocol(test=1), str(tmp_path))


def test_binsort_experiment_waits_for_a_run_another_process_owns(tmp_path):
    """A job whose run folder is locked by a live process (the same run started by hand) is not
    started again: the scheduler waits for its done file, then runs what depends on it."""
    be = _binsort_experiment()
    folder = tmp_path / "seed_0" / "pre"
    folder.mkdir(parents=True)
    done_a, done_b = folder / "done", tmp_path / "seed_0" / "b_done"
    elsewhere = subprocess.Popen(["bash", "-c", f"sleep 1; touch {done_a}"])
    (folder / runfolder.LOCK_FILE).write_text(f"{elsewhere.pid}\n")
    marker = tmp_path / "started_twice"
    a = be.Job("s0/a", ["bash", "-c", f"touch {marker} {done_a}", "-", "--out", str(folder)])
    a.done_file = str(done_a)
    b = be.Job("s0/b", ["bash", "-c", f"touch {done_b}"], ("s0/a",), str(done_b))
    be.run([a, b], str(tmp_path), max_jobs=2, poll=0.05)
    elsewhere.wait()
    assert done_b.exists() and not marker.exists()


def test_binsort_experiment_test_phase_picks_dev_winners_and_tests_them_paired(tmp_path):
    be = _binsort_experiment()
    p = be.Protocol(
        q_weights="0,1",
        awr_betas="2",
        gbc_mixes="0.7,0.9",
        bc_mixes="0.7",
        bc_dropouts="0.4",
        seeds="0,1",
        test=1,
    )
    dev = {
        "ptr_q0": 5,
        "ptr_q1": 7,
        "ptr_awr2": 7,
        "gbc_ft_m0.7": 3,
        "gbc_ft_m0.9": 4,
        "bc_ft_d0.4_m0.7": 2,
    }
    for run, k in dev.items():
        _fake_eval(tmp_path / "seed_0" / "eval" / f"dev_{run}.json", [1] * k + [0] * (10 - k))
    # ties go to the first candidate: lambda 1 before beta 2
    assert be.test_runs(p, str(tmp_path)) == {
        "ptr_imitating": "ptr_q0",
        "ptr_critic": "ptr_q1",
        "gbc": "gbc_ft_m0.9",
        "bc": "bc_ft_d0.4_m0.7",
    }
    jobs = {job.name: job.cmd for job in be.build_jobs(p, str(tmp_path))}
    test = jobs["s1/eval_test_ptr_q1"]
    assert test[test.index("--seed") + 1] == str(p.test_seed)
    assert "s1/ptr_awr2" not in jobs and "s1/gbc_ft_m0.7" not in jobs and "s1/ptr_q0" in jobs
    assert "--seed 1" in jobs["s1/collect"][2]
    # seed 0: A wins 3 episodes B loses, B wins 1; seed 1: 4 and 0 -> b = 7, c = 1
    outcomes = {
        ("ptr_q1", 0): [1, 1, 1, 1, 0, 0],
        ("gbc_ft_m0.9", 0): [1, 0, 0, 0, 1, 0],
        ("ptr_q1", 1): [1, 1, 1, 1, 0, 0],
        ("gbc_ft_m0.9", 1): [0, 0, 0, 0, 0, 0],
        ("ptr_q0", 0): [0] * 6,
        ("ptr_q0", 1): [0] * 6,
        ("bc_ft_d0.4_m0.7", 0): [0] * 6,
        ("bc_ft_d0.4_m0.7", 1): [0] * 6,
    }
    for (run, seed), x in outcomes.items():
        _fake_eval(tmp_path / f"seed_{seed}" / "eval" / f"test_{run}.json", x)
    assert be.paired_test(
        [
            json.loads((tmp_path / f"seed_{s}" / "eval" / "test_ptr_q1.json").read_text())
            for s in (0, 1)
        ],
        [
            json.loads((tmp_path / f"seed_{s}" / "eval" / "test_gbc_ft_m0.9.json").read_text())
            for s in (0, 1)
        ],
    ) == (7, 1, pytest.approx(stats.mcnemar_exact_p(7, 1)))
    trace = {"diagnostics": {"q_minus_mc_at_t0": 2.5, "dq_da": [0.1] * 7, "sigma": [0.2] * 7}}
    (tmp_path / "seed_0" / "ptr_q1").mkdir()
    (tmp_path / "seed_0" / "ptr_q1" / "qvalues_00000250.json").write_text(json.dumps(trace))
    be.write_table(p, str(tmp_path), seconds=5400)
    header, row = (tmp_path / "critic_diagnostics.csv").read_text().splitlines()
    assert header.startswith("run,step,q_minus_mc_t0,dq_da_x") and header.endswith("sigma_gripper")
    assert row == "ptr_q1,250,2.5," + ",".join(["0.1"] * 7 + ["0.2"] * 7)
    table = (tmp_path / "results.md").read_text()
    raw = [stats.mcnemar_exact_p(7, 1), stats.mcnemar_exact_p(8, 0), 1.0, 1.0]
    holm = stats.holm(raw)
    assert (
        f"| ptr_critic vs gbc | the critic-driven actor beats matched imitation | 7 | 1 | "
        f"{raw[0]:.2g} | {holm[0]:.2g} |" in table
    )
    assert "**8/12 = 67% [" in table and "Paper (Section V-E" in table
    assert "that ran the jobs: 90 min." in table


def _online_experiment():
    spec = importlib.util.spec_from_file_location(
        "online_experiment", os.path.join(HERE, "scripts", "online_experiment.py")
    )
    oe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(oe)
    return oe


def test_online_experiment_runs_controls_and_evaluations_on_disjoint_seeds(tmp_path):
    oe = _online_experiment()
    paths = dict(offline_ckpt="ft/seed_{seed}/ptr_q10", prior="data/prior", target="data/target")
    p = oe.OnlineProtocol(**paths, env_steps=40, eval_every=20, seeds="0,1", sacfd=1)
    jobs = {job.name: job for job in oe.build_jobs(p, str(tmp_path))}

    def flag(name, key):
        cmd = jobs[name].cmd
        return cmd[cmd.index(key) + 1]

    # every run starts from the checkpoint select_ckpt.py chose in its seed's offline run
    assert flag("s1/calql", "--ckpt") == "SELECTED:ft/seed_1/ptr_q10"
    for run in ("calql", "filtered_bc", "sacfd", "calql_clf"):
        name = f"s0/{run}"
        keys = ("--utd", "--env_steps", "--save_every", "--eval_every", "--seed", "--mix_prior")
        assert [flag(name, k) for k in keys] == ["10", "40", "20", "0", "0", "0.35"]
        assert "--binarize_gripper" in jobs[name].cmd and jobs[name].cmd[-1] == "--resume"
    calql, sacfd = jobs["s0/calql"].cmd, jobs["s0/sacfd"].cmd
    assert flag("s0/calql", "--bc_steps") == str(oe.KEEP_IMITATING) and "--filtered_bc" not in calql
    assert "--filtered_bc" in jobs["s0/filtered_bc"].cmd and "--no-calql" in sacfd
    assert flag("s0/sacfd", "--alpha_online") == "0" and "--bc_steps" not in sacfd
    assert flag("s0/calql_clf", "--classifier") == str(tmp_path / "seed_0" / "classifier.pt")
    assert jobs["s0/calql_clf"].deps == ("s0/clf",) and flag("s0/clf", "--pos_last") == "3"
    collect = jobs["s0/clf_data"].cmd[2].split(" && ")
    assert "--seed 7000" in collect[0] and "--style teleop --imperfect 1" in collect[1]
    # the offline checkpoint and each run's at 20 and 40 env steps, on the same two seed sets
    dev = jobs["s0/eval_dev_calql_000020"].cmd
    assert flag("s0/eval_dev_calql_000020", "--ckpt") == f"FIRST_AT:{tmp_path}/seed_0/calql:20"
    assert flag("s0/eval_dev_calql_000020", "--seed") == "300000" and "--ood" not in dev
    assert "--sample_actions" in dev and jobs["s0/eval_dev_calql_000020"].deps == ("s0/calql",)
    assert flag("s1/eval_ood_offline", "--ood") == "objects"
    assert flag("s1/eval_ood_offline", "--seed") == "400000"
    assert len([name for name in jobs if name.startswith("s0/eval_")]) == 2 * (1 + 4 * 2)
    # no two seed sets overlap: the offline protocol's, the rollouts' (online.rollout_seed)
    assert list(oe.rollout_seeds(p, 1))[5] == online.rollout_seed(1, 5)
    with pytest.raises(SystemExit, match="development seeds 1000..1049 and the offline"):
        oe.build_jobs(dataclasses.replace(p, dev_seed=1000), str(tmp_path))
    with pytest.raises(SystemExit, match="out-of-distribution seeds .* seed 0's rollout"):
        oe.build_jobs(dataclasses.replace(p, ood_seed=1_000_010), str(tmp_path))
    with pytest.raises(SystemExit, match="a multiple of --eval_every 20"):
        oe.build_jobs(dataclasses.replace(p, env_steps=50), str(tmp_path))
    # an online run is done once a checkpoint reaches env_steps; evaluations take the first
    # checkpoint at or after their step
    folder = tmp_path / "seed_0" / "calql"
    folder.mkdir(parents=True)
    (folder / "ckpt_00000023.pt").write_bytes(b"")
    assert not jobs["s0/calql"].done()
    (folder / "ckpt_00000041.pt").write_bytes(b"")
    assert jobs["s0/calql"].done()
    resolved = oe.offline.resolve([f"FIRST_AT:{folder}:20", f"FIRST_AT:{folder}:40"])
    assert resolved == [str(folder / "ckpt_00000023.pt"), str(folder / "ckpt_00000041.pt")]


def test_online_experiment_results_pair_each_run_with_the_offline_start(tmp_path):
    oe = _online_experiment()
    p = oe.OnlineProtocol(offline_ckpt="x.pt", prior="p", target="t", env_steps=20, eval_every=10)
    p.seeds = "0,1"
    outcomes = {
        "offline": [1, 0, 0, 0, 0, 0],
        "calql": [1, 1, 1, 1, 0, 0],
        "filtered_bc": [1, 1, 0, 0, 0, 0],
        "calql_clf": [0, 0, 0, 0, 0, 0],
    }
    for seed in (0, 1):
        for condition in ("dev", "ood"):
            for run, x in outcomes.items():
                labels = ["offline"] if run == "offline" else [f"{run}_000010", f"{run}_000020"]
                for label in labels:
                    _fake_eval(tmp_path / f"seed_{seed}" / "eval" / f"{condition}_{label}.json", x)
    # the classifier's run: one false positive, then a missed success
    episodes = tmp_path / "seed_0" / "calql_clf" / "episodes"
    episodes.mkdir(parents=True)
    np.savez(episodes / "episode_000000.npz", rewards=[0, 1, 1], env_rewards=[0, 0, 1])
    np.savez(episodes / "episode_000001.npz", rewards=[0, 0, 0], env_rewards=[0, 0, 1])
    columns = "step,grad_steps,wall_total_s,wall_rollouts_s,wall_evaluation_s,wall_updates_s"
    (tmp_path / "seed_0" / "calql").mkdir()
    (tmp_path / "seed_0" / "calql" / "progress.csv").write_text(f"{columns}\n21,210,120,6,0,105\n")
    oe.write_results(p, str(tmp_path), seconds=600)
    table = (tmp_path / "results.md").read_text()
    # calql succeeds in 3 episodes of each seed that the offline checkpoint fails, never the reverse
    raw = [stats.mcnemar_exact_p(*bc) for bc in ((6, 0), (2, 0), (0, 2), (4, 0))]
    holm = stats.holm(raw)
    assert f"| calql vs no fine-tuning | 6 | 0 | {raw[0]:.2g} | {holm[0]:.2g} |" in table
    assert f"| calql vs filtered_bc | 4 | 0 | {raw[3]:.2g} | {holm[3]:.2g} |" in table
    assert "| calql | 8/12 = 67% [" in table and "| calql | ood | 2/12 | 8/12 | 8/12 |" in table
    assert "| 0 | - | 6 | 1 (16.7%) | 1 (16.7%) | 1/2 |" in table
    assert "| calql | 0 | 120 s | 6 s | 0 s | 105 s | 3.50 | 2.00 |" in table
    with open(tmp_path / "learning_curve.csv") as f:
        rows = list(csv.DictReader(f))
    calql = [r for r in rows if (r["run"], r["condition"], r["seed"]) == ("calql", "dev", "pooled")]
    assert [(r["env_step"], r["successes"], r["episodes"]) for r in calql] == [
        ("0", "2", "12"),
        ("10", "8", "12"),
        ("20", "8", "12"),
    ]
