"""dynamixel.py: ROBOTIS Dynamixel protocol 2.0 and a serial bus master for it (SPEC section 6).

A leaf (imports nothing from the project; SPEC section 2): arm.py drives the WidowX 250 with it,
and any other Dynamixel X-series project can copy it alone. pyserial is imported only to open a port
by its path.
- Packets: header FF FF FD 00, ID, length (2 bytes, little endian), instruction, parameters, CRC-16
  over all bytes before it. Inside instruction + parameters every FF FF FD gets an extra FD (byte
  stuffing).
- Status packets: instruction 0x55, an error byte (bit 7: the servo latched a hardware error, the
  data are still valid; bits 0-6: why the instruction failed), then the data.
- DynamixelBus: ping, read, write, reboot, sync_read (all servos in one packet), sync_write; retries
  a missing or corrupted reply, then names the servo: NoStatusError (with what to check) when it
  stayed silent, PacketError when its status packets kept failing their CRC. Every
  failure here is a DynamixelError, an OSError as pyserial's SerialException is; a port that fails
  mid-command (SerialException, or any OSError) becomes a PortError naming the port.
"""

import struct
import threading
import time

import numpy as np

HEADER = b"\xff\xff\xfd\x00"
BROADCAST = 0xFE  # the ID every servo listens to
STATUS = 0x55  # the instruction of a status packet (a servo's reply)
ALERT = 0x80  # bit 7 of a status packet's error byte: a latched hardware error
PORT = "/dev/ttyUSB0"  # where a U2D2 usually appears (Linux): the default of every --port
BAUD = 1_000_000  # the WidowX 250's servos

# instructions
PING = 0x01
READ = 0x02
WRITE = 0x03
REBOOT = 0x08
SYNC_READ = 0x82
SYNC_WRITE = 0x83
INSTRUCTION_NAMES = {
    PING: "PING",
    READ: "READ",
    WRITE: "WRITE",
    REBOOT: "REBOOT",
    SYNC_READ: "SYNC_READ",
    SYNC_WRITE: "SYNC_WRITE",
}

# control table items of the XM430 / XL430: (address, bytes). Addresses below 64 are EEPROM:
# writable only with the torque off.
RETURN_DELAY = (9, 1)
DRIVE_MODE = (10, 1)
OPERATING_MODE = (11, 1)
SECONDARY_ID = (12, 1)
HOMING_OFFSET = (20, 4)
MAX_POSITION = (48, 4)
MIN_POSITION = (52, 4)
TORQUE_ENABLE = (64, 1)
HARDWARE_ERROR = (70, 1)
GOAL_PWM = (100, 2)
PROFILE = (108, 8)  # Profile Acceleration (108) and Profile Velocity (112), written together
GOAL_POSITION = (116, 4)
PRESENT_POSITION = (132, 4)
PRESENT_TEMPERATURE = (146, 1)
VALUE_FORMATS = {1: "<B", 2: "<h", 4: "<i", 8: "<ii"}  # struct format of an item by its size
POSITION_MODE = 3  # Operating Mode values
PWM_MODE = 16
REVERSE_BIT = 1  # Drive Mode bits: bit 0 turns the servo's direction round
TIME_PROFILE_BIT = 4  # bit 2: Profile Velocity is the time of a move (ms), acceleration its ramp

MODEL_NAMES = {1020: "XM430-W350", 1060: "XL430-W250"}
# the error byte's low bits, by their value (error & 0x7F); 8 and above are not in the protocol
RESULT_ERRORS = {
    1: "result fail",
    2: "instruction error",
    3: "CRC error (a corrupted packet: cable?)",
    4: "data range error",
    5: "data length error",
    6: "data limit error (a goal beyond the position limits?)",
    7: "access error (read-only register, or EEPROM (address < 64) written with torque on)",
}
# Hardware Error Status (address 70), by bit
HARDWARE_ERRORS = {
    0: "input voltage out of range (check the 12 V supply)",
    2: "overheating",
    3: "motor encoder error",
    4: "electrical shock (short circuit or damaged motor)",
    5: "overload (too much load for too long)",
}
TICKS_PER_HALF_TURN = 2047.5  # position ticks: 0 .. 4095 for one turn, 2047.5 at 0 rad


class DynamixelError(OSError):
    """The bus or a servo reported a problem; the message says which and what to do."""


class PacketError(DynamixelError):
    """A corrupted packet (bad CRC). dxl_id: the ID its header names; rest: the bytes after it."""

    def __init__(self, message, dxl_id=None, rest=b""):
        super().__init__(message)
        self.dxl_id = dxl_id
        self.rest = rest


class NoStatusError(DynamixelError):
    """A servo did not answer."""


class ServoError(DynamixelError):
    """A status packet carried an error code (1..7)."""


class PortError(DynamixelError):
    """The serial port itself failed (unplugged, or taken by another program): no servo can be
    reached."""


class HardwareError(DynamixelError):
    """A servo latched a hardware error: its torque is off until it is rebooted."""


