"""widowx.py: the WidowX 250 6-DOF (wx250s) kinematics, one copy for the real arm
(arm.py, robot.py) and the simulator (binsort_env.py), and the arm as a URDF for the simulator.

A leaf (imports nothing from the project; SPEC section 2). The numbers are SPEC section 6:
- Product-of-exponentials forward kinematics in the space frame (base_link), end effector
  ee_gripper_link: T(q) = e^[S1]q1 ... e^[S6]q6 M, with the screw axes S_i = [w; v] and the home
  pose M (identity rotation).
- One damped-least-squares inverse kinematics solver, solve_ik(). The simulator's data were
  collected with it: its arithmetic must stay bit for bit as it is (test_ptr.py checks the simulator
  against it).
- The Bridge euler convention: R = Rz(yaw) Ry(pitch) Rx(roll), extrinsic x, y, z; the Bridge state's
  euler angles are those of the gripper's rotation relative to pointing down (R_DOWN).
- arm_urdf(): binsort_env.py's PyBullet model of the arm, built from the same screw axes and limits
  (pybullet_data ships no WidowX; SPEC section 7), with a two-finger prismatic gripper.
"""

import numpy as np

# rows S_i = [w; v] in the base frame: waist, shoulder, elbow, forearm roll, wrist angle and rotate
SCREW_AXES = np.array(
    [
        [0, 0, 1, 0, 0, 0],
        [0, 1, 0, -0.11065, 0, 0],
        [0, 1, 0, -0.36065, 0, 0.04975],
        [1, 0, 0, 0, 0.36065, 0],
        [0, 1, 0, -0.36065, 0, 0.29975],
        [1, 0, 0, 0, 0.36065, 0],
    ],
    dtype=np.float64,
)
M_HOME = np.array([0.458325, 0.0, 0.36065])  # ee_gripper_link at zero joints (identity rotation)
JOINT_LOW = np.deg2rad([-180, -108, -123, -180, -100, -180])
JOINT_HIGH = np.deg2rad([180, 114, 92, 180, 123, 180])
VELOCITY_LIMIT = np.pi  # rad/s, every joint
SLEEP_JOINTS = np.array([0.0, -1.80, 1.55, 0.0, 0.8, 0.0])  # Interbotix's sleep pose, on the cradle
# the gripper pointing down: Bridge's zero rotation, which the state's euler angles are relative to
R_DOWN = np.array([[0.0, 0, 1], [0, 1, 0], [-1, 0, 0]])
# The Bridge gripper command is absolute (0 closed .. 1 open) and binary in effect: a command below
# this closes the gripper, one at or above it opens it.
GRIPPER_CLOSED_BELOW = 0.5


class IKError(ValueError):
    """Inverse kinematics did not reach the pose (unreachable, or beyond the joint limits)."""


# ---- rotations (the Bridge convention) -----------------------------------------------------------
def euler_to_mat(rpy):
    """R = Rz(yaw) Ry(pitch) Rx(roll): the Bridge convention (extrinsic x, y, z)."""
    cr, cp, cy = np.cos(rpy)
    sr, sp, sy = np.sin(rpy)
    return np.array(
        [
            [cy * cp, cy * sp * sr - sy * cr, cy * sp * cr + sy * sr],
            [sy * cp, sy * sp * sr + cy * cr, sy * sp * cr - cy * sr],
            [-sp, cp * sr, cp * cr],
        ]
    )


def mat_to_euler(R):
    """The inverse of euler_to_mat: (roll, pitch, yaw), pitch within +-pi/2."""
    return np.array(
        [
            np.arctan2(R[2, 1], R[2, 2]),
            -np.arcsin(np.clip(R[2, 0], -1, 1)),
            np.arctan2(R[1, 0], R[0, 0]),
        ]
    )


def cross3(a, b):
    """a x b of two 3-vectors: np.cross costs ~20 us here, and the IK calls it thousands of times an
    episode."""
    return np.array(
        [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]]
    )


def skew(w):
    """The matrix [w] with [w] x = w x x."""
    return np.array([[0, -w[2], w[1]], [w[2], 0, -w[0]], [-w[1], w[0], 0]])


def rotation_angle(E):
    """The angle (rad, 0..pi) of the rotation matrix E."""
    return np.arccos(np.clip((np.trace(E) - 1) / 2, -1, 1))


