"""robot.py: the WidowX 250 6-DOF without ROS: arm backends, the robot environment, teleoperation.

PTR (Kumar et al., RSS 2023, Sec. V-A, Appendix B) evaluates on real WidowX 250 arms with the Bridge
setup (5 Hz, end-effector deltas, gripper absolute). This file drives the arm from a laptop over the
USB cable alone (numbers: SPEC section 6) and records target demos in the Bridge numpy format (SPEC
section 5).
- dynamixel.py holds the protocol and the serial bus, widowx.py the kinematics; this file holds the
  arm (servo IDs, setup, gripper), the Interbotix backend, WidowXEnv (its docstring: the safety
  rules), teleoperated recording and the command line. pyserial and opencv load only when used.
- A servo with a latched hardware error stops every command that would move the arm, before anything
  moves; `python robot.py check --reboot` clears it. So does a joint beyond its software limit,
  until it is moved back by hand.
- FTDI latency: the U2D2's FTDI chip holds received bytes for its latency timer (16 ms by default),
  so each reply comes 16 ms late; set 1 ms after every plug-in:
      echo 1 | sudo tee /sys/bus/usb-serial/devices/ttyUSB0/latency_timer
Usage:
    python robot.py check|sleep|home --port /dev/ttyUSB0
    python robot.py record --out target/my_task --episodes 10
"""

import argparse
import contextlib
import functools
import os
import select
import socket
import struct
import sys
import tempfile
import threading
import time

import numpy as np

from bridge import parse_trajectory, read_bridge_file
from cli import ExpectedError, run_cli
from dynamixel import (
    DRIVE_MODE,
    GOAL_POSITION,
    GOAL_PWM,
    HARDWARE_ERROR,
    HOMING_OFFSET,
    MAX_POSITION,
    MIN_POSITION,
    MODEL_NAMES,
    OPERATING_MODE,
    POSITION_MODE,
    PRESENT_POSITION,
    PRESENT_TEMPERATURE,
    PROFILE,
    PWM_MODE,
    RETURN_DELAY,
    REVERSE_BIT,
    SECONDARY_ID,
    TIME_PROFILE_BIT,
    TORQUE_ENABLE,
    DynamixelBus,
    DynamixelError,
    HardwareError,
    NoStatusError,
    PacketError,
    PortError,
    hardware_messages,
    rad_to_ticks,
    ticks_to_rad,
)
from fileio import bridge_trajectory, write_bridge_file
from widowx import (
    JOINT_HIGH,
    JOINT_LOW,
    R_DOWN,
    SLEEP_JOINTS,
    VELOCITY_LIMIT,
    IKError,
    euler_to_mat,
    forward_kinematics,
    inverse_kinematics,
    mat_to_euler,
)

# ---- the arm's servos (SPEC 6) -------------------------------------------------------------------
SERVO_NAMES = {
    1: "waist",
    2: "shoulder",
    3: "shoulder_shadow",
    4: "elbow",
    5: "elbow_shadow",
    6: "forearm_roll",
    7: "wrist_angle",
    8: "wrist_rotate",
    9: "gripper",
}
JOINT_IDS = (1, 2, 4, 6, 7, 8)  # the six joints, in the order of the kinematics
ARM_IDS = (1, 2, 3, 4, 5, 6, 7, 8)  # the joints and the shadows
GRIPPER_ID = 9
ALL_IDS = tuple(range(1, 10))
SHADOWS = {3: 2, 5: 4}  # shadow -> master (the shadow's Secondary ID)
REVERSED = (3, 5, 7)  # mounted mirrored: Drive Mode bit 0
CALIBRATED_TICKS = 5  # a calibrated shadow reads within this of its master
STALL_TICKS = 2  # the gripper moved when its position changed by more than this
LIMIT_SLACK = 0.015  # rad (10 ticks): a servo holding a goal at its limit reads a few ticks past it
# a servo without the time-based profile reads Profile Velocity in 0.229 rpm: 20 units = 0.48 rad/s
SLOW_PROFILE = (5, 20)
SLOW_PROFILE_SPEED = 0.48
HOME_JOINTS = np.zeros(6)
RESET_JOINTS = np.array([0.0, -0.191, 0.2993, 0.0, 1.4624, 0.0])  # gripper down at (0.25, 0, 0.18)
WORKSPACE = ((0.10, -0.25, 0.0), (0.41, 0.143, 0.33))  # Bridge's xyz box (m), low and high corners
# gripper linkage, Interbotix xs_sdk's (not this arm's: see DynamixelArm.read):
# finger = r sin(a) + sqrt(L^2 - r^2 cos^2(a)), in m
HORN_RADIUS = 0.014
LINK_LENGTH = 0.024
FINGER_CLOSED = 0.015
FINGER_OPEN = 0.037


class MissingPackageError(ExpectedError, ImportError):
    """An optional package (pyserial, opencv, Interbotix's API) is missing; the message names it."""


class RefusedToMove(DynamixelError):
    """The arm is not fit to move (a servo with a latched hardware error, a joint beyond its
    software limit), so the command moved nothing; the message names the servo and the fix."""


def open_bus(port="/dev/ttyUSB0", baud=1_000_000, **options):
    """The arm's DynamixelBus on a serial port path (or a port object), with the servos' names.
    options: DynamixelBus's timeout and retries."""
    try:
        return DynamixelBus(port, baud, names=SERVO_NAMES, **options)
    except ImportError as e:  # pyserial: dynamixel.py's message names the pip command
        raise MissingPackageError(str(e)) from None


