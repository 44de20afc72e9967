"""WidowX 250 6-DOF without ROS: Dynamixel protocol 2.0 over the U2D2, kinematics, the robot environment.

PTR (Kumar et al., RSS 2023, Sec. V-A, Appendix B) evaluates on real WidowX 250 arms with the Bridge setup (5 Hz,
end-effector deltas, gripper absolute). This file drives the arm from a laptop over the USB cable alone (numbers:
SPEC section 6) and records target demos in the Bridge numpy format (SPEC section 5). It imports nothing from the
project; pyserial and opencv are imported only when used. Safety rules: WidowXEnv's docstring.
FTDI latency: the U2D2's FTDI chip holds received bytes for its latency timer (16 ms by default), so each reply
comes 16 ms late; set 1 ms after every plug-in: echo 1 | sudo tee /sys/bus/usb-serial/devices/ttyUSB0/latency_timer
Usage: python robot.py check|sleep|home --port /dev/ttyUSB0; python robot.py record --out target/my_task --episodes 10
"""

import argparse
import contextlib
import os
import select
import struct
import sys
import threading
import time
import numpy as np

# ---- Dynamixel protocol 2.0 (SPEC 6) --------------------------------------------------------------------------
HEADER, BROADCAST, STATUS = b"\xff\xff\xfd\x00", 0xFE, 0x55
INSTRUCTIONS = {
    0x01: "PING",
    0x02: "READ",
    0x03: "WRITE",
    0x08: "REBOOT",
    0x82: "SYNC_READ",
    0x83: "SYNC_WRITE",
}
PING, READ, WRITE, REBOOT, SYNC_READ, SYNC_WRITE = INSTRUCTIONS  # the codes, in the order above
# control table items of the XM430 / XL430: (address, bytes); PROFILE = acceleration (108) + velocity (112)
RETURN_DELAY, DRIVE_MODE, OPERATING_MODE, SECONDARY_ID, HOMING_OFFSET = (
    (9, 1),
    (10, 1),
    (11, 1),
    (12, 1),
    (20, 4),
)
MAX_POSITION, MIN_POSITION, TORQUE_ENABLE, HARDWARE_ERROR, GOAL_PWM = (
    (48, 4),
    (52, 4),
    (64, 1),
    (70, 1),
    (100, 2),
)
PROFILE, GOAL_POSITION, PRESENT_POSITION, PRESENT_TEMPERATURE = (
    (108, 8),
    (116, 4),
    (132, 4),
    (146, 1),
)
RESULT_ERRORS = (
    None,
    "result fail",
    "instruction error",
    "CRC error (a corrupted packet: cable?)",  # error & 0x7F
    "data range error",
    "data length error",
    "data limit error (a goal beyond the position limits?)",
    "access error (read-only register, or EEPROM (address < 64) written with torque on)",
    "error 8+",
)
HARDWARE_ERRORS = {
    0: "input voltage out of range (check the 12 V supply)",
    2: "overheating",
    3: "motor encoder error",
    4: "electrical shock (short circuit or damaged motor)",
    5: "overload (too much load for too long)",
}
MODELS, _FORMATS = {1020: "XM430-W350", 1060: "XL430-W250"}, {1: "<B", 2: "<h", 4: "<i", 8: "<ii"}

# ---- the arm (SPEC 6) ------------------------------------------------------------------------------------------
NAMES = {
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
JOINT_IDS, ARM_IDS, GRIPPER_ID, ALL_IDS = (
    (1, 2, 4, 6, 7, 8),
    (1, 2, 3, 4, 5, 6, 7, 8),
    9,
    tuple(range(1, 10)),
)
SHADOWS, REVERSED = {3: 2, 5: 4}, (3, 5, 7)  # shadow -> master (its Secondary ID); Drive Mode bit 0
JOINT_LOW, JOINT_HIGH = (
    np.radians([-180, -108, -123, -180, -100, -180]),
    np.radians([180, 114, 92, 180, 123, 180]),
)
VELOCITY_LIMIT, CALIBRATED_TICKS, STALL_TICKS = (
    np.pi,
    5,
    2,
)  # rad/s (SPEC 6); shadow vs master; gripper moved
SLEEP_JOINTS, HOME_JOINTS = np.array([0.0, -1.80, 1.55, 0.0, 0.8, 0.0]), np.zeros(6)
RESET_JOINTS = np.array([0.0, -0.191, 0.2993, 0.0, 1.4624, 0.0])  # gripper down at (0.25, 0, 0.18)
SCREWS = np.array(
    [
        [0, 0, 1, 0, 0, 0],
        [0, 1, 0, -0.11065, 0, 0],
        [0, 1, 0, -0.36065, 0, 0.04975],
        [1, 0, 0, 0, 0.36065, 0],
        [0, 1, 0, -0.36065, 0, 0.29975],
        [1, 0, 0, 0, 0.36065, 0],
    ],
    float,
)
M_HOME = np.array([[1, 0, 0, 0.458325], [0, 1, 0, 0], [0, 0, 1, 0.36065], [0, 0, 0, 1]], float)
DOWN = np.array(
    [[0, 0, 1], [0, 1, 0], [-1, 0, 0]], float
)  # gripper pointing down = Bridge's zero rotation
WORKSPACE = ((0.10, -0.25, 0.0), (0.41, 0.143, 0.33))
# gripper linkage, Interbotix xs_sdk's (not this arm's: see read()): finger = r sin(a) + sqrt(L^2 - r^2 cos^2(a)), m
HORN_RADIUS, LINK_LENGTH, FINGER_CLOSED, FINGER_OPEN = 0.014, 0.024, 0.015, 0.037


class DynamixelError(RuntimeError):
    """The bus or a servo reported a problem; the message says which and what to do."""


class PacketError(DynamixelError):
    """A corrupted packet (bad CRC)."""


class NoStatusError(DynamixelError):
    """A servo did not answer."""


class ServoError(DynamixelError):
    """A status packet carried an error code (1..7)."""


class HardwareError(DynamixelError):
    """A servo latched a hardware error: torque off until rebooted."""


class IKError(ValueError):
    """Inverse kinematics did not converge."""


def crc16(data):  # CRC-16 of protocol 2.0: polynomial 0x8005, initial value 0, not reflected
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x8005 if crc & 0x8000 else crc << 1) & 0xFFFF
    return crc


