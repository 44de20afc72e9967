"""arm.py: the WidowX 250 6-DOF as servos, without ROS: the servo map, setup, shadow calibration,
the gripper in PWM mode, the Interbotix backend, and `check`.

PTR (Kumar et al., RSS 2023, Sec. V-A, Appendix B) evaluates on real WidowX 250 arms with the Bridge
setup. This file is the servo-level driver (SPEC section 2; the servos' numbers: SPEC section 6): an
Arm reads the six joints and the gripper and commands joint goals, either on a DynamixelBus straight
over the U2D2's USB cable (DynamixelArm) or through Interbotix's Python API (InterbotixArm).
robot.py builds the Bridge environment, the recording and the command line on it.
- It copies with dynamixel.py (the protocol and the serial bus), widowx.py (the kinematics and the
  joint limits) and cli.py, and needs no other file of the project; pyserial loads only when a bus
  opens, Interbotix's API only for its backend.
- A servo with a latched hardware error, or a joint beyond its software limit, makes a move refuse
  (RefusedToMove) before anything moves; the message names the fix, `python robot.py check`.
"""

import time

import numpy as np

from cli import MissingPackageError
from dynamixel import (
    BAUD,
    PORT,
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
    NoStatusError,
    PacketError,
    hardware_messages,
    rad_to_ticks,
    ticks_to_rad,
)
from widowx import GRIPPER_CLOSED_BELOW, JOINT_HIGH, JOINT_LOW, SLEEP_JOINTS, VELOCITY_LIMIT

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
# gripper linkage, Interbotix xs_sdk's (not this arm's: see DynamixelArm.read):
# finger = r sin(a) + sqrt(L^2 - r^2 cos^2(a)), in m
HORN_RADIUS = 0.014
LINK_LENGTH = 0.024
FINGER_CLOSED = 0.015
FINGER_OPEN = 0.037


class RefusedToMove(DynamixelError):
    """The arm is not fit to move (a servo with a latched hardware error, a joint beyond its
    software limit), so the command moved nothing; the message names the servo and the fix."""


def open_bus(port=PORT, baud=BAUD, **options):
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
    port = PORT  # for the messages

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
        (time-based profile: Profile Velocity = the time in ms, acceleration a quarter); grip at or
        above widowx.GRIPPER_CLOSED_BELOW opens, below it closes."""
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
            self.set_gripper(1 if grip >= GRIPPER_CLOSED_BELOW else -1)

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
            self.set_gripper(1 if grip >= GRIPPER_CLOSED_BELOW else -1)

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


BACKENDS = ("dynamixel", "interbotix")  # make_arm's: the servos directly, or Interbotix's API


def make_arm(backend="dynamixel", port=PORT, baud=BAUD, log=print):
    """-> the Arm of `backend`: a DynamixelArm on the bus at `port`, or an InterbotixArm."""
    if backend == "dynamixel":
        return DynamixelArm(open_bus(port, baud), log=log)
    if backend == "interbotix":
        return InterbotixArm(log=log)
    raise ValueError(f"backend must be 'dynamixel' or 'interbotix', got {backend!r}")


# ---- check: every servo's state ------------------------------------------------------------------
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
