"""store.py: a converted store on disk: its format and its reader (Store).

data.py writes a store once from the Bridge-format sources (SPEC section 5), streaming and atomic,
and opens it here (load_store); this file is what every later reader needs of it: batches.py's
samplers read a Store's arrays and index, scripts open one by path, and nothing here unpickles.

A store (a folder, memory-mapped, allow_pickle=False):
  images.npy uint8 (F, H, W, 3) and states.npy float32 (F, 7), one row per frame: a trajectory of T
  steps owns T + 1 consecutive frames, so transition g of trajectory k has its obs at frame g + k
  and its next obs at frame g + k + 1;
  actions.npy float32 (N, 7, raw units) and terminals.npy float32 (N,), one row per transition;
  trajectories.npz: task, split (0 train / 1 val), length, source (file number), index in the file,
  success (0: a failed attempt, whose rewards have no positive entry; bridge.trajectory_success);
  meta.json, written last: options, task names, action bounds, counts, the sources' sizes, mtimes.
Opening one checks every file against its meta.json; a damaged file is a StoreError that names it
and the `python data.py convert` line that rebuilds the store (convert_command).
Level 2 (SPEC section 2): of the project it imports bridge.py and cli.py. No torch.
"""

import json
import math
import os
import shlex

import numpy as np

from bridge import describe, image_hw
from cli import ExpectedError

# The store layout's version (2: trajectories.npz keeps each trajectory's success). It is one of the
# conversion options, so part of a store's key: a store of another version is converted again on
# its next use, and one given by path is refused by its meta.json check with the rebuild command.
FORMAT_VERSION = 2
SPLITS = ("train", "val")  # split codes 0 and 1
STORE_ARRAYS = ("images", "states", "actions", "terminals")
TRAJECTORY_FIELDS = ("task", "split", "length", "source", "index", "success")  # trajectories.npz
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


class StoreError(ExpectedError, ValueError):
    """A converted store whose files disagree with its meta.json (truncated, deleted or replaced
    files): names the damaged file and the command that rebuilds the store."""

    def __init__(self, store, file, problem, rebuild):
        self.file = file
        self.problem = problem
        super().__init__(f"{os.path.join(store, file)}: {problem}; rebuild the store: {rebuild}")


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
        self.traj_success = index["success"].astype(bool)  # False: a failed attempt
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
        if not np.isin(index["success"], (0, 1)).all():
            raise self._damaged(file, "'success': expected 0 (a failed attempt) or 1")
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

    def in_split(self, split):
        """A bool mask over the trajectories: those of `split` ("train", "val"; None: all). What
        num_transitions() and trajectory_ids() count, and what a sampler draws from."""
        if split not in (None, *SPLITS):
            raise ValueError(f"split: expected one of {SPLITS} or None, got {split!r}")
        if split is None:
            return np.ones(len(self.traj_length), bool)
        return self.traj_split == SPLITS.index(split)

    def num_transitions(self, split=None):
        return int(self.traj_length[self.in_split(split)].sum())

    def trajectory_ids(self, split=None):
        return np.flatnonzero(self.in_split(split))

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