# byte stuffing: a header inside the data would read as a new packet, so every FF FF FD gets an extra FD
def stuff(body):
    return bytes(body).replace(b"\xff\xff\xfd", b"\xff\xff\xfd\xfd")


def unstuff(body):
    return bytes(body).replace(b"\xff\xff\xfd\xfd", b"\xff\xff\xfd")


def make_packet(dxl_id, instruction, params=b""):
    """Header, ID, length, instruction, params (stuffed), CRC. Status packets too: 0x55, error byte + data."""
    body = stuff(bytes([instruction]) + bytes(params))
    packet = HEADER + bytes([dxl_id]) + struct.pack("<H", len(body) + 2) + body
    return packet + struct.pack("<H", crc16(packet))


def split_packet(buf):
    """First packet in buf -> ((id, instruction, unstuffed params) or None, rest of buf, bytes still missing).
    Bytes before a header are dropped (a partial header at the end is kept); a bad CRC raises PacketError."""
    i = buf.find(HEADER)
    if i < 0:
        keep = next(k for k in (3, 2, 1, 0) if buf.endswith(HEADER[:k]))
        return None, buf[len(buf) - keep :], 11 - keep
    buf = buf[i:]
    total = (
        7 + struct.unpack_from("<H", buf, 5)[0] if len(buf) >= 7 else 11
    )  # 11: the shortest status packet
    if len(buf) < total:
        return None, buf, total - len(buf)
    packet, rest = buf[:total], buf[total:]
    if total < 10 or struct.unpack_from("<H", packet, total - 2)[0] != crc16(packet[:-2]):
        raise PacketError(f"bad CRC in a packet from ID {packet[4]}: {packet.hex(' ')}")
    body = unstuff(packet[7:-2])
    return (packet[4], body[0], body[1:]), rest, 0


def _pack(value, size):
    return struct.pack(_FORMATS[size], *np.atleast_1d(value).astype(int).tolist())


class DynamixelBus:
    """Dynamixel 2.0 master; port: a path (opened by pyserial) or an object with read(n), write, reset_input_buffer"""

    def __init__(self, port="/dev/ttyUSB0", baud=1_000_000, timeout=0.1, retries=3):
        self.name = port if isinstance(port, str) else getattr(port, "name", type(port).__name__)
        if isinstance(port, str):
            try:
                import serial
            except ImportError:
                raise ImportError(
                    "robot.py needs pyserial to open a serial port: pip install pyserial"
                ) from None
            port = serial.Serial(
                port, baud, timeout=0.01
            )  # short reads: the bus keeps its own deadline
        self.port, self.baud, self.timeout, self.retries = port, baud, timeout, retries
        self.alerts, self.lock, self._buf = (
            set(),
            threading.RLock(),
            b"",
        )  # alerts: IDs with the alert bit

    def transact(self, dxl_id, instruction, params=b"", reply_ids=None):
        """Send one packet -> {id: status data} for reply_ids (default: dxl_id; () where no reply comes)."""
        reply_ids = (dxl_id,) if reply_ids is None else tuple(reply_ids)
        packet, name, out = make_packet(dxl_id, instruction, params), INSTRUCTIONS[instruction], {}
        with self.lock:
            for _ in range(self.retries):
                self.port.reset_input_buffer()
                self.port.write(packet)
                self._buf, out, deadline = b"", {}, time.monotonic() + self.timeout
                try:
                    while len(out) < len(reply_ids):
                        got, self._buf, need = split_packet(self._buf)
                        if got is None:
                            if time.monotonic() > deadline:
                                break
                            self._buf += self.port.read(need)
                        elif (
                            got[1] == STATUS and got[0] in reply_ids and got[2]
                        ):  # else a stale reply
                            (pid, _, (error, *data)) = got
                            out[pid] = bytes(data)
                            # the alert bit: the data is valid, but the servo latched a hardware error (or cleared it)
                            (self.alerts.add if error & 0x80 else self.alerts.discard)(pid)
                            if error & 0x7F:
                                raise ServoError(
                                    f"servo ID {pid} ({NAMES.get(pid, '?')}) answered {name} with "
                                    f"{RESULT_ERRORS[min(error & 0x7F, 8)]}"
                                )
                except PacketError:
                    continue  # corrupted on the wire: send again
                if len(out) == len(reply_ids):
                    return out
        missing = ", ".join(str(i) for i in reply_ids if i not in out)
        raise NoStatusError(
            f"no status packet from servo ID {missing} on {self.name} at {self.baud} baud ({name}, "
            f"{self.retries} tries of {self.timeout} s). Check the 12 V power, the port (ls "
            "/dev/ttyUSB*), the baud (WidowX: 1000000), the ID. Late replies: set the FTDI latency "
            "timer to 1 ms (echo 1 | sudo tee /sys/bus/usb-serial/devices/ttyUSB0/latency_timer)"
        )

    # the instructions; an item is a control table (address, bytes)
    def ping(self, dxl_id):
        return struct.unpack_from("<H", self.transact(dxl_id, PING)[dxl_id])[0]  # -> model number

    def read(self, dxl_id, item):
        return struct.unpack_from(
            _FORMATS[item[1]], self.transact(dxl_id, READ, struct.pack("<HH", *item))[dxl_id]
        )[0]

    def write(self, dxl_id, item, value):
        self.transact(dxl_id, WRITE, struct.pack("<H", item[0]) + _pack(value, item[1]))

    def reboot(self, dxl_id):  # clears a latched hardware error (and turns the torque off)
        self.transact(dxl_id, REBOOT)
        self.alerts.discard(dxl_id)

    def sync_read(self, ids, item):
        got = self.transact(
            BROADCAST, SYNC_READ, struct.pack("<HH", *item) + bytes(ids), reply_ids=ids
        )
        return {i: struct.unpack_from(_FORMATS[item[1]], got[i])[0] for i in ids}

    def sync_write(
        self, item, values
    ):  # values {id: value}; no replies: a missing servo shows at the next read
        data = b"".join(bytes([i]) + _pack(v, item[1]) for i, v in values.items())
        self.transact(BROADCAST, SYNC_WRITE, struct.pack("<HH", *item) + data, reply_ids=())

    def close(self):
        self.port.close()


