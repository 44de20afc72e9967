"""sim_binsort.py: the simulated WidowX 250 bin-sort task of PTR (Kumar et al., RSS 2023, Appendix A
and B.2).

Two bins in front of a WidowX 250 6-DOF in PyBullet. Pre-training data: pick-and-place demos (one of
10 objects into one of the two bins, about 25 steps). Target task: sort two given objects, each into
its own bin, within 80 steps; success only when both lie in their bins. A pick-place scene holds its
object plus DISTRACTORS others (none by default), never both objects of the sort pair, so the pair
never appears together in the prior data.

Design choices (SPEC sections 2, 5, 6, 7):
- The arm is built from the product-of-exponentials kinematics of SPEC 6: each URDF link frame sits
  on its joint's screw axis, world-aligned at zero joints, so PyBullet's end-effector pose IS the
  PoE kinematics.
- Bridge control at 5 Hz: translation delta in the base frame, rotation delta about the end-effector
  position with world-aligned axes (R_target <- Rz Ry Rx @ R_target), gripper absolute (0 closed ..
  1 open). The target pose accumulates from the previous target, is clipped to the workspace and a
  tilt range, and is tracked by damped-least-squares IK plus joint position control (120 Hz
  physics).
- Grasp assist (honest note): friction grasps between box fingers slip at this step rate, so a
  gripper commanded closed (< 0.5) with both fingers on an object attaches it by a fixed constraint;
  opening (>= 0.5) releases it. The fingers still close onto the object, so images and the gripper
  state look like a real grasp. The rule is forgiving: closing with the fingertips up to 3 cm off
  the object's centre and up to 3.5 cm above the table grasps in 177 of 180 attempts over 5 objects
  (scripts/grasp_tolerance.py; results/grasp_tolerance.txt, results/binsort_round2/report.md).
- Bins "left" and "right" as seen in the image (the camera faces the robot: image left = robot's
  right, -y).
- Episodes end at the step limit (truncated: 40 pick-place, 80 sort); terminate_on_success=True
  (default) also ends one at its first successful step, as every rewarded step is terminal offline
  (done = r). Collection stops 3 steps after success, so the 3 steps the Bridge relabelling rewards
  are successful.
- Stages (paper Appendix A: "all methods are able to generally solve the first segment"): every
  step's info["stages"] says which parts of the task hold now: pick-place "grasped", "placed"; sort
  "grasped" (a goal object in the gripper), "first_in_bin" (at least one goal object in its bin),
  "both_in_bins".
- Scripted demos decide from each observation which phase they are in and command that phase on
  the same step: the step that reaches the grasp height closes, the first step holding the object
  lifts. Until round 8 the switch came a step late, so the arm stood at the bottom with "open"
  recorded and then "close" from the same view; a deterministic BC policy averaged the two and
  hovered there (results/binsort_round8/report.md).
- Scripted demos add Gaussian noise of std `noise` (0.1) in normalized action units (fractions of
  each half range): 0.1 -> 5 mm, 0.025 rad, 0.05 of the gripper range.
- `collect --style teleop` (TeleopStyle, TeleopPolicy): demos that look teleoperated, for prior data
  of mixed quality: noise 0.3, pauses, detours the script corrects, and a fraction of attempts kept
  failed or cut short with their zero rewards (data.py marks them failed, batches.py never
  relabels them). Its random draws come from streams of their own (episode_stream).
- Data: the Bridge numpy format (SPEC 5): <out>/<task>/{train,val}/out.npy, tasks
  "pick_duck_to_left", "sort_mug_cube". Usage:
  python sim_binsort.py collect --task pickplace --n 2000 --out data/binsort/prior  (or --task sort
  --n 5)
       python sim_binsort.py show --out strip.png   (speed: scripts/bench_sim.py)
"""

import argparse
import contextlib
import ctypes
import multiprocessing as mp
import os
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from cli import add_dataclass_args, dataclass_from_args
from fileio import atomic_write, bridge_trajectory, write_bridge_file
from widowx import (  # the arm's kinematics (SPEC section 6), shared with robot.py, and its URDF
    ARM_JOINTS,
    FINGER_MAX,
    R_DOWN,
    arm_urdf,
    euler_to_mat,
    fk_and_jacobian,  # noqa: F401 (importable from here, as before)
    mat_to_euler,
    solve_ik,
)