# ---- packets -------------------------------------------------------------------------------------
def crc16(data):
    """CRC-16 of protocol 2.0: polynomial 0x8005, initial value 0, not reflected."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            if crc & 0x8000:
                crc = ((crc << 1) ^ 0x8005) & 0xFFFF
            else:
                crc = (crc << 1) & 0xFFFF
    return crc


def stuff(body):
    """Byte stuffing: a header inside the data would read as a new packet, so FF FF FD gets an extra
    FD."""
    return bytes(body).replace(b"\xff\xff\xfd", b"\xff\xff\xfd\xfd")


def unstuff(body):
    """The inverse of stuff()."""
    return bytes(body).replace(b"\xff\xff\xfd\xfd", b"\xff\xff\xfd")


def make_packet(dxl_id, instruction, params=b""):
    """Header, ID, length, instruction, params (stuffed), CRC. Status packets too: 0x55, error byte
    + data."""
    body = stuff(bytes([instruction]) + bytes(params))
    packet = HEADER + bytes([dxl_id]) + struct.pack("<H", len(body) + 2) + body
    return packet + struct.pack("<H", crc16(packet))


def split_packet(buf):
    """First packet in buf -> ((id, instruction, unstuffed params) or None, rest of buf, bytes still
    missing). Bytes before a header are dropped (a partial header at the end is kept); a bad CRC
    raises PacketError."""
    start = buf.find(HEADER)
    if start < 0:
        keep = next(k for k in (3, 2, 1, 0) if buf.endswith(HEADER[:k]))
        return None, buf[len(buf) - keep :], 11 - keep  # 11 bytes: the shortest status packet
    buf = buf[start:]
    if len(buf) < 7:  # the length field is not there yet
        return None, buf, 11 - len(buf)
    total = 7 + struct.unpack_from("<H", buf, 5)[0]
    if len(buf) < total:
        return None, buf, total - len(buf)
    packet = buf[:total]
    rest = buf[total:]
    if total < 10 or struct.unpack_from("<H", packet, total - 2)[0] != crc16(packet[:-2]):
        raise PacketError(
            f"bad CRC in a packet from ID {packet[4]}: {packet.hex(' ')}", packet[4], rest
        )
    body = unstuff(packet[7:-2])
    return (packet[4], body[0], body[1:]), rest, 0


def pack_value(value, size):
    """A control table value (or the pair of a PROFILE item) as the item's little-endian bytes."""
    return struct.pack(VALUE_FORMATS[size], *np.atleast_1d(value).astype(int).tolist())


def result_message(error):
    """The text of a status packet's error code (its low 7 bits)."""
    return RESULT_ERRORS.get(error & 0x7F, f"error {error & 0x7F}")


def hardware_messages(status):
    """Hardware Error Status (address 70) -> its set bits in words."""
    messages = [text for bit, text in HARDWARE_ERRORS.items() if status >> bit & 1]
    return messages or [f"hardware error status {status}"]


def rad_to_ticks(q):
    """Joint angles (rad) -> position ticks, 2047.5 at 0 rad (SPEC 6)."""
    ticks = np.asarray(q) / np.pi * TICKS_PER_HALF_TURN + TICKS_PER_HALF_TURN
    return np.round(ticks).astype(int)


def ticks_to_rad(ticks):
    """Position ticks -> joint angles (rad)."""
    return (np.asarray(ticks, float) - TICKS_PER_HALF_TURN) * np.pi / TICKS_PER_HALF_TURN


def open_serial(path, baud):
    """Open a serial port by its path with pyserial; short reads, the bus keeps its own deadline."""
    try:
        import serial
    except ImportError:
        raise ImportError(
            f"opening the serial port {path} needs pyserial: pip install pyserial"
        ) from None
    return serial.Serial(path, baud, timeout=0.01)


