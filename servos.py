"""servos.py: the WidowX 250's Dynamixel servos as the driver sees them: their control tables and
the XM430's rules, the servo map, the encoders' ticks against the joints, the move profiles.

twin.py serves these servos on a pseudo-terminal with the PyBullet arm behind them; this file has
no world, no bus and no clock of its own, and copies with dynamixel.py (the control table's items,
the status packets' bits) and widowx.py (the joint limits, the finger travel).
- Servos 1-9 as on the arm (SPEC 6): 1-7 XM430-W350, 8 and 9 XL430-W250; the shadows 3 and 5 carry
  Secondary IDs 2 and 4; 3, 5 and 7 are mounted mirrored. A Servo starts as Interbotix's setup
  leaves it (drive modes, limits, Secondary IDs, the shadows' Homing Offsets), torque off.
- The control table of SPEC 6 with the XM430's rules (Servo.check_write): EEPROM (addresses below
  64) is writable only with the torque off, read-only items refuse writes, a write must cover whole
  items, a goal beyond the position limits is refused, a latched hardware error turns the torque
  off and sets the alert bit of every status packet until a REBOOT.
- A goal position starts a trapezoidal profile (plan_profile) from where the joint is commanded
  now: with Drive Mode bit 2 (time-based), Profile Velocity is the move's time in ms and Profile
  Acceleration its ramp; without it, they are a speed (0.229 rpm) and an acceleration
  (214.577 rev/min^2).
"""

import dataclasses

import numpy as np

from dynamixel import (
    ALERT,
    DRIVE_MODE,
    GOAL_POSITION,
    GOAL_PWM,
    HARDWARE_ERROR,
    HOMING_OFFSET,
    MAX_POSITION,
    MIN_POSITION,
    OPERATING_MODE,
    POSITION_MODE,
    PRESENT_TEMPERATURE,
    PWM_MODE,
    RETURN_DELAY,
    REVERSE_BIT,
    SECONDARY_ID,
    TIME_PROFILE_BIT,
    TORQUE_ENABLE,
    rad_to_ticks,
)
from widowx import FINGER_MAX, JOINT_HIGH, JOINT_LOW, VELOCITY_LIMIT

# ---- the arm as its servos see it (SPEC 6) -------------------------------------------------------
JOINT_OF = {1: 0, 2: 1, 3: 1, 4: 2, 5: 2, 6: 3, 7: 4, 8: 5}  # servo -> joint of the kinematics
MASTERS = (1, 2, 4, 6, 7, 8)  # the servo that answers for each joint, in joint order
SHADOWS = {3: 2, 5: 4}  # shadow -> master: its Secondary ID
GRIPPER = 9
# mounted mirrored: their encoders count the other way, which Drive Mode bit 0 turns round
MIRRORED = (3, 5, 7)
HORN_TICKS = {3: 6, 5: -4}  # how far a shadow's horn sits from its master's (its Homing Offset)
MODELS = {i: 1060 if i in (8, 9) else 1020 for i in range(1, 10)}  # XL430-W250, XM430-W350
FIRMWARE = 45

