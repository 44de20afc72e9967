"""twin.py: a simulated WidowX 250 behind a pseudo-terminal, answering Dynamixel protocol 2.0 as
the real servos do, so that robot.py's commands and its WidowXEnv run against it unchanged.

    python twin.py            # prints the port (e.g. /dev/pts/3) first, serves until Ctrl-C
    python robot.py check --port /dev/pts/3
    python robot.py record --out my_task --port /dev/pts/3 --camera twin:/dev/pts/3

The driver cannot tell: it opens the pseudo-terminal as it opens the U2D2's serial port.
- Servos 1-9 as on the arm, each a servos.Servo: the control table of SPEC 6 with the XM430's
  rules (EEPROM locked while the torque is on, read-only and whole items, position limits, latched
  hardware errors until a REBOOT), configured as Interbotix's setup leaves them; the shadows 3 and
  5 carry Secondary IDs 2 and 4, so they execute their masters' writes without answering. The twin
  starts at the sleep pose, torque off. PING, READ, WRITE, SYNC_READ, SYNC_WRITE, REBOOT; packets,
  CRC and byte stuffing are dynamixel.py's.
- Behind the servos is the PyBullet world of binsort_env.BinSortEnv (arm, table, bins, objects).
  A goal position starts a trapezoidal profile (servos.plan_profile: time-based with Drive Mode
  bit 2, else a speed and an acceleration) from where the joint is commanded now. The joint
  motors follow the profile; present positions, velocities and loads come from the physics. A
  joint follows its master's goal, or its shadow's while the master's torque is off; with both off
  it is held by gearbox friction only (enough to carry the arm, so the twin needs no cradle). The
  gripper in PWM mode drives both fingers towards an end of their travel at a speed and force in
  proportion to the PWM, so they stall on an object; closed on one, it is attached as BinSortEnv's
  grasp assist does (binsort_env.py's docstring), and opening releases it.
- Physics runs in a thread at binsort_env.PHYSICS_HZ, in real time (speed 1) or `speed` times
  faster (tests, with the driver's clock replaced by Twin.clock and Twin.sleep).
- The camera: a Unix socket at robot.twin_camera_socket(port) serves the env's camera view as BGR
  frames of the size asked for (robot.SocketCamera, which `--camera twin:<port>` opens).
- Faults on demand, at a time after the start (--fault KIND:SERVO@SECONDS, repeatable): silent
  (the servo stops answering, still obeying writes), overload and overheat (a latched hardware
  error: torque off, alert bit), crc (its status packets fail their CRC), slow (it answers
  --slow_ms late); --start_beyond_limit SERVO puts that joint 0.3 rad beyond its software limit.
- SIGINT and SIGTERM stop it cleanly (exit status 0, the camera's socket removed).
"""

import argparse
import dataclasses
import heapq
import os
import select
import signal
import socketserver
import struct
import sys
import termios
import threading
import time
import tty

import numpy as np

from arm import SERVO_NAMES
from binsort_env import PHYSICS_HZ, BinSortEnv, quiet_stdout
from cli import run_cli
from dynamixel import (
    BROADCAST,
    DRIVE_MODE,
    GOAL_POSITION,
    GOAL_PWM,
    HOMING_OFFSET,
    OPERATING_MODE,
    PING,
    PRESENT_POSITION,
    PWM_MODE,
    READ,
    REBOOT,
    REVERSE_BIT,
    SECONDARY_ID,
    STATUS,
    SYNC_READ,
    SYNC_WRITE,
    WRITE,
    PacketError,
    make_packet,
    rad_to_ticks,
    split_packet,
)
from robot import FRAME_HEADER, twin_camera_socket
from servos import (
    CRC_ERROR,
    CURRENT_UNIT,
    DATA_LENGTH_ERROR,
    GRIPPER,
    INSTRUCTION_ERROR,
    JOINT_OF,
    MASTERS,
    MIRRORED,
    MOVING,
    MOVING_SPEED,
    OVERHEATING,
    OVERLOAD,
    POSITION_MODES,
    PRESENT_CURRENT,
    PRESENT_VELOCITY,
    PROFILE_ACCELERATION,
    PROFILE_VELOCITY,
    SHADOWS,
    STALL_CURRENT,
    STALL_TORQUE,
    VELOCITY_UNIT,
    Servo,
    gripper_angle,
    joint_to_ticks,
    plan_profile,
    ticks_to_joint,
)
from widowx import FINGER_MAX, JOINT_HIGH, JOINT_LOW, SLEEP_JOINTS, VELOCITY_LIMIT

