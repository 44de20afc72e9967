"""PTR data: Bridge-format demos -> a memory-mapped store -> relabelled, mixed, augmented batches.

PTR (Kumar et al., RSS 2023) pre-trains multi-task CQL with a one-hot task id (Sec. IV-A), labels
the last n = 3 steps of every demo with reward +1 (Sec. IV-B "Reward specification", App. E), puts a
new task on a fresh slot or re-targets an existing id (Sec. IV-A "Handling task identifiers"), mixes
prior and target data in each batch (tau; 0.35 / 0.15 / 0.5 prior / target / online, Sec. V-F and
App. E) and trains with random crop + color jitter (Table X).

The path of the data, top to bottom in this file:
  find_sources() lists the source files of a tree (or an RLDS / LeRobot dataset folder) ->
  _episodes() yields each file's trajectories (read_source() for out.npy; rlds.py, lerobot.py) ->
  parse_trajectory() checks one -> convert() streams them into a store -> Store opens it
  (checked against its meta.json) -> Sampler, MixedSampler, ReplayBuffer make batches -> augment().
load_store() ties the first half together and caches: a store is rebuilt when its sources change.

Store (a folder, memory-mapped, allow_pickle=False):
  images.npy uint8 (F, H, W, 3) and states.npy float32 (F, 7), one row per frame: a trajectory of T
  steps owns T + 1 consecutive frames, so transition g of trajectory k has its obs at frame g + k
  and its next obs at frame g + k + 1;
  actions.npy float32 (N, 7, raw units) and terminals.npy float32 (N,), one row per transition;
  trajectories.npz: task, split (0 train / 1 val), length, source (file number), index in the file;
  meta.json, written last: options, task names, action bounds, counts, the sources' sizes, mtimes.
torch is imported inside the functions that make tensors: `python data.py convert` never loads it
(~500 MB resident, 2.5 s).
"""

import argparse
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np
from PIL import Image

import lerobot
import rlds
from cli import ExpectedError, run_cli
from fileio import FormatError, pid_alive, write_bridge_file  # data.write_bridge_file is fileio's

FORMAT_VERSION = 1
SOURCE_NAME = "out.npy"  # the Bridge release's file name (SPEC section 5)
# The default store location, under the source root; the tree scan skips dot-folders.
STORE_DIR = ".ptr_store"
SPLITS = ("train", "val")  # split codes 0 and 1
VAL_FRACTION = 0.1  # held out for a task that ships only one of train/ and val/
# Rescaled data actions are clipped to +-ACTION_CLIP, inside the open interval of the tanh policy;
# online.py clips the policy's executed actions there too, so an executed action is a storable one.
ACTION_CLIP = 0.99
STORE_ARRAYS = ("images", "states", "actions", "terminals")
TRAJECTORY_FIELDS = ("task", "split", "length", "source", "index")  # trajectories.npz
META_FIELDS = (
    "format_version",
    "key",
    "options",
    "root",
    "task_names",
    "action_low",
    "action_high",
    "num_transitions",
    "skipped",
    "sources",
)
# A fixed .npy header size, so that the final frame count can be written over it in place.
_HEADER_BYTES = 128
_GRAY = (0.2989, 0.587, 0.114)  # luma weights of torchvision's rgb_to_grayscale
_RGB2YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


class BridgeFormatError(ExpectedError, FormatError):
    """A source file that does not follow the Bridge numpy format (SPEC section 5): names the file,
    the trajectory (its index in the file), the field, what was expected and what was found."""

    unit = "trajectory"  # FormatError's message: "<file>: trajectory <i>: field ..."


class StoreError(ExpectedError, ValueError):
    """A converted store whose files disagree with its meta.json (truncated, deleted or replaced
    files): names the damaged file and the command that rebuilds the store."""

    def __init__(self, store, file, problem, rebuild):
        self.file = file
        self.problem = problem
        super().__init__(f"{os.path.join(store, file)}: {problem}; rebuild the store: {rebuild}")


@dataclass(frozen=True)
class RewardConfig:
    """Sparse relabelling (Sec. IV-B): the last n_last steps get r = 1, the others 0. The batch's
    reward is scale * r + shift (+10 / -1); done = r (every rewarded step is terminal), or the
    file's terminals."""

    n_last: int = 3
    scale: float = 11.0
    shift: float = -1.0
    use_terminals: bool = False


def describe(x):
    """What a value is, for an error message: 'float64 array of shape (3, 7)' or its type's name."""
    if isinstance(x, np.ndarray):
        return f"{x.dtype} array of shape {x.shape}"
    return type(x).__name__


def image_hw(image_size):
    """An image size as (height, width): an int is a square size; None stays None (keep it)."""
    if image_size is None:
        return None
    if np.ndim(image_size):
        return tuple(image_size)
    return (image_size, image_size)


def resize_image(image, size):
    """One uint8 (H, W, 3) image to `size` (an int for a square, or (H, W)), PIL's LANCZOS filter;
    returned as it is when it has that size already. The store's frames and online.py's camera
    images both go through here: a policy sees images resized as its training data were."""
    image = np.asarray(image, dtype=np.uint8)
    size = image_hw(size)
    if size is None or image.shape[:2] == size:
        return image
    return np.array(Image.fromarray(image).resize(size[::-1], Image.Resampling.LANCZOS))


def resize_images(frames, size):
    """uint8 frames (N, H, W, 3) to `size` (see resize_image); as they are if size is theirs."""
    size = image_hw(size)
    if size is None or frames.shape[1:3] == size:
        return frames
    return np.stack([resize_image(frame, size) for frame in frames])


# -------------------- the Bridge numpy format (SPEC section 5)
def synthetic_trajectory(T, image_size, rng, cameras=("images0",)):
    """A Bridge-format trajectory of random images, states and actions in the release's ranges
    (tests, bench). It has several cameras per step, so it builds its dict itself (fileio's
    bridge_trajectory takes one); next_observations share their dicts with observations (the
    release stores two copies)."""
    height, width = image_hw(image_size)
    observations = []
    for _ in range(T + 1):
        step = {c: rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for c in cameras}
        step["state"] = rng.uniform(-0.3, 0.3, 7).astype(np.float32)
        observations.append(step)
    translation = rng.uniform(-0.05, 0.05, (T, 3))
    rotation = rng.uniform(-0.25, 0.25, (T, 3))
    gripper = rng.integers(0, 2, (T, 1))
    return {
        "observations": observations[:-1],
        "next_observations": observations[1:],
        "actions": np.concatenate([translation, rotation, gripper], axis=1),
        "terminals": np.zeros(T),
    }


def read_bridge_file(path):
    """Unpickle one out.npy -> list of trajectory dicts. The only place that unpickles."""
    if os.path.isdir(path):
        raise BridgeFormatError(
            path, None, "<file>", "a file: an np.save'd list of trajectory dicts", "a directory"
        )
    try:
        data = np.load(path, allow_pickle=True)
    # a truncated pickle raises EOFError, UnpicklingError, ValueError, ... by where it ends
    except Exception as e:
        raise BridgeFormatError(
            path,
            None,
            "<file>",
            "a complete np.save'd list of trajectory dicts",
            f"unreadable ({type(e).__name__}: {e})",
        ) from None
    if isinstance(data, np.ndarray) and data.dtype == object and data.ndim == 0:
        data = data.item()
    elif isinstance(data, np.ndarray) and data.dtype == object and data.ndim == 1:
        data = list(data)
    if not isinstance(data, list):
        raise BridgeFormatError(path, None, "<file>", "a list of trajectory dicts", describe(data))
    return data


def read_source(path):
    """The trajectories of one out.npy as Bridge trajectory dicts (SPEC section 5), in order.

    The numpy format's side of the seam where source formats plug in: find_sources() lists the
    files, _episodes() turns one into trajectories (through read_source() for an out.npy, rlds.py or
    lerobot.py for an RLDS shard or a LeRobot table), and convert() checks each one with
    parse_trajectory() and streams it into the store. A reader yields the dicts (a list or a
    generator) and raises a FormatError for a file it cannot read (convert reports it, or skips the
    rest of that file under skip_bad)."""
    return read_bridge_file(path)


