"""lerobot.py: LeRobot datasets (format v2.0, v2.1 and v3.0) as Bridge trajectories (issue 12).

A LeRobot dataset folder holds `meta/info.json` (codebase_version, fps, features, path templates),
frame tables `data/**/*.parquet` (one row per frame: observation.state, action, episode_index,
frame_index, timestamp, task_index) and, for cameras of dtype "video", `videos/**/*.mp4`:
- v2.0 / v2.1: one parquet file and one mp4 per camera for each episode,
  `data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet`; tasks in `meta/tasks.jsonl`.
- v3.0: many episodes per file, `data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet`,
  and one mp4 per camera and file that concatenates the episodes; `meta/episodes/**/*.parquet`
  says where each episode starts (videos/<camera>/from_timestamp); tasks in `meta/tasks.parquet`.
  Its default codec is AV1.
Cameras of dtype "image" are PNG / JPEG bytes inside the table. A LeRobot episode of T frames pairs
observation t with action t, so it becomes a Bridge trajectory (SPEC section 5) of T - 1
transitions; its task is its first frame's entry in the task table.

Imports from the project only the leaves fileio.py (the Bridge format, FormatError) and cli.py.
pyarrow and PyAV are imported by the functions that need them. The writers at the end make fixtures
for the tests and scripts/bench_formats.py (throughput and peak memory against the numpy reader).
"""

import glob
import io
import json
import os

import numpy as np
from PIL import Image

from cli import ExpectedError
from fileio import FormatError, atomic_write_text, bridge_trajectory, choose_camera

VERSIONS = ("v2.0", "v2.1", "v3.0")
STATE_KEY = "observation.state"
ACTION_KEY = "action"
CHUNKS_SIZE = 1000  # files per chunk folder, LeRobot's default


class MissingPackageError(ExpectedError, ImportError):
    """An optional package this reader needs is not installed: the message names the pip command."""


def _require(module):
    """Import an optional package, or say which pip command installs it."""
    package = module.split(".")[0]
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise MissingPackageError(
            f"reading LeRobot datasets needs {package}: pip install {package}"
        ) from None


# ---------------------------------------------------------------- the dataset folder
def is_lerobot(folder):
    return os.path.isfile(os.path.join(folder, "meta", "info.json"))


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise FormatError(path, None, "<file>", "a JSON file", f"unreadable ({e})") from None


def _read_jsonl(path):
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as e:
        raise FormatError(
            path, None, "<file>", "one JSON object a line", f"unreadable ({e})"
        ) from None


