"""robot.py: the WidowX 250 6-DOF without ROS as an environment: WidowXEnv, the camera,
teleoperated recording, the robot command line.

PTR (Kumar et al., RSS 2023, Sec. V-A, Appendix B) evaluates on real WidowX 250 arms with the Bridge
setup (5 Hz, end-effector deltas, gripper absolute). This file drives the arm from a laptop over the
USB cable alone (numbers: SPEC section 6) and records target demos in the Bridge numpy format (SPEC
section 5).
- arm.py holds the servo-level driver (servo IDs, setup, gripper, the Interbotix backend, `check`),
  dynamixel.py the protocol and the serial bus, widowx.py the kinematics; this file holds
  WidowXEnv (its docstring: the safety rules), the camera, teleoperated recording and the command
  line. pyserial and opencv load only when used.
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
import dataclasses
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

from arm import (
    BACKENDS,
    RefusedToMove,
    check,
    hardware_error_message,
    make_arm,
    move_seconds,
    open_bus,
)
from bridge import bridge_trajectory, parse_trajectory, read_bridge_file, write_bridge_file
from cli import MissingPackageError, add_dataclass_args, dataclass_from_args, run_cli
from dynamixel import BAUD, PORT, HardwareError, PortError
from widowx import (
    R_DOWN,
    SLEEP_JOINTS,
    IKError,
    euler_to_mat,
    forward_kinematics,
    inverse_kinematics,
    mat_to_euler,
)

# ---- the poses and the workspace (SPEC 6) --------------------------------------------------------
HOME_JOINTS = np.zeros(6)
RESET_JOINTS = np.array([0.0, -0.191, 0.2993, 0.0, 1.4624, 0.0])  # gripper down at (0.25, 0, 0.18)
WORKSPACE = ((0.10, -0.25, 0.0), (0.41, 0.143, 0.33))  # Bridge's xyz box (m), low and high corners


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
        port=PORT,
        *,
        backend="dynamixel",
        baud=BAUD,
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


@dataclasses.dataclass(frozen=True)
class RecordOptions:
    """What `robot.py record` records (each field is a flag of it): record's and the camera's."""

    episodes: int = 10  # episodes to record
    max_steps: int = 100  # steps of one episode at most
    val_every: int = 5  # every n-th kept episode goes to val/
    camera: str = "0"  # opencv index or path, or twin:<port> for twin.py's simulated camera


def record_episode(env, keys, max_steps=RecordOptions.max_steps, step_m=0.02, step_rad=0.08):
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


def record(env, out_dir, keys, options=RecordOptions(), log=print):
    """Record options.episodes more episodes of at most options.max_steps steps into out_dir (every
    options.val_every-th to val/), saving after each one, atomically: a crash loses only the episode
    at hand. Returns the number kept. The episodes already there are read and checked first: a
    damaged file stops it before the arm moves, and is never overwritten."""
    paths = {split: os.path.join(out_dir, split, "out.npy") for split in ("train", "val")}
    splits = {split: read_recorded(path) for split, path in paths.items()}
    already = f"{len(splits['train'])} train + {len(splits['val'])} val episodes already there"
    log(f"{out_dir}: {already}")
    log(TELEOP_HELP)
    episodes = options.episodes
    for n in range(episodes):
        log(f"episode {n + 1}/{episodes}: moving to the start pose ...")
        trajectory = None
        quit_ = False
        while trajectory is None and not quit_:
            trajectory, quit_ = record_episode(env, keys, options.max_steps)
        if trajectory is None:
            return n
        count = len(splits["train"]) + len(splits["val"]) + 1
        splits["val" if count % options.val_every == 0 else "train"].append(trajectory)
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
@dataclasses.dataclass(frozen=True)
class ArmOptions:
    """How robot.py's commands reach the arm (each field is a flag of check, sleep, home and
    record): make_arm's and WidowXEnv's arguments."""

    port: str = PORT  # the U2D2's serial port
    baud: int = BAUD  # the servos' baud rate
    backend: str = "dynamixel"  # the servos directly, or Interbotix's API (not check's)


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
        add_dataclass_args(c, ArmOptions, choices={"backend": BACKENDS})
    sub.choices["check"].add_argument(
        "--reboot", action="store_true", help="reboot servos with a hardware error"
    )
    r = sub.choices["record"]
    r.add_argument(
        "--out", required=True, help="task folder: writes OUT/train/out.npy and OUT/val/out.npy"
    )
    add_dataclass_args(r, RecordOptions)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    options = dataclass_from_args(ArmOptions, args)
    if args.cmd == "check":  # talks to the servos directly (stop the Interbotix node first)
        with contextlib.closing(open_bus(options.port, options.baud)) as bus:
            return 0 if check(bus, args.reboot) else 1
    if args.cmd in ("sleep", "home"):
        with contextlib.closing(make_arm(options.backend, options.port, options.baud)) as arm:
            arm.setup()
            if args.cmd == "sleep":  # resting on its cradle; home keeps holding
                arm.move(SLEEP_JOINTS)
                arm.torque(False)
            else:
                arm.move(HOME_JOINTS)
        return 0
    recording = dataclass_from_args(RecordOptions, args)
    env = WidowXEnv(
        options.port,
        backend=options.backend,
        baud=options.baud,
        camera=camera_arg(recording.camera),
        max_steps=recording.max_steps,
    )
    with env, terminal_keys() as keys:
        record(env, args.out, keys, recording)
    return 0


if __name__ == "__main__":
    run_cli(main)