# ---- the physics of the servos (the world is binsort_env's) --------------------------------------
ARM_FORCE = 60.0  # N m the joint motors may use, as BinSortEnv's
FRICTION = 5.0  # N m of gearbox friction holding a joint with its torque off
POSITION_GAIN = 0.6  # PyBullet's position-control gains, tracking the profile's position and speed
VELOCITY_GAIN = 1.0
GRIP_PWM = 350  # the driver's PWM: the fingers' speed and force scale with |PWM| / GRIP_PWM
FINGER_SPEED = 0.1  # m/s of each finger at GRIP_PWM: closes the 7.4 cm opening in 0.37 s
FINGER_FORCE = 20.0  # N of each finger at GRIP_PWM, as BinSortEnv's
FINGER_FRICTION = 2.0  # N holding a finger without PWM
FINGER_MOVING = 0.002  # m/s: a finger faster than this makes the gripper's Moving 1
GRASP_EVERY = 4  # physics steps between two grasp checks of a closing gripper, as BinSortEnv's
CAMERA_SIZE = 128  # frames asked for as 0 x 0
BEYOND_LIMIT = 0.3  # rad past its software limit that --start_beyond_limit puts a joint

# ---- faults --------------------------------------------------------------------------------------
FAULT_KINDS = ("silent", "overload", "overheat", "crc", "slow")
HARDWARE_FAULTS = {"overload": OVERLOAD, "overheat": OVERHEATING}  # Hardware Error Status bits
SLOW_S = 0.05  # how late a slow servo answers (--slow_ms)


@dataclasses.dataclass
class Fault:
    """A fault that strikes servo `servo` at `at` seconds of the twin's clock."""

    kind: str
    servo: int
    at: float = 0.0


def parse_fault(text):
    """KIND:SERVO@SECONDS (e.g. overload:4@5) -> Fault; @SECONDS may be left out (at the start)."""
    expected = f"KIND:SERVO@SECONDS with KIND one of {', '.join(FAULT_KINDS)} and SERVO 1-9"
    kind, _, rest = text.partition(":")
    servo, _, at = rest.partition("@")
    try:
        fault = Fault(kind, int(servo), float(at or 0))
    except ValueError:
        raise ValueError(f"--fault {text}: expected {expected}") from None
    if kind not in FAULT_KINDS or fault.servo not in SERVO_NAMES or not fault.at >= 0:
        raise ValueError(f"--fault {text}: expected {expected}, SECONDS >= 0")
    return fault


