"""fileio.py: how PTR-torch writes files, written once for every script (a leaf: imports
nothing from the project, so robot.py and sim_binsort.py may use it as well as data.py and
train.py; SPEC section 2).

- atomic_write(path, write): the file appears whole or not at all. It is written to
  `<path>.tmp-<pid>` in the same folder and renamed over `path`; on any failure (disk full, Ctrl-C,
  SIGTERM) the temporary file is removed. It replaces a regular file only, never a symbolic link,
  a FIFO, a device or a directory, and a full disk is one AtomicWriteError naming the file.
  atomic_write_json writes null where a number is not finite (JSON has no NaN).
- sweep_stale_tmp(folder) removes the temporaries that killed processes (kill -9) left behind;
  pid_alive() is how it (and the run folder's lock, data.py's store folders) tells a dead writer.
The Bridge numpy format, its writer included, is bridge.py's.
"""

import errno
import glob
import json
import math
import os
import stat

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
