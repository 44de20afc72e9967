"""PTR data: Bridge-format demos -> a checked, memory-mapped store (batches.py makes batches of it).

PTR (Kumar et al., RSS 2023) pre-trains on Bridge (Sec. V, SPEC section 5): ~80 tasks of
pickled numpy trajectories, one folder per task. Reading those once and memory-mapping the result
keeps pickle out of training.

The path of the data, top to bottom in this file:
  find_sources() lists the source files of a tree (or an RLDS / LeRobot dataset folder) ->
  _episodes() yields each file's trajectories (bridge.py's read_source() for out.npy; rlds.py,
  lerobot.py) -> bridge.py's parse_trajectory() checks one -> convert() streams them into a store
  -> store.py's Store opens it
  (checked against its meta.json). batches.py takes it from there: Sampler, MixedSampler and
  ReplayBuffer relabel and make batches, augment() shifts and jitters them.
load_store() ties this file together and caches: a store is rebuilt when its sources change.

The store's layout (its arrays, trajectories.npz, meta.json) and its reader are store.py's; this
file writes it: images.npy streams to disk trajectory by trajectory, the rest is gathered in
memory, and meta.json is written last, all in a temporary folder renamed into place as a whole.
torch is imported inside the functions that make tensors: `python data.py convert` never loads it
(~500 MB resident, 2.5 s).
"""

import argparse
import dataclasses
import hashlib
import json
import os
import re
import shutil
import struct
import sys
import time
import zlib
from collections.abc import Sequence

import numpy as np

import lerobot
import rlds
from bridge import (
    SOURCE_NAME,
    BridgeFormatError,
    FormatError,
    describe,
    image_hw,
    parse_trajectory,
    read_source,
    resize_images,
    trajectory_success,
)
from cli import add_dataclass_args, dataclass_from_args, run_cli
from fileio import pid_alive
from store import (
    FORMAT_VERSION,
    SPLITS,
    Store,
    StoreError,
    convert_command,
    is_store,
    read_meta,
)

# The default store location, under the source root; the tree scan skips dot-folders.
STORE_DIR = ".ptr_store"
VAL_FRACTION = 0.1  # held out for a task that ships only one of train/ and val/
# A fixed .npy header size, so that the final frame count can be written over it in place.
_HEADER_BYTES = 128


# -------------------- the Bridge numpy format (SPEC section 5)
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
    trajectory's size, which every later one must have), and whether it succeeded
    (trajectory_success). BridgeFormatError for a bad trajectory."""
    images, states, actions, terminals = parse_trajectory(traj, path, index, options["camera"])
    success = trajectory_success(traj, path, index)
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
    return images, states, actions, terminals, success


def _write_trajectories(images_file, sources, root, options, skip):
    """Stream every valid trajectory's frames into images_file (after its header placeholder).
    Returns (rows: (task name, source file, index in file, length, success) per trajectory,
    {name: per-step arrays}, image (H, W)). States, actions and terminals (~0.1 % of the bytes) are
    gathered in memory. skip(error) notes a bad trajectory or file, or raises the error."""
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
                    images, states, actions, terminals, success = _checked_frames(
                        load(), path, index, checks, size
                    )
                except FormatError as e:
                    skip(e)
                    continue
                size = next(iter(images.values())).shape[1:3]  # the first one fixes it
                name = aliases.get(traj_task, traj_task)
                for frames in images.values():  # camera="all": each camera a trajectory of its own
                    images_file.write(np.ascontiguousarray(frames).data)
                    arrays["states"].append(states)
                    arrays["actions"].append(actions)
                    arrays["terminals"].append(terminals)
                    rows.append((name, source, index, len(actions), success))
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
        task, source, index, length, success = np.array(rows, np.int64).T
        np.savez(
            os.path.join(tmp, "trajectories.npz"),
            task=task,
            source=source,
            index=index,
            length=length,
            split=_assign_splits(task, source, index, sources, task_names),
            success=success.astype(np.int8),
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


@dataclasses.dataclass(frozen=True)
class DataOptions:
    """Which data a run reads and how its store is built (load_store's options): the flags of
    `data.py convert` and of every training phase (add_data_args; the trailing comments are
    their help)."""

    image_size: int | None = None  # resize images to this square size (None: the data's own)
    camera: str = "images0"  # imagesN | all (each a trajectory) | a camera name (RLDS, LeRobot)
    include: Sequence[str] = ()  # keep paths with one of these (RLDS: file_path, LeRobot: task)
    exclude: Sequence[str] = ()  # drop paths with one of these (the same)
    aliases: str | None = None  # a JSON file mapping task names to merged names
    skip_bad: bool = False  # skip bad trajectories and files (counted) instead of stopping


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
        f"{store.meta['skipped']} skipped, {(~store.traj_success).sum()} failed attempts; "
        f"length min {lengths.min()}, mean {lengths.mean():.1f}, max {lengths.max()}"
    )
    print("  id  train   val  transitions  task")
    for k, name in enumerate(store.task_names):
        in_task = store.traj_task == k
        train = (in_task & (store.traj_split == 0)).sum()
        val = (in_task & (store.traj_split == 1)).sum()
        print(f"{k:4} {train:6} {val:5} {lengths[in_task].sum():12}  {name}")
    print(f"action low  {np.round(store.action_low, 4)}")
    print(f"action high {np.round(store.action_high, 4)}")


def add_data_args(parser):
    """The flags of DataOptions (`data.py convert`, train.py, finetune.py, online.py finetune);
    --skip_bad is a plain switch."""
    add_dataclass_args(parser, DataOptions, switches=("skip_bad",))


def main(argv=None):
    p = argparse.ArgumentParser(
        description="PTR data: convert Bridge out.npy trees, RLDS and LeRobot datasets; inspect "
        "(benchmark: scripts/bench_data.py)."
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
        "--task_source",
        choices=rlds.TASK_SOURCES,
        default="path",
        help="RLDS: task from the episode's source out.npy path or its language instruction",
    )
    add_data_args(convert_cmd)
    info_cmd = sub.add_parser("info", help="tasks, transitions, trajectory lengths, action bounds")
    info_cmd.add_argument("store")
    args = p.parse_args(argv)
    if args.cmd == "convert":
        options = dataclass_from_args(DataOptions, args)
        load_store(
            args.src,
            args.out,
            **dataclasses.asdict(options),
            repair=True,
            task_source=args.task_source,
        )
    else:
        try:
            info(args.store)
            sys.stdout.flush()  # a pipe's buffer goes out here, where a closed pipe is caught
        except BrokenPipeError:
            _stdout_closed()


def _stdout_closed():
    """The reader of stdout went away (`python data.py info STORE | head -1`): end quietly, as other
    command-line tools do. stdout is pointed at /dev/null, so that the exit's flush of what is left
    in its buffer does not fail again."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


if __name__ == "__main__":
    run_cli(main)