# ---- the world behind the servos -----------------------------------------------------------------
class World:
    """binsort_env's bin-sort scene with its arm driven as servos drive it: each joint follows a
    Profile, or only friction holds it (None); the fingers run at a PWM. Readings (q, qd, effort,
    width, finger force) are refreshed after every physics step. Not thread-safe: the Twin holds
    its lock around every call."""

    def __init__(self, task="sort", seed=0, joints=SLEEP_JOINTS):
        self.env = BinSortEnv(task=task, seed=seed, terminate_on_success=False)
        self.env.reset(seed=seed)  # builds the scene; the arm is moved below
        self.client = self.env.client
        self.arm = self.env.arm
        for j, q in zip(self.env.arm_joints, joints):
            self.client.resetJointState(self.arm, j, q)
        for finger in self.env.fingers:
            self.client.resetJointState(self.arm, finger, FINGER_MAX)
        self.dt = 1.0 / PHYSICS_HZ
        self.t = 0.0
        self.steps = 0
        self.profiles = [None] * 6
        self.pwm = 0
        self._read()

    def setpoint(self, joint):
        """Where the joint is commanded now: its profile's position, else where it is."""
        profile = self.profiles[joint]
        return profile.at(self.t)[0] if profile else float(self.q[joint])

    def moving(self, joint):
        """Moving (122): a profile still running, or faster than the Moving Threshold."""
        profile = self.profiles[joint]
        busy = profile is not None and self.t < profile.t0 + profile.duration
        return busy or abs(self.qd[joint]) > MOVING_SPEED

    def step(self):
        client = self.client
        for joint, j in enumerate(self.env.arm_joints):
            profile = self.profiles[joint]
            if profile is None:  # torque off: the gearbox holds it, by friction
                client.setJointMotorControl2(
                    self.arm, j, client.VELOCITY_CONTROL, targetVelocity=0, force=FRICTION
                )
                continue
            position, velocity = profile.at(self.t)
            client.setJointMotorControl2(
                self.arm,
                j,
                client.POSITION_CONTROL,
                targetPosition=position,
                targetVelocity=velocity,
                force=ARM_FORCE,
                maxVelocity=VELOCITY_LIMIT,
                positionGain=POSITION_GAIN,
                velocityGain=VELOCITY_GAIN,
            )
        self._drive_fingers()
        client.stepSimulation()
        self.t += self.dt
        self.steps += 1
        self._grasp_or_release()
        self._read()

    def _drive_fingers(self):
        """PWM: towards the open (> 0) or closed (< 0) end of the travel at a speed and with a
        force in proportion to |PWM|, so the fingers stall on an object; 0: friction holds them.
        Holding an object they keep their width, as BinSortEnv's grasp assist does."""
        client = self.client
        share = min(abs(self.pwm) / GRIP_PWM, 1.0)
        for finger in self.env.fingers:
            if self.env.held is not None:
                client.setJointMotorControl2(
                    self.arm,
                    finger,
                    client.POSITION_CONTROL,
                    self.env._hold_width,
                    force=FINGER_FORCE,
                )
            elif self.pwm:
                client.setJointMotorControl2(
                    self.arm,
                    finger,
                    client.POSITION_CONTROL,
                    targetPosition=FINGER_MAX if self.pwm > 0 else 0.0,
                    force=FINGER_FORCE * share,
                    maxVelocity=FINGER_SPEED * share,
                )
            else:
                client.setJointMotorControl2(
                    self.arm,
                    finger,
                    client.VELOCITY_CONTROL,
                    targetVelocity=0,
                    force=FINGER_FRICTION,
                )

    def _grasp_or_release(self):
        """BinSortEnv's grasp assist: closing fingers on an object attach it, opening releases."""
        env = self.env
        if self.pwm > 0 and env.held is not None:
            self.client.removeConstraint(env._grasp_constraint)
            env.held = None
            env._grasp_constraint = None
        elif self.pwm < 0 and env.held is None and self.steps % GRASP_EVERY == 0:
            env._q = self.q.copy()  # _try_grasp re-drives the arm to env._q; step() overrides it
            env._grip = 0.0
            env._try_grasp()

    def _read(self):
        joints = self.client.getJointStates(self.arm, self.env.arm_joints)
        self.q = np.array([s[0] for s in joints])
        self.qd = np.array([s[1] for s in joints])
        self.effort = np.array([s[3] for s in joints])
        fingers = self.client.getJointStates(self.arm, self.env.fingers)
        self.width = float(np.mean([s[0] for s in fingers]))
        self.finger_speed = float(np.mean([s[1] for s in fingers]))
        self.finger_force = float(np.mean([s[3] for s in fingers]))

    def render(self, height, width):
        """The env's camera view as RGB (height, width, 3): BinSortEnv renders a square, cropped
        to the size asked for."""
        self.env.image_size = max(height, width)
        return self.env.render()[:height, :width]

    def close(self):
        self.env.close()


