"""fakes.py: the test doubles of test_ptr.py (SPEC section 2: level -, it may import anything).

Stand-ins for the hardware that robot.py, arm.py and dynamixel.py talk to, so that their tests run
on any Linux or macOS machine: a WidowX 250's nine servos behind a pseudo-terminal (FakeBus, the
XM430 rules the driver depends on), the driver's end of its pseudo-terminal as a serial port
(PtyPort; twin.PtyPort opens a twin's by path), a camera that sees red (RedCamera), pyserial's
exception (SerialException) and Interbotix's Python API (fake_interbotix).

Stand-ins for what rollout.py and online.py run: policies (ReplayAgent replays given actions,
ZeroPolicy acts zero, RecordingPolicy records whether it was asked for the mean), wrappers of the
simulator (SucceedAt: a success at step k; CtrlCAt: a Ctrl-C at its k-th step) and environments of
their own (BrightAtEnv: one bright frame; StagedEnv: episodes that report stages).
"""

import os
import select
import signal
import struct
import sys
import threading
import types

import numpy as np
import torch

import dynamixel
import twin
import widowx
from arm import ALL_IDS, GRIPPER_ID, JOINT_IDS, SERVO_NAMES, SHADOWS

# ---- dynamixel.py, arm.py, twin.py: servos behind a pseudo-terminal ------------------------------
MECH = {3: 7, 5: -5}  # how far each shadow's horn sits from its mirrored master (ticks)


class PtyPort(twin.PtyPort):
    """The driver's end of a pseudo-terminal already open (fd); twin.PtyPort opens one by path."""

    def __init__(self, fd):
        self.fd = fd
        self.name = "/dev/pts/fake"