# control table items beyond dynamixel.py's (address, bytes)
MODEL_NUMBER = (0, 2)
FIRMWARE_VERSION = (6, 1)
ID = (7, 1)
BAUD_RATE = (8, 1)
PWM_LIMIT = (36, 2)
STATUS_RETURN_LEVEL = (68, 1)
POSITION_P_GAIN = (84, 2)
PROFILE_ACCELERATION = (108, 4)
PROFILE_VELOCITY = (112, 4)
MOVING = (122, 1)
PRESENT_CURRENT = (126, 2)  # Present Load (0.1 %) on the XL430
PRESENT_VELOCITY = (128, 4)
PRESENT_INPUT_VOLTAGE = (144, 2)
# every item of the XM430 table up to Present Temperature: a write must cover whole items
ITEM_SIZES = {
    0: 2, 2: 4, 6: 1, 7: 1, 8: 1, 9: 1, 10: 1, 11: 1, 12: 1, 13: 1, 20: 4, 24: 4, 31: 1, 32: 2,
    34: 2, 36: 2, 38: 2, 44: 4, 48: 4, 52: 4, 60: 1, 63: 1, 64: 1, 65: 1, 68: 1, 69: 1, 70: 1,
    76: 2, 78: 2, 80: 2, 82: 2, 84: 2, 88: 2, 90: 2, 98: 1, 100: 2, 102: 2, 104: 4, 108: 4,
    112: 4, 116: 4, 120: 2, 122: 1, 123: 1, 124: 2, 126: 2, 128: 4, 132: 4, 136: 4, 140: 4,
    144: 2, 146: 1,
}  # fmt: skip
READ_ONLY = (0, 2, 6, 69, 70, 120, 122, 123, 124, 126, 128, 132, 136, 140, 144, 146)
TABLE_BYTES = 148  # Present Temperature is the last item modelled
EEPROM_END = 64
# the result codes of a status packet (dynamixel.RESULT_ERRORS)
INSTRUCTION_ERROR = 2
CRC_ERROR = 3
DATA_RANGE_ERROR = 4
DATA_LENGTH_ERROR = 5
DATA_LIMIT_ERROR = 6
ACCESS_ERROR = 7
OPERATING_MODES = (0, 1, 3, 4, 5, 16)  # current, velocity, position, extended, current-based, PWM
POSITION_MODES = (3, 4, 5)  # the modes in which Goal Position moves the servo
# units of the X-series registers
RPM = 2 * np.pi / 60  # rad/s
VELOCITY_UNIT = 0.229 * RPM  # Profile Velocity and Present Velocity without the time profile
ACCELERATION_UNIT = 214.577 * 2 * np.pi / 3600  # Profile Acceleration: rev/min^2 -> rad/s^2
CURRENT_UNIT = 2.69  # mA
STALL_TORQUE = 4.1  # N m of an XM430-W350 at 12 V, drawing STALL_CURRENT
STALL_CURRENT = 2300.0  # mA
MOVING_SPEED = 10 * VELOCITY_UNIT  # Moving Threshold's default: faster than this is moving
ROOM_TEMPERATURE = 38  # C, a servo at work
OVERHEATED = 80  # C, the XM430's Temperature Limit
INPUT_VOLTAGE = 120  # 0.1 V
# Hardware Error Status bits (dynamixel.HARDWARE_ERRORS)
OVERHEATING = 1 << 2
OVERLOAD = 1 << 5

# the gripper's horn and link (Interbotix's numbers): servo angle a -> finger position
# r sin(a) + sqrt(L^2 - r^2 cos^2(a)), from CLOSED_FINGER (closed) to CLOSED_FINGER + travel (open)
HORN_RADIUS = 0.014
LINK_LENGTH = 0.024
CLOSED_FINGER = 0.015
FINGER_TRAVEL = 0.022


