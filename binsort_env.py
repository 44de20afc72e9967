"""binsort_env.py: the simulated world of the WidowX 250 bin-sort task of PTR (Kumar et al., RSS
2023, Appendix A and B.2): the PyBullet scene, its objects, the tasks and BinSortEnv (SPEC section
2, level 1; the scripted demos and collection are sim_binsort.py's).

Two bins in front of a WidowX 250 6-DOF in PyBullet. Pre-training task: pick-and-place (one of 10
objects into one of the two bins). Target task: sort two given objects, each into its own bin;
success only when both lie in their bins. A pick-place scene holds its object plus DISTRACTORS
others (none by default), never both objects of the sort pair, so the pair never appears together
in the prior data.

Design choices (SPEC sections 2, 5, 6, 7):
- The arm is built from the product-of-exponentials kinematics of SPEC 6 (widowx.py): each URDF
  link frame sits on its joint's screw axis, world-aligned at zero joints, so PyBullet's
  end-effector pose IS the PoE kinematics.
- Bridge control at 5 Hz: translation delta in the base frame, rotation delta about the end-effector
  position with world-aligned axes (R_target <- Rz Ry Rx @ R_target), gripper absolute (0 closed ..
  1 open). The target pose accumulates from the previous target, is clipped to the workspace and a
  tilt range, and is tracked by damped-least-squares IK plus joint position control (120 Hz
  physics).
- Grasp assist (honest note): friction grasps between box fingers slip at this step rate, so a
  gripper commanded closed (below widowx.GRIPPER_CLOSED_BELOW) with both fingers on an object
  attaches it by a fixed constraint; opening releases it. The fingers still close onto the object,
  so images and the gripper state look like a real grasp. The rule is forgiving: closing with the
  fingertips up to 3 cm off the object's centre and up to 3.5 cm above the table grasps in 177 of
  180 attempts over 5 objects (scripts/grasp_tolerance.py, results/grasp_tolerance.txt).
- Bins "left" and "right" as seen in the image (the camera faces the robot: image left = robot's
  right, -y).
- Episodes end at the step limit (truncated: MAX_STEPS, 50 pick-place, 100 sort);
  terminate_on_success=True (default) also ends one at its first successful step, as every rewarded
  step is terminal offline (done = r).
- Stages (paper Appendix A: "all methods are able to generally solve the first segment"): every
  step's info["stages"] says which parts of the task hold now: pick-place "grasped", "placed"; sort
  "grasped" (a goal object in the gripper), "first_in_bin" (at least one goal object in its bin),
  "both_in_bins".
- Out-of-distribution starts (ood, OOD_STARTS): objects or the arm where no collected episode
  starts.
"""

import contextlib
import ctypes
import os
import sys
import tempfile

import numpy as np

from widowx import (  # the arm's kinematics (SPEC section 6), shared with robot.py, and its URDF
    ARM_JOINTS,
    FINGER_MAX,
    GRIPPER_CLOSED_BELOW,
    R_DOWN,
    arm_urdf,
    euler_to_mat,
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


# ---------------------------------------------------------------- the world
CONTROL_HZ = 5
PHYSICS_HZ = 120
# Bridge action bounds (SPEC 5); actions are clipped to them
ACTION_LOW = np.array([-0.05] * 3 + [-0.25] * 3 + [0.0])
ACTION_HIGH = np.array([0.05] * 3 + [0.25] * 3 + [1.0])
ACTION_NAMES = ("dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper")
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
# commanded object from the other before it can learn where it is, and multi-task BC at laptop
# scale does not (after 20k steps it reaches for the objects' average position).
DISTRACTORS = 0
# name -> (pybullet_data URDF, scale, RGBA or None to keep the texture).
# No "_" in names: task names are split at "_".
# Scales: every object at most 6 cm long as loaded, so that it fits the 7.4 cm opening with
# GRASP_MARGIN a side whatever its yaw, and the demos never turn the gripper: an object that fits
# at one yaw only (a 7.5 cm mug) must be grasped at that yaw, which a 64 px policy must read from
# the image, and learned policies rarely do.
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


# ---------------------------------------------------------------- tasks and scenes
def _check_action(action):
    try:
        a = np.asarray(action, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(
            "binsort_env.py: action must be a 7-d numeric vector %s, got %s" % (ACTION_NAMES, e)
        ) from None
    if a.shape != (7,):
        raise ValueError(
            "binsort_env.py: action must have shape (7,) %s, got shape %s" % (ACTION_NAMES, a.shape)
        )
    bad = np.flatnonzero(~np.isfinite(a))
    if bad.size:
        raise ValueError(
            "binsort_env.py: action[%d] (%s) must be finite, got %s"
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
        "binsort_env.py: task must be 'pickplace', 'pick_<object>_to_<left|right>', 'sort' or "
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
            raise ValueError(f"binsort_env.py: ood must be one of {OOD_STARTS}, got {ood!r}")
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
                "binsort_env.py: call reset() before step() (and again after an episode ends)"
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