def gripper_fraction(angle):
    """Gripper servo angle (rad) -> 0 closed .. 1 open, by the finger travel."""
    a1 = HORN_RADIUS * np.sin(angle)
    finger = a1 + np.sqrt(LINK_LENGTH**2 - HORN_RADIUS**2 + a1**2)
    return float(np.clip((finger - FINGER_CLOSED) / (FINGER_OPEN - FINGER_CLOSED), 0.0, 1.0))


def move_seconds(q, q_now, seconds, limit=VELOCITY_LIMIT):
    """The profile time of a move: `seconds`, or longer where a joint would pass the velocity limit.
    The profile ramps a quarter of the time (peak speed 4/3 of the mean): 1.5 x keeps it at 0.89."""
    dq = np.abs(np.clip(np.asarray(q, float), JOINT_LOW, JOINT_HIGH) - np.asarray(q_now, float))
    return max(seconds, 1.5 * float(dq.max()) / limit)


def hardware_error_message(errors, port):
    """{id: [messages]} -> one line naming each faulted servo, its errors, and the fix."""
    servos = "; ".join(f"ID {i} ({SERVO_NAMES[i]}): {', '.join(m)}" for i, m in errors.items())
    return (
        f"servo hardware error: {servos or 'alert bit set'}. The servo latched it and turned its "
        f"torque off; reboot it with: python robot.py check --port {port} --reboot"
    )


def joints_beyond_limits(angles):
    """{joint servo ID: angle (rad)} -> [(ID, angle, the limit it passed)] for each joint more than
    LIMIT_SLACK beyond its software limit (JOINT_LOW, JOINT_HIGH: the servos' position limits)."""
    beyond = []
    for i, angle in angles.items():
        low = JOINT_LOW[JOINT_IDS.index(i)]
        high = JOINT_HIGH[JOINT_IDS.index(i)]
        if angle < low - LIMIT_SLACK:
            beyond.append((i, float(angle), float(low)))
        elif angle > high + LIMIT_SLACK:
            beyond.append((i, float(angle), float(high)))
    return beyond


def beyond_limits_message(beyond, port):
    """[(ID, angle, limit)] -> one line naming each joint beyond its software limit, and the fix."""
    joints = "; ".join(
        f"ID {i} ({SERVO_NAMES[i]}) at {angle:+.3f} rad, limit {limit:+.3f} rad"
        for i, angle, limit in beyond
    )
    return (
        f"joint beyond its software limit: {joints}. The arm will not move until it is back "
        "inside: move it by hand with the torque off (it is off after power-up), then run "
        f"python robot.py check --port {port}"
    )


# ---- the arm backends ----------------------------------------------------------------------------
class Arm:
    """A backend: read() -> (joints, gripper 0 closed .. 1 open), command(q, grip=None,
    seconds=None), set_gripper(+1 open, -1 close, 0 stop), torque(on), setup(), hardware_errors() ->
    {id: [messages]}, close(); hold() and move() are built on those. read() and move() keep
    `joints`, where the arm was last known to be."""

    alerts = frozenset()  # IDs whose last reply had the hardware alert bit
    joints = None  # the last reading, or the goal of the last finished move (None: unknown)
    opening = False  # the gripper is being driven open
    log = print
    velocity_limit = VELOCITY_LIMIT  # rad/s: move_seconds
    port = "/dev/ttyUSB0"  # for the messages

    def hardware_errors(self):
        return {}

    def refuse_if_faulted(self):
        """Raise RefusedToMove, before anything moves, when a servo has a latched hardware error."""
        errors = self.hardware_errors()
        if errors:
            raise RefusedToMove(f"not moving the arm: {hardware_error_message(errors, self.port)}")

    def refuse_if_beyond_limits(self, q):
        """Raise RefusedToMove when a joint of q is beyond its software limit: it was pushed there
        by hand or its calibration is off, and turning the torque on would drive it to the limit
        unannounced."""
        beyond = joints_beyond_limits(dict(zip(JOINT_IDS, q)))
        if beyond:
            raise RefusedToMove(f"not moving the arm: {beyond_limits_message(beyond, self.port)}")

    def close(self):
        pass

    def hold(self, q=None):
        """Stay at q (default: where the arm reads); an opening gripper stops, a closing one keeps
        its grasp."""
        self.command(self.read()[0] if q is None else q)
        if self.opening:
            self.set_gripper(0)

    def move(self, q, seconds=2.0, start=None):
        """A joint move taking `seconds` (or longer: move_seconds from `start`, default where the
        arm reads), with 10 % more to arrive."""
        if start is None:
            start = self.read()[0]
        seconds = move_seconds(q, start, seconds, self.velocity_limit)
        self.command(q, seconds=seconds)
        time.sleep(1.1 * seconds)
        self.joints = np.clip(np.asarray(q, float), JOINT_LOW, JOINT_HIGH)