def _episodes(path, task, root, options):
    """(index in file, task, load) for each trajectory of one source; load() gives its Bridge
    trajectory dict. An out.npy (task from its folder) comes from read_source(); an RLDS shard or a
    LeRobot frame table streams episode by episode from rlds.py / lerobot.py, each with its own
    task, kept when its source (the episode's out.npy path in RLDS, its task in LeRobot) passes
    include / exclude. Both readers put the chosen camera in images0."""
    if task is not None:
        for index, traj in enumerate(read_source(path)):
            yield index, task, lambda traj=traj: traj
        return
    if rlds.is_rlds(root):
        features, cameras = rlds.read_schema(root)
        task_source = options.get("task_source", "path")
        episodes = rlds.read_shard(path, features, cameras, options["camera"], task_source)
    else:
        episodes = lerobot.read_data_file(lerobot.Dataset(root), path, options["camera"])
    include, exclude = options["include"], options["exclude"]
    for index, name, source, load in episodes:
        if source is not None:
            if include and not any(k in source for k in include):
                continue
            if any(k in source for k in exclude):
                continue
        yield index, name, load


def _first_non_finite(a, steps):
    """Where the first NaN / inf of a (T, D), (T,) or (D,) array is, for an error message."""
    position = tuple(np.argwhere(~np.isfinite(a))[0])
    value = a[position]
    if not steps:
        return f"{value} in dimension {position[0]}"
    if len(position) == 1:
        return f"{value} at step {position[0]}"
    return f"{value} at step {position[0]}, dimension {position[1]}"


def _numbers(x, fail, field, expected, shape_ok, steps=False):
    """x as an array of finite numbers whose shape passes shape_ok, or fail(...)'s
    BridgeFormatError. steps: axis 0 of x counts steps (actions, terminals), for the message about a
    non-finite entry."""
    try:
        a = np.asarray(x)
    except (ValueError, TypeError):  # numpy >= 1.24 refuses ragged nested lists
        raise fail(
            field, expected, f"a ragged {type(x).__name__} (rows of unequal length)"
        ) from None
    if a.dtype.kind not in "fiub" or not shape_ok(a.shape):
        got = "nothing (key missing)" if x is None else describe(a)
        raise fail(field, expected, got)
    if a.dtype.kind == "f":  # checked as the store keeps them: float32
        with np.errstate(over="ignore"):  # a float64 beyond float32's range: inf, reported below
            stored = a.astype(np.float32)
        if not np.isfinite(stored).all():
            raise fail(field, "finite numbers", _first_non_finite(stored, steps))
    return a


def parse_trajectory(traj, path, index, camera="images0"):
    """Check one trajectory dict -> ({camera: uint8 frames (T+1, H, W, 3)}, states (T+1, 7), actions
    (T, 7), terminals (T,)), all finite. Frame t < T is observations[t]; frame T is
    next_observations[T-1] (the final next obs). camera="all": every images<k> key, each one a
    trajectory of its own in the store."""

    def fail(field, expected, got=None):
        return BridgeFormatError(path, index, field, expected, got)

    if not isinstance(traj, dict):
        raise fail("<trajectory>", "a dict", describe(traj))
    for key in ("observations", "next_observations", "actions"):
        if key not in traj:
            raise fail(key, "a key of the trajectory dict", f"keys {sorted(map(str, traj))}")
    actions = _numbers(
        traj["actions"],
        fail,
        "actions",
        "a (T, 7) float array, T >= 1",
        lambda s: len(s) == 2 and s[1] == 7 and s[0] >= 1,
        steps=True,
    )
    T = len(actions)
    for key in ("observations", "next_observations"):
        entries = traj[key]
        if not isinstance(entries, (list, tuple, np.ndarray)) or len(entries) != T:
            got = f"{len(entries)} entries" if hasattr(entries, "__len__") else describe(entries)
            raise fail(key, f"a list of {T} observation dicts (one per action)", got)
    observations = list(traj["observations"]) + [traj["next_observations"][-1]]
    names = [f"observations[{t}]" for t in range(T)] + [f"next_observations[{T - 1}]"]
    cameras = [camera]
    if camera == "all" and isinstance(observations[0], dict):
        cameras = sorted(k for k in observations[0] if re.fullmatch(r"images\d+", k))
    if not cameras:
        raise fail(f"{names[0]}.images*", "at least one camera image (images0, images1, ...)")
    for t, (obs, name) in enumerate(zip(observations, names)):
        if not isinstance(obs, dict):
            raise fail(name, "an observation dict", describe(obs))
        for cam in cameras:
            image = obs.get(cam)
            shape = observations[0][cam].shape if t else "(H, W, 3)"
            is_image = (
                isinstance(image, np.ndarray)
                and image.dtype == np.uint8
                and image.ndim == 3
                and image.shape[2] == 3
            )
            if not is_image or (t and image.shape != shape):
                got = "nothing (camera missing)" if image is None else describe(image)
                raise fail(f"{name}.{cam}", f"a uint8 image of shape {shape}", got)
        _numbers(
            obs.get("state"),
            fail,
            f"{name}.state",
            "7 floats (xyz, euler, gripper)",
            lambda s: s == (7,),
        )
    terminals = _numbers(
        traj.get("terminals", np.zeros(T)),
        fail,
        "terminals",
        f"{T} numbers",
        lambda s: s == (T,),
        steps=True,
    )
    images = {c: np.stack([obs[c] for obs in observations]) for c in cameras}
    states = np.array([obs["state"] for obs in observations], np.float32)
    return images, states, actions.astype(np.float32), terminals.astype(np.float32)


def find_sources(src, include=(), exclude=()):
    """Every out.npy under src (a tree root, one task folder or one out.npy) -> (root, [(path, task,
    split)]). The task is the folder that holds train/ and val/; split is "train", "val" or None.
    include / exclude are keyword substrings of the path relative to root (the paper pre-trains on
    all but toykitchen6). A folder named out.npy is listed too, so that reading it reports it
    instead of skipping it silently. An RLDS / TFDS dataset folder lists its shards, a
    LeRobot folder its frame tables, with task None: their tasks and include / exclude go
    by episode (_episodes)."""
    src = os.path.abspath(src)
    if not os.path.exists(src):
        raise FileNotFoundError(f"{src}: no such file or folder")
    if rlds.is_rlds(src):
        return src, [(path, None, split) for path, split in rlds.find_shards(src)]
    if lerobot.is_lerobot(src):
        return src, [(path, None, None) for path in lerobot.Dataset(src).data_files()]
    if os.path.isfile(src):
        root = os.path.dirname(src)
        paths = [src]
    else:
        root = src
        paths = []
        for folder, subfolders, files in os.walk(src):
            subfolders[:] = sorted(x for x in subfolders if not x.startswith("."))
            if SOURCE_NAME in files or SOURCE_NAME in subfolders:
                paths.append(os.path.join(folder, SOURCE_NAME))
    found = []
    for path in sorted(paths):
        relative = os.path.relpath(path, root)
        if include and not any(k in relative for k in include):
            continue
        if any(k in relative for k in exclude):
            continue
        folder = os.path.dirname(path)
        split = os.path.basename(folder) if os.path.basename(folder) in SPLITS else None
        task_folder = os.path.dirname(folder) if split else folder
        found.append((path, os.path.basename(task_folder), split))
    return root, found


# -------------------- conversion: streaming, atomic, cached
def _npy_header(dtype, shape):
    """A .npy header padded to _HEADER_BYTES: images.npy streams to disk behind a placeholder of
    that size and gets this header with the final frame count at the end (two passes would unpickle
    every file twice)."""
    header = {
        "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
        "fortran_order": False,
        "shape": tuple(shape),
    }
    text = repr(header).encode("latin1")
    magic = b"\x93NUMPY\x01\x00" + struct.pack("<H", _HEADER_BYTES - 10)
    return magic + text.ljust(_HEADER_BYTES - 11) + b"\n"


