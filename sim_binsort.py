"""sim_binsort.py: the simulated WidowX 250 bin-sort task of PTR (Kumar et al., RSS 2023, Appendix A and B.2).

Two bins in front of a WidowX 250 6-DOF in PyBullet. Pre-training data: pick-and-place demos (one of 10 objects into
one of the two bins, 30-40 steps). Target task: sort two given objects, each into its own bin, within 80 steps;
success only when both lie in their bins. A pick-place scene holds its object plus distractors, never both objects
of the sort pair, so the pair never appears together in the prior data.

Design choices (SPEC sections 2, 5, 6, 7):
- The arm is built from the product-of-exponentials kinematics of SPEC 6: each URDF link frame sits on its joint's
  screw axis, world-aligned at zero joints, so PyBullet's end-effector pose IS the PoE forward kinematics.
- Bridge control at 5 Hz: translation delta in the base frame, rotation delta about the end-effector position with
  world-aligned axes (R_target <- Rz Ry Rx @ R_target), gripper absolute (0 closed .. 1 open). The target pose
  accumulates from the previous target, is clipped to the workspace and a tilt range, and is tracked by
  damped-least-squares IK plus joint position control (120 Hz physics).
- Grasp assist (honest note): friction grasps between box fingers slip at this step rate, so a gripper commanded
  closed (< 0.5) with both fingers on an object attaches it by a fixed constraint; opening (>= 0.5) releases it.
  The fingers still close onto the object, so images and the gripper state look like a real grasp.
- Bins "left" and "right" as seen in the image (the camera faces the robot: image left = robot's right, -y).
- Episodes end at the step limit (truncated: 40 pick-place, 80 sort); terminate_on_success=True (default) also ends
  one at its first successful step, as every rewarded step is terminal offline (done = r). Collection stops 3 steps
  after success, so the 3 steps the Bridge relabelling rewards are successful (sort demos: ~60 steps, not 80).
- Scripted demos add Gaussian noise of std `noise` (0.1) in normalized action units (fractions of each half range):
  0.1 -> 5 mm, 0.025 rad, 0.05 of the gripper range.
Data: the Bridge numpy format (SPEC 5): <out>/<task>/{train,val}/out.npy, tasks "pick_duck_to_left", "sort_mug_cube".
Usage: python sim_binsort.py collect --task pickplace --n 2000 --out data/binsort/prior   (or --task sort --n 5)
       python sim_binsort.py show --out strip.png;   python sim_binsort.py bench
"""

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time
import timeit
import zlib

import numpy as np
import pybullet as pb
import pybullet_data
from pybullet_utils import bullet_client

from widowx import (  # the arm's kinematics (SPEC section 6), shared with robot.py
    JOINT_HIGH,
    JOINT_LOW,
    M_HOME,
    R_DOWN,
    SCREW_AXES,
    euler_to_mat,
    fk_and_jacobian,  # noqa: F401 (importable from here, as before)
    mat_to_euler,
    solve_ik,
)
from widowx import cross3 as _cross