class FakeBus:
    """Servos 1-9 of a WidowX 250 behind a pseudo-terminal, served by a thread.

    Each servo has a control table (factory defaults), a raw encoder position and the XM430 rules
    the driver depends on: Present Position = raw + Homing Offset, mirrored when Drive Mode bit 0
    is set; EEPROM (< 64) locked while torque is on; goals beyond the position limits refused; a
    Secondary ID executes writes silently. Shadows 3 and 5 are bolted to their masters (mirrored, a
    few ticks off): a shadow whose goal disagrees with where it is gets a recorded fight.
    offset_mode: where a reversed servo adds its Homing Offset ("before" the mirroring, as
    Interbotix assumes, "after", or "ignored"); grip_stops: where PWM drives the gripper (rad,
    closed and open). Faults: the servos in `silent` never answer (they still obey), those in
    `garbled` answer with a bad CRC; `corrupt` garbles the next n replies of any servo."""

    def __init__(self, joints=widowx.SLEEP_JOINTS):
        import tty

        master, slave = os.openpty()
        tty.setraw(slave)  # bytes as they are: no echo, no newline translation
        self.fd = master
        self.port = PtyPort(slave)
        self.table = {i: bytearray(256) for i in ALL_IDS}
        for i, t in self.table.items():
            struct.pack_into("<H", t, 0, 1060 if i == GRIPPER_ID else 1020)  # model number
            t[6] = 45  # firmware version
            t[7] = i  # ID
            t[9] = 250  # return delay time
            t[11] = 3  # operating mode
            t[12] = 255  # secondary ID
            t[146] = 38  # present temperature (C)
            struct.pack_into("<i", t, 48, 4095)
        ticks = dynamixel.rad_to_ticks(joints)
        self.raw = {i: int(t) for i, t in zip(JOINT_IDS, ticks)}
        # the wrist angle is mounted mirrored: it reads right once reversed
        self.raw[7] = 4095 - self.raw[7]
        self.raw[GRIPPER_ID] = 2048
        self._couple()
        self.packets = []
        self.raw_in = b""
        self.fights = []
        self.silent = set()
        self.garbled = set()
        self.corrupt = 0
        self._stop = threading.Event()
        self.offset_mode = "before"
        self.grip_stops = (-0.6, 1.3)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _couple(self):
        for shadow, master in SHADOWS.items():
            self.raw[shadow] = 4095 - self.raw[master] + MECH[shadow]

    def get(self, i, addr, size):
        return struct.unpack_from({1: "<B", 2: "<h", 4: "<i"}[size], self.table[i], addr)[0]

    def present(self, i):
        p = self.raw[i]
        off = self.get(i, 20, 4)
        if not self.get(i, 10, 1) & 1:
            return p + off
        mirrored = {"before": 4095 - (p + off), "after": 4095 - p + off, "ignored": 4095 - p}
        return mirrored[self.offset_mode]

    def fail(self, i, bits):
        """A latched hardware error: the alert bit on every reply, torque off."""
        self.table[i][70] = bits
        self.table[i][64] = 0

    def close(self):
        self._stop.set()
        self.thread.join()
        os.close(self.fd)
        self.port.close()

    def _serve(self):
        buf = b""
        while not self._stop.is_set():
            if not select.select([self.fd], [], [], 0.01)[0]:
                continue
            data = os.read(self.fd, 4096)
            self.raw_in += data
            buf += data
            while True:
                try:
                    got, buf, _ = dynamixel.split_packet(buf)
                except dynamixel.PacketError:  # drop the broken packet's header and look further
                    buf = buf[buf.find(dynamixel.HEADER) + 1 :]
                    continue
                if got is None:
                    break
                self.packets.append(got)
                for reply in self._handle(*got):
                    if self.corrupt:
                        self.corrupt -= 1
                        reply = reply[:-1] + bytes([reply[-1] ^ 0xFF])
                    os.write(self.fd, reply)

    def _status(self, i, error=0, data=b""):
        if i in self.silent:
            return []
        error |= 0x80 if self.table[i][70] else 0
        packet = dynamixel.make_packet(i, dynamixel.STATUS, bytes([error]) + data)
        if i in self.garbled:
            packet = packet[:-1] + bytes([packet[-1] ^ 0xFF])  # the CRC's high byte
        return [packet]

    def _write(self, target, addr, data):
        """Apply a write addressed to `target` -> error code for each primary servo {id: code}."""
        codes = {}
        servos = [i for i in ALL_IDS if target in (i, self.table[i][12], dynamixel.BROADCAST)]
        # masters move first, then shadows check
        for i in sorted(servos, key=lambda i: i in SHADOWS):
            t = self.table[i]
            code = 0
            if addr < 64 and t[64]:
                code = 7
            elif addr == 116:
                goal = struct.unpack_from("<i", data)[0]
                if not self.get(i, 52, 4) <= goal <= self.get(i, 48, 4):
                    code = 6
                else:
                    t[116:120] = data
                    if t[64] and i in SHADOWS and abs(self.present(i) - goal) > 3:
                        self.fights.append((i, goal, self.present(i)))
                    elif t[64] and i not in SHADOWS:
                        off = self.get(i, 20, 4)
                        self.raw[i] = (4095 - goal if t[10] & 1 else goal) - off
                        self._couple()
            else:
                t[addr : addr + len(data)] = data
                if addr == 100 and t[64]:  # PWM: the gripper runs to an end of its travel
                    pwm = self.get(i, 100, 2)
                    if pwm:
                        self.raw[i] = int(dynamixel.rad_to_ticks(self.grip_stops[pwm > 0]))
            if target == i:
                codes[i] = code
        return codes

    def _handle(self, target, inst, params):
        if inst == dynamixel.SYNC_READ:
            addr, size = struct.unpack_from("<HH", params)
            return [r for i in params[4:] for r in self._read(i, addr, size)]
        if inst == dynamixel.SYNC_WRITE:
            addr, size = struct.unpack_from("<HH", params)
            for k in range(4, len(params), size + 1):
                self._write(params[k], addr, params[k + 1 : k + 1 + size])
            return []
        if inst == dynamixel.WRITE:
            codes = self._write(target, struct.unpack_from("<H", params)[0], params[2:])
            return [r for i, c in codes.items() for r in self._status(i, c)]
        if target not in self.table:
            return []
        if inst == dynamixel.PING:
            model_and_firmware = bytes(self.table[target][0:2]) + bytes([self.table[target][6]])
            return self._status(target, 0, model_and_firmware)
        if inst == dynamixel.READ:
            return self._read(target, *struct.unpack_from("<HH", params))
        if inst == dynamixel.REBOOT:
            self.table[target][70] = 0
            return self._status(target)
        return self._status(target, 2)

    def _read(self, i, addr, size):
        struct.pack_into("<i", self.table[i], 132, self.present(i))
        return self._status(i, 0, bytes(self.table[i][addr : addr + size]))

    def sent(self, inst, addr=None):
        """Packets the driver sent with this instruction (and start address): [(target, params)]."""
        return [
            (t, p)
            for t, i, p in self.packets
            if i == inst and (addr is None or struct.unpack_from("<H", p)[0] == addr)
        ]