class DynamixelArm(Arm):
    """The WidowX 250 6-DOF on a DynamixelBus, set up as Interbotix's firmware config. The gripper
    runs in PWM mode: grip_pwm to move, hold_pwm to keep a grasp after a stall (stall_s still)."""

    def __init__(self, bus, grip_pwm=350, hold_pwm=150, stall_s=0.5, log=print):
        self.bus = bus
        self.port = bus.name
        self.alerts = bus.alerts
        self.grip_pwm = grip_pwm
        self.hold_pwm = hold_pwm
        self.stall_s = stall_s
        self.log = log
        self.grip = 0.0  # the gripper's last reading, 0 closed .. 1 open
        self.pwm = 0  # the gripper's PWM goal (None: unknown)
        self.seconds = None  # the profile time written last (None: unknown)
        self.stalled = 0  # +1 / -1: the gripper stalled while opening / closing
        self._grip_ticks = None  # the gripper's last position that moved by more than STALL_TICKS,
        self._grip_since = 0.0  # and since when it has stayed there

    @property
    def opening(self):
        return (self.pwm or 0) > 0

    def setup(self):
        """Reads first (they work with torque on), and refuses when a servo has a hardware error;
        only when EEPROM needs writing does the torque go off, and an arm holding itself up goes to
        the sleep pose before (it would drop). Then: write what differs (EEPROM wears out),
        calibrate the shadows, refuse when a joint is beyond its software limit, goals = present
        positions (no jump), torque on."""
        for i in ALL_IDS:  # all there before anything changes
            self.bus.ping(i)
        self.refuse_if_faulted()
        want = self._settings()
        have = {key: self.bus.read(*key) for key in want}
        writes = [key for key in want if have[key] != want[key]]
        # comparable once both Drive Modes are right
        position = self.bus.sync_read(ALL_IDS, PRESENT_POSITION)
        calibrate = [
            shadow
            for shadow, master in SHADOWS.items()
            if (shadow, DRIVE_MODE) in writes
            or (master, DRIVE_MODE) in writes
            or abs(position[shadow] - position[master]) > CALIBRATED_TICKS
        ]
        if writes or calibrate:
            if any(self.bus.sync_read(ARM_IDS, TORQUE_ENABLE).values()):
                self._sleep_before_torque_off(have)
            self.torque(False)  # EEPROM (address < 64) is writable only with torque off
            for i, item in writes:
                self.bus.write(i, item, want[i, item])
            for shadow in calibrate:
                self._calibrate(shadow, SHADOWS[shadow])
        q = self.read()[0]  # in the frame the settings just written give
        self.refuse_if_beyond_limits(q)
        self.pwm = None  # unknown: both get written
        self.seconds = None
        self.command(q, seconds=2.0)
        self.set_gripper(0)
        self.torque(True)

    def _settings(self):
        """The EEPROM settings of every servo: {(id, item): value}, in the order they are read."""
        low = rad_to_ticks(JOINT_LOW)
        high = rad_to_ticks(JOINT_HIGH)
        want = {}
        for i in ALL_IDS:
            want[i, RETURN_DELAY] = 0
            drive_mode = 0
            if i in REVERSED:
                drive_mode |= REVERSE_BIT
            if i in ARM_IDS:
                drive_mode |= TIME_PROFILE_BIT
            want[i, DRIVE_MODE] = drive_mode
            want[i, SECONDARY_ID] = SHADOWS.get(i, 255)  # 255: none
            want[i, OPERATING_MODE] = PWM_MODE if i == GRIPPER_ID else POSITION_MODE
            if i in ARM_IDS:  # position limits: a shadow takes its master's
                joint = JOINT_IDS.index(SHADOWS.get(i, i))
                want[i, MAX_POSITION] = high[joint]
                want[i, MIN_POSITION] = low[joint]
        return want

    def _sleep_before_torque_off(self, have):
        """To the sleep pose with the present settings (have: the EEPROM values read), so that
        turning the torque off does not drop the arm."""
        self.log(
            "setup: the arm holds itself up and EEPROM needs writing: "
            "to the sleep pose, then torque off"
        )
        q = self.read()[0]
        timed = {i: bool(have[i, DRIVE_MODE] & TIME_PROFILE_BIT) for i in ARM_IDS}
        seconds = move_seconds(SLEEP_JOINTS, q, 2.0, self.velocity_limit)
        if not all(timed.values()):  # the slow speed profile: long enough for the farthest joint
            seconds = max(seconds, float(np.abs(SLEEP_JOINTS - q).max()) / SLOW_PROFILE_SPEED + 0.5)
        self.seconds = seconds
        ms = int(round(seconds * 1000))
        profiles = {i: (ms // 4, ms) if timed[i] else SLOW_PROFILE for i in ARM_IDS}
        self.bus.sync_write(PROFILE, profiles)
        self.command(SLEEP_JOINTS)
        time.sleep(1.1 * seconds)

    def _calibrate(self, shadow, master):
        """Homing Offset so that the shadow reads its master's position. The sign for a reversed
        servo is undocumented (Interbotix's xs_sdk: shadow - master, SPEC 6: master - shadow): try
        one, check, else the other, else stop."""
        self.bus.write(shadow, HOMING_OFFSET, 0)
        master_ticks = self.bus.read(master, PRESENT_POSITION)
        shadow_ticks = self.bus.read(shadow, PRESENT_POSITION)
        difference = master_ticks - shadow_ticks
        if shadow in REVERSED:
            offsets = (-difference, difference)
        else:
            offsets = (difference, -difference)
        tried = []
        for offset in offsets:
            self.bus.write(shadow, HOMING_OFFSET, offset)
            now_master = self.bus.read(master, PRESENT_POSITION)
            now_shadow = self.bus.read(shadow, PRESENT_POSITION)
            tried.append((offset, now_master, now_shadow))
            if abs(now_shadow - now_master) <= CALIBRATED_TICKS:
                return offset
        raise DynamixelError(
            f"shadow servo ID {shadow} ({SERVO_NAMES[shadow]}) does not follow master ID "
            f"{master}: they read {master_ticks} and {shadow_ticks} ticks with Homing Offset 0; "
            f"(offset, master, shadow) then: {tried[0]}, {tried[1]}. Keep the arm still during "
            "setup; are both horns bolted on?"
        )

    def read(self):
        """One SYNC_READ of every servo, the shadows too: their replies carry their alert bits."""
        position = self.bus.sync_read(ALL_IDS, PRESENT_POSITION)
        now = time.monotonic()
        grip_ticks = position[GRIPPER_ID]
        self.grip = gripper_fraction(ticks_to_rad(grip_ticks))
        # Stall guard: 0..1 uses Interbotix's linkage constants, not this gripper's, so a mechanical
        # stop may come first. Driven but still for stall_s -> PWM 0 if opening, hold_pwm if closing
        # (Interbotix's least grip: a grasp holds).
        if self._grip_ticks is None or abs(grip_ticks - self._grip_ticks) > STALL_TICKS:
            self._grip_ticks = grip_ticks
            self._grip_since = now
        elif self.pwm and not self.stalled and now - self._grip_since >= self.stall_s:
            self.stalled = 1 if self.pwm > 0 else -1
            self.log(
                f"gripper stalled at {self.grip:.2f} with PWM {self.pwm} "
                "(a mechanical stop, or an object)"
            )
            self.set_gripper(self.stalled)
        self.joints = ticks_to_rad([position[i] for i in JOINT_IDS])
        return self.joints, self.grip

    def command(self, q, grip=None, seconds=None):
        """Goal joints, clipped to the limits whatever the caller computed, reached in `seconds`
        (time-based profile: Profile Velocity = the time in ms, acceleration a quarter); grip >= 0.5
        opens, else closes."""
        q = np.asarray(q, float)
        if q.shape != (6,) or not np.all(np.isfinite(q)):
            raise ValueError(f"a joint command is 6 finite angles, got {q}")
        if seconds is not None and seconds != self.seconds:
            ms = int(round(seconds * 1000))
            self.bus.sync_write(PROFILE, {i: (ms // 4, ms) for i in ARM_IDS})
            self.seconds = seconds
        ticks = rad_to_ticks(np.clip(q, JOINT_LOW, JOINT_HIGH)).tolist()
        # the shadows follow their masters through their Secondary IDs
        self.bus.sync_write(GOAL_POSITION, dict(zip(JOINT_IDS, ticks)))
        if grip is not None:
            self.set_gripper(1 if grip >= 0.5 else -1)

    def set_gripper(self, direction):
        """PWM mode has no position limits: stop at the ends of the travel (as Interbotix does);
        after a stall (read()), the same direction keeps the stalled PWM, a new one drives at full
        PWM again."""
        if direction != self.stalled:
            self.stalled = 0
        if not self.stalled:
            pwm = direction * self.grip_pwm
        elif direction < 0:
            pwm = -self.hold_pwm  # closed on something: hold it with less
        else:
            pwm = 0
        if (pwm > 0 and self.grip >= 1.0) or (pwm < 0 and self.grip <= 0.0):
            pwm = 0  # at the end of the travel
        if pwm != self.pwm:
            self.bus.write(GRIPPER_ID, GOAL_PWM, pwm)
            self.pwm = pwm
            self._grip_since = time.monotonic()

    def torque(self, on):
        """On servo by servo (each confirms); off by one SYNC_WRITE, which needs no replies and
        reaches every servo still listening."""
        if on:
            for i in ALL_IDS:
                self.bus.write(i, TORQUE_ENABLE, 1)
        else:
            self.bus.sync_write(TORQUE_ENABLE, {i: 0 for i in ALL_IDS})

    def hardware_errors(self):
        """-> {id: [messages]} of the servos whose Hardware Error Status is not 0: one SYNC_READ."""
        status = self.bus.sync_read(ALL_IDS, HARDWARE_ERROR)
        return {i: hardware_messages(s) for i, s in status.items() if s}

    def close(self):
        self.bus.close()


class InterbotixArm(Arm):
    """The same interface over Interbotix's Python API (ROS 1 or 2); their xs_sdk node
    (xsarm_control) sets the servos up, stops the gripper at its limits and logs servo errors."""

    GRIPPER_METHODS = {1: ("open", "release"), -1: ("close", "grasp")}  # (ROS 1 name, ROS 2 name)

    def __init__(self, robot_model="wx250s", log=print):
        try:
            from interbotix_xs_modules.xs_robot.arm import InterbotixManipulatorXS  # ROS 2
        except ImportError:
            try:
                from interbotix_xs_modules.arm import InterbotixManipulatorXS  # ROS 1
            except ImportError:
                raise MissingPackageError(
                    "--backend interbotix needs Interbotix's Python API (interbotix_xs_modules) "
                    "and xsarm_control; --backend dynamixel needs neither ROS nor Interbotix"
                ) from None
        self.bot = InterbotixManipulatorXS(robot_model, "arm", "gripper")
        self.log = log
        self.seconds = 2.0
        self.core = getattr(self.bot, "core", None) or self.bot.dxl  # ROS 2 or ROS 1

    def read(self):
        states = self.core.robot_get_joint_states()
        position = dict(zip(states.name, states.position))
        grip = (position["left_finger"] - FINGER_CLOSED) / (FINGER_OPEN - FINGER_CLOSED)
        self.joints = np.array([position[SERVO_NAMES[i]] for i in JOINT_IDS])
        return self.joints, float(np.clip(grip, 0.0, 1.0))

    def command(self, q, grip=None, seconds=None):
        self.seconds = seconds or self.seconds
        self.bot.arm.set_joint_positions(
            np.clip(q, JOINT_LOW, JOINT_HIGH).tolist(),
            moving_time=self.seconds,
            accel_time=self.seconds / 4,
            blocking=False,
        )
        if grip is not None:
            self.set_gripper(1 if grip >= 0.5 else -1)

    def set_gripper(self, direction):
        if direction not in self.GRIPPER_METHODS:  # 0 (stop) is their node's to do
            return
        ros1_name, ros2_name = self.GRIPPER_METHODS[direction]
        method = getattr(self.bot.gripper, ros1_name, None) or getattr(self.bot.gripper, ros2_name)
        method(delay=0)

    def torque(self, on):
        self.core.robot_torque_enable("group", "all", on)

    def setup(self):
        self.refuse_if_beyond_limits(self.read()[0])
        self.torque(True)


def make_arm(backend="dynamixel", port="/dev/ttyUSB0", baud=1_000_000, log=print):
    if backend == "dynamixel":
        return DynamixelArm(open_bus(port, baud), log=log)
    if backend == "interbotix":
        return InterbotixArm(log=log)
    raise ValueError(f"backend must be 'dynamixel' or 'interbotix', got {backend!r}")


# ---- the environment -----------------------------------------------------------------------------
def pose_to_state(T, grip):
    """Bridge state: xyz, euler relative to pointing down (R_DOWN), gripper (0 closed, 1 open)."""
    euler = mat_to_euler(T[:3, :3] @ R_DOWN.T)
    return np.array([*T[:3, 3], *euler, grip], np.float32)


def _cv2():
    try:
        import cv2
    except ImportError:
        raise MissingPackageError(
            "the camera needs opencv: pip install opencv-python (or camera=None)"
        ) from None
    return cv2


# twin.py's camera protocol: a request is the frame size wanted (0 0: the server's), a reply the
# frame's size then its BGR bytes
FRAME_HEADER = "<HH"


def twin_camera_socket(port):
    """Where twin.py serves the camera of the simulated arm on `port`: a Unix socket in the
    temporary folder, named after the pseudo-terminal (/dev/pts/3: widowx-twin-dev-pts-3.camera)."""
    name = os.path.realpath(port).strip("/").replace("/", "-")
    return os.path.join(tempfile.gettempdir(), f"widowx-twin-{name}.camera")


class SocketCamera:
    """Frames from a Unix socket (twin.py's simulated camera), read() as cv2.VideoCapture's:
    (ok, BGR frame of `size`)."""

    def __init__(self, path, size=(0, 0)):
        self.path = path
        self.size = tuple(size)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(path)
        except OSError as e:
            self.sock.close()
            raise OSError(
                f"no simulated camera at {path} ({e.strerror}): is twin.py serving that port?"
            ) from None

    def read(self):
        try:
            self.sock.sendall(struct.pack(FRAME_HEADER, *self.size))
            header = self._receive(struct.calcsize(FRAME_HEADER))
            height, width = struct.unpack(FRAME_HEADER, header)
            frame = np.frombuffer(self._receive(height * width * 3), np.uint8)
        except OSError:  # the twin stopped: no frame, as a camera that was unplugged
            return False, None
        return True, frame.reshape(height, width, 3)

    def _receive(self, n):
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError(f"{self.path} closed")
            data += chunk
        return data

    def release(self):
        self.sock.close()


def open_camera(camera, size=(0, 0)):
    """None (black images), anything with read() -> (ok, BGR frame), twin:<port> (twin.py's
    simulated camera, frames of size (H, W)), or an opencv index or path."""
    if camera is None or hasattr(camera, "read"):
        return camera
    if isinstance(camera, str) and camera.startswith("twin:"):
        return SocketCamera(twin_camera_socket(camera.removeprefix("twin:")), size)
    cv2 = _cv2()
    capture = cv2.VideoCapture(camera)
    if not capture.isOpened():
        raise OSError(f"could not open camera {camera!r} (ls /dev/video*; try another index)")
    capture.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # the newest frame, not one queued long ago
    return capture


class WidowXEnv:
    """The real arm with the simulator's interface (SPEC 2): reset() -> obs, step(action) -> (obs,
    reward, terminated, truncated, info), obs = {"image": uint8 (H, W, 3), "state": float32 (7,)}.
    action: the raw Bridge action (dx, dy, dz in m, droll, dpitch, dyaw in rad, gripper 0 closed ..
    1 open); the pose target accumulates from the previous target, not the measured pose;
    translation in the base frame, clipped to the workspace; rotation about the end effector with
    world axes (R <- Rz Ry Rx R). reward 0, info["success"] False: on the real arm, success comes
    from a learned classifier (online.py).
    Safety: a servo with a latched hardware error or a joint beyond its software limit makes reset()
    refuse before anything moves; commands are clipped to the joint limits (the servos' limits are
    a backstop); at most max_joint_step per joint and tick; an IK failure holds the arm; an
    exception, Ctrl-C or a servo hardware alert in reset/step runs safe_stop, which reaches the
    sleep pose even when a servo has stopped answering; a watchdog thread holds the arm when no
    step() came for watchdog_s (a late policy)."""

    def __init__(
        self,
        port="/dev/ttyUSB0",
        *,
        backend="dynamixel",
        baud=1_000_000,
        camera=0,
        image_size=128,
        control_hz=5.0,
        max_steps=40,
        workspace=WORKSPACE,
        max_joint_step=0.3,
        watchdog_s=0.5,
        move_s=2.0,
        reset_joints=RESET_JOINTS,
        arm=None,
        log=print,
    ):
        self.arm = arm if arm is not None else make_arm(backend, port, baud, log)
        self.log = log
        if np.isscalar(image_size):
            self.image_size = (image_size, image_size)
        else:
            self.image_size = tuple(image_size)
        self.camera = open_camera(camera, self.image_size)
        self.period = 1.0 / control_hz
        self.max_steps = max_steps
        self.move_s = move_s
        self.workspace = (np.asarray(workspace[0], float), np.asarray(workspace[1], float))
        self.max_joint_step = max_joint_step
        self.watchdog_s = watchdog_s
        self.reset_joints = reset_joints
        self._lock = threading.RLock()  # the control loop and the watchdog take turns on the arm
        self._stop = threading.Event()
        self._last = None  # when the last command went out
        self._ready = False  # set up and not safe-stopped since
        self._held = False  # the watchdog held the arm since the last command
        if watchdog_s:  # wakes 4 times per watchdog_s; acts only on a ready env, between steps
            threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self):
        while not self._stop.wait(self.watchdog_s / 4):
            self.watchdog_tick(time.monotonic())

    def watchdog_tick(self, now):
        """Hold the arm when no command came for watchdog_s (a late policy, a stall)."""
        with self._lock:
            if self._ready and not self._held and now - self._last > self.watchdog_s:
                try:
                    self.arm.hold()
                except Exception as e:  # the next step() meets the same fault and stops safely
                    self.log(f"watchdog: hold failed: {e}")
                self._held = True

    def safe_stop(self, reason=None):
        """Hold, open the gripper, sleep pose, torque off; every part runs even when an earlier one
        failed. The moves start from where the arm is, read once, else last known: a servo that
        stopped answering must not keep the arm from its sleep pose, since goal writes need no
        reply and the torque goes off at the end. Nothing more is tried once the serial port itself
        is gone: the servos keep holding their last goal."""
        with self._lock:
            self._ready = False
            if isinstance(reason, PortError):
                self.log(
                    "robot: no safe stop: the port is gone; the servos keep holding their last goal"
                )
                return
            if reason is not None:
                self.log(
                    f"robot: {type(reason).__name__}: {reason} -> safe stop (hold, open gripper, "
                    "sleep, torque off)"
                )
            q = self._joints_for_safe_stop()
            parts = (
                ("hold", functools.partial(self.arm.hold, q)),
                ("open gripper", functools.partial(self.arm.set_gripper, 1)),
                ("sleep pose", functools.partial(self.arm.move, SLEEP_JOINTS, self.move_s, q)),
                ("gripper off", functools.partial(self.arm.set_gripper, 0)),
                ("torque off", functools.partial(self.arm.torque, False)),
            )
            for what, part in parts:
                try:
                    part()
                except PortError as e:  # the parts after it cannot reach the servos either
                    self.log(f"safe stop: {what} failed: {e}")
                    break
                except BaseException as e:  # a second Ctrl-C included: the torque still goes off
                    self.log(f"safe stop: {what} failed: {type(e).__name__}: {e}")

    def _joints_for_safe_stop(self):
        """Where the arm is: a reading, else the arm's last known joints (None: unknown, the moves
        then read for themselves)."""
        try:
            return self.arm.read()[0]
        except BaseException as e:  # a second Ctrl-C included: the safe stop goes on
            self.log(
                f"safe stop: reading the arm failed ({type(e).__name__}): "
                "moving from its last known joints"
            )
            return self.arm.joints

    def reset(self, seed=None):
        """Set the arm up (the first time, or after a safe stop), open the gripper, go to
        reset_joints; seed is unused. A faulted servo or a joint beyond its limit: RefusedToMove,
        and nothing moves."""
        try:
            with self._lock:
                if self._ready:
                    self.arm.refuse_if_faulted()
                else:
                    self.arm.setup()  # refuses too, after the pings
                    self._ready = True
                self.arm.set_gripper(1)
                self.arm.move(self.reset_joints, self.move_s)
                obs = self._observe()
                self._target = forward_kinematics(self._q)
                self._t = 0
                self._held = False
                self._tick = time.monotonic()
                self._last = self._tick
                return obs
        except RefusedToMove:  # nothing moved, so nothing to stop (a safe stop would move the arm)
            self._ready = False
            raise
        except BaseException as e:  # Ctrl-C too
            self.safe_stop(e)
            raise

    def step(self, action):
        if not self._ready:
            raise RuntimeError(
                "call reset() first (after a safe stop, reset() sets the arm up again)"
            )
        try:
            action = np.asarray(action, float).reshape(-1)
            if action.shape != (7,) or not np.all(np.isfinite(action)):
                # a broken policy output stops the arm too
                raise ValueError(
                    "action must be 7 finite numbers (dx, dy, dz, droll, dpitch, dyaw, gripper): "
                    f"{action}"
                )
            with self._lock:
                self._raise_on_alerts()  # a reply since the last observation carried the alert bit
                info = {"success": False, "held_by_watchdog": self._held}
                q = self._next_joints(action, info)
                seconds = move_seconds(q, self._q, self.period, self.arm.velocity_limit)
                self.arm.command(q, grip=action[6], seconds=seconds)
                self._last = time.monotonic()
                self._held = False
            # 5 Hz while the policy keeps up; never observe sooner than half a tick after commanding
            self._tick = max(self._tick + self.period, self._last + self.period / 2)
            time.sleep(max(0.0, self._tick - time.monotonic()))
            with self._lock:
                obs = self._observe()
            self._t += 1
            return obs, 0.0, False, self._t >= self.max_steps, info
        except BaseException as e:  # Ctrl-C too
            self.safe_stop(e)
            raise

    def _next_joints(self, action, info):
        """Move the pose target by the action -> this tick's joint goal (max_joint_step at most).
        An unreachable target keeps the last reachable one and holds the arm (info["ik_error"])."""
        goal = self._target.copy()
        goal[:3, 3] = np.clip(goal[:3, 3] + action[:3], *self.workspace)
        goal[:3, :3] = euler_to_mat(action[3:6]) @ goal[:3, :3]
        try:
            q_goal = inverse_kinematics(goal, self._q)
            self._target = goal
        except IKError as e:
            q_goal = self._q
            info["ik_error"] = str(e)
        return self._q + np.clip(q_goal - self._q, -self.max_joint_step, self.max_joint_step)

    def _raise_on_alerts(self):
        if self.arm.alerts:
            errors = self.arm.hardware_errors()
            raise HardwareError(hardware_error_message(errors, self.arm.port))

    def _observe(self):
        self._q, grip = self.arm.read()
        self._raise_on_alerts()
        return {"image": self._image(), "state": pose_to_state(forward_kinematics(self._q), grip)}

    def _image(self):
        """The camera's newest frame as RGB at image_size (black without a camera)."""
        if self.camera is None:
            return np.zeros(self.image_size + (3,), np.uint8)
        for _ in range(5):  # a dropped frame happens; five in a row do not
            ok, frame = self.camera.read()
            if ok:
                break
        else:
            raise OSError(
                "the camera returned no frame 5 times in a row (cable? another program using it?)"
            )
        image = np.ascontiguousarray(np.asarray(frame, np.uint8)[..., ::-1])  # BGR -> RGB
        if image.shape[:2] != self.image_size:
            cv2 = _cv2()
            image = cv2.resize(image, self.image_size[::-1], interpolation=cv2.INTER_AREA)
        return image

    def close(self):
        """Sleep pose, torque off, release the port and the camera."""
        self._stop.set()
        if self._ready:
            self.safe_stop()
        self.arm.close()
        if hasattr(self.camera, "release"):
            self.camera.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---- teleoperation into the Bridge numpy format (SPEC 5) -----------------------------------------
TELEOP_KEYS = {  # key -> (action dimension, sign)
    "w": (0, 1),
    "s": (0, -1),
    "a": (1, 1),
    "d": (1, -1),
    "r": (2, 1),
    "f": (2, -1),
    "u": (3, -1),
    "o": (3, 1),
    "i": (4, 1),
    "k": (4, -1),
    "j": (5, 1),
    "l": (5, -1),
}
TELEOP_HELP = """Keys, one move per 5 Hz tick while held: w/s forward/back (x), a/d left/right (y),
r/f up/down (z), u/o roll, i/k pitch, j/l yaw, space opens/closes the gripper. Enter ends the
episode and keeps it, Backspace discards it, q quits (kept episodes are saved), Ctrl-C stops the arm
safely (sleep pose, torque off)."""


def record_episode(env, keys, max_steps=100, step_m=0.02, step_rad=0.08):
    """One teleoperated episode -> (Bridge trajectory, or None when discarded or empty; quit?).
    keys() -> the characters typed since the last call."""
    observations = [env.reset()]
    actions = []
    grip = 1.0
    while len(actions) < max_steps:
        typed = keys()
        if "q" in typed or "\x7f" in typed or "\b" in typed:
            return None, "q" in typed
        if "\n" in typed or "\r" in typed:
            break
        action = np.zeros(7)
        for key in set(typed) & TELEOP_KEYS.keys():
            axis, sign = TELEOP_KEYS[key]
            action[axis] = sign * (step_m if axis < 3 else step_rad)
        if typed.count(" ") % 2:  # each space toggles the gripper
            grip = 1.0 - grip
        action[6] = grip
        observations.append(env.step(action)[0])
        actions.append(action)
    if not actions:
        return None, False
    return bridge_trajectory(observations, actions), False


def read_recorded(path):
    """The trajectories already in an out.npy ([] when there is none), each checked: a damaged file
    raises BridgeFormatError naming the file, the trajectory and the field."""
    if not os.path.exists(path):
        return []
    trajectories = read_bridge_file(path)
    for index, trajectory in enumerate(trajectories):
        parse_trajectory(trajectory, path, index)
    return trajectories


def record(env, out_dir, episodes, keys, max_steps=100, val_every=5, log=print):
    """Record `episodes` more episodes into out_dir (every val_every-th to val/), saving after each
    one, atomically: a crash loses only the episode at hand. Returns the number kept. The episodes
    already there are read and checked first: a damaged file stops it before the arm moves, and is
    never overwritten."""
    paths = {split: os.path.join(out_dir, split, "out.npy") for split in ("train", "val")}
    splits = {split: read_recorded(path) for split, path in paths.items()}
    already = f"{len(splits['train'])} train + {len(splits['val'])} val episodes already there"
    log(f"{out_dir}: {already}")
    log(TELEOP_HELP)
    for n in range(episodes):
        log(f"episode {n + 1}/{episodes}: moving to the start pose ...")
        trajectory = None
        quit_ = False
        while trajectory is None and not quit_:
            trajectory, quit_ = record_episode(env, keys, max_steps)
        if trajectory is None:
            return n
        count = len(splits["train"]) + len(splits["val"]) + 1
        splits["val" if count % val_every == 0 else "train"].append(trajectory)
        for split, trajectories in splits.items():
            write_bridge_file(paths[split], trajectories)
        log(
            f"kept {len(trajectory['actions'])} steps; {len(splits['train'])} train + "
            f"{len(splits['val'])} val"
        )
    return episodes


@contextlib.contextmanager
def terminal_keys():
    """-> keys(): what was typed since the last call, without Enter or echo; Ctrl-C still works."""
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)

    def keys():
        if select.select([fd], [], [], 0)[0]:
            return os.read(fd, 1024).decode(errors="ignore")  # one tick's keys fit in 1024 bytes
        return ""

    try:
        yield keys
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


# ---- the command line ----------------------------------------------------------------------------
def check(bus, reboot=False, log=print):
    """A line per servo 1-9: model, position, temperature, hardware errors (rebooted with
    reboot=True), a joint beyond its software limit; then a line on what keeps the arm from moving.
    -> True when every servo answered, none is left with a hardware error and every joint is
    within its limits."""
    missing = []  # no valid reply: silent, or every status packet garbled
    faulted = []
    beyond = []
    for i in ALL_IDS:
        try:
            model, position, temperature, status = _read_servo(bus, i, reboot)
        except (NoStatusError, PacketError) as e:
            how = "no reply" if isinstance(e, NoStatusError) else "bad CRC"
            if missing:
                log(f"ID {i} {SERVO_NAMES[i]:<15} {how}")
            else:  # the first missing servo's message explains what to check
                log(f"ID {i} {SERVO_NAMES[i]:<15} {how}\n{e}")
            missing.append(i)
            continue
        angle = float(ticks_to_rad(position))
        past = joints_beyond_limits({i: angle}) if i in JOINT_IDS else []
        beyond += past
        if status and not reboot:
            faulted.append(i)
        log(
            f"ID {i} {SERVO_NAMES[i]:<15} {MODEL_NAMES.get(model, f'model {model}'):<10} "
            f"position {position:5d} ({angle:+.3f} rad) "
            f"{temperature:3d} C  {_servo_errors(status, reboot, past)}"
        )
    if faulted:
        servos = ", ".join(f"ID {i} ({SERVO_NAMES[i]})" for i in faulted)
        log(
            f"hardware error on {servos}: the arm will not move until it is rebooted with "
            f"python robot.py check --port {bus.name} --reboot"
        )
    if beyond:
        log(beyond_limits_message(beyond, bus.name))
    return not missing and not faulted and not beyond


def _read_servo(bus, i, reboot):
    """-> servo i's model, position (ticks), temperature and Hardware Error Status; with reboot,
    a servo with a hardware error is then rebooted."""
    model = bus.ping(i)
    position = bus.read(i, PRESENT_POSITION)
    temperature = bus.read(i, PRESENT_TEMPERATURE)
    status = bus.read(i, HARDWARE_ERROR)
    if status and reboot:
        bus.reboot(i)
    return model, position, temperature, status


def _servo_errors(status, reboot, beyond):
    """The last column of check's line: the hardware errors (-> rebooted), the limit passed."""
    errors = []
    if status:
        messages = "; ".join(hardware_messages(status))
        errors.append(f"{messages} -> rebooted" if reboot else messages)
    errors += [f"beyond its limit {limit:+.3f} rad" for _, _, limit in beyond]
    return "; ".join(errors) or "no errors"


def camera_arg(text):
    """--camera: an opencv index (digits), a path, or twin:<port> (twin.py's camera)."""
    return int(text) if text.isdigit() else text


def build_parser():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    commands = {
        "check": "ping servos 1-9: model, position, temperature, errors (dynamixel backend); "
        "exits 1 when a servo is missing or has a hardware error",
        "sleep": "set the arm up, go to the sleep pose, torque off",
        "home": "set the arm up, go to the home pose (torque stays on)",
        "record": "record teleoperated demos in the Bridge format.\n\n" + TELEOP_HELP,
    }
    for cmd, text in commands.items():
        c = sub.add_parser(cmd, help=text.split("\n")[0], description=text)
        c.add_argument("--port", default="/dev/ttyUSB0", help="the U2D2's serial port")
        c.add_argument("--baud", type=int, default=1_000_000)
        c.add_argument("--backend", choices=("dynamixel", "interbotix"), default="dynamixel")
    sub.choices["check"].add_argument(
        "--reboot", action="store_true", help="reboot servos with a hardware error"
    )
    r = sub.choices["record"]
    r.add_argument(
        "--out", required=True, help="task folder: writes OUT/train/out.npy and OUT/val/out.npy"
    )
    r.add_argument("--episodes", type=int, default=10)
    r.add_argument("--max_steps", type=int, default=100)
    r.add_argument("--val_every", type=int, default=5, help="every n-th kept episode goes to val/")
    r.add_argument(
        "--camera",
        default=0,
        type=camera_arg,
        help="opencv index or path, or twin:<port> for twin.py's simulated camera",
    )
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.cmd == "check":  # talks to the servos directly (stop the Interbotix node first)
        with contextlib.closing(open_bus(args.port, args.baud)) as bus:
            return 0 if check(bus, args.reboot) else 1
    if args.cmd in ("sleep", "home"):
        with contextlib.closing(make_arm(args.backend, args.port, args.baud)) as arm:
            arm.setup()
            if args.cmd == "sleep":  # resting on its cradle; home keeps holding
                arm.move(SLEEP_JOINTS)
                arm.torque(False)
            else:
                arm.move(HOME_JOINTS)
        return 0
    env = WidowXEnv(
        args.port,
        backend=args.backend,
        baud=args.baud,
        camera=args.camera,
        max_steps=args.max_steps,
    )
    with env, terminal_keys() as keys:
        record(env, args.out, args.episodes, keys, args.max_steps, args.val_every)
    return 0


if __name__ == "__main__":
    run_cli(main)