AXIS_SKEWS = [skew(w) for w in SCREW_AXES[:, :3]]  # [w_i] of each screw axis, computed once


# ---- forward kinematics (product of exponentials) ------------------------------------------------
def fk_and_jacobian(q):
    """PoE kinematics T = e^[S1]q1 ... e^[S6]q6 M -> (R, p, 6x6 Jacobian [angular; velocity of the
    point p])."""
    R = np.eye(3)
    p = np.zeros(3)
    J = np.empty((6, 6))
    for i in range(6):
        # the screw axis at this configuration: moved by the joints before it
        w = R @ SCREW_AXES[i, :3]
        J[:3, i] = w
        J[3:, i] = R @ SCREW_AXES[i, 3:] + cross3(p, w)
        # Rodrigues for exp([S_i] q_i)
        K = AXIS_SKEWS[i]
        v = SCREW_AXES[i, 3:]
        s = np.sin(q[i])
        c = np.cos(q[i])
        K2 = K @ K
        p = R @ (q[i] * v + (1 - c) * (K @ v) + (q[i] - s) * (K2 @ v)) + p
        R = R @ (np.eye(3) + s * K + (1 - c) * K2)
    p_ee = R @ M_HOME + p
    for i in range(6):  # twist -> velocity of the end-effector point
        J[3:, i] += cross3(J[:3, i], p_ee)
    return R, p_ee, J


def forward_kinematics(q):
    """Joints (6,) -> the 4x4 pose of ee_gripper_link in base_link."""
    R, p, _ = fk_and_jacobian(q)
    T = np.eye(4)
    T[:3, :3] = R
    T[:3, 3] = p
    return T


# ---- inverse kinematics --------------------------------------------------------------------------
def solve_ik(pos, R_goal, q0, iters=30, damping=0.02):
    """Damped least squares from the previous joint target (the IK branch stays continuous), clipped
    to the joint limits at every iteration; 1 rad of rotation error counts as 30 cm. Returns the
    last iterate."""
    q = np.array(q0, dtype=np.float64)
    weight = np.array([0.3] * 3 + [1.0] * 3)
    for _ in range(iters):
        R, p, J = fk_and_jacobian(q)
        E = R_goal @ R.T  # rotation error as an axis-angle vector in the base frame
        axis = np.array([E[2, 1] - E[1, 2], E[0, 2] - E[2, 0], E[1, 0] - E[0, 1]])
        angle = rotation_angle(E)
        err = np.concatenate([0.3 * axis * angle / max(np.linalg.norm(axis), 1e-9), pos - p])
        if np.abs(err).max() < 2e-5:
            break
        Jw = J * weight[:, None]
        step = Jw.T @ np.linalg.solve(Jw @ Jw.T + damping**2 * np.eye(6), err)
        q = np.clip(q + step, JOINT_LOW, JOINT_HIGH)
    return q


def inverse_kinematics(T_goal, seed, iters=100, tol_pos=1e-4, tol_rot=1e-3):
    """solve_ik() for a 4x4 pose, checked: raises IKError with the residual when the result misses
    the pose by more than tol_pos (m) or tol_rot (rad); the robot then holds the arm, it never
    guesses. 100 iterations: from the measured joints of the robot, a few more than the simulator's
    30 can be needed near a singular wrist."""
    q = solve_ik(T_goal[:3, 3], T_goal[:3, :3], seed, iters)
    R, p, _ = fk_and_jacobian(q)
    position_error = np.linalg.norm(T_goal[:3, 3] - p)
    rotation_error = rotation_angle(T_goal[:3, :3] @ R.T)
    if position_error > tol_pos or rotation_error > tol_rot:
        raise IKError(
            f"IK did not converge in {iters} iterations: position error "
            f"{position_error * 1e3:.1f} mm, rotation error {rotation_error:.3f} rad "
            "(unreachable, or beyond the joint limits)"
        )
    return q


# ---- the arm as a URDF, from the screw axes (the simulator's model) ------------------------------
# where each joint sits on its axis: looks only (the kinematics are the screw axes)
JOINT_ALONG_AXIS = [0.072, 0.0, 0.0, 0.14975, 0.0, 0.36475]
FINGER_MAX = 0.037  # m of travel per finger: a 7.4 cm opening
ARM_JOINTS = ("waist", "shoulder", "elbow", "forearm_roll", "wrist_angle", "wrist_rotate")