# ---- robot.py: a camera, a failing serial port, Interbotix's API ---------------------------------
class RedCamera:
    """A camera (cv2.VideoCapture's read) that sees a red image of size (H, W)."""

    def __init__(self, size):
        self.frame = np.zeros(size + (3,), np.uint8)
        self.frame[..., 0] = 10  # BGR: a red image
        self.frame[..., 2] = 200

    def read(self):
        return True, self.frame.copy()


class SerialException(OSError):
    """What pyserial raises (serial.SerialException is an IOError) for a port that fails."""


def fake_interbotix(monkeypatch):
    """Installs a stand-in for Interbotix's ROS 2 Python API -> the list of calls it receives."""
    calls = []

    class Core:
        q = widowx.SLEEP_JOINTS.copy()

        def robot_get_joint_states(self):
            fingers = ["gripper", "left_finger", "right_finger"]
            names = [SERVO_NAMES[i] for i in JOINT_IDS] + fingers
            return types.SimpleNamespace(name=names, position=list(self.q) + [0.0, 0.037, -0.037])

        def robot_torque_enable(self, cmd_type, name, enable):
            calls.append(("torque", cmd_type, name, enable))

    class Manipulator:  # bot.core, bot.arm, bot.gripper.release / grasp
        def __init__(self, model, group, gripper):
            assert (model, group, gripper) == ("wx250s", "arm", "gripper")
            self.core = Core()
            self.arm = types.SimpleNamespace(set_joint_positions=self.move)
            self.gripper = types.SimpleNamespace(
                release=lambda delay: calls.append(("release", delay)),
                grasp=lambda delay: calls.append(("grasp", delay)),
            )

        def move(self, q, moving_time, accel_time, blocking):
            calls.append(("joints", np.array(q), moving_time))
            self.core.q = np.array(q)

    module = types.ModuleType("interbotix_xs_modules.xs_robot.arm")
    module.InterbotixManipulatorXS = Manipulator
    for name in ("interbotix_xs_modules", "interbotix_xs_modules.xs_robot"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "interbotix_xs_modules.xs_robot.arm", module)
    return calls


# ---- rollout.py, online.py: stand-in policies and environments -----------------------------------
class ReplayAgent:
    """A stand-in for a trained actor that replays given rescaled actions, one per act() call.

    It keeps the images and states the policy was shown, in `seen`."""

    def __init__(self, scaled_actions, image_size):
        self.cfg = types.SimpleNamespace(image_size=image_size)
        self.actions = torch.as_tensor(scaled_actions)
        self.seen = []

    def act(self, images, state, task, deterministic=True):
        self.seen.append((images[0].permute(1, 2, 0).numpy().copy(), state[0].numpy().copy()))
        return self.actions[len(self.seen) - 1][None]


class ZeroPolicy:
    """A stand-in for rollout.Policy on 8 px images: every action is zero."""

    size = 8
    task_name = None

    def __call__(self, image, state, deterministic=True):
        return np.zeros(7, np.float32), np.zeros(7, np.float32)