# ---------------------------------------------------------------- the arm (SPEC section 6)
JOINT_ALONG_AXIS = [
    0.072,
    0.0,
    0.0,
    0.14975,
    0.0,
    0.36475,
]  # where each joint sits on its axis: looks only
FINGER_MAX = 0.037  # m of travel per finger: a 7.4 cm opening
ARM_JOINTS = ("waist", "shoulder", "elbow", "forearm_roll", "wrist_angle", "wrist_rotate")
# ---------------------------------------------------------------- the task
CONTROL_HZ, PHYSICS_HZ = 5, 120
ACTION_LOW = np.array(
    [-0.05] * 3 + [-0.25] * 3 + [0.0]
)  # Bridge action bounds (SPEC 5); actions are clipped
ACTION_HIGH = np.array([0.05] * 3 + [0.25] * 3 + [1.0])
ACTION_NAMES = ("dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper")
WORKSPACE_LOW = np.array(
    [0.10, -0.30, 0.0]
)  # the Bridge x and z ranges; y widened to reach both bins
WORKSPACE_HIGH = np.array([0.41, 0.30, 0.33])
TILT_LIMIT = np.array(
    [0.8, 0.8, 1.6]
)  # |roll|, |pitch|, |yaw| of the target relative to pointing down (rad)
START_POS = np.array([0.22, 0.0, 0.18])
BINS = {"left": np.array([0.25, -0.18]), "right": np.array([0.25, 0.18])}  # as seen in the image
BIN_SCALE, BIN_INNER = (
    0.22,
    0.058,
)  # pybullet_data's traybox scaled to 13 cm; half width counted as "in"
SPAWN_LOW, SPAWN_HIGH, MIN_GAP = np.array([0.19, -0.06]), np.array([0.32, 0.06]), 0.08
# name -> (pybullet_data URDF, scale, RGBA or None to keep the texture). No "_" in names: task names parse.
OBJECTS = {
    "cube": ("cube_small.urdf", 0.9, (0.85, 0.1, 0.1, 1)),
    "duck": ("duck_vhacd.urdf", 0.6, None),
    "lego": ("lego/lego.urdf", 1.6, (0.1, 0.7, 0.2, 1)),
    "mug": ("objects/mug.urdf", 0.55, (0.95, 0.95, 0.95, 1)),
    "ball": ("sphere_small.urdf", 0.8, (0.15, 0.3, 0.95, 1)),
    "teddy": ("teddy_vhacd.urdf", 0.6, (0.55, 0.3, 0.1, 1)),
    "jenga": ("jenga/jenga.urdf", 0.45, (1.0, 0.55, 0.0, 1)),
    "soccer": ("soccerball.urdf", 0.05, None),
    "blob": ("random_urdfs/000/000.urdf", 0.5, (0.6, 0.15, 0.75, 1)),
    "stick": ("block.urdf", 0.7, (0, 0.85, 0.85, 1)),
}
SORT_PAIR = (
    "mug",
    "cube",
)  # the target task: mug -> left bin, cube -> right bin (the paper: cylinder, teapot)
MAX_STEPS = {"pick": 40, "sort": 80}
HOVER_Z, CARRY_Z, RELEASE_Z = 0.13, 0.13, 0.10  # scripted policy heights of the fingertips (m)


# ---------------------------------------------------------------- the arm as a URDF built from the screw axes
def _box(center, size, rpy=(0, 0, 0), rgba=(0.15, 0.15, 0.15, 1)):
    o = '<origin xyz="%g %g %g" rpy="%g %g %g"/>' % (*center, *rpy)
    g = '<geometry><box size="%g %g %g"/></geometry>' % tuple(size)
    name = "c%02x%02x%02x" % tuple(int(255 * x) for x in rgba[:3])  # one material name per colour
    return (
        '<visual>%s%s<material name="%s"><color rgba="%g %g %g %g"/></material></visual>'
        "<collision>%s%s</collision>" % (o, g, name, *rgba, o, g)
    )