def rad_to_ticks(q):
    return np.round(np.asarray(q) / np.pi * 2047.5 + 2047.5).astype(int)


def ticks_to_rad(t):
    return (np.asarray(t, float) - 2047.5) * np.pi / 2047.5


def gripper_fraction(
    angle,
):  # gripper servo angle (rad) -> 0 closed .. 1 open, by the finger travel
    a1 = HORN_RADIUS * np.sin(angle)
    finger = a1 + np.sqrt(LINK_LENGTH**2 - HORN_RADIUS**2 + a1**2)
    return float(np.clip((finger - FINGER_CLOSED) / (FINGER_OPEN - FINGER_CLOSED), 0.0, 1.0))


def hardware_messages(status):
    return [m for bit, m in HARDWARE_ERRORS.items() if status >> bit & 1] or [
        f"hardware error status {status}"
    ]


def move_seconds(
    q, q_now, seconds, limit=VELOCITY_LIMIT
):  # the profile time: `seconds`, or longer where a joint
    # would pass the limit. The profile ramps a quarter of the time (peak 4/3 of the mean): 1.5 x keeps it at 0.89
    dq = np.abs(np.clip(np.asarray(q, float), JOINT_LOW, JOINT_HIGH) - np.asarray(q_now, float))
    return max(seconds, 1.5 * float(dq.max()) / limit)


class Arm:
    """A backend: read() -> (joints, gripper 0 closed .. 1 open), command(q, grip=None, seconds=None),
    set_gripper(+1 open, -1 close, 0 stop), torque(on), setup(), hardware_errors(), close(); hold and move."""

    alerts, opening, log, velocity_limit = (
        frozenset(),
        False,
        print,
        VELOCITY_LIMIT,
    )  # rad/s: move_seconds

    def hardware_errors(self):
        return {}

    def close(self):
        pass

    def hold(self):
        self.command(self.read()[0])
        if self.opening:  # an opening gripper stops; a closing one keeps its grasp
            self.set_gripper(0)

    def move(
        self, q, seconds=2.0
    ):  # a joint move taking `seconds` (or longer: move_seconds), with 10 % to arrive
        seconds = move_seconds(q, self.read()[0], seconds, self.velocity_limit)
        self.command(q, seconds=seconds)
        time.sleep(1.1 * seconds)