class Dataset:
    """The metadata of one LeRobot dataset: version, cameras, the task table, and (v3.0) where each
    episode's frames lie in the concatenated videos. Frames are read by read_data_file."""

    def __init__(self, folder):
        self.folder = os.path.abspath(folder)
        info_path = os.path.join(self.folder, "meta", "info.json")
        self.info = _read_json(info_path)
        self.version = self.info.get("codebase_version")
        if self.version not in VERSIONS:
            raise FormatError(
                info_path, None, "codebase_version", f"one of {VERSIONS}", repr(self.version)
            )
        features = self.info.get("features", {})
        for key in (STATE_KEY, ACTION_KEY):
            if list(features.get(key, {}).get("shape", [])) != [7]:
                raise FormatError(
                    info_path, None, f"features.{key}", "a feature of shape [7]", features.get(key)
                )
        self.cameras = [k for k, f in features.items() if f.get("dtype") in ("video", "image")]
        if not self.cameras:
            raise FormatError(info_path, None, "features", "a camera (dtype video or image)")
        self.fps = float(self.info.get("fps", 30))
        self.tasks = self._read_tasks()
        self.episodes = self._read_episodes() if self.version == "v3.0" else {}

    def _read_tasks(self):
        if self.version != "v3.0":
            path = os.path.join(self.folder, "meta", "tasks.jsonl")
            rows = _read_jsonl(path)
            if not all(isinstance(r, dict) and {"task_index", "task"} <= set(r) for r in rows):
                raise FormatError(path, None, "<line>", "objects with task_index and task")
            return {int(r["task_index"]): r["task"] for r in rows}
        path = os.path.join(self.folder, "meta", "tasks.parquet")
        table = _read_parquet(path)
        # pandas writes the task strings as the frame's index: a "task" column, or
        # an unnamed index column
        index = json.loads((table.schema.metadata or {}).get(b"pandas", b"{}")).get("index_columns")
        names = [
            c for c in ["task", *(index or []), "__index_level_0__"] if c in table.column_names
        ]
        if not names or "task_index" not in table.column_names:
            raise FormatError(path, None, "task", "columns task and task_index", table.column_names)
        tasks, ids = table.column(names[0]).to_pylist(), table.column("task_index").to_pylist()
        return dict(zip(map(int, ids), tasks))

    def _read_episodes(self):
        """v3.0: {episode_index: row of meta/episodes} with the video file and
        from_timestamp per camera."""
        columns = ["episode_index"]
        for cam in self.cameras:
            columns += [
                f"videos/{cam}/{c}" for c in ("chunk_index", "file_index", "from_timestamp")
            ]
        episodes = {}
        paths = sorted(
            glob.glob(
                os.path.join(self.folder, "meta", "episodes", "**", "*.parquet"), recursive=True
            )
        )
        for path in paths:  # only these columns: the rows also hold every feature's statistics
            wanted = [c for c in columns if c in _column_names(path)]
            for row in _read_parquet(path, wanted).to_pylist():
                episodes[row["episode_index"]] = row
        return episodes

    def data_files(self):
        """Every frame table of the dataset, in order (the sources a conversion streams through)."""
        pattern = os.path.join(self.folder, "data", "**", "*.parquet")
        return sorted(glob.glob(pattern, recursive=True))

    def video_path(self, camera, episode):
        """(the mp4 holding this episode's frames of `camera`, the time in it where
        the episode starts)."""
        template = self.info.get("video_path")
        if self.version != "v3.0":
            chunk = episode // int(self.info.get("chunks_size", CHUNKS_SIZE))
            rel = template.format(episode_chunk=chunk, video_key=camera, episode_index=episode)
            return os.path.join(self.folder, rel), 0.0
        row = self.episodes.get(episode)
        meta = os.path.join(self.folder, "meta", "episodes")
        if row is None or f"videos/{camera}/from_timestamp" not in row:
            raise FormatError(meta, episode, f"videos/{camera}/from_timestamp", "a row per episode")
        rel = template.format(
            video_key=camera,
            chunk_index=row[f"videos/{camera}/chunk_index"],
            file_index=row[f"videos/{camera}/file_index"],
        )
        return os.path.join(self.folder, rel), float(row[f"videos/{camera}/from_timestamp"])


def _column_names(path):
    try:
        return _require("pyarrow.parquet").read_schema(path).names
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise FormatError(path, None, "<file>", "a parquet table", f"unreadable ({e})") from None


def _read_parquet(path, columns=None):
    pq = _require("pyarrow.parquet")
    try:
        return pq.read_table(path, columns=columns)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise FormatError(path, None, "<file>", "a parquet table", f"unreadable ({e})") from None


# ---------------------------------------------------------------- frames
def decode_video(path, start, n, fps, episode):
    """n frames uint8 (n, H, W, 3) of an mp4 from time `start` (seconds) on: seek to the key frame
    before it, decode, keep the frames from start (within half a frame) on."""
    av = _require("av")
    frames = []
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            if start > 0:
                container.seek(int(start / stream.time_base), stream=stream, backward=True)
            for frame in container.decode(stream):
                if frame.time is not None and frame.time < start - 0.5 / fps:
                    continue
                frames.append(frame.to_ndarray(format="rgb24"))
                if len(frames) == n:
                    break
    except (OSError, av.error.FFmpegError, IndexError) as e:  # IndexError: no video stream
        raise FormatError(
            path, episode, "<video>", "a decodable mp4", f"{type(e).__name__}: {e}"
        ) from None
    if len(frames) < n:
        raise FormatError(
            path, episode, "<video>", f"{n} frames from {start:.3f} s on", len(frames)
        )
    return np.stack(frames)


def _column(table, key, path, episode, n):
    """A (n, 7) float32 array from a list column (one list of 7 per frame)."""
    values = table.column(key).combine_chunks().flatten().to_numpy(zero_copy_only=False)
    if values.size != 7 * n:
        raise FormatError(path, episode, key, f"{n} x 7 numbers (one list per frame)", values.size)
    return values.astype(np.float32).reshape(n, 7)