@contextlib.contextmanager
def quiet_stdout():
    """Silence what PyBullet's C code prints to file descriptor 1 ("pybullet build time",
    "argv[0]=")."""
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        libc.fflush(None)  # C stdio buffers what it printed when stdout is a pipe: drop it here
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


with quiet_stdout():
    import pybullet as pb
    import pybullet_data
    from pybullet_utils import bullet_client


# ---------------------------------------------------------------- the task
CONTROL_HZ = 5
PHYSICS_HZ = 120
# Bridge action bounds (SPEC 5); actions are clipped to them
ACTION_LOW = np.array([-0.05] * 3 + [-0.25] * 3 + [0.0])
ACTION_HIGH = np.array([0.05] * 3 + [0.25] * 3 + [1.0])
ACTION_NAMES = ("dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper")
GRIPPER_CLOSED_BELOW = 0.5  # a gripper command under this closes (and grasps), at or above it opens
# the Bridge x and z ranges; y widened to reach both bins
WORKSPACE_LOW = np.array([0.10, -0.30, 0.0])
WORKSPACE_HIGH = np.array([0.41, 0.30, 0.33])
TILT_LIMIT = np.array(
    [0.8, 0.8, 1.6]
)  # |roll|, |pitch|, |yaw| of the target vs pointing down (rad)
START_POS = np.array([0.22, 0.0, 0.18])
BINS = {"left": np.array([0.25, -0.18]), "right": np.array([0.25, 0.18])}  # as seen in the image
BIN_SCALE = 0.22  # pybullet_data's traybox scaled to 13 cm
BIN_INNER = 0.058  # half width counted as "in the bin"
IN_BIN_MAX_Z = 0.08  # an object above this is falling or carried, not in a bin
SPAWN_LOW = np.array([0.19, -0.06])
SPAWN_HIGH = np.array([0.32, 0.06])
# Out-of-distribution starts (BinSortEnv(ood=...), online.py --ood): does a policy act where its
# data never started? "objects": spawned in a strip nearer the camera than SPAWN_LOW..SPAWN_HIGH,
# beyond the bins' far edge (x 0.315) and inside the workspace, so every object stays reachable
# (the scripted sort solves 8 of 8 such scenes); "arm": the episode starts with the end effector
# drawn from a box above START_POS's height, off to either side; "both". collect never sets ood,
# so no prior or target demo starts there.
OOD_STARTS = ("none", "objects", "arm", "both")
OOD_SPAWN_LOW = np.array([0.345, -0.09])
OOD_SPAWN_HIGH = np.array([0.395, 0.09])
OOD_ARM_LOW = np.array([0.26, -0.10, 0.22])
OOD_ARM_HIGH = np.array([0.34, 0.10, 0.28])
MIN_GAP = 0.08  # between spawned objects, so that each can be grasped alone
GRASP_MARGIN = 0.007  # clearance a side between an object's long side and the open fingers
# Other objects in a pick-place scene. None by default: with one, a 64 px policy must also tell the
# commanded object from the other before it can learn where it is, and at laptop scale it does not
# (multi-task BC after 20k steps still reached for the average position;
# results/binsort_round3/report.md).
DISTRACTORS = 0
# name -> (pybullet_data URDF, scale, RGBA or None to keep the texture).
# No "_" in names: task names are split at "_".
# Scales: every object at most 6 cm long as loaded, so that it fits the 7.4 cm opening with
# GRASP_MARGIN a side whatever its yaw, and the demos never turn the gripper. At the old sizes the
# mug (7.5 cm with its handle), stick (7.0) and jenga block (6.8) had to be grasped at one yaw,
# which a 64 px policy must read from the image, and learned policies grasped the mug in 0-8 of
# 25 episodes (results/binsort_round4/report.md).
OBJECTS = {
    "cube": ("cube_small.urdf", 0.9, (0.85, 0.1, 0.1, 1)),
    "duck": ("duck_vhacd.urdf", 0.45, None),
    "lego": ("lego/lego.urdf", 1.4, (0.1, 0.7, 0.2, 1)),
    "mug": ("objects/mug.urdf", 0.38, (0.95, 0.95, 0.95, 1)),
    "ball": ("sphere_small.urdf", 0.8, (0.15, 0.3, 0.95, 1)),
    "teddy": ("teddy_vhacd.urdf", 0.44, (0.55, 0.3, 0.1, 1)),
    "jenga": ("jenga/jenga.urdf", 0.38, (1.0, 0.55, 0.0, 1)),
    "soccer": ("soccerball.urdf", 0.05, None),
    "blob": ("random_urdfs/000/000.urdf", 0.38, (0.6, 0.15, 0.75, 1)),
    "stick": ("block.urdf", 0.6, (0, 0.85, 0.85, 1)),
}
# the target task: mug -> left bin, cube -> right bin (the paper's pair: cylinder, teapot)
SORT_PAIR = ("mug", "cube")
# about 1.7 times a scripted demo's length (28 and 60 steps): room for a learned policy to retry a
# missed grasp, which the demos show
MAX_STEPS = {"pick": 50, "sort": 100}
STAGES = {"pick": ("grasped", "placed"), "sort": ("grasped", "first_in_bin", "both_in_bins")}
# scripted policy heights of the fingertips (m)
HOVER_Z = 0.13
CARRY_Z = 0.13
RELEASE_Z = 0.10