def _assign_splits(task, source, index, sources, task_names):
    """0 train / 1 val per trajectory. A task with trajectories in both train/ and val/ keeps the
    release's split (an empty out.npy counts as none); any other holds out VAL_FRACTION of its
    demos, chosen with a seed fixed by the task name. Demos are grouped by (file, index): the
    cameras of one demo (camera="all") land on one side."""
    split = np.array([sources[s][2] == "val" for s in source], np.int8)
    for k in np.unique(task):
        in_task = task == k
        if {sources[s][2] for s in np.unique(source[in_task])} >= set(SPLITS):
            continue
        demo = source[in_task] * (index.max() + 1) + index[in_task]
        demos = np.unique(demo)
        n_val = 0
        if len(demos) > 1:
            n_val = max(1, int(VAL_FRACTION * len(demos) + 0.5))
        rng = np.random.default_rng(zlib.crc32(task_names[k].encode()))
        held_out = demos[rng.permutation(len(demos))[:n_val]]
        split[in_task] = np.isin(demo, held_out)
    return split


def _action_bounds(actions):
    """Per-dimension (low, high) of the data's raw actions; a constant dimension gets its value +-
    1, so that it rescales to 0."""
    low = actions.min(0)
    high = actions.max(0)
    flat = high - low < 1e-6
    middle = (low + high) / 2
    return np.where(flat, middle - 1, low), np.where(flat, middle + 1, high)


def source_stamps(sources):
    """What the cache compares: every source file with its size and mtime (ns). A file edited in
    place with both restored looks unchanged (README, "The Bridge data")."""
    return [[path, os.stat(path).st_size, os.stat(path).st_mtime_ns] for path, _, _ in sources]


def options_key(options):
    """The store's name under STORE_DIR: a hash of the conversion options."""
    return hashlib.sha1(json.dumps(options, sort_keys=True).encode()).hexdigest()[:12]