def _table_images(table, key, path, episode):
    """A camera of dtype image: PNG / JPEG bytes in a struct column {bytes, path}."""
    frames = []
    for t, cell in enumerate(table.column(key).to_pylist()):
        try:
            with Image.open(io.BytesIO(cell["bytes"])) as img:
                frames.append(np.asarray(img.convert("RGB")))
        except (OSError, ValueError, TypeError) as e:
            raise FormatError(
                path, episode, f"{key}[{t}]", "a PNG or JPEG image", f"undecodable ({e})"
            ) from None
    return np.stack(frames)


def read_data_file(dataset, path, camera="images0"):
    """Yield (episode index, task, source, load) for each episode of one frame table, streaming:
    load() decodes its frames into a Bridge trajectory dict. source (what --include / --exclude
    match) is the task.
    camera: "imagesN" (the N-th camera of info.json), a camera's feature name or its last part."""
    key = choose_camera(dataset.cameras, camera, os.path.join(dataset.folder, "meta", "info.json"))
    image_column = [key] if dataset.info["features"][key]["dtype"] == "image" else []
    columns = ["episode_index", "task_index", STATE_KEY, ACTION_KEY, *image_column]
    names = _column_names(path)
    missing = [c for c in columns if c not in names]
    if missing:
        raise FormatError(path, None, missing[0], "a column of the frame table", "nothing")
    table = _read_parquet(path, columns)  # only these: other cameras may be images in the table
    episode_of_row = table.column("episode_index").to_numpy()
    starts = np.flatnonzero(np.r_[True, episode_of_row[1:] != episode_of_row[:-1]])
    for start, stop in zip(starts, np.r_[starts[1:], len(episode_of_row)]):
        rows, episode = table.slice(start, stop - start), int(episode_of_row[start])
        task = dataset.tasks.get(rows.column("task_index")[0].as_py())

        def load(rows=rows, episode=episode, task=task):
            n = rows.num_rows
            if task is None:
                raise FormatError(path, episode, "task_index", f"one of {sorted(dataset.tasks)}")
            if n < 2:
                raise FormatError(
                    path, episode, "<frames>", "at least 2 frames (one transition)", n
                )
            states = _column(rows, STATE_KEY, path, episode, n)
            actions = _column(rows, ACTION_KEY, path, episode, n)
            if image_column:
                frames = _table_images(rows, key, path, episode)
            else:
                video, start = dataset.video_path(key, episode)
                frames = decode_video(video, start, n, dataset.fps, episode)
            observations = [{"image": f, "state": s} for f, s in zip(frames, states)]
            return bridge_trajectory(observations, actions[:-1])

        yield episode, task, task, load


# ---------------------------------------------------------------- writing: fixtures and the bench
def write_video(path, frames, fps, codec):
    """uint8 (n, H, W, 3) frames -> an mp4 (yuv420p); codec "libsvtav1" (AV1, LeRobot
    v3.0's default) or "h264"."""
    av = _require("av")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with av.open(path, "w") as container:
        stream = container.add_stream(codec, rate=int(fps), options={"crf": "18"})
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(stream.encode())


def _features(image_shape, num_cameras, video):
    camera = {
        "dtype": "video" if video else "image",
        "shape": list(image_shape),
        "names": ["height", "width", "channels"],
    }
    vector = {"dtype": "float32", "shape": [7], "names": None}
    scalar = {"dtype": "int64", "shape": [1], "names": None}
    return {
        **{f"observation.images.image_{c}": camera for c in range(num_cameras)},
        STATE_KEY: vector,
        ACTION_KEY: vector,
        "timestamp": {"dtype": "float32", "shape": [1], "names": None},
        **{k: scalar for k in ("frame_index", "episode_index", "index", "task_index")},
    }