def _box(center, size, rpy=(0, 0, 0), rgba=(0.15, 0.15, 0.15, 1)):
    origin = '<origin xyz="%g %g %g" rpy="%g %g %g"/>' % (*center, *rpy)
    geometry = '<geometry><box size="%g %g %g"/></geometry>' % tuple(size)
    material = "c%02x%02x%02x" % tuple(int(255 * x) for x in rgba[:3])  # one name per colour
    return (
        '<visual>%s%s<material name="%s"><color rgba="%g %g %g %g"/></material></visual>'
        "<collision>%s%s</collision>" % (origin, geometry, material, *rgba, origin, geometry)
    )


def _beam(vector, width):
    """A box from the origin along `vector` (in the x-z plane), as the links between joints."""
    rpy = (0, np.arctan2(vector[0], vector[2]), 0)
    return _box(np.divide(vector, 2), (width, width, np.linalg.norm(vector)), rpy)


def _link(name, body, mass=0.2):
    inertial = (
        '<inertial><origin xyz="0 0 0"/><mass value="%g"/>'
        '<inertia ixx="1e-3" ixy="0" ixz="0" iyy="1e-3" iyz="0" izz="1e-3"/></inertial>' % mass
    )
    return '<link name="%s">%s%s</link>' % (name, inertial, body)


def _joint(name, kind, parent, child, xyz, axis="1 0 0", limit=""):
    return (
        '<joint name="%s" type="%s"><parent link="%s"/><child link="%s"/><origin xyz="%g %g %g"/>'
        '<axis xyz="%s"/>%s</joint>' % (name, kind, parent, child, *xyz, axis, limit)
    )


def arm_urdf():
    """The wx250s as a URDF string: joint i at a point of the axis of S_i, axis w_i, link frames
    world-aligned."""
    # w x v is the axis point nearest the origin; JOINT_ALONG_AXIS slides it along the axis
    points = [cross3(S[:3], S[3:]) + s * S[:3] for S, s in zip(SCREW_AXES, JOINT_ALONG_AXIS)]
    x_ee = M_HOME[0] - points[5][0]
    grey = (0.45, 0.45, 0.5, 1)
    bodies = [
        _box((0, 0, -0.036), (0.12, 0.12, 0.07)) + _box((0, 0, 0.02), (0.07, 0.09, 0.04)),
        _beam(points[2] - points[1], 0.04),
        _beam(points[3] - points[2], 0.045),
        _beam(points[4] - points[3], 0.04),
        _beam(points[5] - points[4], 0.035),
        _box((x_ee - 0.062, 0, 0), (0.033, 0.09, 0.028), rgba=grey),
    ]
    names = ["shoulder", "upper_arm", "upper_forearm", "lower_forearm", "wrist", "gripper"]
    parts = [
        '<robot name="wx250s">',
        _link("base_link", _box((0, 0, 0.03), (0.14, 0.14, 0.06)), 0.0),
    ]
    parent = "base_link"
    previous_point = np.zeros(3)
    for i in range(6):
        limit = '<limit lower="%g" upper="%g" effort="50" velocity="3.14159"/>' % (
            JOINT_LOW[i],
            JOINT_HIGH[i],
        )
        child = names[i] + "_link"
        axis = "%g %g %g" % tuple(SCREW_AXES[i, :3])
        offset = points[i] - previous_point
        parts.append(_link(child, bodies[i]))
        parts.append(_joint(ARM_JOINTS[i], "revolute", parent, child, offset, axis, limit))
        parent = child
        previous_point = points[i]
    parts.append(_link("ee_gripper_link", "", 0.001))
    parts.append(_joint("ee_gripper", "fixed", parent, "ee_gripper_link", (x_ee, 0, 0)))
    limit = '<limit lower="0" upper="%g" effort="20" velocity="0.4"/>' % FINGER_MAX
    # finger inner faces at y = +-q: touching when closed
    for side, sign in (("left", 1), ("right", -1)):
        finger = _box((x_ee - 0.0225, sign * 0.006, 0), (0.045, 0.012, 0.024), rgba=grey)
        child = side + "_finger_link"
        axis = "0 %d 0" % sign
        parts.append(_link(child, finger, 0.03))
        parts.append(_joint(side + "_finger", "prismatic", parent, child, (0, 0, 0), axis, limit))
    return "".join(parts) + "</robot>"
