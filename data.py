"""PTR data: Bridge-format demonstrations -> a memory-mapped store -> relabelled, mixed, augmented batches.

PTR (Kumar et al., RSS 2023) pre-trains multi-task CQL with a one-hot task id (Sec. IV-A), labels the last n = 3
steps of every demo with reward +1 (Sec. IV-B "Reward specification", App. E), puts a new task on a fresh slot or
re-targets an existing id (Sec. IV-A "Handling task identifiers"), mixes prior and target data in each batch (tau;
0.35 / 0.15 / 0.5 prior / target / online, Sec. V-F, App. E) and trains with random crop + color jitter (Table X).
Store (a folder, memory-mapped, allow_pickle=False): images.npy uint8 (F, H, W, 3) and states.npy (F, 7) per frame
(a trajectory of T steps owns T + 1 consecutive frames: transition g of trajectory k has its obs at frame g + k, its
next obs at g + k + 1); actions.npy (N, 7, raw), terminals.npy (N,); trajectories.npz (task, split 0 train / 1 val,
length, source file, index in file); meta.json, written last. torch is imported inside the functions that make
tensors: `python data.py convert` never loads it (~500 MB resident, 2.5 s).
"""

import argparse, hashlib, json, math, os, re, shutil, struct, subprocess, sys, tempfile, time, zlib  # noqa: E401
from collections import deque
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np
from PIL import Image

FORMAT_VERSION = 1
STORE_DIR = (
    ".ptr_store"  # default store location under the source root; the tree scan skips dot-folders
)
SPLITS = ("train", "val")  # split codes 0 and 1
VAL_FRACTION = 0.1  # held out for a task that ships only one of train/ and val/
ACTION_CLIP = 0.99  # keeps rescaled data actions inside the open interval of the tanh policy
_HEADER_BYTES = (
    128  # fixed .npy header size, so the final frame count can be written over it in place
)
_GRAY = (0.2989, 0.587, 0.114)  # luma weights of torchvision's rgb_to_grayscale
_RGB2YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


class BridgeFormatError(ValueError):
    """A source file that does not follow the Bridge numpy format (SPEC section 5)."""

    def __init__(self, file, traj, field, expected, got=None):
        where = f"{file}: " + ("" if traj is None else f"trajectory {traj}: ")
        super().__init__(
            f"{where}field '{field}': expected {expected}" + ("" if got is None else f", got {got}")
        )


@dataclass(frozen=True)
class RewardConfig:
    """Sparse relabelling (Sec. IV-B): the last n_last steps get r = 1, the others 0. The batch's reward is
    scale * r + shift (+10 / -1); done = r (every rewarded step is terminal), or the file's terminals."""

    n_last: int = 3
    scale: float = 11.0
    shift: float = -1.0
    use_terminals: bool = False


def _describe(x):
    return f"{x.dtype} array of shape {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__


def _hw(image_size):
    return (
        None
        if image_size is None
        else tuple(image_size)
        if np.ndim(image_size)
        else (image_size, image_size)
    )