# ---- the twin: servos, world, pseudo-terminal, camera --------------------------------------------
class _FrameHandler(socketserver.BaseRequestHandler):
    """One camera client: each request (height, width) gets a frame of that size back."""

    def handle(self):
        twin = self.server.twin
        while True:
            request = _receive(self.request, struct.calcsize(FRAME_HEADER))
            if request is None:
                return
            height, width = struct.unpack(FRAME_HEADER, request)
            frame = twin.frame(height or CAMERA_SIZE, width or CAMERA_SIZE)
            header = struct.pack(FRAME_HEADER, *frame.shape[:2])
            self.request.sendall(header + frame.tobytes())


def _receive(sock, n):
    """Exactly n bytes from a socket, or None when the other end closed it."""
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


class Twin:
    """The simulated arm: servos 1-9 on a pseudo-terminal (port: its path), the world behind them
    in a physics thread, the camera on a Unix socket (camera_path). start() runs it, close() stops
    it. lock guards servos and world; clock() is the world's time, sleep(s) waits for it."""

    def __init__(
        self,
        task="sort",
        seed=0,
        speed=1.0,
        faults=(),
        beyond=(),
        slow_s=SLOW_S,
        log=None,
    ):
        self.log = log or (lambda line: print(f"twin: {line}", file=sys.stderr, flush=True))
        self.speed = speed
        self.faults = sorted(faults, key=lambda f: f.at)
        self.slow_s = slow_s
        self.lock = threading.RLock()
        self._stop = threading.Event()
        self.servos = {i: Servo(i) for i in SERVO_NAMES}
        joints = SLEEP_JOINTS.copy()
        for servo in beyond:  # past the limit on the side nearer the sleep pose
            joint = JOINT_OF[servo]
            if joints[joint] - JOINT_LOW[joint] < JOINT_HIGH[joint] - joints[joint]:
                joints[joint] = JOINT_LOW[joint] - BEYOND_LIMIT
            else:
                joints[joint] = JOINT_HIGH[joint] + BEYOND_LIMIT
        with quiet_stdout():  # PyBullet prints on file descriptor 1, where the port goes
            self.world = World(task, seed, joints)
        for servo in self.servos.values():
            servo.set(GOAL_POSITION, self.present(servo))
        self._planned = {}  # joint -> (driving servo, goal, profile registers) of its profile
        self._pending = []  # delayed status packets: (due, sequence, packet)
        self._sent = 0
        # the pseudo-terminal: the twin keeps the servo end (master) and an open slave, so that
        # the driver opening and closing the port never hangs the line up
        self.master, self._slave = os.openpty()
        tty.setraw(self._slave)  # bytes as they are: no echo, no newline translation
        self.port = os.ttyname(self._slave)
        self.camera_path = twin_camera_socket(self.port)
        if os.path.exists(self.camera_path):  # left by a twin that was killed
            os.unlink(self.camera_path)
        self._camera = socketserver.ThreadingUnixStreamServer(self.camera_path, _FrameHandler)
        self._camera.daemon_threads = True
        self._camera.twin = self
        self._threads = [
            threading.Thread(target=self._run_physics, daemon=True),
            threading.Thread(target=self._serve_bus, daemon=True),
            threading.Thread(target=self._camera.serve_forever, args=(0.05,), daemon=True),
        ]

    def start(self):
        for thread in self._threads:
            thread.start()
        return self

    def close(self):
        self._stop.set()
        if self._threads[2].is_alive():  # shutdown() waits for serve_forever, which must be running
            self._camera.shutdown()
        for thread in self._threads:
            if thread.is_alive():
                thread.join()
        self._camera.server_close()
        if os.path.exists(self.camera_path):
            os.unlink(self.camera_path)
        os.close(self.master)
        os.close(self._slave)
        with self.lock:
            self.world.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    # ---- time
    def clock(self):
        """The world's time (s): real time at speed 1, `speed` times faster otherwise."""
        return self.world.t

    def sleep(self, seconds):
        """Wait until the world's clock has advanced by `seconds`."""
        end = self.world.t + seconds
        while self.world.t < end and not self._stop.is_set():
            time.sleep(0.001)

    def _run_physics(self):
        """Steps at PHYSICS_HZ of the world's time; a step late by more than 0.1 s of wall time
        (a busy machine) makes the world slow down instead of catching up in a burst."""
        due = time.monotonic()
        while not self._stop.is_set():
            with self.lock:
                self._strike_faults()
                self.world.step()
            due += self.world.dt / self.speed
            wait = due - time.monotonic()
            if wait > 0:
                self._stop.wait(wait)
            elif wait < -0.1:
                due = time.monotonic()

    # ---- the servos and the world
    def present(self, servo):
        """The servo's Present Position register (ticks)."""
        if servo.id == GRIPPER:
            ticks = rad_to_ticks(gripper_angle(self.world.width))
            return int(ticks) + servo.get(HOMING_OFFSET)
        return joint_to_ticks(servo, self.world.q[JOINT_OF[servo.id]])

    def _refresh(self, servo):
        """The present-value registers from the world, before a read."""
        servo.set(PRESENT_POSITION, self.present(servo))
        if servo.id == GRIPPER:  # Present Load (0.1 %) of the finger force
            servo.set(PRESENT_CURRENT, np.clip(self.world.finger_force / FINGER_FORCE, -1, 1) * 1e3)
            servo.set(MOVING, abs(self.world.finger_speed) > FINGER_MOVING)
            return
        joint = JOINT_OF[servo.id]
        sign = -1 if (servo.id in MIRRORED) != bool(servo.get(DRIVE_MODE) & REVERSE_BIT) else 1
        velocity = sign * self.world.qd[joint] / VELOCITY_UNIT
        current = sign * self.world.effort[joint] / STALL_TORQUE * STALL_CURRENT / CURRENT_UNIT
        servo.set(PRESENT_VELOCITY, velocity)
        servo.set(PRESENT_CURRENT, np.clip(current, -32768, 32767))
        servo.set(MOVING, self.world.moving(joint))

    def _update(self):
        """After a write or a fault: each joint follows the goal of the first of its servos with
        the torque on (the master, else its shadow), or friction holds it; a new goal, driver or
        profile setting starts a new profile from the joint's setpoint. The gripper runs at its
        Goal PWM with the torque on in PWM mode."""
        for joint, master in enumerate(MASTERS):
            shadows = [s for s, m in SHADOWS.items() if m == master]
            driving = [self.servos[i] for i in (master, *shadows) if self.servos[i].torque]
            driving = [s for s in driving if s.get(OPERATING_MODE) in POSITION_MODES]
            if not driving:
                self.world.profiles[joint] = None
                self._planned.pop(joint, None)
                continue
            servo = driving[0]
            profile = (servo.get(PROFILE_VELOCITY), servo.get(PROFILE_ACCELERATION))
            key = (servo.id, servo.get(GOAL_POSITION), profile)
            if self._planned.get(joint) == key:
                continue
            self._planned[joint] = key
            start = self.world.setpoint(joint)
            goal = ticks_to_joint(servo, servo.get(GOAL_POSITION))
            self.world.profiles[joint] = plan_profile(servo, start, goal, self.world.t)
        gripper = self.servos[GRIPPER]
        on = gripper.torque and gripper.get(OPERATING_MODE) == PWM_MODE
        self.world.pwm = gripper.get(GOAL_PWM) if on else 0

    def _write(self, servo, address, data):
        """A write reaching `servo` (addressed to it or to its Secondary ID) -> result code."""
        code = servo.check_write(address, data)
        if not code:
            servo.write(address, data)
        return code

    def _strike_faults(self):
        while self.faults and self.faults[0].at <= self.world.t:
            fault = self.faults.pop(0)
            self.inject(fault.kind, fault.servo)

    def inject(self, kind, servo_id):
        """Fault `kind` (FAULT_KINDS) on a servo, now."""
        with self.lock:
            servo = self.servos[servo_id]
            if kind in HARDWARE_FAULTS:
                servo.latch(HARDWARE_FAULTS[kind])
                self._update()
            elif kind == "silent":
                servo.silent = True
            elif kind == "crc":
                servo.garbled = True
            elif kind == "slow":
                servo.delay = self.slow_s
            else:
                raise ValueError(f"fault kind {kind!r}: expected one of {', '.join(FAULT_KINDS)}")
        name = SERVO_NAMES[servo_id]
        self.log(f"{self.world.t:.1f} s: {kind} fault on servo ID {servo_id} ({name})")

    def frame(self, height, width):
        """The camera's view, BGR as cv2.VideoCapture gives it."""
        with self.lock:
            return np.ascontiguousarray(self.world.render(height, width)[..., ::-1])

    # ---- the protocol
    def _status(self, servo, error=0, data=b""):
        return servo, make_packet(servo.id, STATUS, bytes([error | servo.status_error]) + data)

    def answer(self, target, instruction, params):
        """One instruction packet -> [(servo, status packet)] of the servos that answer it."""
        with self.lock:
            if instruction == SYNC_READ:
                return self._sync_read(params)
            if instruction == SYNC_WRITE:
                self._sync_write(params)
                return []
            addressed = [s for s in self.servos.values() if target in (s.id, BROADCAST)]
            followers = [s for s in self.servos.values() if s.get(SECONDARY_ID) == target]
            if instruction == PING:  # the model number and the firmware version
                return [self._status(s, 0, s.read(0, 2)[1] + s.read(6, 1)[1]) for s in addressed]
            if target == BROADCAST:  # only PING, SYNC_READ and SYNC_WRITE may be broadcast
                return []
            if instruction == READ:
                return [self._read(s, params) for s in addressed]
            if instruction == WRITE:
                if len(params) < 3:
                    return [self._status(s, DATA_LENGTH_ERROR) for s in addressed]
                address = struct.unpack_from("<H", params)[0]
                replies = [self._status(s, self._write(s, address, params[2:])) for s in addressed]
                for servo in followers:  # a Secondary ID executes silently
                    self._write(servo, address, params[2:])
                self._update()
                return replies
            if instruction == REBOOT:
                replies = [self._status(s) for s in addressed]  # it answers, then restarts
                for servo in addressed:
                    servo.reboot(self.present(servo))
                self._update()
                return replies
            return [self._status(s, INSTRUCTION_ERROR) for s in addressed]

    def _read(self, servo, params):
        if len(params) != 4:
            return self._status(servo, DATA_LENGTH_ERROR)
        self._refresh(servo)
        error, data = servo.read(*struct.unpack("<HH", params))
        return self._status(servo, error, data)

    def _sync_read(self, params):
        """Each listed servo answers in turn, as READ."""
        if len(params) < 5:
            return []
        return [self._read(self.servos[i], params[:4]) for i in params[4:] if i in self.servos]

    def _sync_write(self, params):
        """Each servo takes the entry with its ID, else the one with its Secondary ID."""
        address, size = struct.unpack_from("<HH", params)
        entries = {}
        for k in range(4, len(params) - size, size + 1):
            entries[params[k]] = params[k + 1 : k + 1 + size]
        for servo in self.servos.values():
            data = entries.get(servo.id, entries.get(servo.get(SECONDARY_ID)))
            if data is not None:
                self._write(servo, address, data)
        self._update()

    def _serve_bus(self):
        """Read instruction packets from the pseudo-terminal, write the status packets back (a
        slow servo's later)."""
        buf = b""
        while not self._stop.is_set():
            wait = 0.01
            if self._pending:
                wait = min(wait, max(0.0, self._pending[0][0] - time.monotonic()))
            ready = select.select([self.master], [], [], wait)[0]
            while self._pending and self._pending[0][0] <= time.monotonic():
                os.write(self.master, heapq.heappop(self._pending)[2])
            if not ready:
                continue
            buf += os.read(self.master, 4096)
            while True:
                try:
                    got, buf, _ = split_packet(buf)
                except PacketError as e:  # a corrupted instruction: its servo says so
                    buf = e.rest
                    servo = self.servos.get(e.dxl_id)
                    if servo is not None:
                        self._send(*self._status(servo, CRC_ERROR))
                    continue
                if got is None:
                    break
                for servo, packet in self.answer(*got):
                    self._send(servo, packet)

    def _send(self, servo, packet):
        """A status packet onto the line, as the servo's faults let it."""
        if servo.silent:
            return
        if servo.garbled:  # the high byte of the CRC flipped
            packet = packet[:-1] + bytes([packet[-1] ^ 0xFF])
        if servo.delay:
            self._sent += 1
            heapq.heappush(self._pending, (time.monotonic() + servo.delay, self._sent, packet))
            return
        os.write(self.master, packet)