class RecordingPolicy(ZeroPolicy):
    """ZeroPolicy that records the `deterministic` flag of every call."""

    def __init__(self):
        self.flags = []

    def __call__(self, image, state, deterministic=True):
        self.flags.append(deterministic)
        return super().__call__(image, state, deterministic)


class SucceedAt:
    """The simulator, except that step k of every episode is a success (reward 1, terminated), or
    of the episodes numbered in `episodes` only (counted from 0 over resets)."""

    def __init__(self, env, k, episodes=None):
        self.env = env
        self.k = k
        self.t = 0
        self.episodes = episodes
        self.episode = -1

    def reset(self, seed=None):
        self.t = 0
        self.episode += 1
        return self.env.reset(seed=seed)

    def step(self, action):
        obs, r, term, trunc, info = self.env.step(action)
        self.t += 1
        chosen = self.episodes is None or self.episode in self.episodes
        if self.t == self.k and chosen:
            return obs, 1.0, True, False, dict(info, success=True)
        return obs, r, term, trunc, info

    def close(self):
        self.env.close()


class CtrlCAt:
    """The simulator, and a Ctrl-C (SIGINT to this process) during its k-th step call, counted
    over episodes."""

    def __init__(self, env, k):
        self.env = env
        self.k = k
        self.calls = 0
        self.reset = env.reset
        self.close = env.close

    def step(self, action):
        self.calls += 1
        if self.calls == self.k:
            os.kill(os.getpid(), signal.SIGINT)
        return self.env.step(action)


class BrightAtEnv:
    """An environment of dark 40 px images, bright at step k, 3 steps; it never rewards itself."""

    def __init__(self, k):
        self.k = k
        self.t = 0

    def reset(self, seed=None):
        self.t = 0
        return self._obs()

    def _obs(self):
        return {
            "image": np.full((40, 40, 3), 220 if self.t == self.k else 30, np.uint8),
            "state": np.zeros(7, np.float32),
        }

    def step(self, action):
        self.t += 1
        return self._obs(), 0.0, False, self.t >= 3, {"success": False}

    def close(self):
        pass


class StagedEnv:
    """An environment of 4 steps an episode that reports stages (stages=False: none).

    'grasped' holds at step 2 only (a grasp that slips), 'placed' from step 3 on in even-seeded
    episodes, which then succeed."""

    def __init__(self, stages=True):
        self.stages = stages
        self.t = 0
        self.seed = None

    def reset(self, seed=None):
        self.t = 0
        self.seed = seed
        return self._obs()

    def _obs(self):
        return {"image": np.zeros((8, 8, 3), np.uint8), "state": np.zeros(7, np.float32)}

    def step(self, action):
        self.t += 1
        placed = self.t >= 3 and self.seed % 2 == 0
        info = {"success": placed}
        if self.stages:
            info["stages"] = {"grasped": self.t == 2, "placed": placed}
        return self._obs(), float(placed), False, self.t >= 4, info

    def close(self):
        pass


class ModuleEnv:
    """A user's own environment, as `--env fakes:ModuleEnv` makes it (rollout.env_from_module):
    image_size px frames, episodes of max_steps steps (5 when not given) that succeed at step 2
    when the seed is even; no close(). The keywords of every one made are kept in ModuleEnv.made."""

    made = []

    def __init__(self, image_size, max_steps=None):
        ModuleEnv.made.append({"image_size": image_size, "max_steps": max_steps})
        self.size = image_size
        self.max_steps = max_steps or 5
        self.t = 0
        self.seed = None

    def reset(self, seed=None):
        self.t = 0
        self.seed = seed
        return self._obs()

    def _obs(self):
        image = np.zeros((self.size, self.size, 3), np.uint8)
        return {"image": image, "state": np.zeros(7, np.float32)}

    def step(self, action):
        self.t += 1
        won = self.t == 2 and self.seed is not None and self.seed % 2 == 0
        return self._obs(), float(won), won, self.t >= self.max_steps, {"success": won}