class DynamixelArm(Arm):
    """The WidowX 250 6-DOF on a DynamixelBus, set up as Interbotix's firmware config; gripper PWMs: read()."""

    def __init__(self, bus, grip_pwm=350, hold_pwm=150, stall_s=0.5, log=print):
        self.bus, self.alerts, self.grip_pwm, self.hold_pwm, self.stall_s = (
            bus,
            bus.alerts,
            grip_pwm,
            hold_pwm,
            stall_s,
        )
        self.grip, self.pwm, self.seconds, self.log, self.stalled, self._grip_at = (
            0.0,
            0,
            None,
            log,
            0,
            (-1e9, 0.0),
        )

    opening = property(lambda self: (self.pwm or 0) > 0)

    def setup(self):
        """Reads first (they work with torque on); only when EEPROM needs writing does the torque go off, and an arm
        holding itself up goes to the sleep pose before (it would drop). Then: write what differs (EEPROM wears
        out), calibrate the shadows, goals = present positions (no jump), torque on."""
        for i in ALL_IDS:  # all there before anything changes
            self.bus.ping(i)
        low, high, want = rad_to_ticks(JOINT_LOW), rad_to_ticks(JOINT_HIGH), {}
        for i in ALL_IDS:  # position limits: a shadow takes its master's
            j = JOINT_IDS.index(SHADOWS.get(i, i)) if i in ARM_IDS else None
            want.update(
                {
                    (i, RETURN_DELAY): 0,
                    (i, DRIVE_MODE): (i in REVERSED) | 4 * (i in ARM_IDS),  # 4: time
                    (i, SECONDARY_ID): SHADOWS.get(i, 255),
                    (i, OPERATING_MODE): 16 if i == GRIPPER_ID else 3,
                    **(
                        {(i, MAX_POSITION): high[j], (i, MIN_POSITION): low[j]}
                        if j is not None
                        else {}
                    ),
                }
            )
        have = {key: self.bus.read(*key) for key in want}
        writes = [key for key in want if have[key] != want[key]]
        pos = self.bus.sync_read(
            ALL_IDS, PRESENT_POSITION
        )  # comparable once both Drive Modes are right
        calibrate = [
            s
            for s, m in SHADOWS.items()
            if (s, DRIVE_MODE) in writes
            or (m, DRIVE_MODE) in writes
            or abs(pos[s] - pos[m]) > CALIBRATED_TICKS
        ]
        if writes or calibrate:
            if any(
                self.bus.sync_read(ARM_IDS, TORQUE_ENABLE).values()
            ):  # it would drop: to the sleep pose first
                # with the present settings; without Drive Mode bit 2, a velocity profile of 0.48 rad/s (20 x 0.229 rpm)
                self.log(
                    "setup: the arm holds itself up and EEPROM needs writing: to the sleep pose, then torque off"
                )
                q, timed = self.read()[0], {i: have[i, DRIVE_MODE] & 4 for i in ARM_IDS}
                self.seconds = max(
                    move_seconds(SLEEP_JOINTS, q, 2.0, self.velocity_limit),
                    0.0
                    if all(timed.values())
                    else float(np.abs(SLEEP_JOINTS - q).max()) / 0.48 + 0.5,
                )
                ms = int(round(self.seconds * 1000))
                self.bus.sync_write(
                    PROFILE, {i: (ms // 4, ms) if timed[i] else (5, 20) for i in ARM_IDS}
                )
                self.command(SLEEP_JOINTS)
                time.sleep(1.1 * self.seconds)
            self.torque(False)  # EEPROM (address < 64) is writable only with torque off
            for i, item in writes:
                self.bus.write(i, item, want[i, item])
            for shadow in calibrate:
                self._calibrate(shadow, SHADOWS[shadow])
        self.pwm, self.seconds = None, None  # unknown: both get written
        self.command(self.read()[0], seconds=2.0)
        self.set_gripper(0)
        self.torque(True)

    def _calibrate(self, shadow, master):
        """Homing Offset so that the shadow reads its master's position. The sign for a reversed servo is undocumented
        (Interbotix's xs_sdk: shadow - master, SPEC 6: master - shadow): try one, check, else the other, else stop."""
        self.bus.write(shadow, HOMING_OFFSET, 0)
        m, s = tried = [self.bus.read(i, PRESENT_POSITION) for i in (master, shadow)]
        for offset in (s - m, m - s) if shadow in REVERSED else (m - s, s - m):
            self.bus.write(shadow, HOMING_OFFSET, offset)
            tried += [offset] + [self.bus.read(i, PRESENT_POSITION) for i in (master, shadow)]
            if abs(tried[-1] - tried[-2]) <= CALIBRATED_TICKS:
                return offset
        raise DynamixelError(
            f"shadow servo ID {shadow} ({NAMES[shadow]}) does not follow master ID {master}: they "
            f"read {m} and {s} ticks with Homing Offset 0; (offset, master, shadow) then: "
            f"{tried[2:5]}, {tried[5:]}. Keep the arm still during setup; are both horns bolted on?"
        )

    def read(self):  # one SYNC_READ, of the shadows too: their replies carry their alert bits
        pos, now = self.bus.sync_read(ALL_IDS, PRESENT_POSITION), time.monotonic()
        self.grip = gripper_fraction(ticks_to_rad(pos[GRIPPER_ID]))
        # stall guard: 0..1 uses Interbotix's linkage constants, not this gripper's: a stop may come first. Driven but
        # still for stall_s -> PWM 0 if opening, hold_pwm if closing (Interbotix's least grip: a grasp holds).
        # _grip_at: the gripper's last position that differed by more than STALL_TICKS, and since when
        if abs(pos[GRIPPER_ID] - self._grip_at[0]) > STALL_TICKS:
            self._grip_at = (pos[GRIPPER_ID], now)
        elif self.pwm and not self.stalled and now - self._grip_at[1] >= self.stall_s:
            self.stalled = 1 if self.pwm > 0 else -1
            self.log(
                f"gripper stalled at {self.grip:.2f} with PWM {self.pwm} (a mechanical stop, or an object)"
            )
            self.set_gripper(self.stalled)
        return ticks_to_rad([pos[i] for i in JOINT_IDS]), self.grip

    def command(self, q, grip=None, seconds=None):
        """Goal joints, clipped to the limits whatever the caller computed, reached in `seconds` (time-based
        profile: Profile Velocity = the time in ms, acceleration a quarter); grip >= 0.5 opens, else closes."""
        q = np.asarray(q, float)
        if q.shape != (6,) or not np.all(np.isfinite(q)):
            raise ValueError(f"a joint command is 6 finite angles, got {q}")
        if seconds is not None and seconds != self.seconds:
            ms = int(round(seconds * 1000))
            self.bus.sync_write(PROFILE, {i: (ms // 4, ms) for i in ARM_IDS})
            self.seconds = seconds
        ticks = rad_to_ticks(np.clip(q, JOINT_LOW, JOINT_HIGH)).tolist()
        self.bus.sync_write(
            GOAL_POSITION, dict(zip(JOINT_IDS, ticks))
        )  # shadows follow their Secondary ID
        if grip is not None:
            self.set_gripper(1 if grip >= 0.5 else -1)

    def set_gripper(self, direction):
        """PWM mode has no position limits: stop at the ends of the travel (as Interbotix does); stalls: read()."""
        self.stalled = self.stalled if direction == self.stalled else 0
        pwm = (
            direction * self.grip_pwm
            if not self.stalled
            else -self.hold_pwm
            if direction < 0
            else 0
        )
        pwm = 0 if (pwm > 0 and self.grip >= 1.0) or (pwm < 0 and self.grip <= 0.0) else pwm
        if pwm != self.pwm:
            self.bus.write(GRIPPER_ID, GOAL_PWM, pwm)
            self.pwm, self._grip_at = pwm, (self._grip_at[0], time.monotonic())

    def torque(
        self, on
    ):  # off by SYNC_WRITE: no replies needed, it reaches every servo still listening
        for i in ALL_IDS if on else ():
            self.bus.write(i, TORQUE_ENABLE, 1)
        if not on:
            self.bus.sync_write(TORQUE_ENABLE, {i: 0 for i in ALL_IDS})

    def hardware_errors(self):  # -> {id: [messages]} for the servos that raised the alert bit
        return {i: hardware_messages(self.bus.read(i, HARDWARE_ERROR)) for i in sorted(self.alerts)}

    def close(self):
        self.bus.close()


class InterbotixArm(Arm):
    """The same interface over Interbotix's Python API (ROS 1 or 2); their xs_sdk node (xsarm_control) sets the
    servos up, stops the gripper at its limits and logs servo errors."""

    def __init__(self, robot_model="wx250s", log=print):
        try:
            from interbotix_xs_modules.xs_robot.arm import InterbotixManipulatorXS  # ROS 2
        except ImportError:
            try:
                from interbotix_xs_modules.arm import InterbotixManipulatorXS  # ROS 1
            except ImportError:
                raise ImportError(
                    "--backend interbotix needs Interbotix's Python API (interbotix_xs_modules) "
                    "and xsarm_control; --backend dynamixel needs neither ROS nor Interbotix"
                ) from None
        self.bot, self.log, self.seconds = (
            InterbotixManipulatorXS(robot_model, "arm", "gripper"),
            log,
            2.0,
        )
        self.core = getattr(self.bot, "core", None) or self.bot.dxl

    def read(self):
        js = self.core.robot_get_joint_states()
        pos = dict(zip(js.name, js.position))
        grip = (pos["left_finger"] - FINGER_CLOSED) / (FINGER_OPEN - FINGER_CLOSED)
        return np.array([pos[NAMES[i]] for i in JOINT_IDS]), float(np.clip(grip, 0.0, 1.0))

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

    def set_gripper(self, direction):  # ROS 1 / ROS 2 method names; 0 (stop) is theirs to do
        names = {1: ("open", "release"), -1: ("close", "grasp")}.get(direction)
        if names:
            (getattr(self.bot.gripper, names[0], None) or getattr(self.bot.gripper, names[1]))(
                delay=0
            )

    def torque(self, on):
        self.core.robot_torque_enable("group", "all", on)

    def setup(self):
        self.torque(True)


def make_arm(backend="dynamixel", port="/dev/ttyUSB0", baud=1_000_000, log=print):
    if backend not in ("dynamixel", "interbotix"):
        raise ValueError(f"backend must be 'dynamixel' or 'interbotix', got {backend!r}")
    return (
        DynamixelArm(DynamixelBus(port, baud), log=log)
        if backend == "dynamixel"
        else InterbotixArm(log=log)
    )


# ---- kinematics (SPEC 6: product of exponentials in the space frame) -------------------------------------------
def _skew(w):
    return np.array([[0, -w[2], w[1]], [w[2], 0, -w[0]], [-w[1], w[0], 0]])


def _rot(w, theta):  # Rodrigues: rotation by theta about the unit axis w
    k = _skew(w)
    return np.eye(3) + np.sin(theta) * k + (1 - np.cos(theta)) * k @ k


def _exp_screw(s, theta):
    k, T = _skew(s[:3]), np.eye(4)
    T[:3, :3] = _rot(s[:3], theta)
    T[:3, 3] = (np.eye(3) * theta + (1 - np.cos(theta)) * k + (theta - np.sin(theta)) * k @ k) @ s[
        3:
    ]
    return T


def forward_kinematics(
    q,
):  # joints (6,) -> 4x4 pose of ee_gripper_link in base_link: e^[S1]q1 ... e^[S6]q6 M
    T = np.eye(4)
    for s, theta in zip(SCREWS, q):
        T = T @ _exp_screw(s, theta)
    return T @ M_HOME


def _jacobian(
    q, p
):  # 6x6: rows 0-2 the angular velocity, rows 3-5 the velocity of the end-effector point p
    T, J = np.eye(4), np.zeros((6, 6))
    for i, (s, theta) in enumerate(zip(SCREWS, q)):
        w = T[:3, :3] @ s[:3]
        v = np.cross(T[:3, 3], w) + T[:3, :3] @ s[3:]  # the screw, moved by the joints before it
        J[:3, i], J[3:, i] = w, v + np.cross(w, p)
        T = T @ _exp_screw(s, theta)
    return J


def rotation_log(R):  # rotation matrix -> rotation vector (axis * angle), also at angle pi
    w = np.array([R[2, 1] - R[1, 2], R[0, 2] - R[2, 0], R[1, 0] - R[0, 1]]) / 2
    s, c = np.linalg.norm(w), (np.trace(R) - 1) / 2
    if s < 1e-9 and c < 0:  # angle pi: the axis is the largest column of R + I
        v = (R + np.eye(3))[:, np.argmax(np.diag(R))]
        return v / np.linalg.norm(v) * np.pi
    return w / s * np.arctan2(s, c) if s > 1e-9 else w


def inverse_kinematics(T_goal, seed, iters=200, damping=0.02, tol_pos=1e-4, tol_rot=1e-3):
    """Damped least squares from `seed` (the current joints), clipped to the joint limits at every iteration.
    Raises IKError with the residual when it does not converge: the caller holds the arm, it never guesses."""
    q = np.clip(np.asarray(seed, float), JOINT_LOW, JOINT_HIGH)
    for _ in range(iters):
        T = forward_kinematics(q)
        err = np.concatenate([rotation_log(T_goal[:3, :3] @ T[:3, :3].T), T_goal[:3, 3] - T[:3, 3]])
        if np.linalg.norm(err[3:]) < tol_pos and np.linalg.norm(err[:3]) < tol_rot:
            return q
        J = _jacobian(q, T[:3, 3])
        dq = J.T @ np.linalg.solve(J @ J.T + damping**2 * np.eye(6), err)
        q = np.clip(
            q + dq * min(1.0, 0.5 / (np.abs(dq).max() + 1e-12)), JOINT_LOW, JOINT_HIGH
        )  # no leaps
    raise IKError(
        f"IK did not converge in {iters} iterations: position error {np.linalg.norm(err[3:]) * 1e3:.1f} "
        f"mm, rotation error {np.linalg.norm(err[:3]):.3f} rad (unreachable, or beyond the joint limits)"
    )


def euler_to_matrix(e):
    return _rot((0, 0, 1), e[2]) @ _rot((0, 1, 0), e[1]) @ _rot((1, 0, 0), e[0])  # xyz extr.


def pose_to_state(T, grip):
    """Bridge state: xyz, euler xyz of the rotation relative to pointing down, gripper (0 closed .. 1 open)."""
    R = T[:3, :3] @ DOWN.T
    euler = (
        np.arctan2(R[2, 1], R[2, 2]),
        np.arctan2(-R[2, 0], np.hypot(R[2, 1], R[2, 2])),
        np.arctan2(R[1, 0], R[0, 0]),
    )
    return np.array([*T[:3, 3], *euler, grip], np.float32)


# ---- the environment -------------------------------------------------------------------------------------------
def _cv2():
    try:
        import cv2
    except ImportError:
        raise ImportError(
            "the camera needs opencv: pip install opencv-python (or camera=None)"
        ) from None
    return cv2


def open_camera(
    camera,
):  # None (black images), anything with read() -> (ok, BGR frame), an opencv index or path
    if camera is None or hasattr(camera, "read"):
        return camera
    cap = _cv2().VideoCapture(camera)
    if not cap.isOpened():
        raise RuntimeError(f"could not open camera {camera!r} (ls /dev/video*; try another index)")
    cap.set(_cv2().CAP_PROP_BUFFERSIZE, 1)  # the newest frame, not one queued long ago
    return cap


class WidowXEnv:
    """The real arm with the simulator's interface (SPEC 2): reset() -> obs, step(action) -> (obs, reward,
    terminated, truncated, info), obs = {"image": uint8 (H, W, 3), "state": float32 (7,)}. action: the raw Bridge
    action (dx, dy, dz in m, droll, dpitch, dyaw in rad, gripper 0 closed .. 1 open); the pose target accumulates
    from the previous target, not the measured pose; translation in the base frame, clipped to the workspace;
    rotation about the end effector with world axes (R <- Rz Ry Rx R). reward 0, info["success"] False: on the
    real arm, success comes from a learned classifier (online.py). Safety: commands clipped to the joint limits
    (the servos' limits are a backstop); at most max_joint_step per joint and tick; an IK failure holds the arm; an
    exception, Ctrl-C or a servo hardware alert in reset/step runs safe_stop; a watchdog thread holds the arm
    when no step() came for watchdog_s (a late policy)."""

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
        self.camera, self.log = open_camera(camera), log
        self.image_size = (image_size, image_size) if np.isscalar(image_size) else tuple(image_size)
        self.period, self.max_steps, self.move_s = 1.0 / control_hz, max_steps, move_s
        self.workspace = (np.asarray(workspace[0], float), np.asarray(workspace[1], float))
        self.max_joint_step, self.watchdog_s, self.reset_joints = (
            max_joint_step,
            watchdog_s,
            reset_joints,
        )
        self._lock, self._stop, self._last, self._ready, self._held = (
            threading.RLock(),
            threading.Event(),
            None,
            0,
            0,
        )
        if watchdog_s:  # wakes 4 times per watchdog_s; acts only on a ready env, between steps
            threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self):
        while not self._stop.wait(self.watchdog_s / 4):
            self.watchdog_tick(time.monotonic())

    def watchdog_tick(
        self, now
    ):  # hold the arm when no command came for watchdog_s (a late policy, a stall)
        with self._lock:
            if self._ready and not self._held and now - self._last > self.watchdog_s:
                try:
                    self.arm.hold()
                except Exception as e:  # the next step() meets the same fault and stops safely
                    self.log(f"watchdog: hold failed: {e}")
                self._held = True

    def safe_stop(self, reason=None):
        """Hold, open the gripper, sleep pose, torque off; every part runs even when an earlier one failed."""
        if reason is not None:
            self.log(
                f"robot: {type(reason).__name__}: {reason} -> safe stop (hold, open gripper, sleep, torque off)"
            )
        with self._lock:
            self._ready = False
            for what, fn in (
                ("hold", self.arm.hold),
                ("open gripper", lambda: self.arm.set_gripper(1)),
                ("sleep pose", lambda: self.arm.move(SLEEP_JOINTS, self.move_s)),
                ("gripper off", lambda: self.arm.set_gripper(0)),
                ("torque off", lambda: self.arm.torque(False)),
            ):
                try:
                    fn()
                except BaseException as e:  # a second Ctrl-C included: the torque still goes off
                    self.log(f"safe stop: {what} failed: {type(e).__name__}: {e}")

    def reset(self, seed=None):
        """Set the arm up (first time, or after a safe stop), open the gripper, go to reset_joints. seed: unused."""
        try:
            with self._lock:
                if not self._ready:
                    self.arm.setup()
                    self._ready = True
                self.arm.set_gripper(1)
                self.arm.move(self.reset_joints, self.move_s)
                obs = self._observe()
                self._target, self._t, self._held = forward_kinematics(self._q), 0, False
                self._tick = self._last = time.monotonic()
                return obs
        except BaseException as e:  # Ctrl-C too
            self.safe_stop(e)
            raise

    def step(self, action):
        if not self._ready:
            raise RuntimeError(
                "call reset() first (after a safe stop, reset() sets the arm up again)"
            )
        try:
            a = np.asarray(action, float).reshape(-1)
            if a.shape != (7,) or not np.all(
                np.isfinite(a)
            ):  # a broken policy output stops the arm too
                raise ValueError(
                    f"action must be 7 finite numbers (dx, dy, dz, droll, dpitch, dyaw, gripper): {a}"
                )
            with self._lock:
                info = {"success": False, "held_by_watchdog": self._held}
                goal = self._target.copy()
                goal[:3, 3] = np.clip(goal[:3, 3] + a[:3], *self.workspace)
                goal[:3, :3] = euler_to_matrix(a[3:6]) @ goal[:3, :3]
                try:
                    q_goal, self._target = inverse_kinematics(goal, self._q), goal
                except IKError as e:  # hold; the target stays at the last reachable pose
                    q_goal, info["ik_error"] = self._q, str(e)
                q = self._q + np.clip(q_goal - self._q, -self.max_joint_step, self.max_joint_step)
                self.arm.command(
                    q,
                    grip=a[6],
                    seconds=move_seconds(q, self._q, self.period, self.arm.velocity_limit),
                )
                self._last, self._held = time.monotonic(), False
            # 5 Hz while the policy keeps up, and never observe sooner than half a tick after the command
            self._tick = max(self._tick + self.period, self._last + self.period / 2)
            time.sleep(max(0.0, self._tick - time.monotonic()))
            with self._lock:
                obs = self._observe()
            self._t += 1
            return obs, 0.0, False, self._t >= self.max_steps, info
        except BaseException as e:  # Ctrl-C too
            self.safe_stop(e)
            raise

    def _observe(self):
        self._q, grip = self.arm.read()
        if self.arm.alerts:
            errors = "; ".join(
                f"ID {i} ({NAMES[i]}): {', '.join(m)}"
                for i, m in self.arm.hardware_errors().items()
            )
            raise HardwareError(
                f"servo hardware error: {errors or 'alert bit set'}. The servo latched it and "
                "turned its torque off; reboot it with: python robot.py check --port ... --reboot"
            )
        image = np.zeros(self.image_size + (3,), np.uint8)
        if self.camera is not None:
            ok, frame = next(
                (r for r in (self.camera.read() for _ in range(5)) if r[0]), (False, None)
            )
            if not ok:  # a dropped frame happens; five in a row do not
                raise RuntimeError(
                    "the camera returned no frame 5 times in a row (cable? another program using it?)"
                )
            image = np.ascontiguousarray(np.asarray(frame, np.uint8)[..., ::-1])  # BGR -> RGB
            if image.shape[:2] != self.image_size:
                image = _cv2().resize(image, self.image_size[::-1], interpolation=_cv2().INTER_AREA)
        return {"image": image, "state": pose_to_state(forward_kinematics(self._q), grip)}

    def close(self):  # sleep pose, torque off, release the port and the camera
        self._stop.set()
        if self._ready:
            self.safe_stop()
        self.arm.close()
        if hasattr(self.camera, "release"):
            self.camera.release()

    __enter__ = lambda self: self
    __exit__ = lambda self, *exc: self.close()


# ---- teleoperation into the Bridge numpy format (SPEC 5) -------------------------------------------------------
TELEOP_KEYS = {
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
TELEOP_HELP = """Keys, one move per 5 Hz tick while held: w/s forward/back (x), a/d left/right (y), r/f up/down (z),
u/o roll, i/k pitch, j/l yaw, space opens/closes the gripper. Enter ends the episode and keeps it, Backspace
discards it, q quits (kept episodes are saved), Ctrl-C stops the arm safely (sleep pose, torque off)."""


def record_episode(env, keys, max_steps=100, step_m=0.02, step_rad=0.08):
    """One teleoperated episode -> (Bridge trajectory or None when discarded, quit?); keys() -> chars typed."""
    observations, actions, grip = [env.reset()], [], 1.0
    while len(actions) < max_steps:
        typed = keys()
        if "q" in typed or "\x7f" in typed or "\b" in typed:
            return None, "q" in typed
        if "\n" in typed or "\r" in typed:
            break
        a = np.zeros(7)
        for c in set(typed) & TELEOP_KEYS.keys():
            axis, sign = TELEOP_KEYS[c]
            a[axis] = sign * (step_m if axis < 3 else step_rad)
        a[6] = grip = 1.0 - grip if typed.count(" ") % 2 else grip
        observations.append(env.step(a)[0])
        actions.append(a)
    obs = [{"images0": o["image"], "state": o["state"]} for o in observations]
    return {
        "observations": obs[:-1],
        "next_observations": obs[1:],
        "actions": np.asarray(actions, np.float32),
        "terminals": np.zeros(len(actions), np.float32),
    } if actions else None, False


def record(env, out_dir, episodes, keys, max_steps=100, val_every=5, log=print):
    """Record `episodes` more episodes into out_dir (every val_every-th to val/), saving after each one."""
    paths = {split: os.path.join(out_dir, split, "out.npy") for split in ("train", "val")}
    splits = {
        k: list(np.load(p, allow_pickle=True)) if os.path.exists(p) else []
        for k, p in paths.items()
    }
    log(
        f"{out_dir}: {len(splits['train'])} train + {len(splits['val'])} val episodes already there\n{TELEOP_HELP}"
    )
    for n in range(episodes):
        log(f"episode {n + 1}/{episodes}: moving to the start pose ...")
        trajectory, quit_ = None, False
        while trajectory is None and not quit_:
            trajectory, quit_ = record_episode(env, keys, max_steps)
        if trajectory is None:
            return n
        count = len(splits["train"]) + len(splits["val"]) + 1
        splits["val" if count % val_every == 0 else "train"].append(trajectory)
        for split, trajectories in splits.items():
            os.makedirs(os.path.dirname(paths[split]), exist_ok=True)
            with open(
                paths[split] + ".tmp", "wb"
            ) as f:  # atomically: a crash loses only the episode at hand
                np.save(f, np.array(trajectories, dtype=object), allow_pickle=True)
            os.replace(paths[split] + ".tmp", paths[split])
        log(
            f"kept {len(trajectory['actions'])} steps; {len(splits['train'])} train + {len(splits['val'])} val"
        )
    return episodes


@contextlib.contextmanager
def terminal_keys():  # -> keys(): what was typed since the last call, without Enter or echo; Ctrl-C still works
    import termios
    import tty

    fd, saved = sys.stdin.fileno(), termios.tcgetattr(sys.stdin.fileno())
    tty.setcbreak(fd)
    try:  # one tick's keys fit in 1024 bytes
        yield (
            lambda: (
                os.read(fd, 1024).decode(errors="ignore")
                if select.select([fd], [], [], 0)[0]
                else ""
            )
        )
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def check(
    bus, reboot=False, log=print
):  # a line per servo 1-9: model, position, temperature, errors -> all there?
    missing = []  # the first missing servo's message explains what to check
    for i in ALL_IDS:
        try:
            model = bus.ping(i)
            pos, temp, hw = (
                bus.read(i, item)
                for item in (PRESENT_POSITION, PRESENT_TEMPERATURE, HARDWARE_ERROR)
            )
            if hw and reboot:
                bus.reboot(i)
            log(
                f"ID {i} {NAMES[i]:<15} {MODELS.get(model, f'model {model}'):<10} position {pos:5d} "
                f"({float(ticks_to_rad(pos)):+.3f} rad) {temp:3d} C  "
                f"{'; '.join(hardware_messages(hw)) if hw else 'no errors'}{' -> rebooted' if hw and reboot else ''}"
            )
        except NoStatusError as e:
            log(f"ID {i} {NAMES[i]:<15} no reply" + ("" if missing else f"\n{e}"))
            missing.append(i)
    return not missing


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    for cmd, text in (
        ("check", "ping servos 1-9: model, position, temperature, errors (dynamixel backend)"),
        ("sleep", "set the arm up, go to the sleep pose, torque off"),
        ("home", "set the arm up, go to the home pose (torque stays on)"),
        ("record", "record teleoperated demos in the Bridge format.\n\n" + TELEOP_HELP),
    ):
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
        type=lambda s: int(s) if s.isdigit() else s,
        help="opencv index or path",
    )
    args = p.parse_args(argv)
    if args.cmd == "check":  # talks to the servos directly (stop the Interbotix node first)
        with contextlib.closing(DynamixelBus(args.port, args.baud)) as bus:
            return 0 if check(bus, args.reboot) else 1
    if args.cmd in ("sleep", "home"):
        with contextlib.closing(make_arm(args.backend, args.port, args.baud)) as arm:
            arm.setup()
            arm.move(SLEEP_JOINTS if args.cmd == "sleep" else HOME_JOINTS)
            if args.cmd == "sleep":  # resting on its cradle; home keeps holding
                arm.torque(False)
        return 0
    with (
        WidowXEnv(
            args.port,
            backend=args.backend,
            baud=args.baud,
            camera=args.camera,
            max_steps=args.max_steps,
        ) as env,
        terminal_keys() as keys,
    ):
        record(env, args.out, args.episodes, keys, args.max_steps, args.val_every)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (
        ImportError,
        DynamixelError,
    ) as e:  # the message says what to do; a traceback would bury it
        sys.exit(f"robot.py: {e}")