def arm_urdf():
    """The wx250s as a URDF string: joint i at a point of the axis of S_i, axis w_i, link frames world-aligned."""
    points = [
        _cross(S[:3], S[3:]) + s * S[:3] for S, s in zip(SCREW_AXES, JOINT_ALONG_AXIS)
    ]  # w x v: on the axis
    link = lambda name, body, mass=0.2: (
        '<link name="%s"><inertial><origin xyz="0 0 0"/><mass value="%g"/><inertia ixx="1e-3" ixy="0" ixz="0" '
        'iyy="1e-3" iyz="0" izz="1e-3"/></inertial>%s</link>' % (name, mass, body)
    )
    joint = lambda name, kind, parent, child, xyz, axis="1 0 0", lim="": (
        '<joint name="%s" type="%s"><parent link="%s"/><child link="%s"/><origin xyz="%g %g %g"/>'
        '<axis xyz="%s"/>%s</joint>' % (name, kind, parent, child, *xyz, axis, lim)
    )
    beam = lambda b, width: _box(
        np.divide(b, 2), (width, width, np.linalg.norm(b)), (0, np.arctan2(b[0], b[2]), 0)
    )
    x_ee, grey = M_HOME[0] - points[5][0], (0.45, 0.45, 0.5, 1)
    bodies = [
        _box((0, 0, -0.036), (0.12, 0.12, 0.07)) + _box((0, 0, 0.02), (0.07, 0.09, 0.04)),
        beam(points[2] - points[1], 0.04),
        beam(points[3] - points[2], 0.045),
        beam(points[4] - points[3], 0.04),
        beam(points[5] - points[4], 0.035),
        _box((x_ee - 0.062, 0, 0), (0.033, 0.09, 0.028), rgba=grey),
    ]
    names = ["shoulder", "upper_arm", "upper_forearm", "lower_forearm", "wrist", "gripper"]
    parts = [
        '<robot name="wx250s">',
        link("base_link", _box((0, 0, 0.03), (0.14, 0.14, 0.06)), 0.0),
    ]
    parent, prev = "base_link", np.zeros(3)
    for i in range(6):
        lim = '<limit lower="%g" upper="%g" effort="50" velocity="3.14159"/>' % (
            JOINT_LOW[i],
            JOINT_HIGH[i],
        )
        child, axis = names[i] + "_link", "%g %g %g" % tuple(SCREW_AXES[i, :3])
        parts += [
            link(child, bodies[i]),
            joint(ARM_JOINTS[i], "revolute", parent, child, points[i] - prev, axis, lim),
        ]
        parent, prev = child, points[i]
    parts += [
        link("ee_gripper_link", "", 0.001),
        joint("ee_gripper", "fixed", parent, "ee_gripper_link", (x_ee, 0, 0)),
    ]
    lim = '<limit lower="0" upper="%g" effort="20" velocity="0.4"/>' % FINGER_MAX
    for side, sgn in (
        ("left", 1),
        ("right", -1),
    ):  # finger inner faces at y = +-q: touching when closed
        finger = _box((x_ee - 0.0225, sgn * 0.006, 0), (0.045, 0.012, 0.024), rgba=grey)
        parts += [
            link(side + "_finger_link", finger, 0.03),
            joint(
                side + "_finger",
                "prismatic",
                parent,
                side + "_finger_link",
                (0, 0, 0),
                "0 %d 0" % sgn,
                lim,
            ),
        ]
    return "".join(parts) + "</robot>"


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
    """pickplace (drawn per episode) | pick_<obj>_to_<bin> | sort | sort_<a>_<b> -> (kind, {object: bin} or None)."""
    parts = ["sort", *sort_pair] if task == "sort" else str(task).split("_")
    if task == "pickplace":
        return "pick", None
    if (
        len(parts) == 4
        and parts[0] == "pick"
        and parts[2] == "to"
        and parts[1] in OBJECTS
        and parts[3] in BINS
    ):
        return "pick", {parts[1]: parts[3]}
    if (
        len(parts) == 3
        and parts[0] == "sort"
        and parts[1] in OBJECTS
        and parts[2] in OBJECTS
        and parts[1] != parts[2]
    ):
        return "sort", {parts[1]: "left", parts[2]: "right"}
    raise ValueError(
        "sim_binsort.py: task must be 'pickplace', 'pick_<object>_to_<left|right>', 'sort' or "
        "'sort_<a>_<b>' with two different objects from %s, got %r (sort pair %s)"
        % (sorted(OBJECTS), task, sort_pair)
    )


def task_name(kind, goal):
    return (
        "pick_%s_to_%s" % next(iter(goal.items())) if kind == "pick" else "sort_%s_%s" % tuple(goal)
    )


def choose_scene(rng, goal, num_distractors, sort_pair):
    """The goal objects plus distractors; a pick-place scene never holds both objects of the sort pair."""
    scene = list(goal)
    for _ in range(num_distractors if len(goal) == 1 else 0):
        partners = {b if o == a else a for a, b in [sort_pair] for o in scene if o in sort_pair}
        options = sorted(set(OBJECTS) - set(scene) - partners)
        if options:
            scene.append(options[rng.integers(len(options))])
    return scene