# ---------------------------------------------------------------- tasks
def _check_action(action):
    try:
        a = np.asarray(action, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(
            "sim_binsort.py: action must be a 7-d numeric vector %s, got %s" % (ACTION_NAMES, e)
        ) from None
    if a.shape != (7,):
        raise ValueError(
            "sim_binsort.py: action must have shape (7,) %s, got shape %s" % (ACTION_NAMES, a.shape)
        )
    bad = np.flatnonzero(~np.isfinite(a))
    if bad.size:
        raise ValueError(
            "sim_binsort.py: action[%d] (%s) must be finite, got %s"
            % (bad[0], ACTION_NAMES[bad[0]], float(a[bad[0]]))
        )
    return a


def parse_task(task, sort_pair=SORT_PAIR):
    """pickplace (drawn per episode) | pick_<obj>_to_<bin> | sort | sort_<a>_<b>
    -> (kind, {object: bin} or None)."""
    if task == "pickplace":
        return "pick", None
    parts = ["sort", *sort_pair] if task == "sort" else str(task).split("_")
    is_pick = len(parts) == 4 and parts[0] == "pick" and parts[2] == "to"
    if is_pick and parts[1] in OBJECTS and parts[3] in BINS:
        return "pick", {parts[1]: parts[3]}
    is_sort = len(parts) == 3 and parts[0] == "sort" and parts[1] != parts[2]
    if is_sort and parts[1] in OBJECTS and parts[2] in OBJECTS:
        return "sort", {parts[1]: "left", parts[2]: "right"}
    raise ValueError(
        "sim_binsort.py: task must be 'pickplace', 'pick_<object>_to_<left|right>', 'sort' or "
        "'sort_<a>_<b>' with two different objects from %s, got %r (sort pair %s)"
        % (sorted(OBJECTS), task, sort_pair)
    )


def task_name(kind, goal):
    if kind == "pick":
        return "pick_%s_to_%s" % next(iter(goal.items()))
    return "sort_%s_%s" % tuple(goal)


def choose_scene(rng, goal, num_distractors, sort_pair):
    """The goal objects plus distractors; a pick-place scene never holds both objects of the sort
    pair."""
    scene = list(goal)
    if len(goal) > 1:  # the sort scene: its two objects only
        return scene
    a, b = sort_pair
    for _ in range(num_distractors):
        partners = {b if o == a else a for o in scene if o in sort_pair}
        options = sorted(set(OBJECTS) - set(scene) - partners)
        if options:
            scene.append(options[rng.integers(len(options))])
    return scene


def grasp_yaw(extent):
    """Gripper yaw that closes the fingers across the short side of an object too long to fit the
    opening lengthwise (AABB extent as loaded), or None for one that fits at any yaw."""
    if max(extent[0], extent[1]) <= 2 * (FINGER_MAX - GRASP_MARGIN):
        return None
    return 0.0 if extent[0] > extent[1] else np.pi / 2


def task_stages(kind, goal, in_bin, held):
    """Which stages of the task hold now (see the module docstring), from info()'s in_bin and
    held."""
    placed = [in_bin[name] == bin_name for name, bin_name in goal.items()]
    stages = {"grasped": held in goal}
    if kind == "pick":
        stages["placed"] = all(placed)
    else:
        stages["first_in_bin"] = any(placed)
        stages["both_in_bins"] = all(placed)
    return stages


# ---------------------------------------------------------------- the environment
class BinSortEnv:
    """reset(seed=None, task=None) -> obs; step(action) -> (obs, reward, terminated, truncated,
    info); close(). obs = {"image": uint8 (H, W, 3), "state": float32 (7,): xyz, euler relative to
    pointing down, gripper 0..1}. task: see parse_task. ood: one of OOD_STARTS, where episodes
    start ("none": where the data's did, drawing the same numbers as always). Attributes client,
    arm, arm_joints, ee_link, objects, spawn_xy (where each object was placed), target_pos /
    target_R are for tools and tests."""

    def __init__(
        self,
        task="sort",
        image_size=128,
        max_steps=None,
        num_distractors=DISTRACTORS,
        sort_pair=SORT_PAIR,
        terminate_on_success=True,
        seed=None,
        ood="none",
    ):
        if ood not in OOD_STARTS:
            raise ValueError(f"sim_binsort.py: ood must be one of {OOD_STARTS}, got {ood!r}")
        self.ood = ood
        self.task = task
        self.sort_pair = tuple(sort_pair)
        parse_task(task, self.sort_pair)  # fail early on a bad name
        self.image_size = int(image_size)
        self.max_steps_arg = max_steps
        self.num_distractors = num_distractors
        self.terminate_on_success = terminate_on_success
        self._rng = np.random.default_rng(seed)
        self._t = None  # the step count of the running episode; None: reset() needed
        with quiet_stdout():
            self.client = bullet_client.BulletClient(connection_mode=pb.DIRECT)
        self._urdf = arm_urdf()
        # roughly the Bridge view: across the table, to the side, down at the bins and the arm
        self._view = pb.computeViewMatrix([0.58, 0.14, 0.50], [0.24, 0.0, 0.0], [0, 0, 1])
        self._proj = pb.computeProjectionMatrixFOV(48, 1.0, 0.05, 3.0)

    @property
    def pb(self):
        """The PyBullet client (the older name of `client`, kept for tools written against it)."""
        return self.client

    def _build(self, scene):
        client = self.client
        # a fresh world per episode: episodes are independent of what ran before
        client.resetSimulation()
        client.setAdditionalSearchPath(pybullet_data.getDataPath())
        client.setGravity(0, 0, -9.81)
        client.setTimeStep(1.0 / PHYSICS_HZ)
        half = [0.5, 0.6, 0.02]
        table = client.createMultiBody(
            0,
            client.createCollisionShape(pb.GEOM_BOX, halfExtents=half),
            client.createVisualShape(
                pb.GEOM_BOX, halfExtents=half, rgbaColor=[0.62, 0.58, 0.52, 1]
            ),
            [0.3, 0, -0.02],
        )
        client.changeDynamics(table, -1, lateralFriction=1.0)
        # PyBullet loads URDFs from files only
        with tempfile.NamedTemporaryFile("w", suffix=".urdf") as f:
            f.write(self._urdf)
            f.flush()
            self.arm = client.loadURDF(f.name, useFixedBase=True)
        joint_ids = {}
        for j in range(client.getNumJoints(self.arm)):
            joint_ids[client.getJointInfo(self.arm, j)[1].decode()] = j
        self.arm_joints = [joint_ids[name] for name in ARM_JOINTS]
        self.ee_link = joint_ids["ee_gripper"]
        self.fingers = [joint_ids["left_finger"], joint_ids["right_finger"]]
        for finger in self.fingers:
            client.changeDynamics(self.arm, finger, lateralFriction=1.5)
        for xy in BINS.values():
            tray = client.loadURDF(
                "tray/traybox.urdf", [*xy, 0], globalScaling=BIN_SCALE, useFixedBase=True
            )
            client.changeVisualShape(tray, -1, rgbaColor=[0.45, 0.5, 0.6, 1], textureUniqueId=-1)
        self.objects = {}
        self.grasp_yaw = {}
        self.spawn_xy = {}
        placed = []
        low, high = (SPAWN_LOW, SPAWN_HIGH)
        if self.ood in ("objects", "both"):
            low, high = (OOD_SPAWN_LOW, OOD_SPAWN_HIGH)
        for name in scene:
            urdf, scale, rgba = OBJECTS[name]
            for _ in range(100):  # rejection sampling keeps the objects MIN_GAP apart
                xy = self._rng.uniform(low, high)
                if all(np.linalg.norm(xy - p) > MIN_GAP for p in placed):
                    break
            placed.append(xy)
            self.spawn_xy[name] = xy
            body = client.loadURDF(urdf, [0, 0, 0], globalScaling=scale)
            lo, hi = np.array(client.getAABB(body))
            self.grasp_yaw[name] = grasp_yaw(hi - lo)
            orn = pb.getQuaternionFromEuler([0, 0, self._rng.uniform(-np.pi, np.pi)])
            client.resetBasePositionAndOrientation(body, [xy[0], xy[1], 0.002 - lo[2]], orn)
            if rgba is not None:  # flat colours keep the objects distinguishable at 64x64
                client.changeVisualShape(body, -1, rgbaColor=rgba, textureUniqueId=-1)
            client.changeDynamics(
                body, -1, lateralFriction=1.0, rollingFriction=0.001, spinningFriction=0.001
            )
            self.objects[name] = body

    def reset(self, seed=None, task=None):
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        kind, goal = parse_task(task or self.task, self.sort_pair)
        if goal is None:  # pickplace: an object and a bin drawn for this episode
            obj = sorted(OBJECTS)[self._rng.integers(len(OBJECTS))]
            goal = {obj: sorted(BINS)[self._rng.integers(len(BINS))]}
        self.kind = kind
        self.goal = goal
        self.task_name = task_name(kind, goal)
        self.max_steps = self.max_steps_arg or MAX_STEPS[kind]
        self._build(choose_scene(self._rng, goal, self.num_distractors, self.sort_pair))
        self.target_pos = START_POS.copy()
        if self.ood in ("arm", "both"):  # drawn after the scene, so its objects lie as without
            self.target_pos = self._rng.uniform(OOD_ARM_LOW, OOD_ARM_HIGH)
        self.target_R = R_DOWN.copy()
        self._q = solve_ik(self.target_pos, self.target_R, [0, 0, 0, 0, np.pi / 2, 0], iters=100)
        self._grip = 1.0
        self.held = None
        self._grasp_constraint = None
        self._t = 0
        for j, qj in zip(self.arm_joints + self.fingers, [*self._q, FINGER_MAX, FINGER_MAX]):
            self.client.resetJointState(self.arm, j, qj)
        self._drive()
        for _ in range(PHYSICS_HZ // 10):  # let the objects settle
            self.client.stepSimulation()
        return self._obs()

    def _drive(self):
        client = self.client
        for j, qj in zip(self.arm_joints, self._q):
            # gain 0.3 reaches a 5 Hz target within one control step
            client.setJointMotorControl2(
                self.arm, j, pb.POSITION_CONTROL, qj, force=60, maxVelocity=np.pi, positionGain=0.3
            )
        # with an object attached the fingers keep their width: squeezing on would push the object
        # out of the constraint
        if self.held is not None:
            width = self._hold_width
        else:
            width = self._grip * FINGER_MAX
        for finger in self.fingers:
            client.setJointMotorControl2(
                self.arm, finger, pb.POSITION_CONTROL, width, force=20, maxVelocity=0.4
            )

    def _try_grasp(self):
        client = self.client
        # the link's centre-of-mass frame: constraints are expressed in it
        ee_pos, ee_orn = client.getLinkState(self.arm, self.ee_link)[:2]
        touching = []
        for name, body in self.objects.items():
            contacts = [
                client.getClosestPoints(self.arm, body, 0.003, linkIndexA=finger)
                for finger in self.fingers
            ]
            if all(contacts):
                touching.append((np.linalg.norm(self.object_position(name) - ee_pos), name))
        if not touching:
            return
        # both fingers on it; of two such objects the one nearer the fingertips
        self.held = min(touching)[1]
        pos, orn = client.getBasePositionAndOrientation(self.objects[self.held])
        rel_pos, rel_orn = client.multiplyTransforms(
            *client.invertTransform(ee_pos, ee_orn), pos, orn
        )
        self._grasp_constraint = client.createConstraint(
            self.arm,
            self.ee_link,
            self.objects[self.held],
            -1,
            pb.JOINT_FIXED,
            [0, 0, 0],
            rel_pos,
            [0, 0, 0],
            rel_orn,
        )
        client.changeConstraint(self._grasp_constraint, maxForce=500)
        self._hold_width = np.mean([client.getJointState(self.arm, f)[0] for f in self.fingers])
        self._drive()

    def step(self, action):
        if self._t is None:
            raise RuntimeError(
                "sim_binsort.py: call reset() before step() (and again after an episode ends)"
            )
        a = np.clip(_check_action(action), ACTION_LOW, ACTION_HIGH)
        self.target_pos = np.clip(self.target_pos + a[:3], WORKSPACE_LOW, WORKSPACE_HIGH)
        # world-aligned rotation axes: the delta left-multiplies the target orientation
        relative = mat_to_euler(euler_to_mat(a[3:6]) @ self.target_R @ R_DOWN.T)
        self.target_R = euler_to_mat(np.clip(relative, -TILT_LIMIT, TILT_LIMIT)) @ R_DOWN
        self._q = solve_ik(self.target_pos, self.target_R, self._q)
        self._grip = float(a[6])
        closed = self._grip < GRIPPER_CLOSED_BELOW
        if not closed and self.held is not None:
            self.client.removeConstraint(self._grasp_constraint)
            self.held = None
            self._grasp_constraint = None
        self._drive()
        for i in range(PHYSICS_HZ // CONTROL_HZ):
            self.client.stepSimulation()
            if closed and self.held is None and i % 4 == 3:
                self._try_grasp()
        self._t += 1
        info = self.info()
        terminated = info["success"] and self.terminate_on_success
        truncated = self._t >= self.max_steps and not terminated
        obs = self._obs()
        if terminated or truncated:
            self._t = None
        return obs, float(info["success"]), terminated, truncated, info

    def ee_pose(self):
        link = self.client.getLinkState(self.arm, self.ee_link, computeForwardKinematics=True)
        return np.array(link[4]), np.array(pb.getMatrixFromQuaternion(link[5])).reshape(3, 3)

    def _obs(self):
        pos, R = self.ee_pose()
        fingers = [self.client.getJointState(self.arm, f)[0] for f in self.fingers]
        grip = np.clip(np.mean(fingers) / FINGER_MAX, 0, 1)
        state = np.concatenate([pos, mat_to_euler(R @ R_DOWN.T), [grip]]).astype(np.float32)
        return {"image": self.render(), "state": state}

    def render(self):
        n = self.image_size
        rgba = self.client.getCameraImage(
            n,
            n,
            self._view,
            self._proj,
            lightDirection=[0.4, -0.3, 1.0],
            shadow=0,
            flags=pb.ER_NO_SEGMENTATION_MASK,
            renderer=pb.ER_TINY_RENDERER,
        )[2]
        return np.asarray(rgba, dtype=np.uint8).reshape(n, n, 4)[:, :, :3].copy()

    def object_position(self, name):
        return np.array(self.client.getBasePositionAndOrientation(self.objects[name])[0])

    def _bin_of(self, name):
        """The bin an object lies in, or None (in no bin, held, or still above the bins)."""
        p = self.object_position(name)
        if name == self.held or p[2] >= IN_BIN_MAX_Z:
            return None
        for bin_name, xy in BINS.items():
            if np.all(np.abs(p[:2] - xy) < BIN_INNER):
                return bin_name
        return None

    def info(self):
        """success, which object lies in which bin (None: in no bin, or held), the held object, the
        stages that hold now (task_stages), task name, step."""
        in_bin = {name: self._bin_of(name) for name in self.objects}
        return {
            "success": all(in_bin[name] == bin_name for name, bin_name in self.goal.items()),
            "in_bin": in_bin,
            "held": self.held,
            "stages": task_stages(self.kind, self.goal, in_bin, self.held),
            "task": self.task_name,
            "step": self._t,
        }

    def close(self):
        if getattr(self, "client", None) is not None:
            self.client.disconnect()
            self.client = None


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

    def __init__(self, env, noise=0.1, rng=None, max_step=0.025, first=None):
        self.env = env
        self.noise = noise
        self.max_step = max_step
        self.rng = np.random.default_rng(rng)
        # Sort demos place the objects in one fixed order: `first` (an object of the goal), then
        # the other; by default the goal's order (the mug, then the cube). With either order at
        # random, 5 demos show each second segment (from one bin to the other object) only two or
        # three times, and a policy after the first object wandered (round 4).
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
            yaw = pb.getEulerFromQuaternion(orn)[2]
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


# The parts of an episode that draw from random streams of their own (episode_stream)
TELEOP_STREAM = 1  # the operator's pauses and detours
CUT_STREAM = 2  # the step at which an imperfect attempt is cut short


def episode_stream(seed, part):
    """A random generator for one part of an episode, derived from the episode's seed as a stream
    of its own: the scripted policy's noise draws stay those of the scripted episode."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(part,)))


def run_episode(
    env, task, seed, noise=0.1, extra_success_steps=2, first=None, teleop=None, max_steps=None
):
    """One scripted episode (reset included), stopped `extra_success_steps` steps after the task is
    first solved; seed: int or list of ints; first: see ScriptedPolicy. teleop: a TeleopStyle, whose
    TeleopPolicy wraps the scripted policy (and whose teleop_noise replaces `noise`); max_steps: stop
    after this many steps at the latest (an attempt cut short; the env's limit holds too). Returns
    (T + 1 observations, actions (T, 7), rewards (T,), success at the end).
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
    """The env.reset seed that run_episode(env, task, seed) used."""
    return int(np.random.SeedSequence(seed).generate_state(2)[0])


def replay_actions(env, task, seed, actions):
    """Open loop: reset as run_episode(env, task, seed) did and execute the recorded actions.
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
_WORKER = {}  # the environment of this (worker) process, made by its first job
OUTCOMES = ("success", "failed", "partial")  # what a kept attempt was (collect's summary)


class _Job(NamedTuple):
    """One demo to collect: a job of the worker pool (collect's arguments, and this demo's place)."""

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
        observations, actions, rewards, ok = run_episode(
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
    """The run_episode seed of one collected demo."""
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


def collect(
    task,
    n,
    out,
    seed=0,
    workers=1,
    image_size=128,
    noise=0.1,
    keep_failures=False,
    val_frac=0.1,
    min_val=3,
    sort_pair=SORT_PAIR,
    num_distractors=DISTRACTORS,
    max_attempts=20,
    log=sys.stderr,
    first=None,
    teleop=None,
):
    """Scripted demos into <out>/<task name>/{train,val}/out.npy. The n training demos are split
    evenly over the tasks; each task also gets max(min_val, round(val_frac * its n)) held-out demos.
    first: the object sort demos place first (ScriptedPolicy). teleop: a TeleopStyle for demos that
    look teleoperated (--style teleop), a fraction teleop.imperfect of each split's demos imperfect
    attempts kept with their zero rewards (imperfect_demos); None: the scripted style. Returns a
    summary, with the count of each outcome (OUTCOMES) of the kept demos."""
    parse_task(
        "sort_" + "_".join(sort_pair), sort_pair
    )  # a bad --sort_pair fails here, not in a worker
    if task == "pickplace":  # the 20 tasks
        names = ["pick_%s_to_%s" % (obj, bin_name) for obj in OBJECTS for bin_name in BINS]
    else:
        names = [task_name(*parse_task(task, sort_pair))]
    env_kwargs = {
        "image_size": image_size,
        "sort_pair": sort_pair,
        "num_distractors": num_distractors,
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
            noise=noise,
            keep_failures=keep_failures,
            max_attempts=max_attempts,
            env_kwargs=env_kwargs,
            first=first,
            teleop=teleop,
            imperfect=(name, split, i) in imperfect,
        )
        jobs.append(job)
    # spawn, not fork: a forked PyBullet client is not safe
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
def show(out, task="sort", seed=0, image_size=128, frames=12, noise=0.1):
    """A PNG film strip (one row, 2 px white gaps) of one scripted episode."""
    from PIL import Image  # pillow: only this subcommand needs it

    env = BinSortEnv(task, image_size, terminate_on_success=False)
    observations, actions, _, ok = run_episode(env, task, seed, noise)
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
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--image_size", type=int, default=128)
    common.add_argument(
        "--noise",
        type=float,
        default=0.1,
        help="action noise std in normalized action units (--style teleop: --teleop_noise)",
    )
    c = sub.add_parser(
        "collect", parents=[common], help="scripted demos in the Bridge numpy format"
    )
    c.add_argument(
        "--task", default="pickplace", help="pickplace | sort | pick_<obj>_to_<bin> | sort_<a>_<b>"
    )
    c.add_argument(
        "--n", type=int, required=True, help="training demos in all, split evenly over the tasks"
    )
    c.add_argument("--out", required=True)
    c.add_argument("--workers", type=int, default=1)
    c.add_argument(
        "--keep_failures",
        action="store_true",
        help="keep failed first attempts (their rewards key is 0)",
    )
    c.add_argument("--val_frac", type=float, default=0.1)
    c.add_argument("--min_val", type=int, default=3, help="held-out demos per task at least")
    c.add_argument(
        "--sort_pair",
        default=",".join(SORT_PAIR),
        help="a,b: a goes to the left bin, b to the right",
    )
    c.add_argument(
        "--distractors",
        type=int,
        default=DISTRACTORS,
        help="distractor objects in pick-place scenes",
    )
    c.add_argument("--max_attempts", type=int, default=20)
    c.add_argument(
        "--first",
        default=None,
        help="sort demos: the object placed first (default: the sort pair's first, the left one)",
    )
    c.add_argument(
        "--style",
        choices=("scripted", "teleop"),
        default="scripted",
        help="scripted demos, or demos that look teleoperated (the TeleopStyle flags below)",
    )
    add_dataclass_args(c.add_argument_group("--style teleop (TeleopStyle)"), TeleopStyle)
    s = sub.add_parser("show", parents=[common], help="PNG film strip of one scripted episode")
    s.add_argument("--out", default="strip.png")
    s.add_argument("--task", default="sort")
    s.add_argument("--frames", type=int, default=12)
    # prefix "+": every flag after `twin` is twin.py's, passed on as it is
    t = sub.add_parser("twin", prefix_chars="+", help="python twin.py: the arm behind a pty")
    t.add_argument("twin_args", nargs="*", help="twin.py's flags (python twin.py -h)")
    args = ap.parse_args(argv)
    if args.cmd == "twin":  # twin.py imports this file: imported here, when asked for
        import twin
        from cli import run_cli

        run_cli(twin.main, args.twin_args)
    if args.cmd == "collect":
        teleop = dataclass_from_args(TeleopStyle, args) if args.style == "teleop" else None
        summary = collect(
            args.task,
            args.n,
            args.out,
            args.seed,
            args.workers,
            args.image_size,
            args.noise,
            args.keep_failures,
            args.val_frac,
            args.min_val,
            tuple(args.sort_pair.split(",")),
            args.distractors,
            args.max_attempts,
            first=args.first,
            teleop=teleop,
        )
        print(collect_report(summary, args.out, teleop))
    else:
        show(args.out, args.task, args.seed, args.image_size, args.frames, args.noise)


if __name__ == "__main__":
    main()