def write_lerobot(
    folder, episodes, version="v3.0", fps=10, episodes_per_file=2, codec=None, video=True
):
    """A LeRobot dataset folder from [(Bridge trajectory with cameras images0.., task)]: each
    episode of T actions is T frames (observations[t], actions[t]), the final next observation
    dropped. v2.x: one table and one mp4 per camera for each episode; v3.0: episodes_per_file
    episodes per table and mp4. video=False: cameras of dtype image, PNG bytes in the table."""
    pa = _require("pyarrow")
    pq = _require("pyarrow.parquet")
    obs0 = episodes[0][0]["observations"][0]
    cams = sorted(k for k in obs0 if k.startswith("images"))
    task_names = list(dict.fromkeys(task for _, task in episodes))
    v3 = version == "v3.0"
    codec = codec or ("libsvtav1" if v3 else "h264")
    info = {
        "codebase_version": version,
        "robot_type": "widowx",
        "fps": fps,
        "chunks_size": CHUNKS_SIZE,
        "total_episodes": len(episodes),
        "total_tasks": len(task_names),
        "splits": {"train": f"0:{len(episodes)}"},
        "features": _features(obs0["images0"].shape, len(cams), video),
    }
    if v3:
        info["data_path"] = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
        info["video_path"] = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
    else:
        info["data_path"] = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
        info["video_path"] = (
            "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
        )
    per_file = episodes_per_file if v3 else 1
    groups = [range(s, min(s + per_file, len(episodes))) for s in range(0, len(episodes), per_file)]
    episode_rows, index = [], 0
    for file_index, group in enumerate(groups):
        columns = [STATE_KEY, ACTION_KEY, "timestamp", "frame_index", "episode_index", "index"]
        if not video:
            columns += [f"observation.images.image_{c}" for c in range(len(cams))]
        table = {k: [] for k in [*columns, "task_index"]}
        videos = {c: [] for c in cams}
        time = 0.0
        for e in group:
            traj, task = episodes[e]
            T = len(traj["actions"])
            row = {"episode_index": e, "tasks": [task], "length": T, "data/chunk_index": 0}
            row["data/file_index"] = file_index
            for c, cam in enumerate(cams):
                if not video:
                    pngs = [{"bytes": _png(o[cam]), "path": None} for o in traj["observations"]]
                    table[f"observation.images.image_{c}"] += pngs
                    continue
                videos[cam].extend(o[cam] for o in traj["observations"])
                key = f"videos/observation.images.image_{c}"
                row |= {f"{key}/chunk_index": 0, f"{key}/file_index": file_index}
                row |= {f"{key}/from_timestamp": time, f"{key}/to_timestamp": time + T / fps}
            episode_rows.append(row)
            table[STATE_KEY] += [o["state"].tolist() for o in traj["observations"]]
            table[ACTION_KEY] += np.asarray(traj["actions"], np.float32).tolist()
            table["timestamp"] += (np.arange(T) / fps).tolist()
            table["frame_index"] += list(range(T))
            table["episode_index"] += [e] * T
            table["index"] += list(range(index, index + T))
            table["task_index"] += [task_names.index(task)] * T
            index, time = index + T, time + T / fps
        if v3:
            names = {"chunk_index": 0, "file_index": file_index}
        else:
            names = {"episode_chunk": 0, "episode_index": group[0]}
        pq.write_table(pa.table(table), _mkdirs(folder, info["data_path"].format(**names)))
        for c, cam in enumerate(cams if video else []):
            rel = info["video_path"].format(video_key=f"observation.images.image_{c}", **names)
            write_video(os.path.join(folder, rel), np.stack(videos[cam]), fps, codec)
    info["total_frames"] = index
    atomic_write_text(json.dumps(info, indent=4), os.path.join(folder, "meta", "info.json"))
    if v3:
        pq.write_table(
            pa.Table.from_pylist(episode_rows),
            _mkdirs(folder, "meta/episodes/chunk-000/file-000.parquet"),
        )
        # as pandas writes LeRobot's task frame: the task strings are its index
        pandas = {"index_columns": ["task"], "columns": []}
        tasks = pa.table({"task_index": range(len(task_names)), "task": task_names})
        tasks = tasks.replace_schema_metadata({"pandas": json.dumps(pandas)})
        pq.write_table(tasks, os.path.join(folder, "meta", "tasks.parquet"))
    else:
        lines = [{"task_index": k, "task": t} for k, t in enumerate(task_names)]
        text = "".join(json.dumps(r) + "\n" for r in lines)
        atomic_write_text(text, os.path.join(folder, "meta", "tasks.jsonl"))
        lines = [{k: r[k] for k in ("episode_index", "tasks", "length")} for r in episode_rows]
        text = "".join(json.dumps(r) + "\n" for r in lines)
        atomic_write_text(text, os.path.join(folder, "meta", "episodes.jsonl"))


def _png(image):
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    return buf.getvalue()


def _mkdirs(folder, rel):
    path = os.path.join(folder, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path
