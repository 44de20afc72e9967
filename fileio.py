"""fileio.py: how PTR-torch writes files, written once for every script (a leaf: imports
nothing from the project, so robot.py and sim_binsort.py may use it as well as data.py and
train.py; SPEC section 2).

- atomic_write(path, write): the file appears whole or not at all. It is written to
  `<path>.tmp-<pid>` in the same folder and renamed over `path`; on any failure (disk full, Ctrl-C,
  SIGTERM) the temporary file is removed. It replaces a regular file only, never a symbolic link,
  a FIFO, a device or a directory, and a full disk is one AtomicWriteError naming the file.
  sweep_stale_tmp(folder) removes the temporaries that killed processes (kill -9) left behind.
  atomic_write_json writes null where a number is not finite (JSON has no NaN).
- The Bridge numpy format (SPEC section 5): bridge_trajectory() builds one trajectory dict
  from T + 1 observations, write_bridge_file() stores a list of them as the release does
  (np.save of an object array). Every producer of data (sim collection, robot recording, synthetic
  test trees) goes through these two.
- Readers of other formats (rlds.py, lerobot.py) turn their episodes into the same dicts;
  FormatError names the file, the episode and the field of bad input, and choose_camera maps a
  --camera choice to a feature.
"""

import errno
import glob
import json
import math
import os
import re
import stat

import numpy as np

TMP_SUFFIX = ".tmp-"  # <path>.tmp-<pid>: the pid says whether the writer is still alive
# What an atomic write names instead of "not a regular file", by the type bits of os.lstat.
FILE_TYPES = {
    stat.S_IFLNK: "a symbolic link",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a directory",
}
OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT)  # a full disk, an exhausted quota


class AtomicWriteError(OSError):
    """An atomic write refused or cut short; the message names the destination and the reason."""


def tmp_path(path):
    return f"{path}{TMP_SUFFIX}{os.getpid()}"


def check_replaceable(path):
    """Refuse a destination that is there but is not a regular file (see atomic_write). A symbolic
    link is not followed: replacing it would leave its target stale, and writing through it would
    change a file elsewhere (as root, a link to /etc/passwd), so neither happens silently."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISREG(mode):
        return
    kind = FILE_TYPES.get(stat.S_IFMT(mode), "a special file")
    link = f" (to {os.readlink(path)}; links are not followed)" if stat.S_ISLNK(mode) else ""
    raise AtomicWriteError(
        f"{path}: {kind}, not a regular file{link}; an atomic write replaces regular files only"
    )


def out_of_space(error):
    """The OSError of a full disk (or quota) in error's chain, or None. A writer may wrap it:
    torch.save raises a RuntimeError from it."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in OUT_OF_SPACE:
            return error
        error = error.__cause__ or error.__context__
    return None


def atomic_write(path, write, mode="wb"):
    """write(f) fills an open temporary file; then it replaces `path` in one rename. Returns path.

    Only nothing or a regular file at `path` is replaced: a symbolic link (not followed, even to a
    regular file), a FIFO, a device node or a directory is an AtomicWriteError before anything is
    written (check_replaceable). A disk that fills up is an AtomicWriteError naming `path` and the
    cause, whatever the writer turned the OSError into; what was at `path` stays intact."""
    check_replaceable(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = tmp_path(path)
    try:
        with open(tmp, mode) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        full = out_of_space(e)
        if full is not None:
            reason = os.strerror(full.errno)
            message = f"{path}: {reason}; not written (any earlier version is intact)"
            raise AtomicWriteError(message) from e
        raise
    return path


def atomic_write_text(text, path):
    return atomic_write(path, lambda f: f.write(text), mode="w")


def finite_or_none(value):
    """value with every non-finite float in it (nested in dicts, lists, tuples) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def atomic_write_json(doc, path, indent=None):
    """doc as a JSON file, atomically. JSON has no NaN or infinity (Python's json would write a bare
    NaN that strict readers reject), so a non-finite number is written as null; allow_nan=False
    guards that none slips through."""
    text = json.dumps(finite_or_none(doc), indent=indent, allow_nan=False)
    return atomic_write_text(text + "\n", path)


def pid_alive(pid):
    """True while a process with this pid exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def sweep_stale_tmp(folder, pattern="*"):
    """Remove `<name>.tmp-<pid>` files in folder whose writer is dead; returns the removed paths."""
    removed = []
    for tmp in glob.glob(os.path.join(folder, pattern + TMP_SUFFIX + "*")):
        pid = tmp.rsplit(TMP_SUFFIX, 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            try:
                os.unlink(tmp)
                removed.append(tmp)
            except FileNotFoundError:  # another sweeper was quicker
                pass
    return removed


def bridge_trajectory(observations, actions, rewards=None, camera="images0"):
    """One Bridge trajectory dict from T + 1 observations {"image", "state"} and T actions.
    next_observations[t] IS observations[t + 1], so pickle stores each image once."""
    actions = np.asarray(actions, dtype=np.float32)
    if len(observations) != len(actions) + 1:
        raise ValueError(
            f"fileio.py: a trajectory of {len(actions)} actions needs {len(actions) + 1} "
            f"observations, got {len(observations)}"
        )
    steps = [
        {camera: o["image"], "state": np.asarray(o["state"], np.float32)} for o in observations
    ]
    traj = {
        "observations": steps[:-1],
        "next_observations": steps[1:],
        "actions": actions,
        "terminals": np.zeros(len(actions), np.float32),
    }
    if rewards is not None:
        traj["rewards"] = np.asarray(rewards, dtype=np.float32)
    return traj


def write_bridge_file(path, trajectories):
    """np.save of an object array of trajectory dicts (the Bridge release's out.npy), atomically."""
    arr = np.empty(len(trajectories), dtype=object)
    arr[:] = list(trajectories)
    atomic_write(path, lambda f: np.save(f, arr, allow_pickle=True))
    return path


class FormatError(ValueError):
    """Bad input in a data source:
    `<file>: episode <i>: field '<field>': expected <...>, got <...>`."""

    unit = "episode"

    def __init__(self, file, episode, field, expected, got=None):
        where = f"{file}: " + ("" if episode is None else f"{self.unit} {episode}: ")
        super().__init__(
            f"{where}field '{field}': expected {expected}" + ("" if got is None else f", got {got}")
        )


def choose_camera(cameras, camera, where):
    """A dataset's camera feature from a --camera choice: "imagesN" is the N-th of `cameras` (so the
    Bridge numpy format's names keep their meaning), else a feature's full name or its last part."""
    m = re.fullmatch(r"images(\d+)", camera)
    if m and int(m[1]) < len(cameras):
        return cameras[int(m[1])]
    for c in cameras:
        if camera in (c, re.split(r"[/.]", c)[-1]):
            return c
    raise FormatError(
        where,
        None,
        "camera",
        f"one of {cameras} or images0..images{len(cameras) - 1}",
        repr(camera),
    )