def read_meta(store):
    """A store's meta.json as a dict, or None when missing or unreadable (Store says which)."""
    try:
        with open(os.path.join(store, "meta.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def is_store(path):
    """A folder that holds a converted store, whole or damaged: any of its arrays, or a meta.json of
    ours (a source tree may hold a meta.json of its own)."""
    if not os.path.isdir(path):
        return False
    files = ["trajectories.npz"] + [f"{name}.npy" for name in STORE_ARRAYS]
    if any(os.path.exists(os.path.join(path, f)) for f in files):
        return True
    meta = read_meta(path)
    return meta is not None and "format_version" in meta


def is_current(meta, sources, key=None):
    """meta (a store's meta.json or None) was built from these exact files, and with these options
    (the key) when key is given."""
    if meta is None or meta.get("sources") != source_stamps(sources):
        return False
    return key is None or meta.get("key") == key


def _is_intact(store):
    """Store(store) opens: its files agree with its meta.json."""
    try:
        Store(store)
    except (StoreError, FileNotFoundError):
        return False
    return True


def _make_tmp_store(store):
    """Make <store>.tmp-<pid>, first deleting the .tmp-<pid> / .old-<pid> folders of conversions
    that died (kill -9): a live pid's folder belongs to a conversion in progress; our own pid's, to
    a dead namesake. (fileio.sweep_stale_tmp does this for files; these are folders.)"""
    parent, name = os.path.split(store)
    os.makedirs(parent, exist_ok=True)
    for entry in os.listdir(parent):
        leftover = re.fullmatch(re.escape(name) + r"\.(?:tmp|old)-(\d+)", entry)
        if not leftover:
            continue
        pid = int(leftover.group(1))
        if pid == os.getpid() or not pid_alive(pid):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
    tmp = f"{store}.tmp-{os.getpid()}"
    os.makedirs(tmp)
    return tmp


def _check_replaceable(store):
    """A conversion replaces `store`: refuse when it is a file or a folder of other things (--out
    bridge/ typed by mistake must not delete the tree)."""
    if not os.path.lexists(store) or is_store(store):
        return
    if os.path.isdir(store) and not os.listdir(store):
        return
    raise FileExistsError(
        f"{store}: exists and is not a store; refusing to replace it "
        "(choose another --out / --store)"
    )


def _install(tmp, store, sources, key):
    """Rename the finished tmp folder to `store` (the store appears whole or not at all). A folder
    cannot be renamed onto a non-empty one (ENOTEMPTY): an intact store that another process built
    from the same files with the same options meanwhile is kept (the caller deletes tmp); any other
    store moves aside to <store>.old-<pid> and is deleted once the new one is in place."""
    try:
        os.replace(tmp, store)
        return
    except OSError:
        if is_current(read_meta(store), sources, key) and _is_intact(store):
            return
    old = f"{store}.old-{os.getpid()}"
    os.replace(store, old)
    os.replace(tmp, store)
    shutil.rmtree(old, ignore_errors=True)


def _checked_frames(traj, path, index, options, size):
    """parse_trajectory(), then every camera's frames resized to `size` (None: the first
    trajectory's size, which every later one must have). BridgeFormatError for a bad trajectory."""
    images, states, actions, terminals = parse_trajectory(traj, path, index, options["camera"])
    images = {c: resize_images(frames, size) for c, frames in images.items()}
    size = size or next(iter(images.values())).shape[1:3]
    for c, frames in images.items():
        if frames.shape[1:3] != size:
            raise BridgeFormatError(
                path,
                index,
                c,
                f"{size[0]}x{size[1]} images like the first trajectory's (or pass image_size)",
                describe(frames[0]),
            )
    return images, states, actions, terminals


def _write_trajectories(images_file, sources, root, options, skip):
    """Stream every valid trajectory's frames into images_file (after its header placeholder).
    Returns (rows: (task name, source file, index in file, length) per trajectory, {name: per-step
    arrays}, image (H, W)). States, actions and terminals (~0.1 % of the bytes) are gathered in
    memory. skip(error) notes a bad trajectory or file, or raises the error."""
    size = image_hw(options["image_size"])
    aliases = options["aliases"]
    rows = []
    arrays = {"states": [], "actions": [], "terminals": []}
    for source, (path, task, _) in enumerate(sources):
        # RLDS and LeRobot sources (task None) come with the chosen camera in images0
        checks = options if task is not None else dict(options, camera="images0")
        # one file's trajectories in memory at a time: read_source's list is freed after its loop
        try:
            for index, traj_task, load in _episodes(path, task, root, options):
                try:
                    images, states, actions, terminals = _checked_frames(
                        load(), path, index, checks, size
                    )
                except FormatError as e:
                    skip(e)
                    continue
                size = next(iter(images.values())).shape[1:3]  # the first one fixes it
                for frames in images.values():  # camera="all": each camera a trajectory of its own
                    images_file.write(np.ascontiguousarray(frames).data)
                    arrays["states"].append(states)
                    arrays["actions"].append(actions)
                    arrays["terminals"].append(terminals)
                    rows.append((aliases.get(traj_task, traj_task), source, index, len(actions)))
        # the file itself is bad, or a reader failed part-way (or skip() passed an error on)
        except FormatError as e:
            skip(e)
    return rows, arrays, size


def convert(sources, root, store, key, options, log=print):
    """Write the store for `sources` (from find_sources) into <store>.tmp-<pid>, then rename it to
    `store`. Nothing half-written survives an error or Ctrl-C: the tmp folder is deleted (one left
    by a kill -9 is swept by the next conversion). options: load_store's."""
    store = os.path.abspath(store)
    _check_replaceable(store)
    stamps = source_stamps(sources)  # taken before reading: a file changed meanwhile converts again
    skipped = []
    start = time.time()

    # skip_bad: note the bad trajectory (or file) and go on; otherwise the error ends it all
    def skip(error):
        if not options["skip_bad"]:
            raise error
        skipped.append(str(error))

    tmp = _make_tmp_store(store)
    try:
        with open(os.path.join(tmp, "images.npy"), "wb") as images_file:
            images_file.write(bytes(_HEADER_BYTES))  # the placeholder for _npy_header
            rows, arrays, size = _write_trajectories(images_file, sources, root, options, skip)
            if not rows:
                raise BridgeFormatError(
                    root,
                    None,
                    "<trajectories>",
                    "at least one valid trajectory",
                    f"none in {len(sources)} files; skipped:\n" + "\n".join(skipped),
                )
            arrays = {name: np.concatenate(parts) for name, parts in arrays.items()}
            images_file.seek(0)
            images_file.write(_npy_header(np.uint8, (len(arrays["states"]), *size, 3)))
        for name, a in arrays.items():
            np.save(os.path.join(tmp, f"{name}.npy"), a)
        task_names = sorted({row[0] for row in rows})  # RLDS / LeRobot: known once all are read
        rows = [(task_names.index(name), *rest) for name, *rest in rows]
        task, source, index, length = np.array(rows, np.int64).T
        np.savez(
            os.path.join(tmp, "trajectories.npz"),
            task=task,
            source=source,
            index=index,
            length=length,
            split=_assign_splits(task, source, index, sources, task_names),
        )
        low, high = _action_bounds(arrays["actions"])
        meta = {
            "format_version": FORMAT_VERSION,
            "key": key,
            "options": options,
            "root": root,
            "task_names": task_names,
            "action_low": low.tolist(),
            "action_high": high.tolist(),
            "num_transitions": int(length.sum()),
            "skipped": len(skipped),
            "sources": stamps,
        }
        # inside tmp, which is renamed as a whole: no atomic write of its own needed
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        _install(tmp, store, sources, key)
    finally:  # Ctrl-C included; once renamed, there is no tmp left to delete
        shutil.rmtree(tmp, ignore_errors=True)
    megabytes = sum(stamp[1] for stamp in stamps) / 1e6
    seconds = time.time() - start
    log(
        f"converted {len(rows)} trajectories ({meta['num_transitions']} transitions) from "
        f"{len(sources)} files, {megabytes:.0f} MB in {seconds:.1f} s "
        f"({megabytes / max(seconds, 1e-9):.1f} MB/s); "
        f"skipped {len(skipped)} bad trajectories/files" + "".join("\n  " + e for e in skipped)
    )


def convert_command(src, store, options):
    """The `python data.py convert` line that (re)builds `store` from `src` with these options."""
    words = ["python", "data.py", "convert", str(src), "--out", str(store)]
    size = image_hw(options.get("image_size"))
    if size is not None and size[0] == size[1]:
        words += ["--image_size", str(size[0])]
    if options.get("camera", "images0") != "images0":
        words += ["--camera", options["camera"]]
    if options.get("include"):
        words += ["--include", *options["include"]]
    if options.get("exclude"):
        words += ["--exclude", *options["exclude"]]
    if options.get("skip_bad"):
        words.append("--skip_bad")
    if "task_source" in options:
        words += ["--task_source", options["task_source"]]
    command = shlex.join(words)
    if options.get("aliases"):
        command += " --aliases <your aliases file>"
    return command


def _read_aliases(aliases):
    if isinstance(aliases, (str, os.PathLike)):
        with open(aliases) as f:
            aliases = json.load(f)
    aliases = aliases or {}
    if not isinstance(aliases, dict) or not all(isinstance(v, str) for v in aliases.values()):
        raise ValueError(
            f"aliases: expected a dict (or JSON file) task name -> task name, got {aliases!r:.200}"
        )
    return aliases


def _default_store(root, sources, options):
    """<root>/.ptr_store/<key> and its key. A store of the sources' native size serves a request for
    that very size (finetune.py asks for the checkpoint's): no second copy."""
    native_key = options_key(dict(options, image_size=None))
    native = os.path.join(root, STORE_DIR, native_key)
    if options["image_size"] is not None and is_current(read_meta(native), sources):
        try:
            if Store(native).image_size == tuple(options["image_size"]):
                return native, native_key
        except StoreError:
            pass  # a damaged native store is rebuilt when it is asked for; this size gets its own
    key = options_key(options)
    return os.path.join(root, STORE_DIR, key), key


def load_store(
    src,
    store=None,
    image_size=None,
    camera="images0",
    include=(),
    exclude=(),
    aliases=None,
    skip_bad=False,
    repair=False,
    task_source="path",
    log=print,
):
    """Open the store for `src` (a Bridge tree root, one task folder, one out.npy, an RLDS / TFDS or
    LeRobot dataset folder, or a built store folder), converting first unless a store was built with
    these options from these exact files (size, mtime_ns). store=None: <src root>/.ptr_store/<key>.
    camera: "images0", "images1", ... or "all" (each camera a trajectory of its own; numpy only);
    RLDS / LeRobot: imagesN is their N-th camera, or a camera's name ("image_1").
    task_source (RLDS): "path" (the task folder of the episode's source out.npy) or "instruction".
    aliases: a dict or a JSON file mapping task name -> task name (e.g. open_* variants onto one).

    A damaged store (files that disagree with its meta.json) in the default place is rebuilt from
    its sources with a one-line notice. A damaged `store` given by the caller is a StoreError naming
    the file and the command that rebuilds it, unless repair=True (python data.py convert)."""
    if is_store(src):  # a built store: opened as it is, the options are not checked
        return Store(src)
    aliases = _read_aliases(aliases)
    options = {
        "format_version": FORMAT_VERSION,
        "camera": camera,
        "image_size": image_hw(image_size),
        "include": list(include),
        "exclude": list(exclude),
        "aliases": dict(sorted(aliases.items())),
        "skip_bad": skip_bad,
    }
    if task_source != "path":  # only then: the keys of the stores built before stay the same
        options["task_source"] = task_source
    # tuples -> lists, so that it equals the copy in meta.json
    options = json.loads(json.dumps(options))
    root, sources = find_sources(src, include, exclude)
    if not sources:
        raise BridgeFormatError(
            src,
            None,
            SOURCE_NAME,
            f"at least one {SOURCE_NAME} below it (or an RLDS / LeRobot dataset folder)",
            f"none (include={list(include)}, exclude={list(exclude)})",
        )
    chosen = store is not None
    if chosen:
        store = os.path.abspath(store)
        key = options_key(options)
    else:
        store, key = _default_store(root, sources, options)
    rebuild = convert_command(src, store, options)
    meta = read_meta(store)
    if is_current(meta, sources, key) or (meta is None and is_store(store)):
        try:
            opened = Store(store, rebuild=rebuild)
            log(f"using store {store}")
            return opened
        except StoreError as e:
            if chosen and not repair:
                raise
            log(f"store {store} is damaged ({e.file}: {e.problem}); rebuilding it from {root}")
    else:
        log(f"converting {len(sources)} files under {root} into {store}")
    convert(sources, root, store, key, options, log)
    return Store(store, rebuild=rebuild)


def _meta_problem(meta):
    """What is wrong with a parsed meta.json, or None."""
    if not isinstance(meta, dict):
        return f"expected a JSON object, got {type(meta).__name__}"
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        return f"field 'format_version': expected {FORMAT_VERSION}, got {version!r}"
    missing = [field for field in META_FIELDS if field not in meta]
    if missing:
        return f"fields {missing} missing"
    names = meta["task_names"]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        return f"field 'task_names': expected a non-empty list of names, got {names!r:.80}"
    for field in ("action_low", "action_high"):
        bound = meta[field]
        numbers = isinstance(bound, list) and all(isinstance(x, (int, float)) for x in bound)
        if not numbers or len(bound) != 7 or not all(math.isfinite(x) for x in bound):
            return f"field '{field}': expected 7 finite numbers, got {bound!r:.80}"
    count = meta["num_transitions"]
    if not isinstance(count, int) or count < 1:
        return f"field 'num_transitions': expected a positive count, got {count!r:.80}"
    if not isinstance(meta["options"], dict):
        return f"field 'options': expected a JSON object, got {meta['options']!r:.80}"
    return None


class Store:
    """A converted store: memory-mapped arrays (never unpickled) and small per-trajectory index
    arrays. Opening it checks every file against meta.json (fields, counts, shapes, dtypes; not the
    values), so a truncated, deleted or replaced file is an error naming it (StoreError) instead of
    a wrong batch later. rebuild: the command that error gives; by default the one meta.json
    implies."""

    def __init__(self, path, rebuild=None):
        self.path = os.path.abspath(path)
        self.rebuild = rebuild
        self.meta = None  # until it is read: _damaged() then gives the generic rebuild command
        self.meta = self._read_meta()
        index = self._read_index()
        self.traj_task = index["task"]
        self.traj_split = index["split"]
        self.traj_length = index["length"]
        self.traj_start = np.cumsum(self.traj_length) - self.traj_length  # first transition of each
        transitions = self.meta["num_transitions"]
        frames = transitions + len(self.traj_length)  # T + 1 frames per trajectory
        self.images = self._open_array("images", (frames, None, None, 3), np.uint8)
        self.states = self._open_array("states", (frames, 7), np.float32)
        self.actions = self._open_array("actions", (transitions, 7), np.float32)
        self.terminals = self._open_array("terminals", (transitions,), np.float32)
        self.image_size = tuple(self.images.shape[1:3])
        wanted = image_hw(self.meta["options"].get("image_size"))
        if wanted is not None and self.image_size != wanted:
            size = f"{self.image_size[0]}x{self.image_size[1]}"
            raise self._damaged("images.npy", f"{size} images, but meta.json asks for {wanted}")
        self.task_names = list(self.meta["task_names"])
        self.action_low = np.array(self.meta["action_low"], np.float32)
        self.action_high = np.array(self.meta["action_high"], np.float32)

    def _damaged(self, file, problem):
        rebuild = self.rebuild
        if rebuild is None and self.meta is not None:
            rebuild = convert_command(self.meta["root"], self.path, self.meta["options"])
        if rebuild is None:
            rebuild = f"python data.py convert <its source> --out {shlex.quote(self.path)}"
        return StoreError(self.path, file, problem, rebuild)

    def _read_meta(self):
        path = os.path.join(self.path, "meta.json")
        if not os.path.isfile(path):
            if is_store(self.path):
                raise self._damaged("meta.json", "missing")
            raise FileNotFoundError(
                f"{self.path}: not a store (no meta.json: never converted, or interrupted)"
            )
        try:
            with open(path) as f:
                meta = json.load(f)
        except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError too
            raise self._damaged("meta.json", f"unreadable ({type(e).__name__}: {e})") from None
        problem = _meta_problem(meta)
        if problem:
            raise self._damaged("meta.json", problem)
        return meta

    def _read_index(self):
        file = "trajectories.npz"
        try:
            with np.load(os.path.join(self.path, file)) as z:
                index = {field: z[field] for field in TRAJECTORY_FIELDS}
        except FileNotFoundError:
            raise self._damaged(file, "missing") from None
        except KeyError as e:
            raise self._damaged(file, f"array {e} missing") from None
        except Exception as e:  # a damaged zip (BadZipFile, EOFError, ...) or a pickled array
            raise self._damaged(file, f"unreadable ({type(e).__name__}: {e})") from None
        count = len(index["length"])
        for field, a in index.items():
            if a.dtype.kind not in "iu" or a.shape != (count,):
                raise self._damaged(
                    file, f"'{field}': expected {count} integers like 'length', got {describe(a)}"
                )
        transitions = self.meta["num_transitions"]
        if count == 0 or index["length"].min() < 1 or index["length"].sum() != transitions:
            raise self._damaged(
                file,
                f"'length': expected {count} positive lengths summing to meta.json's "
                f"{transitions} transitions, got sum {index['length'].sum()}",
            )
        tasks = len(self.meta["task_names"])
        if index["task"].min() < 0 or index["task"].max() >= tasks:
            raise self._damaged(file, f"'task': expected ids in 0..{tasks - 1} (meta.json's tasks)")
        if not np.isin(index["split"], (0, 1)).all():
            raise self._damaged(file, "'split': expected 0 (train) or 1 (val)")
        return index

    def _open_array(self, name, shape, dtype):
        """Memory-map <name>.npy and check it has `shape` (None: any size) and dtype."""
        file = f"{name}.npy"
        try:
            a = np.load(os.path.join(self.path, file), mmap_mode="r")
        except FileNotFoundError:
            raise self._damaged(file, "missing") from None
        except Exception as e:  # truncated: ValueError (mmap length > file size), EOFError, ...
            raise self._damaged(
                file, f"truncated or unreadable ({type(e).__name__}: {e})"
            ) from None
        fits = len(a.shape) == len(shape) and all(
            want is None or got == want for got, want in zip(a.shape, shape)
        )
        if a.dtype != dtype or not fits:
            expected = "(" + ", ".join("*" if n is None else str(n) for n in shape) + ")"
            raise self._damaged(
                file,
                f"expected a {np.dtype(dtype)} array of shape {expected} (meta.json: "
                f"{self.meta['num_transitions']} transitions in {len(self.traj_length)} "
                f"trajectories), got {describe(a)}",
            )
        return a

    def _in_split(self, split):
        if split not in (None, *SPLITS):
            raise ValueError(f"split: expected one of {SPLITS} or None, got {split!r}")
        if split is None:
            return np.ones(len(self.traj_length), bool)
        return self.traj_split == SPLITS.index(split)

    def num_transitions(self, split=None):
        return int(self.traj_length[self._in_split(split)].sum())

    def trajectory_ids(self, split=None):
        return np.flatnonzero(self._in_split(split))

    def state_statistics(self, split="train"):
        """Per-dimension mean and std (float32 (7,) each) of the proprioceptive states of a split's
        trajectories, over all T + 1 frames of each: what a policy normalizes
        its state input with."""
        ids = self.trajectory_ids(split)
        if len(ids) == 0:
            raise ValueError(f"{self.path}: no {split} trajectories to take state statistics of")
        # trajectory i's T + 1 frames start after the i extra (final) frames of those before it
        first = self.traj_start[ids] + ids
        frames = np.concatenate(
            [np.arange(f, f + n + 1) for f, n in zip(first, self.traj_length[ids])]
        )
        states = np.asarray(self.states[frames], np.float64)
        return states.mean(0).astype(np.float32), states.std(0).astype(np.float32)


# -------------------- task ids, actions, returns, batches
def target_task_ids(prior_tasks, target_tasks, target="new"):
    """One-hot slots for the target store's tasks (Sec. IV-A): target="new" puts target task i on
    the fresh slot len(prior_tasks) + i, never trained during pre-training; a prior task name
    re-targets that task's id. Returns (global index per target-store task, num_tasks)."""
    if target == "new":
        ids = np.arange(len(target_tasks), dtype=np.int64) + len(prior_tasks)
        return ids, len(prior_tasks) + len(target_tasks)
    if target not in prior_tasks:
        raise ValueError(
            f"target: expected 'new' or one of the prior tasks {list(prior_tasks)}, got {target!r}"
        )
    return np.full(len(target_tasks), list(prior_tasks).index(target), np.int64), len(prior_tasks)


def _as_bounds(a, low, high):
    """low, high as arrays of a's kind (numpy, or torch on a's device and dtype)."""
    if isinstance(a, np.ndarray):
        return a.astype(np.float32), np.asarray(low, np.float32), np.asarray(high, np.float32)
    import torch

    low = torch.as_tensor(low, dtype=a.dtype, device=a.device)
    high = torch.as_tensor(high, dtype=a.dtype, device=a.device)
    return a, low, high


def rescale_actions(a, low, high):
    """Raw actions -> [-1, 1] by per-dimension bounds, clipped to +-ACTION_CLIP (numpy or torch in,
    same out)."""
    a, low, high = _as_bounds(a, low, high)
    return (2 * (a - low) / (high - low) - 1).clip(-ACTION_CLIP, ACTION_CLIP)


def unscale_actions(a, low, high):
    """[-1, 1] -> raw actions: the inverse of rescale_actions inside the clip range."""
    a, low, high = _as_bounds(a, low, high)
    return low + (a + 1) * 0.5 * (high - low)


def mc_returns(success, reward, mask, lengths, gamma):
    """Monte-Carlo return-to-go of back-to-back trajectories, with the backup's masks (the Cal-QL
    bound, SPEC section 3): G_t = reward_t + gamma * mask_t * G_{t+1}, G = reward at a trajectory's
    last step; a trajectory without success (success all 0) gets the constant reward / (1 - gamma).
    success: the binary r; reward: the scaled one (scale * r + shift); mask: 1 - done; all (N,),
    lengths sum to N."""
    lengths = np.asarray(lengths)
    traj = np.repeat(np.arange(len(lengths)), lengths)  # the trajectory of each step
    start = np.cumsum(lengths) - lengths
    step = np.arange(len(reward)) - start[traj]
    G = np.array(reward, np.float64)
    # every trajectory at once, one step at a time, backwards from each one's next-to-last step
    idx = np.flatnonzero(step < lengths[traj] - 1)
    idx = idx[np.argsort(-step[idx], kind="stable")]
    for group in np.split(idx, np.flatnonzero(np.diff(step[idx])) + 1):
        G[group] += gamma * mask[group] * G[group + 1]
    failed = (np.maximum.reduceat(success, start) <= 0)[traj]
    G[failed] = np.asarray(reward)[failed] / (1 - gamma)
    return G.astype(np.float32)


def _make_batch(images, states, frame, next_frame, action, reward, mask, mc_return, task):
    """The batch: obs, next_obs uint8 (B, 3, H, W), a permuted (channels-last) view made without a
    copy; state, next_state (B, 7), action (B, 7) in [-1, 1], reward, mask, mc_return (B,) float32;
    task int64 (B,)."""
    import torch

    B = len(frame)
    both = np.concatenate([frame, next_frame])
    image = torch.from_numpy(np.asarray(images[both])).permute(0, 3, 1, 2)
    state = torch.from_numpy(np.asarray(states[both], np.float32))
    floats = {"action": action, "reward": reward, "mask": mask, "mc_return": mc_return}
    return {
        "obs": image[:B],
        "next_obs": image[B:],
        "state": state[:B],
        "next_state": state[B:],
        **{k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in floats.items()},
        "task": torch.from_numpy(np.asarray(task, np.int64)),
    }


# -------------------- samplers and the replay buffer
class _Seeded:
    """The RNG state as python ints, for an exact resume from a weights_only checkpoint."""

    def state_dict(self):
        return {"rng": self._rng.bit_generator.state}

    def load_state_dict(self, d):
        self._rng.bit_generator.state = d["rng"]


class Sampler(_Seeded):
    """Uniform transitions of one split of a store (split=None: all). Rewards, masks, MC returns and
    global task ids are computed once for every transition here, so a batch is a handful of gathers.
    """

    def __init__(
        self,
        store,
        split="train",
        *,
        gamma,
        reward=RewardConfig(),
        task_ids=None,
        action_low=None,
        action_high=None,
        seed=0,
    ):
        self.store = store
        self.split = split
        self.image_size = store.image_size
        if task_ids is None:
            task_ids = np.arange(len(store.task_names))
        self.task_ids = np.asarray(task_ids, np.int64)
        if self.task_ids.shape != (len(store.task_names),):
            raise ValueError(
                f"task_ids: expected one per store task ({len(store.task_names)}), "
                f"got shape {self.task_ids.shape}"
            )
        if action_low is None:
            action_low = store.action_low
        if action_high is None:
            action_high = store.action_high
        self.action_low = np.asarray(action_low, np.float32)
        self.action_high = np.asarray(action_high, np.float32)
        lengths = store.traj_length
        traj = np.repeat(np.arange(len(lengths)), lengths)  # the trajectory of each transition
        step = np.arange(len(traj)) - store.traj_start[traj]
        success = (step >= lengths[traj] - reward.n_last).astype(np.float32)
        done = np.asarray(store.terminals, np.float32) if reward.use_terminals else success
        self._reward = (reward.scale * success + reward.shift).astype(np.float32)
        self._mask = 1 - done
        self._mc_return = mc_returns(success, self._reward, self._mask, lengths, gamma)
        self._task = self.task_ids[store.traj_task[traj]]
        # transition g of trajectory k: its obs is frame g + k, its next obs frame g + k + 1
        self._frame = np.arange(len(traj)) + traj
        self._idx = np.flatnonzero(store._in_split(split)[traj])
        self._rng = np.random.default_rng(seed)

    def sample(self, batch_size):
        if not len(self._idx):
            raise ValueError(
                f"{self.store.path}: split '{self.split}' has no transitions to sample"
            )
        drawn = self._idx[self._rng.integers(0, len(self._idx), batch_size)]
        # sorted: the memmap gather walks the file forward (the order in a batch carries no meaning)
        return self._batch(np.sort(drawn))

    def trajectory(self, traj_id):
        start = self.store.traj_start[traj_id]
        return self._batch(start + np.arange(self.store.traj_length[traj_id]))

    def _batch(self, g):
        raw = np.asarray(self.store.actions[g])
        return _make_batch(
            self.store.images,
            self.store.states,
            self._frame[g],
            self._frame[g] + 1,
            rescale_actions(raw, self.action_low, self.action_high),
            self._reward[g],
            self._mask[g],
            self._mc_return[g],
            self._task[g],
        )


class MixedSampler:
    """Each batch draws floor(B * f_i) transitions from sampler i and the rest from the last one
    with f_i > 0: tau = 0.9 prior / 0.1 target offline (Sec. IV-A), 0.35 / 0.15 / 0.5 prior / target
    / online (Sec. V-F)."""

    def __init__(self, samplers, fractions):
        if len(samplers) != len(fractions) or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
            raise ValueError(
                f"fractions: expected {len(samplers)} non-negative numbers summing to 1, "
                f"got {fractions}"
            )
        self.samplers = list(samplers)
        self.fractions = list(fractions)

    def counts(self, batch_size):
        n = [math.floor(batch_size * f + 1e-9) for f in self.fractions]  # 1e-9: 0.7 * 10 = 6.999...
        last = np.flatnonzero(self.fractions)[-1]  # never a 0 fraction (an empty buffer)
        n[last] += batch_size - sum(n)
        return n

    def sample(self, batch_size):
        import torch

        counts = self.counts(batch_size)
        parts = [s.sample(n) for s, n in zip(self.samplers, counts) if n > 0]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def state_dict(self):
        return {"samplers": [s.state_dict() for s in self.samplers]}

    def load_state_dict(self, d):
        for sampler, state in zip(self.samplers, d["samplers"]):
            sampler.load_state_dict(state)


class ReplayBuffer(_Seeded):
    """Online data in the batch format of Sampler, first in first out by whole trajectories, in a
    ring of `capacity` frames (a trajectory of T steps takes T + 1). Rewards are the binary r of the
    env or the success classifier, done = r, scale / shift apply; MC returns are computed when a
    trajectory is added. Transition arrays are indexed by the obs frame. state_dict: the RNG, not
    the data."""

    def __init__(self, capacity, image_size, *, gamma, reward=RewardConfig(), seed=0):
        self.capacity = capacity
        self.image_size = image_hw(image_size)
        self.gamma = gamma
        self.reward = reward
        # np.zeros is a calloc: memory is used as it is written
        self.images = np.zeros((capacity, *self.image_size, 3), np.uint8)
        self.states = np.zeros((capacity, 7), np.float32)
        self.actions = np.zeros((capacity, 7), np.float32)
        self.rewards = np.zeros(capacity, np.float32)  # scaled: scale * r + shift
        self.masks = np.zeros(capacity, np.float32)
        self.mc_returns = np.zeros(capacity, np.float32)
        self.tasks = np.zeros(capacity, np.int64)
        self.live = np.zeros(capacity, bool)  # a transition starts at this frame
        self._lengths = deque()  # steps of the trajectories in the ring, oldest first
        self._start = 0  # the oldest trajectory's first frame
        self._used = 0  # frames in use
        self._rng = np.random.default_rng(seed)

    def __len__(self):
        return sum(self._lengths)

    def add_trajectory(self, images, states, actions, rewards, task):
        """images uint8 (T+1, H, W, 3), states (T+1, 7), actions (T, 7) in [-1, 1], rewards (T,) in
        {0, 1}."""
        images = np.asarray(images)
        states = np.asarray(states, np.float32)
        actions = np.asarray(actions, np.float32)
        success = np.asarray(rewards, np.float32)
        T = len(actions)
        fits = (
            images.shape == (T + 1, *self.image_size, 3)
            and images.dtype == np.uint8
            and 1 <= T < self.capacity
            and states.shape == (T + 1, 7)
            and actions.shape == (T, 7)
            and success.shape == (T,)
            and np.isin(success, (0, 1)).all()
        )
        if not fits:
            raise ValueError(
                f"ReplayBuffer.add_trajectory: expected images uint8 (T+1, *{self.image_size}, 3), "
                f"states (T+1, 7), actions (T, 7), rewards (T,) in {{0, 1}}, 1 <= T < "
                f"{self.capacity}; got {describe(images)}, states {states.shape}, "
                f"actions {actions.shape}, {success}"
            )
        while self._used + T + 1 > self.capacity:  # drop the oldest trajectories until it fits
            n = self._lengths.popleft() + 1
            self.live[(self._start + np.arange(n)) % self.capacity] = False
            self._start = (self._start + n) % self.capacity
            self._used -= n
        frames = (self._start + self._used + np.arange(T + 1)) % self.capacity
        steps = frames[:-1]
        reward = (self.reward.scale * success + self.reward.shift).astype(np.float32)
        mask = 1 - success
        self.images[frames] = images
        self.states[frames] = states
        self.actions[steps] = actions
        self.rewards[steps] = reward
        self.masks[steps] = mask
        self.mc_returns[steps] = mc_returns(success, reward, mask, [T], self.gamma)
        self.tasks[steps] = task
        self.live[steps] = True
        self._lengths.append(T)
        self._used += T + 1

    def sample(self, batch_size):
        ring = (
            self._start + np.arange(self._used)
        ) % self.capacity  # oldest first: a refill samples alike
        live = ring[self.live[ring]]
        if not len(live):
            raise ValueError("ReplayBuffer.sample: the buffer is empty")
        f = live[self._rng.integers(0, len(live), batch_size)]
        return _make_batch(
            self.images,
            self.states,
            f,
            (f + 1) % self.capacity,
            self.actions[f],
            self.rewards[f],
            self.masks[f],
            self.mc_returns[f],
            self.tasks[f],
        )


class Prefetcher:
    """Batches of a sampler drawn by a background thread while the device trains on earlier ones
    (an input pipeline that does not starve a GPU): `depth` batches ahead, each in pinned memory
    when CUDA is available, so that train.prepare_batch's non_blocking copy overlaps with compute;
    augmentation stays on the device. A drop-in for the sampler of a training loop (sample,
    state_dict, load_state_dict) at one batch size. Exact resume: each batch is drawn together with
    the sampler's state right after it, and state_dict() is the state after the last batch handed
    out, not after those still waiting, so a checkpoint continues where the consumed batches end,
    with or without a Prefetcher (the format is the sampler's own). For samplers whose data is fixed
    while it runs (Sampler, MixedSampler); not for a ReplayBuffer that grows between updates (a
    batch drawn ahead would miss the newest trajectories)."""

    def __init__(self, sampler, batch_size, depth=2, pin_memory=None):
        import torch

        if depth < 1:
            raise ValueError(f"Prefetcher: depth={depth}, expected >= 1")
        self.sampler = sampler
        self.batch_size = batch_size
        self.depth = depth
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        # one worker: the batches are drawn one after another, in the order the
        # sampler alone gives them
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ptr-prefetch")
        self._pending = deque()  # futures of (batch, sampler state after it), oldest first
        self._state = None  # the state after the last batch handed out; None: the sampler's own

    def _draw(self):
        batch = self.sampler.sample(self.batch_size)
        state = self.sampler.state_dict()
        if self.pin_memory:
            batch = {k: v.pin_memory() for k, v in batch.items()}
        return batch, state

    def _fill(self):
        while len(self._pending) < self.depth:
            self._pending.append(self._pool.submit(self._draw))

    def _drain(self):
        """Drop the batches drawn ahead; afterwards no draw is running and the
        sampler may be touched."""
        for future in self._pending:
            future.cancel()
        wait(self._pending)
        self._pending.clear()

    def sample(self, batch_size):
        if batch_size != self.batch_size:
            raise ValueError(
                f"Prefetcher.sample({batch_size}): this prefetcher draws batches of "
                f"{self.batch_size}"
            )
        self._fill()
        batch, self._state = self._pending.popleft().result()  # a draw's error is raised here
        self._fill()
        return batch

    def state_dict(self):
        if self._state is None:  # nothing handed out yet, so nothing drawn: the sampler is idle
            return self.sampler.state_dict()
        return self._state

    def load_state_dict(self, d):
        self._drain()
        self.sampler.load_state_dict(d)
        self._state = None

    def close(self):
        self._drain()
        self._pool.shutdown()


# -------------------- augmentation (Table X: crop + jitter)
def _random_shift(images, pad, generator):
    """Edge pad + random crop back to size, an offset per image. That equals the shifted pixel
    coordinates clamped into the image: one gather, no padded copy. uint8 (B, 3, H, W) -> same."""
    import torch

    B, _, H, W = images.shape
    device = images.device
    shift = torch.randint(-pad, pad + 1, (B, 2, 1), device=device, generator=generator)
    rows = (torch.arange(H, device=device) + shift[:, 0]).clamp(0, H - 1)  # (B, H)
    cols = (torch.arange(W, device=device) + shift[:, 1]).clamp(0, W - 1)  # (B, W)
    image_offset = torch.arange(B, device=device).view(B, 1, 1) * H
    pixel = (image_offset + rows[:, :, None]) * W + cols[:, None, :]  # (B, H, W) flat indices
    flat = images.permute(0, 2, 3, 1).reshape(B * H * W, 3)
    return flat.index_select(0, pixel.view(-1)).view(B, H, W, 3).permute(0, 3, 1, 2)


def augment(
    images,
    pad=4,
    brightness=0.2,
    contrast=0.1,
    saturation=0.1,
    hue=0.03,
    p_jitter=0.8,
    generator=None,
):
    """Random shift (edge pad + random crop back to size), then color jitter on each image with
    probability p_jitter, independent random parameters per image, on the images' device. Jitter:
    torchvision's ranges in the fixed order brightness, contrast, saturation, hue (torchvision's
    ColorJitter shuffles the order per call; a fixed one is simpler and keeps every pass batched
    over the images); hue rotates the chroma plane in YIQ space by hue * 2 pi (linear, cheap, close
    to the HSV shift). uint8 (B, 3, H, W) -> same; deterministic under torch.manual_seed."""
    import torch

    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"augment: expected uint8 images (B, 3, H, W), got {images.dtype} {tuple(images.shape)}"
        )
    B, _, H, W = images.shape
    device = images.device

    def uniform(*shape):  # in [0, 1)
        return torch.rand(shape, device=device, generator=generator)

    if pad > 0:
        images = _random_shift(images, pad, generator)
    if p_jitter <= 0:
        return images
    # an image left out (prob. 1 - p_jitter) gets identity factors: exact after rounding, and no
    # select pass is needed
    apply = (uniform(B, 1, 1) < p_jitter).float()

    def factor(strength):  # uniform in [1 - strength, 1 + strength] where applied, else 1
        return (1 + apply * strength * (2 * uniform(B, 1, 1) - 1)).clamp(min=0)

    luma = torch.tensor(_GRAY, device=device).view(1, 1, 3)
    # channels first: the broadcasts and the bmm below are ~10x faster on a CPU
    x = images.contiguous().float().view(B, 3, H * W)
    x = x.mul_(factor(brightness)).clamp_(0, 255)  # in place where possible: this also runs on CPUs
    contrast_factor = factor(contrast)
    saturation_factor = factor(saturation)
    mean_gray = (luma @ x).mean(2, keepdim=True)
    x = x.mul_(contrast_factor).add_(mean_gray * (1 - contrast_factor)).clamp_(0, 255)
    gray = luma @ x  # (B, 1, H*W)
    x = x.mul_(saturation_factor).add_(gray * (1 - saturation_factor)).clamp_(0, 255)
    theta = apply.view(B) * (2 * uniform(B) - 1) * hue * 2 * math.pi
    cos = theta.cos()
    sin = theta.sin()
    one = torch.ones_like(theta)
    zero = torch.zeros_like(theta)
    rotation = torch.stack([one, zero, zero, zero, cos, -sin, zero, sin, cos], 1).view(B, 3, 3)
    to_yiq = torch.tensor(_RGB2YIQ, dtype=torch.float32, device=device)
    to_rgb = torch.tensor(np.linalg.inv(_RGB2YIQ), dtype=torch.float32, device=device)
    x = torch.bmm(to_rgb @ rotation @ to_yiq, x)
    return x.clamp_(0, 255).round_().to(torch.uint8).view(B, 3, H, W)


# -------------------- command line
def info(path):
    """Print a store's summary: sources, tasks with their train / val counts, lengths, action
    bounds."""
    store = Store(path)
    lengths = store.traj_length
    print(
        f"{store.path}: {len(lengths)} trajectories, {lengths.sum()} transitions of "
        f"{store.image_size} images, camera {store.meta['options']['camera']}, "
        f"{len(store.meta['sources'])} files under {store.meta['root']}, "
        f"{store.meta['skipped']} skipped; length min {lengths.min()}, mean {lengths.mean():.1f}, "
        f"max {lengths.max()}"
    )
    print("  id  train   val  transitions  task")
    for k, name in enumerate(store.task_names):
        in_task = store.traj_task == k
        train = (in_task & (store.traj_split == 0)).sum()
        val = (in_task & (store.traj_split == 1)).sum()
        print(f"{k:4} {train:6} {val:5} {lengths[in_task].sum():12}  {name}")
    print(f"action low  {np.round(store.action_low, 4)}")
    print(f"action high {np.round(store.action_high, 4)}")


# A launcher reports the conversion's own peak RSS (a direct child inherits this process's peak).
_PEAK_RSS_LAUNCHER = (
    "import resource, subprocess as s, sys; s.run(sys.argv[1:], check=True, stdout=s.DEVNULL); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"  # KiB on Linux
)


def bench(transitions=20000, image_size=128, B=64):
    """Conversion MB/s and peak RSS, sampling vs unpickling transitions/s (one core), augmentation
    ms."""
    import torch

    torch.set_num_threads(1)
    tmp = tempfile.mkdtemp(prefix="ptr_bench_")
    rng = np.random.default_rng(0)
    T = 35
    per_file = math.ceil(transitions / 4 / T)  # trajectories per file
    try:
        files = [os.path.join(tmp, "tree", f"task{k}", "train", "out.npy") for k in range(4)]
        for path in files:  # 4 files of equal size: the tree is 4x its largest out.npy
            trajectories = [synthetic_trajectory(T, image_size, rng) for _ in range(per_file)]
            write_bridge_file(path, trajectories)
        sizes = [os.path.getsize(p) for p in files]
        megabytes = sum(sizes) / 1e6
        command = [sys.executable, os.path.abspath(__file__), "convert", os.path.join(tmp, "tree")]
        command += ["--out", os.path.join(tmp, "store")]
        t = time.time()
        launched = subprocess.run(
            [sys.executable, "-c", _PEAK_RSS_LAUNCHER, *command],
            check=True,
            capture_output=True,
            text=True,
        )
        seconds = time.time() - t
        rss = 1024 * int(launched.stdout)
        bound = (2 * max(sizes) + 300e6) / 1e6
        print(
            f"conversion: {megabytes / seconds:.1f} MB/s ({megabytes:.0f} MB, {seconds:.1f} s with "
            f"interpreter start); peak RSS {rss / 1e6:.0f} MB, bound 2 x largest file + 300 MB = "
            f"{bound:.0f} MB"
        )

        sampler = Sampler(Store(os.path.join(tmp, "store")), None, gamma=0.96)
        n = 0
        t = time.time()
        while time.time() - t < 3:
            n += len(sampler.sample(B)["obs"])
        print(
            f"sampling: {n / (time.time() - t):.0f} transitions/s (batch {B}, obs + next obs at "
            f"{image_size}x{image_size}, {len(sampler._idx)} transitions, one core)"
        )

        t = time.time()
        trajectories = read_bridge_file(files[0])
        picks = zip(rng.integers(0, len(trajectories), B), rng.integers(0, T, B))
        np.stack(
            [
                trajectories[j][key][step]["images0"]
                for j, step in picks
                for key in ("observations", "next_observations")
            ]
        )
        print(
            f"unpickle baseline: {B / (time.time() - t):.0f} transitions/s (one "
            f"{sizes[0] / 1e6:.0f} MB out.npy unpickled per batch of {B})"
        )
        del trajectories

        batch = sampler.sample(64)
        x = torch.cat([batch["obs"], batch["next_obs"]])
        for device in ["cpu"] + ["cuda"] * torch.cuda.is_available():
            x = x.to(device)
            augment(x)  # warm-up
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.time()
            for _ in range(10):
                augment(x)
            if device == "cuda":
                torch.cuda.synchronize()
            threads = " (one thread)" if device == "cpu" else ""
            print(
                f"augment: {(time.time() - t) * 100:.1f} ms for 64 obs + 64 next obs at "
                f"{image_size}x{image_size} on {device}{threads}"
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None):
    p = argparse.ArgumentParser(
        description="PTR data: convert Bridge out.npy trees, RLDS and LeRobot datasets; inspect, "
        "benchmark."
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    convert_cmd = sub.add_parser(
        "convert",
        help="convert (or reuse) the store of a Bridge tree, task folder, out.npy, RLDS or LeRobot "
        "folder; rebuilds a damaged store",
    )
    convert_cmd.add_argument("src")
    convert_cmd.add_argument(
        "--out", default=None, help="store folder (default: <src root>/.ptr_store/<options key>)"
    )
    convert_cmd.add_argument(
        "--image_size", type=int, default=None, help="resize to this square size (default: keep)"
    )
    convert_cmd.add_argument(
        "--camera",
        default="images0",
        help="images0 | images1 | ... | all (each camera a trajectory); RLDS / LeRobot: imagesN is "
        "their N-th camera, or give its name (image_1, observation.images.image_1)",
    )
    convert_cmd.add_argument(
        "--task_source",
        choices=rlds.TASK_SOURCES,
        default="path",
        help="RLDS: task from the episode's source out.npy path or its language instruction",
    )
    convert_cmd.add_argument(
        "--include",
        nargs="*",
        default=[],
        help="keep files whose path contains any of these (RLDS: the episode's file_path; "
        "LeRobot: its task)",
    )
    convert_cmd.add_argument(
        "--exclude",
        nargs="*",
        default=[],
        help="drop files whose path contains any of these (same)",
    )
    convert_cmd.add_argument(
        "--aliases", default=None, help="JSON file mapping task name -> task name"
    )
    convert_cmd.add_argument(
        "--skip_bad", action="store_true", help="skip bad trajectories / files and report the count"
    )
    info_cmd = sub.add_parser("info", help="tasks, transitions, trajectory lengths, action bounds")
    info_cmd.add_argument("store")
    bench_cmd = sub.add_parser("bench", help="conversion, sampling and augmentation figures")
    bench_cmd.add_argument("--image_size", type=int, default=128)
    args = p.parse_args(argv)
    if args.cmd == "convert":
        load_store(
            args.src,
            args.out,
            args.image_size,
            args.camera,
            args.include,
            args.exclude,
            args.aliases,
            args.skip_bad,
            repair=True,
            task_source=args.task_source,
        )
    elif args.cmd == "info":
        info(args.store)
    else:
        bench(image_size=args.image_size)


if __name__ == "__main__":
    run_cli(main)