class PtyPort:
    """The driver's end of the twin's pseudo-terminal, opened by its path, with the serial-port
    methods dynamixel.DynamixelBus uses, so that scripts and tests reach the twin without pyserial
    (robot.py's commands open the same path with pyserial, as they open the U2D2)."""

    def __init__(self, path):
        self.fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
        self.name = path

    def read(self, n):
        return os.read(self.fd, n) if select.select([self.fd], [], [], 0.01)[0] else b""

    def write(self, data):
        os.write(self.fd, data)

    def reset_input_buffer(self):
        termios.tcflush(self.fd, termios.TCIFLUSH)

    def close(self):
        os.close(self.fd)


# ---- the command line ----------------------------------------------------------------------------
def build_parser():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--task", default="sort", help="the bin-sort scene (binsort_env.parse_task)")
    p.add_argument("--seed", type=int, default=0, help="where the scene's objects lie")
    p.add_argument(
        "--fault",
        action="append",
        default=[],
        help="KIND:SERVO@SECONDS, e.g. overload:4@5; KIND: " + ", ".join(FAULT_KINDS),
    )
    p.add_argument(
        "--start_beyond_limit",
        action="append",
        default=[],
        type=int,
        choices=MASTERS,
        metavar="SERVO",
        help=f"start with this joint {BEYOND_LIMIT} rad beyond its software limit",
    )
    p.add_argument("--slow_ms", type=float, default=SLOW_S * 1e3, help="how late a slow servo is")
    p.add_argument(
        "--speed", type=float, default=1.0, help="the world's clock, in multiples of real time"
    )
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if not args.speed > 0:
        raise ValueError(f"--speed {args.speed}: expected a positive number")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    faults = [parse_fault(text) for text in args.fault]
    beyond = args.start_beyond_limit
    twin = Twin(args.task, args.seed, args.speed, faults, beyond, args.slow_ms / 1e3)
    with twin:
        print(twin.port, flush=True)
        twin.log(
            f"WidowX 250 servos 1-9 on {twin.port}, camera --camera twin:{twin.port} "
            f"({twin.camera_path}); Ctrl-C stops"
        )
        while not stop.wait(0.5):
            pass
    twin.log("stopped")
    return 0


if __name__ == "__main__":
    run_cli(main)