# ---- one servo's control table -------------------------------------------------------------------
class Servo:
    """The control table of one X-series servo and the rules a write must pass. Registers hold
    little-endian integers as on the servo; present values are filled in by its owner (twin.Twin)
    before a read. silent, garbled, delay: the faults of its status packets."""

    def __init__(self, dxl_id):
        self.id = dxl_id
        self.table = bytearray(TABLE_BYTES)
        self.silent = False
        self.garbled = False
        self.delay = 0.0
        self.set(MODEL_NUMBER, MODELS[dxl_id])
        self.set(FIRMWARE_VERSION, FIRMWARE)
        self.set(ID, dxl_id)
        self.set(BAUD_RATE, 3)  # 1 Mbps
        self.set(PWM_LIMIT, 885)
        self.set(STATUS_RETURN_LEVEL, 2)  # answer every instruction
        self.set(POSITION_P_GAIN, 800)
        self.set(PRESENT_TEMPERATURE, ROOM_TEMPERATURE)
        self.set(PRESENT_INPUT_VOLTAGE, INPUT_VOLTAGE)
        self.configure()
        self._power_up_ram = bytes(self.table[EEPROM_END:])  # what a reboot restores

    def configure(self):
        """The EEPROM as Interbotix's setup leaves it: no reply delay, mirrored servos reversed,
        arm servos time-based in position mode within the joint limits, the gripper in PWM mode,
        the shadows following their masters with their horns calibrated."""
        i = self.id
        self.set(RETURN_DELAY, 0)
        drive_mode = REVERSE_BIT if i in MIRRORED else 0
        if i != GRIPPER:
            drive_mode |= TIME_PROFILE_BIT
        self.set(DRIVE_MODE, drive_mode)
        self.set(OPERATING_MODE, PWM_MODE if i == GRIPPER else POSITION_MODE)
        self.set(SECONDARY_ID, SHADOWS.get(i, 255))
        self.set(HOMING_OFFSET, HORN_TICKS.get(i, 0))
        if i == GRIPPER:
            self.set(MAX_POSITION, 4095)
            self.set(MIN_POSITION, 0)
        else:
            joint = JOINT_OF[i]
            self.set(MAX_POSITION, int(rad_to_ticks(JOINT_HIGH[joint])))
            self.set(MIN_POSITION, int(rad_to_ticks(JOINT_LOW[joint])))

    def get(self, item):
        address, size = item
        return int.from_bytes(self.table[address : address + size], "little", signed=size > 1)

    def set(self, item, value):
        address, size = item
        self.table[address : address + size] = int(value).to_bytes(size, "little", signed=size > 1)

    @property
    def torque(self):
        return bool(self.get(TORQUE_ENABLE))

    @property
    def status_error(self):
        """The alert bit of its status packets: set while a hardware error is latched."""
        return ALERT if self.get(HARDWARE_ERROR) else 0

    def read(self, address, size):
        """-> (result code, data)."""
        if size < 1 or address + size > TABLE_BYTES:
            return ACCESS_ERROR, b""
        return 0, bytes(self.table[address : address + size])

    def check_write(self, address, data):
        """-> the result code a write of data at address gets (0: accepted), table untouched."""
        end = address + len(data)
        starts = [a for a in ITEM_SIZES if address <= a < end]
        if address not in ITEM_SIZES or not data or end > TABLE_BYTES:
            return ACCESS_ERROR  # not the start of an item: undefined, or inside one
        if starts[-1] + ITEM_SIZES[starts[-1]] != end:
            return DATA_LENGTH_ERROR  # the last item only partly written
        if any(a in READ_ONLY for a in starts):
            return ACCESS_ERROR
        # the EEPROM is locked while the torque is on: a write would change a running servo
        if address < EEPROM_END and self.torque:
            return ACCESS_ERROR
        values = self._values(address, data)
        if OPERATING_MODE[0] in values and values[OPERATING_MODE[0]] not in OPERATING_MODES:
            return DATA_RANGE_ERROR
        if GOAL_POSITION[0] in values:
            low, high = self.get(MIN_POSITION), self.get(MAX_POSITION)
            if not low <= values[GOAL_POSITION[0]] <= high:
                return DATA_LIMIT_ERROR
        if GOAL_PWM[0] in values and abs(values[GOAL_PWM[0]]) > self.get(PWM_LIMIT):
            return DATA_LIMIT_ERROR
        return 0

    def write(self, address, data):
        """Apply a write that check_write() accepted. The torque stays off while a hardware error
        is latched."""
        self.table[address : address + len(data)] = data
        if self.get(HARDWARE_ERROR):
            self.set(TORQUE_ENABLE, 0)

    def _values(self, address, data):
        """{item address: value} of the items a write covers."""
        values = {}
        for a, size in ITEM_SIZES.items():
            if address <= a < address + len(data):
                chunk = data[a - address : a - address + size]
                values[a] = int.from_bytes(chunk, "little", signed=size > 1)
        return values

    def latch(self, bits):
        """A hardware error: the servo turns its torque off and keeps the bits until a reboot."""
        self.set(HARDWARE_ERROR, self.get(HARDWARE_ERROR) | bits)
        self.set(TORQUE_ENABLE, 0)
        if bits & OVERHEATING:
            self.set(PRESENT_TEMPERATURE, OVERHEATED)

    def reboot(self, present):
        """The RAM back to its power-up values, the EEPROM kept: torque off, no hardware error,
        goal = the present position (ticks)."""
        self.table[EEPROM_END:] = self._power_up_ram
        self.set(GOAL_POSITION, present)