# ---- the bus -------------------------------------------------------------------------------------
class DynamixelBus:
    """Protocol 2.0 master. port: a path (opened by pyserial) or an object with read(n),
    write(data), reset_input_buffer() and close(). names: {id: name} for the messages. alerts: the
    IDs whose last status packet had the alert bit set (a latched hardware error)."""

    def __init__(self, port=PORT, baud=BAUD, timeout=0.1, retries=3, names=None):
        if isinstance(port, str):
            self.name = port
            port = open_serial(port, baud)
        else:
            self.name = getattr(port, "name", type(port).__name__)
        self.port = port
        self.baud = baud
        self.timeout = timeout
        self.retries = retries
        self.names = names or {}
        self.alerts = set()
        self.lock = threading.RLock()  # a watchdog thread and the control loop share the bus
        self._buf = b""

    def servo(self, dxl_id):
        """'ID 4 (elbow)' for the messages."""
        name = self.names.get(dxl_id)
        return f"ID {dxl_id} ({name})" if name else f"ID {dxl_id}"

    def transact(self, dxl_id, instruction, params=b"", reply_ids=None):
        """Send one packet -> {id: status data} for reply_ids (default: dxl_id; () where no reply
        comes). A try that misses a reply sends the packet again, up to `retries` tries in all; a
        servo still missing then is named by _missing_error."""
        reply_ids = (dxl_id,) if reply_ids is None else tuple(reply_ids)
        packet = make_packet(dxl_id, instruction, params)
        replies = {}
        corrupted = set()  # the servos whose status packets failed their CRC, in any try
        with self.lock:
            for _ in range(self.retries):
                try:
                    replies = self._send_and_collect(packet, instruction, reply_ids, corrupted)
                except OSError as e:
                    if isinstance(e, DynamixelError):
                        raise
                    raise PortError(
                        f"the serial port {self.name} failed: {e} "
                        "(unplugged? another program using it?)"
                    ) from e
                if len(replies) == len(reply_ids):
                    return replies
        missing = [i for i in reply_ids if i not in replies]
        raise self._missing_error(instruction, missing, corrupted)

    def _missing_error(self, instruction, missing, corrupted):
        """The error naming the servos without a valid reply after every try: NoStatusError for
        those that never answered (power, port, baud, ID), else PacketError for those whose status
        packets all failed their CRC (they answer, but the line garbles them: cable, connector)."""
        tries = f"{INSTRUCTION_NAMES[instruction]}, {self.retries} tries of {self.timeout} s"
        silent = [i for i in missing if i not in corrupted]
        if not silent:
            servos = ", ".join(self.servo(i) for i in missing)
            return PacketError(
                f"every status packet from servo {servos} on {self.name} failed its CRC ({tries}). "
                "The servo answers but its replies arrive garbled: check its cables and connectors"
            )
        servos = ", ".join(self.servo(i) for i in silent)
        return NoStatusError(
            f"no status packet from servo {servos} on {self.name} at {self.baud} baud ({tries}). "
            "Check the 12 V power, the port (ls /dev/ttyUSB*), the baud (WidowX: 1000000), the ID. "
            "Late replies: "
            "set the FTDI latency timer to 1 ms (echo 1 | sudo tee "
            "/sys/bus/usb-serial/devices/ttyUSB0/latency_timer)"
        )

    def _send_and_collect(self, packet, instruction, reply_ids, corrupted):
        """One try: write the packet, gather the status packets of reply_ids until each servo has
        answered or the deadline passes. A reply that fails its CRC is dropped and its servo added
        to `corrupted`; the other servos' replies are still gathered."""
        self.port.reset_input_buffer()
        self.port.write(packet)
        self._buf = b""
        replies = {}
        answered = set()  # this try's repliers, corrupted replies included
        deadline = time.monotonic() + self.timeout
        while len(answered) < len(reply_ids):
            try:
                got, self._buf, need = split_packet(self._buf)
            except PacketError as e:
                self._buf = e.rest
                if e.dxl_id in reply_ids:
                    corrupted.add(e.dxl_id)
                    answered.add(e.dxl_id)
                continue
            if got is None:
                if time.monotonic() > deadline:
                    break
                self._buf += self.port.read(need)
                continue
            dxl_id, kind, params = got
            if kind != STATUS or dxl_id not in reply_ids or not params:
                continue  # a stale reply, or an echo
            error = params[0]
            replies[dxl_id] = bytes(params[1:])
            answered.add(dxl_id)
            # the alert bit: the data are valid, but the servo latched a hardware error (or cleared)
            if error & ALERT:
                self.alerts.add(dxl_id)
            else:
                self.alerts.discard(dxl_id)
            if error & 0x7F:
                raise ServoError(
                    f"servo {self.servo(dxl_id)} answered {INSTRUCTION_NAMES[instruction]} with "
                    f"{result_message(error)}"
                )
        return replies

    def ping(self, dxl_id):
        """-> the servo's model number."""
        return struct.unpack_from("<H", self.transact(dxl_id, PING)[dxl_id])[0]

    def read(self, dxl_id, item):
        """-> the value of a control table item (address, bytes)."""
        data = self.transact(dxl_id, READ, struct.pack("<HH", *item))[dxl_id]
        return struct.unpack_from(VALUE_FORMATS[item[1]], data)[0]

    def write(self, dxl_id, item, value):
        self.transact(dxl_id, WRITE, struct.pack("<H", item[0]) + pack_value(value, item[1]))

    def reboot(self, dxl_id):
        """Clears a latched hardware error (and turns the torque off)."""
        self.transact(dxl_id, REBOOT)
        self.alerts.discard(dxl_id)

    def sync_read(self, ids, item):
        """-> {id: value} of one item from several servos, in one packet."""
        params = struct.pack("<HH", *item) + bytes(ids)
        replies = self.transact(BROADCAST, SYNC_READ, params, reply_ids=ids)
        return {i: struct.unpack_from(VALUE_FORMATS[item[1]], replies[i])[0] for i in ids}

    def sync_write(self, item, values):
        """values {id: value} in one packet. No replies: a missing servo shows at the next read."""
        data = b"".join(bytes([i]) + pack_value(v, item[1]) for i, v in values.items())
        self.transact(BROADCAST, SYNC_WRITE, struct.pack("<HH", *item) + data, reply_ids=())

    def close(self):
        self.port.close()