# ---------------------------------------------------------------- the environment
class BinSortEnv:
    """reset(seed=None, task=None) -> obs; step(action) -> (obs, reward, terminated, truncated, info); close().
    obs = {"image": uint8 (H, W, 3), "state": float32 (7,): xyz, euler relative to pointing down, gripper 0..1}.
    task: see parse_task. Attributes pb, arm, arm_joints, ee_link, objects, target_pos/R are for tools and tests."""

    def __init__(
        self,
        task="sort",
        image_size=128,
        max_steps=None,
        num_distractors=1,
        sort_pair=SORT_PAIR,
        terminate_on_success=True,
        seed=None,
    ):
        self.task, self.sort_pair = task, tuple(sort_pair)
        parse_task(task, self.sort_pair)  # fail early on a bad name
        self.image_size, self.max_steps_arg, self.num_distractors = (
            int(image_size),
            max_steps,
            num_distractors,
        )
        self.terminate_on_success, self._rng, self._t = (
            terminate_on_success,
            np.random.default_rng(seed),
            None,
        )
        self.pb, self._urdf = bullet_client.BulletClient(connection_mode=pb.DIRECT), arm_urdf()
        # roughly the Bridge view: across the table and to the side, looking down at the bins and the arm
        self._view = pb.computeViewMatrix([0.58, 0.14, 0.50], [0.24, 0.0, 0.0], [0, 0, 1])
        self._proj = pb.computeProjectionMatrixFOV(48, 1.0, 0.05, 3.0)

    def _build(self, scene):
        c = self.pb
        c.resetSimulation()  # a fresh world per episode: episodes are independent of what ran before
        c.setAdditionalSearchPath(pybullet_data.getDataPath())
        c.setGravity(0, 0, -9.81)
        c.setTimeStep(1.0 / PHYSICS_HZ)
        half = [0.5, 0.6, 0.02]
        table = c.createMultiBody(
            0,
            c.createCollisionShape(pb.GEOM_BOX, halfExtents=half),
            c.createVisualShape(pb.GEOM_BOX, halfExtents=half, rgbaColor=[0.62, 0.58, 0.52, 1]),
            [0.3, 0, -0.02],
        )
        c.changeDynamics(table, -1, lateralFriction=1.0)
        with tempfile.NamedTemporaryFile(
            "w", suffix=".urdf"
        ) as f:  # PyBullet loads URDFs from files only
            f.write(self._urdf)
            f.flush()
            self.arm = c.loadURDF(f.name, useFixedBase=True)
        names = {
            c.getJointInfo(self.arm, j)[1].decode(): j for j in range(c.getNumJoints(self.arm))
        }
        self.arm_joints = [names[n] for n in ARM_JOINTS]
        self.ee_link, self.fingers = (
            names["ee_gripper"],
            [names["left_finger"], names["right_finger"]],
        )
        for f in self.fingers:
            c.changeDynamics(self.arm, f, lateralFriction=1.5)
        for xy in BINS.values():
            b = c.loadURDF(
                "tray/traybox.urdf", [*xy, 0], globalScaling=BIN_SCALE, useFixedBase=True
            )
            c.changeVisualShape(b, -1, rgbaColor=[0.45, 0.5, 0.6, 1], textureUniqueId=-1)
        self.objects, self.grasp_yaw, placed = {}, {}, []
        for name in scene:
            urdf, scale, rgba = OBJECTS[name]
            for _ in range(
                100
            ):  # rejection sampling keeps the objects apart so that each can be grasped alone
                xy = self._rng.uniform(SPAWN_LOW, SPAWN_HIGH)
                if all(np.linalg.norm(xy - p) > MIN_GAP for p in placed):
                    break
            placed.append(xy)
            body = c.loadURDF(urdf, [0, 0, 0], globalScaling=scale)
            lo, hi = np.array(c.getAABB(body))
            ext = (
                hi - lo
            )  # an elongated object is grasped across its short side (see ScriptedPolicy)
            self.grasp_yaw[name] = (
                0.0 if ext[0] > 1.3 * ext[1] else np.pi / 2 if ext[1] > 1.3 * ext[0] else None
            )
            orn = pb.getQuaternionFromEuler([0, 0, self._rng.uniform(-np.pi, np.pi)])
            c.resetBasePositionAndOrientation(body, [xy[0], xy[1], 0.002 - lo[2]], orn)
            if rgba is not None:  # flat colours keep the objects distinguishable at 64x64
                c.changeVisualShape(body, -1, rgbaColor=rgba, textureUniqueId=-1)
            c.changeDynamics(
                body, -1, lateralFriction=1.0, rollingFriction=0.001, spinningFriction=0.001
            )
            self.objects[name] = body

    def reset(self, seed=None, task=None):
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        kind, goal = parse_task(task or self.task, self.sort_pair)
        if goal is None:
            goal = {
                sorted(OBJECTS)[self._rng.integers(len(OBJECTS))]: sorted(BINS)[
                    self._rng.integers(len(BINS))
                ]
            }
        self.kind, self.goal, self.task_name = kind, goal, task_name(kind, goal)
        self.max_steps = self.max_steps_arg or MAX_STEPS[kind]
        self._build(choose_scene(self._rng, goal, self.num_distractors, self.sort_pair))
        self.target_pos, self.target_R = START_POS.copy(), R_DOWN.copy()
        self._q = solve_ik(self.target_pos, self.target_R, [0, 0, 0, 0, np.pi / 2, 0], iters=100)
        self._grip, self.held, self._grasp_cid, self._t = 1.0, None, None, 0
        for j, qj in zip(self.arm_joints + self.fingers, [*self._q, FINGER_MAX, FINGER_MAX]):
            self.pb.resetJointState(self.arm, j, qj)
        self._drive()
        for _ in range(PHYSICS_HZ // 10):  # let the objects settle
            self.pb.stepSimulation()
        return self._obs()

    def _drive(self):
        c = self.pb
        for j, qj in zip(self.arm_joints, self._q):
            c.setJointMotorControl2(
                self.arm, j, pb.POSITION_CONTROL, qj, force=60, maxVelocity=np.pi, positionGain=0.3
            )  # reaches a 5 Hz target within one step
        # with an object attached the fingers keep their width: squeezing on would push it out of the constraint
        width = self._hold_width if self.held is not None else self._grip * FINGER_MAX
        for f in self.fingers:
            c.setJointMotorControl2(
                self.arm, f, pb.POSITION_CONTROL, width, force=20, maxVelocity=0.4
            )

    def _try_grasp(self):
        c = self.pb
        ee_pos, ee_orn = c.getLinkState(self.arm, self.ee_link)[
            :2
        ]  # centre-of-mass frame: constraints use it
        touching = [
            (np.linalg.norm(self.object_position(name) - ee_pos), name)
            for name, body in self.objects.items()
            if all(c.getClosestPoints(self.arm, body, 0.003, linkIndexA=f) for f in self.fingers)
        ]
        if touching:  # both fingers on it; of two such objects the one nearer the fingertips
            self.held = min(touching)[1]
            pos, orn = c.getBasePositionAndOrientation(self.objects[self.held])
            rel_p, rel_o = c.multiplyTransforms(*c.invertTransform(ee_pos, ee_orn), pos, orn)
            self._grasp_cid = c.createConstraint(
                self.arm,
                self.ee_link,
                self.objects[self.held],
                -1,
                pb.JOINT_FIXED,
                [0, 0, 0],
                rel_p,
                [0, 0, 0],
                rel_o,
            )
            c.changeConstraint(self._grasp_cid, maxForce=500)
            self._hold_width = np.mean([c.getJointState(self.arm, f)[0] for f in self.fingers])
            self._drive()

    def step(self, action):
        if self._t is None:
            raise RuntimeError(
                "sim_binsort.py: call reset() before step() (and again after an episode ends)"
            )
        a = np.clip(_check_action(action), ACTION_LOW, ACTION_HIGH)
        self.target_pos = np.clip(self.target_pos + a[:3], WORKSPACE_LOW, WORKSPACE_HIGH)
        rel = mat_to_euler(
            euler_to_mat(a[3:6]) @ self.target_R @ R_DOWN.T
        )  # world-aligned axes: left-multiply
        self.target_R = euler_to_mat(np.clip(rel, -TILT_LIMIT, TILT_LIMIT)) @ R_DOWN
        self._q, self._grip = solve_ik(self.target_pos, self.target_R, self._q), float(a[6])
        if self._grip >= 0.5 and self.held is not None:
            self.pb.removeConstraint(self._grasp_cid)
            self.held, self._grasp_cid = None, None
        self._drive()
        for i in range(PHYSICS_HZ // CONTROL_HZ):
            self.pb.stepSimulation()
            if self._grip < 0.5 and self.held is None and i % 4 == 3:
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
        s = self.pb.getLinkState(self.arm, self.ee_link, computeForwardKinematics=True)
        return np.array(s[4]), np.array(pb.getMatrixFromQuaternion(s[5])).reshape(3, 3)

    def _obs(self):
        pos, R = self.ee_pose()
        grip = np.mean([self.pb.getJointState(self.arm, f)[0] for f in self.fingers]) / FINGER_MAX
        state = np.concatenate([pos, mat_to_euler(R @ R_DOWN.T), [np.clip(grip, 0, 1)]]).astype(
            np.float32
        )
        return {"image": self.render(), "state": state}

    def render(self):
        n = self.image_size
        img = self.pb.getCameraImage(
            n,
            n,
            self._view,
            self._proj,
            lightDirection=[0.4, -0.3, 1.0],
            shadow=0,
            flags=pb.ER_NO_SEGMENTATION_MASK,
            renderer=pb.ER_TINY_RENDERER,
        )[2]
        return np.asarray(img, dtype=np.uint8).reshape(n, n, 4)[:, :, :3].copy()

    def object_position(self, name):
        return np.array(self.pb.getBasePositionAndOrientation(self.objects[name])[0])

    def info(self):
        """success, which object lies in which bin (None: in no bin, or held), the held object, task name, step."""
        pos = {name: self.object_position(name) for name in self.objects}
        in_bin = {
            name: next(
                (b for b, xy in BINS.items() if np.all(np.abs(p[:2] - xy) < BIN_INNER)), None
            )
            if name != self.held and p[2] < 0.08
            else None
            for name, p in pos.items()
        }
        return {
            "success": all(in_bin[o] == b for o, b in self.goal.items()),
            "in_bin": in_bin,
            "held": self.held,
            "task": self.task_name,
            "step": self._t,
        }

    def close(self):
        if getattr(self, "pb", None) is not None:
            self.pb.disconnect()
            self.pb = None


# ---------------------------------------------------------------- scripted demonstrations
class ScriptedPolicy:
    """Pick-and-place from the simulator's state, one (object, bin) after another: approach above the object (fingers
    across an elongated one), descend, close, lift, carry, lower, open, check; a missed grasp, a drop or a bounce out
    of the bin restarts that sub-goal. Noise N(0, noise^2) in normalized action units, then clipped to the bounds."""

    def __init__(self, env, noise=0.1, rng=None, max_step=0.025):
        self.env, self.noise, self.max_step, self.rng = (
            env,
            noise,
            max_step,
            np.random.default_rng(rng),
        )
        self.plan = list(env.goal.items())
        if len(self.plan) > 1 and self.rng.random() < 0.5:  # sort demos place either object first
            self.plan.reverse()
        self.phase, self.count = "approach", 0

    def __call__(self, obs):
        env, pos, yaw_goal, grip = self.env, obs["state"][:3].astype(np.float64), 0.0, 1.0
        goal = np.array([pos[0], pos[1], CARRY_Z])  # once the plan is done: go up and stay
        if self.plan:
            name, bin_name = self.plan[0]
            o, orn = env.pb.getBasePositionAndOrientation(env.objects[name])
            (lo, hi), bin_xy, held = (
                np.array(env.pb.getAABB(env.objects[name])),
                BINS[bin_name],
                env.held,
            )
            if (
                env.grasp_yaw[name] is not None
            ):  # fingers are symmetric: any yaw modulo pi, the nearest to 0
                yaw_goal = (
                    pb.getEulerFromQuaternion(orn)[2] + env.grasp_yaw[name] + np.pi / 2
                ) % np.pi - np.pi / 2
            grasp_z = max(
                lo[2] + 0.004, hi[2] - 0.04
            )  # fingertips (the end-effector point) near the bottom
            self.count += 1
            if self.phase == "approach":
                goal = np.array([o[0], o[1], HOVER_Z])
                yaw_err = (obs["state"][5] - yaw_goal + np.pi / 2) % np.pi - np.pi / 2
                if (
                    np.linalg.norm(pos[:2] - o[:2]) < 0.012
                    and abs(pos[2] - HOVER_Z) < 0.03
                    and abs(yaw_err) < 0.15
                ):
                    self.phase, self.count = "descend", 0
            elif self.phase == "descend":
                goal = np.array([o[0], o[1], grasp_z])
                if abs(pos[2] - grasp_z) < 0.008:
                    self.phase, self.count = "close", 0
            elif self.phase == "close":
                goal, grip = np.array([o[0], o[1], grasp_z]), 0.0
                if self.count >= 2:
                    self.phase, self.count = ("lift" if held == name else "approach"), 0
            elif self.phase in ("lift", "carry", "lower"):
                grip = 0.0
                goal = np.array(
                    [
                        *(pos[:2] if self.phase == "lift" else bin_xy),
                        RELEASE_Z if self.phase == "lower" else CARRY_Z,
                    ]
                )
                if held != name:
                    self.phase, self.count = "approach", 0
                elif self.phase == "lift" and pos[2] > CARRY_Z - 0.03:
                    self.phase, self.count = "carry", 0
                elif self.phase == "carry" and np.linalg.norm(pos[:2] - bin_xy) < 0.025:
                    self.phase, self.count = "lower", 0
                elif self.phase == "lower" and pos[2] < RELEASE_Z + 0.015:
                    self.phase, self.count = "release", 0
            elif self.phase == "release":
                goal = np.array([*bin_xy, RELEASE_Z])
                if self.count >= 2:
                    if env.info()["in_bin"][name] == bin_name:
                        self.plan.pop(0)
                    self.phase, self.count = "approach", 0
        a = np.concatenate(
            [
                np.clip(goal - env.target_pos, -self.max_step, self.max_step),  # target -> goal
                mat_to_euler(euler_to_mat([0, 0, yaw_goal]) @ R_DOWN @ env.target_R.T),
                [grip],
            ]
        )
        a += (
            self.noise * (ACTION_HIGH - ACTION_LOW) / 2 * self.rng.standard_normal(7)
        )  # normalized units
        return np.clip(a, ACTION_LOW, ACTION_HIGH).astype(np.float32)


def run_episode(env, task, seed, noise=0.1, extra_success_steps=2):
    """One scripted episode (reset included), stopped `extra_success_steps` steps after the task is first solved;
    seed: int or list of ints. Returns (T + 1 observations, actions (T, 7), rewards (T,), success at the end)."""
    env_seed, policy_seed = np.random.SeedSequence(seed).generate_state(2)
    obs = env.reset(seed=int(env_seed), task=task)
    policy = ScriptedPolicy(env, noise, np.random.default_rng(int(policy_seed)))
    observations, actions, rewards, streak = [obs], [], [], 0
    for _ in range(env.max_steps):
        actions.append(policy(obs))
        obs, r, terminated, truncated, info = env.step(actions[-1])
        observations.append(obs)
        rewards.append(r)
        streak = streak + 1 if info["success"] else 0
        if terminated or truncated or streak > extra_success_steps:
            break
    return (
        observations,
        np.array(actions, np.float32),
        np.array(rewards, np.float32),
        bool(rewards[-1] > 0),
    )


# ---------------------------------------------------------------- data collection (Bridge numpy format, SPEC 5)
def to_bridge(observations, actions, rewards):
    """One trajectory dict; next_observations[t] IS observations[t + 1], so pickle stores each image once."""
    steps = [{"images0": o["image"], "state": o["state"]} for o in observations]
    return {
        "observations": steps[:-1],
        "next_observations": steps[1:],
        "actions": actions,
        "terminals": np.zeros(len(actions), np.float32),
        "rewards": rewards,
    }


def save_trajectories(path, trajs):
    """np.save of an object array of trajectory dicts, atomically: a temporary file, then os.replace."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    arr = np.empty(len(trajs), dtype=object)
    arr[:] = trajs
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, arr, allow_pickle=True)
        os.chmod(tmp, 0o644)  # mkstemp makes the file private; a data file is not
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


_WORKER = {}  # the environment of this (worker) process, made by its first job


def _collect_job(job):
    """Attempts at one demo until one succeeds; seeds from (seed, task, split, index, attempt) and a world rebuilt
    at every reset make the data independent of --workers."""
    name, split, i, seed, noise, keep_failures, max_attempts, env_kwargs = job
    if "env" not in _WORKER:
        _WORKER["env"] = BinSortEnv(terminate_on_success=False, **env_kwargs)
    steps = 0
    for attempt in range(max_attempts):
        key = [seed, zlib.crc32(name.encode()), ("train", "val").index(split), i, attempt]
        observations, actions, rewards, ok = run_episode(_WORKER["env"], name, key, noise)
        steps += len(actions)
        if ok or keep_failures:
            return name, split, to_bridge(observations, actions, rewards), attempt, steps
    raise RuntimeError(
        "sim_binsort.py: the scripted policy failed %d times in a row on %s (%s demo %d); raise "
        "--max_attempts or lower --noise" % (max_attempts, name, split, i)
    )


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
    num_distractors=1,
    max_attempts=20,
    log=sys.stderr,
):
    """Scripted demos into <out>/<task name>/{train,val}/out.npy. The n training demos are split evenly over the
    tasks; each task also gets max(min_val, round(val_frac * its n)) held-out demos. Returns a summary dict."""
    parse_task(
        "sort_" + "_".join(sort_pair), sort_pair
    )  # a bad --sort_pair fails here, not in a worker
    names = (
        ["pick_%s_to_%s" % (o, b) for o in OBJECTS for b in BINS]
        if task == "pickplace"  # the 20 tasks
        else [task_name(*parse_task(task, sort_pair))]
    )
    jobs, counts = [], {}
    env_kwargs = {
        "image_size": image_size,
        "sort_pair": sort_pair,
        "num_distractors": num_distractors,
    }
    for k, name in enumerate(names):
        n_train = n // len(names) + (k < n % len(names))
        if n_train > 0:
            counts[name] = {"train": n_train, "val": max(min_val, round(val_frac * n_train))}
            jobs += [
                (name, split, i, seed, noise, keep_failures, max_attempts, env_kwargs)
                for split in ("train", "val")
                for i in range(counts[name][split])
            ]
    pool = (
        mp.get_context("spawn").Pool(workers) if workers > 1 else None
    )  # spawn: no forked PyBullet client
    results = (
        pool.imap(_collect_job, jobs) if pool else map(_collect_job, jobs)
    )  # in order, whoever ran a job
    t0, steps, discarded, pending = time.time(), 0, 0, {}
    try:
        for done, (name, split, traj, attempt, job_steps) in enumerate(results, 1):
            pending.setdefault(name, {"train": [], "val": []})[split].append(traj)
            steps, discarded = steps + job_steps, discarded + attempt
            if all(
                len(pending[name][s]) == counts[name][s] for s in ("train", "val")
            ):  # a task is complete
                for s, trajs in pending.pop(name).items():
                    save_trajectories(os.path.join(out, name, s, "out.npy"), trajs)
            if log is not None:
                el = time.time() - t0
                log.write(
                    "\rcollect: %d/%d demos (%s), %d failed attempts discarded, %.0f steps/s, eta %.0fs %s"
                    % (
                        done,
                        len(jobs),
                        name,
                        discarded,
                        steps / el,
                        (len(jobs) - done) * el / done,
                        "\n" if done == len(jobs) else "",
                    )
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
        "seconds": time.time() - t0,
    }


# ---------------------------------------------------------------- show, bench, command line
def show(out, task="sort", seed=0, image_size=128, frames=12, noise=0.1):
    """A PNG film strip (one row, 2 px white gaps) of one scripted episode."""
    from PIL import Image  # pillow: only this subcommand needs it

    env = BinSortEnv(task, image_size, terminate_on_success=False)
    observations, actions, _, ok = run_episode(env, task, seed, noise)
    env.close()
    idx = np.unique(np.linspace(0, len(observations) - 1, frames).round().astype(int))
    gap = np.full((image_size, 2, 3), 255, np.uint8)
    strip = np.concatenate([x for i in idx for x in (gap, observations[i]["image"])][1:], axis=1)
    Image.fromarray(strip).save(
        out + ".tmp", format="PNG"
    )  # atomic: a temporary file in the same folder, then
    os.replace(out + ".tmp", out)
    print(
        "%s: %s, %d steps, success %s, frames at steps %s"
        % (out, env.task_name, len(actions), ok, idx.tolist())
    )


def bench(image_size=128, episodes=6, workers=2):
    env, t0 = BinSortEnv("pickplace", image_size, terminate_on_success=False), time.perf_counter()
    steps = sum(
        len(run_episode(env, "pickplace", seed)[1]) for seed in range(episodes)
    )  # resets, policy included
    seconds, render_ms = time.perf_counter() - t0, timeit.timeit(env.render, number=20) / 20 * 1e3
    print(
        "%.1f steps/s (scripted pick-place at %dx%d on one core, TinyRenderer; rendering takes %.1f ms of a step)"
        % (steps / seconds, image_size, image_size, render_ms)
    )
    with tempfile.TemporaryDirectory() as d:
        s = collect(
            "pickplace",
            episodes * workers,
            d,
            workers=workers,
            image_size=image_size,
            min_val=0,
            log=None,
        )
    print(
        "collect: %.2f demos/s, %.0f steps/s with --workers %d at %dx%d (%d demos, process start-up included)"
        % (
            s["demos"] / s["seconds"],
            s["steps"] / s["seconds"],
            workers,
            image_size,
            image_size,
            s["demos"],
        )
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--image_size", type=int, default=128)
    common.add_argument(
        "--noise", type=float, default=0.1, help="action noise std in normalized action units"
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
        "--distractors", type=int, default=1, help="distractor objects in pick-place scenes"
    )
    c.add_argument("--max_attempts", type=int, default=20)
    s = sub.add_parser("show", parents=[common], help="PNG film strip of one scripted episode")
    s.add_argument("--out", default="strip.png")
    s.add_argument("--task", default="sort")
    s.add_argument("--frames", type=int, default=12)
    b = sub.add_parser(
        "bench", parents=[common], help="environment steps/s and collection throughput"
    )
    b.add_argument("--episodes", type=int, default=6)
    b.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    args = ap.parse_args(argv)
    if args.cmd == "collect":
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
        )
        print(
            "wrote %(demos)d demos (%(steps)d steps, %(discarded)d failed attempts discarded) in %(seconds).0fs"
            % summary,
            "for %d task(s) to %s" % (len(summary["tasks"]), args.out),
        )
    elif args.cmd == "show":
        show(args.out, args.task, args.seed, args.image_size, args.frames, args.noise)
    else:
        bench(args.image_size, args.episodes, args.workers)


if __name__ == "__main__":
    main()