# ---------------------------------------------------------------- the Bridge numpy format (SPEC section 5)
def write_bridge_file(path, trajectories):
    """np.save a list of trajectory dicts as the Bridge release does (atomically)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "wb") as f:
        np.save(f, np.array(trajectories, dtype=object), allow_pickle=True)
    os.replace(path + ".tmp", path)


def synthetic_trajectory(T, image_size, rng, cameras=("images0",)):
    """A Bridge-format trajectory of random images, states and actions in the release's ranges (tests, bench).
    next_observations share their dicts with observations (the release stores two copies)."""
    obs = [
        {
            **{c: rng.integers(0, 256, (*_hw(image_size), 3), dtype=np.uint8) for c in cameras},
            "state": rng.uniform(-0.3, 0.3, 7).astype(np.float32),
        }
        for _ in range(T + 1)
    ]
    actions = np.concatenate(
        [
            rng.uniform(-0.05, 0.05, (T, 3)),
            rng.uniform(-0.25, 0.25, (T, 3)),
            rng.integers(0, 2, (T, 1)),
        ],
        axis=1,
    )
    return {
        "observations": obs[:-1],
        "next_observations": obs[1:],
        "actions": actions,
        "terminals": np.zeros(T),
    }


def read_bridge_file(path):
    """Unpickle one out.npy -> list of trajectories. The only place that unpickles."""
    try:
        data = np.load(path, allow_pickle=True)
    except Exception as e:  # a truncated pickle raises EOFError, UnpicklingError, ValueError, ... depending on where
        raise BridgeFormatError(
            path,
            None,
            "<file>",
            "a complete np.save'd list of trajectory dicts",
            f"unreadable ({type(e).__name__}: {e})",
        ) from None
    if isinstance(data, np.ndarray) and data.dtype == object and data.ndim <= 1:
        data = data.item() if data.ndim == 0 else list(data)
    if not isinstance(data, list):
        raise BridgeFormatError(path, None, "<file>", "a list of trajectory dicts", _describe(data))
    return data


def parse_trajectory(traj, path, i, camera="images0"):
    """Check one trajectory dict -> ({camera: uint8 frames (T+1, H, W, 3)}, states (T+1, 7), actions (T, 7),
    terminals (T,)). Frame t < T is observations[t]; frame T is next_observations[T-1] (the final next obs)."""

    def fail(field, expected, got=None):
        return BridgeFormatError(path, i, field, expected, got)

    def numbers(
        field, x, expected, shape_ok
    ):  # x as an array of numbers whose shape passes shape_ok, or the error
        try:
            a = np.asarray(x)
        except (ValueError, TypeError):  # numpy >= 1.24 refuses ragged nested lists
            raise fail(
                field, expected, f"a ragged {type(x).__name__} (rows of unequal length)"
            ) from None
        if a.dtype.kind not in "fiub" or not shape_ok(a.shape):
            raise fail(field, expected, "nothing (key missing)" if x is None else _describe(a))
        return a

    if not isinstance(traj, dict):
        raise fail("<trajectory>", "a dict", _describe(traj))
    for key in ("observations", "next_observations", "actions"):
        if key not in traj:
            raise fail(key, "a key of the trajectory dict", f"keys {sorted(map(str, traj))}")
    actions = numbers(
        "actions",
        traj["actions"],
        "a (T, 7) float array, T >= 1",
        lambda s: len(s) == 2 and s[1] == 7 and s[0] >= 1,
    )
    T = len(actions)
    for key in ("observations", "next_observations"):
        if not isinstance(traj[key], (list, tuple, np.ndarray)) or len(traj[key]) != T:
            got = (
                f"{len(traj[key])} entries"
                if hasattr(traj[key], "__len__")
                else _describe(traj[key])
            )
            raise fail(key, f"a list of {T} observation dicts (one per action)", got)
    obs = list(traj["observations"]) + [traj["next_observations"][-1]]
    names = [f"observations[{t}]" for t in range(T)] + [f"next_observations[{T - 1}]"]
    cams = (
        [camera]
        if camera != "all" or not isinstance(obs[0], dict)
        else sorted(k for k in obs[0] if re.fullmatch(r"images\d+", k))
    )  # "all": each camera a trajectory of its own
    if not cams:
        raise fail(f"{names[0]}.images*", "at least one camera image (images0, images1, ...)")
    for t, (o, name) in enumerate(zip(obs, names)):
        if not isinstance(o, dict):
            raise fail(name, "an observation dict", _describe(o))
        for cam in cams:
            img, shape = o.get(cam), obs[0][cam].shape if t else "(H, W, 3)"
            if not (
                isinstance(img, np.ndarray)
                and img.dtype == np.uint8
                and img.ndim == 3
                and img.shape[2] == 3
                and (t == 0 or img.shape == shape)
            ):
                raise fail(
                    f"{name}.{cam}",
                    f"a uint8 image of shape {shape}",
                    "nothing (camera missing)" if img is None else _describe(img),
                )
        numbers(
            f"{name}.state", o.get("state"), "7 floats (xyz, euler, gripper)", lambda s: s == (7,)
        )
    terminals = numbers(
        "terminals", traj.get("terminals", np.zeros(T)), f"{T} numbers", lambda s: s == (T,)
    )
    return (
        {c: np.stack([o[c] for o in obs]) for c in cams},
        np.array([o["state"] for o in obs], np.float32),
        actions.astype(np.float32),
        terminals.astype(np.float32),
    )


def find_sources(src, include=(), exclude=()):
    """Every out.npy under src (a tree root, one task folder or one out.npy) -> (root, [(path, task, split)]).
    The task is the folder that holds train/ and val/; split is "train", "val" or None. include / exclude are
    keyword substrings of the path relative to root (the paper pre-trains on all but toykitchen6)."""
    src = os.path.abspath(src)
    if not os.path.exists(src):
        raise FileNotFoundError(f"{src}: no such file or folder")
    root, paths = (os.path.dirname(src), [src]) if os.path.isfile(src) else (src, [])
    for d, dirs, files in os.walk(src):  # nothing to walk when src is a file
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        paths += [os.path.join(d, "out.npy")] if "out.npy" in files else []
    found = []
    for p in sorted(paths):
        rel, folder = os.path.relpath(p, root), os.path.dirname(p)
        if (not include or any(k in rel for k in include)) and not any(k in rel for k in exclude):
            split = os.path.basename(folder) if os.path.basename(folder) in SPLITS else None
            found.append((p, os.path.basename(os.path.dirname(folder) if split else folder), split))
    return root, found


# ---------------------------------------------------------------- conversion: streaming, atomic, cached
def _npy_header(dtype, shape):
    """A .npy header padded to _HEADER_BYTES: images.npy streams to disk behind a placeholder of that size and
    gets this header with the final frame count at the end (two passes would unpickle every file twice)."""
    d = {
        "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
        "fortran_order": False,
        "shape": tuple(shape),
    }
    h = repr(d).encode("latin1")
    return (
        b"\x93NUMPY\x01\x00"
        + struct.pack("<H", _HEADER_BYTES - 10)
        + h.ljust(_HEADER_BYTES - 11)
        + b"\n"
    )


def _resize(frames, size):
    if size is None or frames.shape[1:3] == size:
        return frames
    return np.stack(
        [
            np.asarray(Image.fromarray(f).resize(size[::-1], Image.Resampling.LANCZOS))
            for f in frames
        ]
    )


def _assign_splits(task, source, index, sources, task_names):
    """0 train / 1 val per trajectory. A task with trajectories in both train/ and val/ keeps the release's split (an
    empty out.npy counts as none); any other holds out VAL_FRACTION of its demos, chosen with a seed fixed by the task
    name. Demos are grouped by (file, index): the cameras of one demo (camera="all") land on one side."""
    split = np.array([sources[s][2] == "val" for s in source], np.int8)
    for k in np.unique(task):
        sel = task == k
        if {sources[s][2] for s in np.unique(source[sel])} >= set(SPLITS):
            continue
        demo = source[sel] * (index.max() + 1) + index[sel]
        groups = np.unique(demo)
        n_val = max(1, int(VAL_FRACTION * len(groups) + 0.5)) if len(groups) > 1 else 0
        rng = np.random.default_rng(zlib.crc32(task_names[k].encode()))
        split[sel] = np.isin(demo, groups[rng.permutation(len(groups))[:n_val]])
    return split


def _fresh_tmp(store):
    """Make <store>.tmp-<pid>, first deleting the .tmp-<pid> / .old-<pid> folders of conversions that died
    (kill -9): a live pid's folder belongs to a conversion in progress; our own pid's, to a dead namesake."""
    parent, base = os.path.split(store)
    os.makedirs(parent, exist_ok=True)
    for name in os.listdir(parent):
        m = re.fullmatch(re.escape(base) + r"\.(?:tmp|old)-(\d+)", name)
        if m and (int(m.group(1)) == os.getpid() or not _alive(int(m.group(1)))):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
    os.makedirs(f"{store}.tmp-{os.getpid()}")
    return f"{store}.tmp-{os.getpid()}"


def _alive(pid):
    try:
        return os.kill(pid, 0) or True  # signal 0 only checks that the pid exists
    except OSError as e:  # PermissionError: alive, another user's
        return isinstance(e, PermissionError)


def _stamp(sources):  # what the cache compares: every source file with its size and mtime
    return [[p, os.stat(p).st_size, os.stat(p).st_mtime_ns] for p, _, _ in sources]


def convert(sources, root, store, key, options, log=print):
    """Write the store for `sources` (from find_sources) into <store>.tmp-<pid>, then rename it to `store`.
    Images stream to disk; states, actions, terminals (~0.1 % of the bytes) are gathered and saved at the end."""
    size, aliases, store = _hw(options["image_size"]), options["aliases"], os.path.abspath(store)
    task_names = sorted({aliases.get(t, t) for _, t, _ in sources})
    tmp, stamp = (
        _fresh_tmp(store),
        _stamp(sources),
    )  # stamped before reading: a file changed meanwhile converts again
    rows, arrays, shape, skipped, t0 = (
        [],
        {"states": [], "actions": [], "terminals": []},
        size,
        [],
        time.time(),
    )

    def skip(
        e,
    ):  # --skip_bad: note the bad trajectory (or file) and go on; otherwise the error ends it all
        if not options["skip_bad"]:
            raise e
        skipped.append(str(e))

    try:
        with open(os.path.join(tmp, "images.npy"), "wb") as images_file:
            images_file.write(bytes(_HEADER_BYTES))  # placeholder for _npy_header
            for fi, (path, task, _) in enumerate(sources):
                try:
                    trajs = read_bridge_file(path)
                except BridgeFormatError as e:
                    skip(e)
                    continue
                for i, traj in enumerate(trajs):
                    try:
                        images, states, actions, terminals = parse_trajectory(
                            traj, path, i, options["camera"]
                        )
                        images = {c: _resize(f, size) for c, f in images.items()}
                        shape = shape or next(iter(images.values())).shape[1:3]
                        for c, f in images.items():
                            if f.shape[1:3] != shape:
                                raise BridgeFormatError(
                                    path,
                                    i,
                                    c,
                                    f"{shape[0]}x{shape[1]} images like the first "
                                    "trajectory's (or pass image_size)",
                                    _describe(f[0]),
                                )
                    except BridgeFormatError as e:
                        skip(e)
                        continue
                    for (
                        frames
                    ) in images.values():  # camera="all": every camera is a trajectory of its own
                        images_file.write(np.ascontiguousarray(frames).data)
                        for name, a in zip(arrays, (states, actions, terminals)):
                            arrays[name].append(a)
                        rows.append(
                            (task_names.index(aliases.get(task, task)), fi, i, len(actions))
                        )
                del trajs  # before the next load: one unpickled file in memory at a time
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
            images_file.write(_npy_header(np.uint8, (len(arrays["states"]), *shape, 3)))
        for name, a in arrays.items():
            np.save(os.path.join(tmp, name + ".npy"), a)
        task, source, index, length = np.array(rows, np.int64).T
        np.savez(
            os.path.join(tmp, "trajectories.npz"),
            task=task,
            source=source,
            index=index,
            length=length,
            split=_assign_splits(task, source, index, sources, task_names),
        )
        low, high = arrays["actions"].min(0), arrays["actions"].max(0)
        flat, mid = (
            high - low < 1e-6,
            (low + high) / 2,
        )  # a constant dimension: bounds mid +- 1, so it maps to 0
        meta = {
            "format_version": FORMAT_VERSION,
            "key": key,
            "options": options,
            "root": root,
            "task_names": task_names,
            "action_low": np.where(flat, mid - 1, low).tolist(),
            "action_high": np.where(flat, mid + 1, high).tolist(),
            "num_transitions": int(length.sum()),
            "skipped": len(skipped),
            "sources": stamp,
        }
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        try:
            os.replace(tmp, store)
        except (
            OSError
        ):  # a folder cannot be renamed onto a full one (ENOTEMPTY): a store that another process
            if not _fresh(
                store, sources, key
            ):  # built from the same files meanwhile is kept; an old one moves aside
                os.replace(store, f"{store}.old-{os.getpid()}")
                os.replace(tmp, store)
        shutil.rmtree(f"{store}.old-{os.getpid()}", ignore_errors=True)
    finally:  # Ctrl-C included: nothing half-written survives (kill -9 leaves tmp to _fresh_tmp); renamed: no tmp
        shutil.rmtree(tmp, ignore_errors=True)
    mb, dt = sum(s[1] for s in stamp) / 1e6, time.time() - t0
    log(
        f"converted {len(rows)} trajectories ({meta['num_transitions']} transitions) from {len(sources)} files, "
        f"{mb:.0f} MB in {dt:.1f} s ({mb / max(dt, 1e-9):.1f} MB/s); skipped {len(skipped)} bad trajectories/files"
        + "".join("\n  " + e for e in skipped)
    )


def _read_meta(store):
    try:
        return json.loads(open(os.path.join(store, "meta.json")).read())
    except (OSError, ValueError):
        return None


def _key(options):
    return hashlib.sha1(json.dumps(options, sort_keys=True).encode()).hexdigest()[:12]


def _fresh(
    store, sources, key=None
):  # built from these exact files (and these options, when key is given)
    return (
        bool(meta := _read_meta(store))
        and meta.get("sources") == _stamp(sources)
        and key in (None, meta["key"])
    )


def load_store(
    src,
    store=None,
    image_size=None,
    camera="images0",
    include=(),
    exclude=(),
    aliases=None,
    skip_bad=False,
    log=print,
):
    """Open the store for `src` (a Bridge tree root, one task folder, one out.npy, or a built store folder),
    converting first unless a store was built with these options from these exact files (size, mtime_ns).
    store=None -> <src root>/.ptr_store/<key>. camera: "images0" | "images1" | ... | "all". aliases: a dict or
    a JSON file mapping task name -> task name (e.g. many open_* variants onto one task)."""
    if _read_meta(src) is not None:  # a built store: opened as it is, the options are not checked
        return Store(src)
    aliases = (
        json.loads(open(aliases).read())
        if isinstance(aliases, (str, os.PathLike))
        else aliases or {}
    )
    if not isinstance(aliases, dict) or not all(isinstance(v, str) for v in aliases.values()):
        raise ValueError(
            f"aliases: expected a dict (or JSON file) task name -> task name, got {aliases!r:.200}"
        )
    options = {
        "format_version": FORMAT_VERSION,
        "camera": camera,
        "image_size": _hw(image_size),
        "include": list(include),
        "exclude": list(exclude),
        "aliases": dict(sorted(aliases.items())),
        "skip_bad": skip_bad,
    }
    options = json.loads(
        json.dumps(options)
    )  # tuples -> lists, so that it equals the copy in meta.json
    key = _key(options)
    root, sources = find_sources(src, include, exclude)
    if not sources:
        raise BridgeFormatError(
            src,
            None,
            "out.npy",
            "at least one out.npy below it",
            f"none (include={list(include)}, exclude={list(exclude)})",
        )
    native = os.path.join(root, STORE_DIR, _key(dict(options, image_size=None)))
    if store is None and _fresh(native, sources) and Store(native).image_size == _hw(image_size):
        store, key = (
            native,
            _key(dict(options, image_size=None)),
        )  # native size == the request: no second copy
    store = store or os.path.join(root, STORE_DIR, key)
    if _fresh(store, sources, key):
        log(f"using store {store}")
    else:
        log(f"converting {len(sources)} out.npy files under {root} into {store}")
        convert(sources, root, store, key, options, log)
    return Store(store)


class Store:
    """A converted store: memory-mapped arrays (never unpickled) and small per-trajectory index arrays."""

    def __init__(self, path):
        self.path, self.meta = os.path.abspath(path), _read_meta(path)
        if self.meta is None:
            raise FileNotFoundError(
                f"{path}: not a store (no meta.json: never converted, or interrupted)"
            )
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{path}/meta.json: field 'format_version': expected {FORMAT_VERSION}, got "
                f"{self.meta.get('format_version')}; convert the source again"
            )
        self.images, self.states, self.actions, self.terminals = (
            np.load(os.path.join(path, f"{n}.npy"), mmap_mode="r")
            for n in ("images", "states", "actions", "terminals")
        )
        with np.load(os.path.join(path, "trajectories.npz")) as z:
            self.traj_task, self.traj_split, self.traj_length = z["task"], z["split"], z["length"]
        self.traj_start = (
            np.cumsum(self.traj_length) - self.traj_length
        )  # first transition of each trajectory
        self.task_names, self.image_size = (
            list(self.meta["task_names"]),
            tuple(self.images.shape[1:3]),
        )
        self.action_low, self.action_high = (
            np.array(self.meta[k], np.float32) for k in ("action_low", "action_high")
        )

    def _in_split(self, split):
        if split not in (None, *SPLITS):
            raise ValueError(f"split: expected one of {SPLITS} or None, got {split!r}")
        return (
            self.traj_split == SPLITS.index(split)
            if split
            else np.ones(len(self.traj_length), bool)
        )

    def num_transitions(self, split=None):
        return int(self.traj_length[self._in_split(split)].sum())

    def trajectory_ids(self, split=None):
        return np.flatnonzero(self._in_split(split))


# ---------------------------------------------------------------- task ids, actions, returns, batches
def target_task_ids(prior_tasks, target_tasks, target="new"):
    """One-hot slots for the target store's tasks (Sec. IV-A): target="new" puts target task i on the fresh
    slot len(prior_tasks) + i, never trained during pre-training; a prior task name re-targets that task's id.
    Returns (global index per target-store task, num_tasks)."""
    if target == "new":
        return np.arange(len(target_tasks), dtype=np.int64) + len(prior_tasks), len(
            prior_tasks
        ) + len(target_tasks)
    if target not in prior_tasks:
        raise ValueError(
            f"target: expected 'new' or one of the prior tasks {list(prior_tasks)}, got {target!r}"
        )
    return np.full(len(target_tasks), list(prior_tasks).index(target), np.int64), len(prior_tasks)


def _as_bounds(a, low, high):
    if isinstance(a, np.ndarray):
        return a.astype(np.float32), np.asarray(low, np.float32), np.asarray(high, np.float32)
    import torch

    return (a, *(torch.as_tensor(x, dtype=a.dtype, device=a.device) for x in (low, high)))


def rescale_actions(a, low, high):
    """Raw actions -> [-1, 1] by per-dimension bounds, clipped to +-ACTION_CLIP (numpy or torch in, same out)."""
    a, low, high = _as_bounds(a, low, high)
    return (2 * (a - low) / (high - low) - 1).clip(-ACTION_CLIP, ACTION_CLIP)


def unscale_actions(a, low, high):
    """[-1, 1] -> raw actions: the inverse of rescale_actions inside the clip range."""
    a, low, high = _as_bounds(a, low, high)
    return low + (a + 1) * 0.5 * (high - low)


def mc_returns(r, R, mask, lengths, gamma):
    """Return-to-go of back-to-back trajectories with the backup's masks: G_t = R_t + gamma mask_t G_{t+1}, G_last =
    R_last; a trajectory without success (all r = 0) gets R / (1 - gamma) (Cal-QL). r binary, R scaled, all (N,)."""
    lengths = np.asarray(lengths)
    traj, start = np.repeat(np.arange(len(lengths)), lengths), np.cumsum(lengths) - lengths
    step, G = np.arange(len(R)) - start[traj], np.array(R, np.float64)
    idx = np.flatnonzero(step < lengths[traj] - 1)
    idx = idx[
        np.argsort(-step[idx], kind="stable")
    ]  # every trajectory at once, one step at a time, backwards
    for group in np.split(idx, np.flatnonzero(np.diff(step[idx])) + 1):
        G[group] += gamma * mask[group] * G[group + 1]
    failed = (np.maximum.reduceat(r, start) <= 0)[traj]
    G[failed] = np.asarray(R)[failed] / (1 - gamma)
    return G.astype(np.float32)


def _make_batch(images, states, frame, next_frame, action, reward, mask, mc_return, task):
    """The batch: obs, next_obs uint8 (B, 3, H, W), a permuted (channels-last) view made without a copy; state,
    next_state (B, 7), action (B, 7) in [-1, 1], reward, mask, mc_return (B,) float32; task int64 (B,)."""
    import torch

    B, both = len(frame), np.concatenate([frame, next_frame])
    img = torch.from_numpy(np.asarray(images[both])).permute(0, 3, 1, 2)
    st = torch.from_numpy(np.asarray(states[both], np.float32))
    floats = {
        k: torch.from_numpy(np.asarray(v, np.float32))
        for k, v in (
            ("action", action),
            ("reward", reward),
            ("mask", mask),
            ("mc_return", mc_return),
        )
    }
    return {
        "obs": img[:B],
        "next_obs": img[B:],
        "state": st[:B],
        "next_state": st[B:],
        **floats,
        "task": torch.from_numpy(np.asarray(task, np.int64)),
    }


# ---------------------------------------------------------------- samplers and the replay buffer
class _Seeded:
    """The RNG state as python ints, for an exact resume from a weights_only checkpoint."""

    def state_dict(self):
        return {"rng": self._rng.bit_generator.state}

    def load_state_dict(self, d):
        self._rng.bit_generator.state = d["rng"]


class Sampler(_Seeded):
    """Uniform transitions of one split of a store (split=None: all). Rewards, masks, MC returns and global
    task ids are computed once for every transition here, so a batch is a handful of gathers."""

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
        self.store, self.split, self.image_size = store, split, store.image_size
        self.task_ids = (
            np.arange(len(store.task_names)) if task_ids is None else np.asarray(task_ids, np.int64)
        )
        assert self.task_ids.shape == (len(store.task_names),), (
            "task_ids: one per store task",
            self.task_ids.shape,
        )
        self.action_low = (
            store.action_low if action_low is None else np.asarray(action_low, np.float32)
        )
        self.action_high = (
            store.action_high if action_high is None else np.asarray(action_high, np.float32)
        )
        L, traj = store.traj_length, np.repeat(np.arange(len(store.traj_length)), store.traj_length)
        r = (np.arange(len(traj)) - store.traj_start[traj] >= L[traj] - reward.n_last).astype(
            np.float32
        )
        done = np.asarray(store.terminals, np.float32) if reward.use_terminals else r
        self._R, self._mask = (reward.scale * r + reward.shift).astype(np.float32), 1 - done
        self._mc = mc_returns(r, self._R, self._mask, L, gamma)
        self._task = self.task_ids[store.traj_task[traj]]
        self._frame = (
            np.arange(len(traj)) + traj
        )  # obs frame of each transition; its next obs is the frame after
        self._idx = np.flatnonzero(store._in_split(split)[traj])
        self._rng = np.random.default_rng(seed)

    def sample(self, batch_size):
        if not len(self._idx):
            raise ValueError(
                f"{self.store.path}: split '{self.split}' has no transitions to sample"
            )
        # sorted: the memmap gather walks the file forward (the order within a batch carries no meaning)
        return self._batch(np.sort(self._idx[self._rng.integers(0, len(self._idx), batch_size)]))

    def trajectory(self, traj_id):
        return self._batch(
            self.store.traj_start[traj_id] + np.arange(self.store.traj_length[traj_id])
        )

    def _batch(self, g):
        action = rescale_actions(
            np.asarray(self.store.actions[g]), self.action_low, self.action_high
        )
        return _make_batch(
            self.store.images,
            self.store.states,
            self._frame[g],
            self._frame[g] + 1,
            action,
            self._R[g],
            self._mask[g],
            self._mc[g],
            self._task[g],
        )


class MixedSampler:
    """Each batch draws floor(B * f_i) transitions from sampler i and the rest from the last one with f_i > 0:
    tau = 0.9 prior / 0.1 target offline (Sec. IV-A), 0.35 / 0.15 / 0.5 prior / target / online (Sec. V-F)."""

    def __init__(self, samplers, fractions):
        if len(samplers) != len(fractions) or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
            raise ValueError(
                f"fractions: expected {len(samplers)} non-negative numbers summing to 1, got {fractions}"
            )
        self.samplers, self.fractions = list(samplers), list(fractions)

    def counts(self, batch_size):
        n = [
            math.floor(batch_size * f + 1e-9) for f in self.fractions
        ]  # 1e-9: 0.7 * 10 is 6.9999...
        n[np.flatnonzero(self.fractions)[-1]] += batch_size - sum(
            n
        )  # never to a 0 fraction (an empty buffer)
        return n

    def sample(self, batch_size):
        import torch

        parts = [s.sample(n) for s, n in zip(self.samplers, self.counts(batch_size)) if n > 0]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def state_dict(self):
        return {"samplers": [s.state_dict() for s in self.samplers]}

    def load_state_dict(self, d):
        for s, sd in zip(self.samplers, d["samplers"]):
            s.load_state_dict(sd)


class ReplayBuffer(_Seeded):
    """Online data in the batch format of Sampler, first in first out by whole trajectories, in a ring of
    `capacity` frames (a trajectory of T steps takes T + 1). Rewards are the binary r of the env or the success
    classifier, done = r, scale / shift apply; MC returns are computed when a trajectory is added. Transition
    arrays are indexed by the obs frame. state_dict: the RNG, not the data."""

    def __init__(self, capacity, image_size, *, gamma, reward=RewardConfig(), seed=0):
        self.capacity, self.image_size, self.gamma, self.reward = (
            capacity,
            _hw(image_size),
            gamma,
            reward,
        )
        self.images = np.zeros(
            (capacity, *self.image_size, 3), np.uint8
        )  # calloc: memory is used as it is written
        self.states, self.action = (
            np.zeros((capacity, 7), np.float32),
            np.zeros((capacity, 7), np.float32),
        )
        self.R, self.mask, self.mc = (np.zeros(capacity, np.float32) for _ in range(3))
        self.task, self.live = (
            np.zeros(capacity, np.int64),
            np.zeros(capacity, bool),
        )  # live: a transition starts here
        self._lengths, self._start, self._used = (
            deque(),
            0,
            0,
        )  # steps of the trajectories in the ring, oldest first
        self._rng = np.random.default_rng(seed)

    def __len__(self):
        return sum(self._lengths)

    def add_trajectory(self, images, states, actions, rewards, task):
        actions, rewards = np.asarray(actions, np.float32), np.asarray(rewards, np.float32)
        images, states, T = np.asarray(images), np.asarray(states, np.float32), len(actions)
        if not (
            images.shape == (T + 1, *self.image_size, 3)
            and images.dtype == np.uint8
            and 1 <= T < self.capacity
            and states.shape == (T + 1, 7)
            and actions.shape == (T, 7)
            and rewards.shape == (T,)
            and np.isin(rewards, (0, 1)).all()
        ):
            raise ValueError(
                f"ReplayBuffer.add_trajectory: expected images uint8 (T+1, *{self.image_size}, 3), "
                f"states (T+1, 7), actions (T, 7), rewards (T,) in {{0, 1}}, 1 <= T < {self.capacity}; "
                f"got {_describe(images)}, states {states.shape}, actions {actions.shape}, {rewards}"
            )
        while (
            self._used + T + 1 > self.capacity
        ):  # drop the oldest trajectories until this one fits
            n = self._lengths.popleft() + 1
            self.live[(self._start + np.arange(n)) % self.capacity] = False
            self._start, self._used = (self._start + n) % self.capacity, self._used - n
        fs = (self._start + self._used + np.arange(T + 1)) % self.capacity
        f, R, mask = (
            fs[:-1],
            (self.reward.scale * rewards + self.reward.shift).astype(np.float32),
            1 - rewards,
        )
        self.images[fs], self.states[fs], self.action[f], self.R[f], self.mask[f] = (
            images,
            states,
            actions,
            R,
            mask,
        )
        self.mc[f], self.task[f], self.live[f] = (
            mc_returns(rewards, R, mask, [T], self.gamma),
            task,
            True,
        )
        self._lengths.append(T)
        self._used += T + 1

    def sample(self, batch_size):
        ring = (
            self._start + np.arange(self._used)
        ) % self.capacity  # oldest first: a refilled ring samples alike
        live = ring[self.live[ring]]
        if not len(live):
            raise ValueError("ReplayBuffer.sample: the buffer is empty")
        f = live[self._rng.integers(0, len(live), batch_size)]
        return _make_batch(
            self.images,
            self.states,
            f,
            (f + 1) % self.capacity,
            self.action[f],
            self.R[f],
            self.mask[f],
            self.mc[f],
            self.task[f],
        )


class Prefetcher:
    """Batches of a sampler drawn by a background thread while the device trains on earlier ones (an input
    pipeline that does not starve a GPU): `depth` batches ahead, each in pinned memory when CUDA is available,
    so that train.prepare_batch's non_blocking copy overlaps with compute; augmentation stays on the device.
    A drop-in for the sampler of a training loop (sample, state_dict, load_state_dict) at one batch size.
    Exact resume: each batch is drawn together with the sampler's state right after it, and state_dict() is
    the state after the last batch handed out, not after those still waiting, so a checkpoint continues
    where the consumed batches end, with or without a Prefetcher (the format is the sampler's own).
    For samplers whose data is fixed while it runs (Sampler, MixedSampler); not for a ReplayBuffer that
    grows between updates (a batch drawn ahead would miss the newest trajectories)."""

    def __init__(self, sampler, batch_size, depth=2, pin_memory=None):
        import torch

        if depth < 1:
            raise ValueError(f"Prefetcher: depth={depth}, expected >= 1")
        self.sampler, self.batch_size, self.depth = sampler, batch_size, depth
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        # one worker: the batches are drawn one after another, in the order the sampler alone gives them
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
        """Drop the batches drawn ahead; afterwards no draw is running and the sampler may be touched."""
        for future in self._pending:
            future.cancel()
        wait(self._pending)
        self._pending.clear()

    def sample(self, batch_size):
        if batch_size != self.batch_size:
            raise ValueError(
                f"Prefetcher.sample({batch_size}): this prefetcher draws batches of {self.batch_size}"
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


# ---------------------------------------------------------------- augmentation (Table X: crop + color jitter)
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
    """Random shift (edge pad + random crop back to size), then color jitter on each image with probability p_jitter,
    independent random parameters per image, on the images' device. Jitter: torchvision's ranges in the fixed order
    brightness, contrast, saturation, hue (torchvision's ColorJitter shuffles the order per call; a fixed one is simpler
    and keeps every pass batched over the images); hue rotates the chroma plane in YIQ space by hue * 2 pi (linear,
    cheap, close to the HSV shift). uint8 (B, 3, H, W) -> same; deterministic under torch.manual_seed."""
    import torch

    assert images.dtype == torch.uint8 and images.ndim == 4 and images.shape[1] == 3, (
        images.dtype,
        images.shape,
    )
    (B, _, H, W), dev = images.shape, images.device
    rand = lambda *shape: torch.rand(shape, device=dev, generator=generator)
    if (
        pad > 0
    ):  # edge pad + crop == the shifted pixel coordinates clamped into the image: one gather, no padding
        shift = torch.randint(-pad, pad + 1, (B, 2, 1), device=dev, generator=generator)
        rows = (torch.arange(H, device=dev) + shift[:, 0]).clamp(0, H - 1)  # (B, H)
        cols = (torch.arange(W, device=dev) + shift[:, 1]).clamp(0, W - 1)  # (B, W)
        pixel = (torch.arange(B, device=dev).view(B, 1, 1) * H + rows[:, :, None]) * W + cols[
            :, None, :
        ]
        images = images.permute(0, 2, 3, 1).reshape(B * H * W, 3).index_select(0, pixel.view(-1))
        images = images.view(B, H, W, 3).permute(0, 3, 1, 2)
    if p_jitter <= 0:
        return images
    # an image left out (prob. 1 - p_jitter) gets identity factors: exact after rounding, and no select pass
    apply = (rand(B, 1, 1) < p_jitter).float()
    factor = lambda s: (1 + apply * s * (2 * rand(B, 1, 1) - 1)).clamp(
        min=0
    )  # uniform in [1 - s, 1 + s]
    gray = lambda x: torch.tensor(_GRAY, device=dev).view(1, 1, 3) @ x  # (B, 1, H*W)
    x = (
        images.contiguous().float().view(B, 3, H * W)
    )  # channels first: broadcasts and bmm ~10x faster on a CPU
    x = x.mul_(factor(brightness)).clamp_(0, 255)  # in place where possible: this also runs on CPUs
    c, s = factor(contrast), factor(saturation)
    x = x.mul_(c).add_(gray(x).mean(2, keepdim=True) * (1 - c)).clamp_(0, 255)
    x = x.mul_(s).add_(gray(x) * (1 - s)).clamp_(0, 255)
    theta = apply.view(B) * (2 * rand(B) - 1) * hue * 2 * math.pi
    c, s, one, zero = theta.cos(), theta.sin(), torch.ones_like(theta), torch.zeros_like(theta)
    rot = torch.stack([one, zero, zero, zero, c, -s, zero, s, c], 1).view(B, 3, 3)
    to_yiq, to_rgb = (
        torch.tensor(m, dtype=torch.float32, device=dev)
        for m in (_RGB2YIQ, np.linalg.inv(_RGB2YIQ))
    )
    return (
        torch.bmm(to_rgb @ rot @ to_yiq, x).clamp_(0, 255).round_().to(torch.uint8).view(B, 3, H, W)
    )


# ---------------------------------------------------------------- command line
def info(path):
    L = (st := Store(path)).traj_length
    print(
        f"{st.path}: {len(L)} trajectories, {L.sum()} transitions of {st.image_size} images, camera "
        f"{st.meta['options']['camera']}, {len(st.meta['sources'])} files under {st.meta['root']}, "
        f"{st.meta['skipped']} skipped; length min {L.min()}, mean {L.mean():.1f}, max {L.max()}\n"
        f"  id  train   val  transitions  task"
    )
    for k, name in enumerate(st.task_names):
        n = [((st.traj_task == k) & (st.traj_split == c)).sum() for c in (0, 1)]
        print(f"{k:4} {n[0]:6} {n[1]:5} {L[st.traj_task == k].sum():12}  {name}")
    print(f"action low  {np.round(st.action_low, 4)}\naction high {np.round(st.action_high, 4)}")


def bench(transitions=20000, image_size=128, B=64):
    """Conversion MB/s and peak RSS, sampling vs unpickling transitions/s (one core), augmentation ms."""
    import torch

    torch.set_num_threads(1)
    tmp, rng, T = tempfile.mkdtemp(prefix="ptr_bench_"), np.random.default_rng(0), 35
    per_file = math.ceil(transitions / 4 / T)  # trajectories per file
    try:
        files = [os.path.join(tmp, "tree", f"task{k}", "train", "out.npy") for k in range(4)]
        for path in files:  # 4 files of equal size: the tree is 4x its largest out.npy
            write_bridge_file(
                path, [synthetic_trajectory(T, image_size, rng) for _ in range(per_file)]
            )
        # a launcher reports the conversion's own peak RSS (a direct child would inherit this process's peak)
        launcher = (
            "import resource, subprocess as s, sys; s.run(sys.argv[1:], check=True, stdout=s.DEVNULL); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
        )  # KiB on Linux
        sizes, t = [os.path.getsize(p) for p in files], time.time()
        rss = 1024 * int(
            subprocess.run(
                [
                    sys.executable,
                    "-c",
                    launcher,
                    sys.executable,
                    os.path.abspath(__file__),
                    "convert",
                    os.path.join(tmp, "tree"),
                    "--out",
                    os.path.join(tmp, "store"),
                ],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
        )
        print(
            f"conversion: {sum(sizes) / 1e6 / (dt := time.time() - t):.1f} MB/s ({sum(sizes) / 1e6:.0f} MB, "
            f"{dt:.1f} s with interpreter start); peak RSS {rss / 1e6:.0f} MB, bound 2 x largest file + 300 MB = "
            f"{(2 * max(sizes) + 300e6) / 1e6:.0f} MB"
        )
        sampler, n, t = Sampler(Store(os.path.join(tmp, "store")), None, gamma=0.96), 0, time.time()
        while time.time() - t < 3:
            n += len(sampler.sample(B)["obs"])
        print(
            f"sampling: {n / (time.time() - t):.0f} transitions/s (batch {B}, obs + next obs at "
            f"{image_size}x{image_size}, {len(sampler._idx)} transitions, one core)"
        )
        t, trajs = time.time(), read_bridge_file(files[0])
        np.stack(
            [
                trajs[j][k][s]["images0"]
                for j, s in zip(rng.integers(0, len(trajs), B), rng.integers(0, T, B))
                for k in ("observations", "next_observations")
            ]
        )
        print(
            f"unpickle baseline: {B / (time.time() - t):.0f} transitions/s (one {sizes[0] / 1e6:.0f} MB out.npy "
            f"unpickled per batch of {B})"
        )
        x, trajs = torch.cat([sampler.sample(64)[k] for k in ("obs", "next_obs")]), None
        for dev in ["cpu"] + ["cuda"] * torch.cuda.is_available():
            x, sync = x.to(dev), torch.cuda.synchronize if dev == "cuda" else (lambda: None)
            augment(x), sync()  # warm-up
            t = time.time()
            for _ in range(10):
                augment(x)
            sync()
            print(
                f"augment: {(time.time() - t) * 100:.1f} ms for 64 obs + 64 next obs at {image_size}x{image_size} "
                f"on {dev}{' (one thread)' if dev == 'cpu' else ''}"
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None):
    p = argparse.ArgumentParser(
        description="PTR data: convert Bridge-format out.npy trees, inspect, benchmark."
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser(
        "convert", help="convert (or reuse) the store of a Bridge tree, task folder or out.npy"
    )
    c.add_argument("src")
    c.add_argument(
        "--out", default=None, help="store folder (default: <src root>/.ptr_store/<options key>)"
    )
    c.add_argument(
        "--image_size", type=int, default=None, help="resize to this square size (default: keep)"
    )
    c.add_argument(
        "--camera",
        default="images0",
        help="images0 | images1 | ... | all (each camera a trajectory)",
    )
    c.add_argument(
        "--include", nargs="*", default=[], help="keep files whose path contains any of these"
    )
    c.add_argument(
        "--exclude", nargs="*", default=[], help="drop files whose path contains any of these"
    )
    c.add_argument("--aliases", default=None, help="JSON file mapping task name -> task name")
    c.add_argument(
        "--skip_bad", action="store_true", help="skip bad trajectories / files and report the count"
    )
    sub.add_parser(
        "info", help="tasks, transitions, trajectory lengths, action bounds"
    ).add_argument("store")
    b = sub.add_parser("bench", help="conversion, sampling and augmentation figures")
    b.add_argument("--image_size", type=int, default=128)
    args = p.parse_args(argv)
    try:
        {
            "convert": lambda: load_store(
                args.src,
                args.out,
                args.image_size,
                args.camera,
                args.include,
                args.exclude,
                args.aliases,
                args.skip_bad,
            ),
            "info": lambda: info(args.store),
            "bench": lambda: bench(image_size=args.image_size),
        }[args.cmd]()
    except (
        ValueError,
        OSError,
    ) as e:  # BridgeFormatError is a ValueError: its message names file and field
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