# ---- the servo's encoder and the joint -----------------------------------------------------------
def joint_to_ticks(servo, q):
    """The position register of `servo` (a Servo) for joint angle q (rad, the kinematics'): the
    encoder counts mirrored on a mirrored servo, off by its horn on a shadow; Drive Mode bit 0
    mirrors it back, then the Homing Offset is added."""
    ticks = float(q) / np.pi * 2047.5 + 2047.5
    if servo.id in MIRRORED:
        ticks = 4095 - ticks + HORN_TICKS.get(servo.id, 0)
    if servo.get(DRIVE_MODE) & REVERSE_BIT:
        ticks = 4095 - ticks
    return int(round(ticks + servo.get(HOMING_OFFSET)))


def ticks_to_joint(servo, ticks):
    """The inverse of joint_to_ticks: a goal position register -> joint angle (rad)."""
    ticks = ticks - servo.get(HOMING_OFFSET)
    if servo.get(DRIVE_MODE) & REVERSE_BIT:
        ticks = 4095 - ticks
    if servo.id in MIRRORED:
        ticks = 4095 - ticks + HORN_TICKS.get(servo.id, 0)
    return (ticks - 2047.5) * np.pi / 2047.5


def gripper_angle(width):
    """Finger position (m, 0 closed .. FINGER_MAX open, the simulator's) -> the gripper servo's
    angle (rad) through the horn and link: solve r sin(a) + sqrt(L^2 - r^2 + r^2 sin^2(a)) = x."""
    x = CLOSED_FINGER + FINGER_TRAVEL * np.clip(width / FINGER_MAX, 0.0, 1.0)
    sine = (x**2 - LINK_LENGTH**2 + HORN_RADIUS**2) / (2 * x * HORN_RADIUS)
    return float(np.arcsin(np.clip(sine, -1.0, 1.0)))


# ---- the profile of a move -----------------------------------------------------------------------
@dataclasses.dataclass
class Profile:
    """A joint's move from start to goal (rad) that begins at t0 and takes `duration` s,
    accelerating for `ramp` s at both ends: a trapezoid of speed (a triangle when ramp is half the
    duration, constant speed when it is 0)."""

    start: float
    goal: float
    t0: float
    duration: float
    ramp: float

    def at(self, t):
        """-> (position, velocity) at time t."""
        s = t - self.t0
        if s >= self.duration:
            return self.goal, 0.0
        s = max(s, 0.0)
        peak = (self.goal - self.start) / (self.duration - self.ramp)
        if s < self.ramp:
            return self.start + 0.5 * peak / self.ramp * s**2, peak * s / self.ramp
        if s <= self.duration - self.ramp:
            return self.start + peak * (s - self.ramp / 2), peak
        left = self.duration - s
        return self.goal - 0.5 * peak / self.ramp * left**2, peak * left / self.ramp


def plan_profile(servo, start, goal, t0):
    """The profile the servo's registers ask for. Time-based (Drive Mode bit 2): Profile Velocity
    is the time of the move (ms), Profile Acceleration the ramp (at most half of it); otherwise
    they are a top speed and an acceleration. 0 means none: the velocity limit sets the pace."""
    distance = abs(goal - start)
    velocity = servo.get(PROFILE_VELOCITY)
    acceleration = servo.get(PROFILE_ACCELERATION)
    if servo.get(DRIVE_MODE) & TIME_PROFILE_BIT:
        duration = velocity / 1000 if velocity else distance / VELOCITY_LIMIT
        ramp = min(acceleration / 1000, duration / 2)
        return Profile(start, goal, t0, duration, ramp)
    speed = velocity * VELOCITY_UNIT if velocity else VELOCITY_LIMIT
    if not acceleration:
        return Profile(start, goal, t0, distance / speed, 0.0)
    ramp = speed / (acceleration * ACCELERATION_UNIT)
    if distance < speed * ramp:  # never reaches the top speed
        ramp = np.sqrt(distance / (acceleration * ACCELERATION_UNIT))
        return Profile(start, goal, t0, 2 * ramp, ramp)
    return Profile(start, goal, t0, distance / speed + ramp, ramp)
