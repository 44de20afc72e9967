"""lerobot.py: LeRobot datasets (format v2.0, v2.1 and v3.0) as Bridge trajectories.

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
transitions; its task is its first frame's entry in the task table. Rows and images are paired by
time, and every link of that pairing is checked (see "frames" below): a disagreement is an error
naming the file, the episode and the field, never a state stored beside another step's image.

Imports from the project bridge.py (the Bridge format, FormatError, choose_camera), fileio.py
(atomic writes) and cli.py. pyarrow and PyAV are imported by the functions that need them. The
writers at the end make fixtures for the tests and scripts/bench_formats.py (throughput and peak
memory against the numpy reader).
"""

import glob
import io
import json
import math
import os

import numpy as np
from PIL import Image

from cli import MissingPackageError
from fileio import atomic_write_text
from bridge import FormatError, bridge_trajectory, choose_camera

VERSIONS = ("v2.0", "v2.1", "v3.0")
STATE_KEY = "observation.state"
ACTION_KEY = "action"
CHUNKS_SIZE = 1000  # files per chunk folder, LeRobot's default
# How far (seconds) a frame's time may be from its row's: LeRobot's own loader's tolerance_s, so
# that what LeRobot reads is read here too, and a frame one step off never is
TIME_TOLERANCE = 1e-4


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
        self.episodes_file = os.path.join(
            self.folder, "meta", "episodes" if self.version == "v3.0" else "episodes.jsonl"
        )
        self.episodes = self._read_episodes()

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
        """{episode_index: its row of the episode table}: its length and (v3.0) per camera the
        video file and the span [from_timestamp, to_timestamp) of its frames in it."""
        if self.version != "v3.0":
            rows = _read_jsonl(self.episodes_file)
            if not all(isinstance(r, dict) and {"episode_index", "length"} <= set(r) for r in rows):
                raise FormatError(
                    self.episodes_file, None, "<line>", "objects with episode_index and length"
                )
            return {int(r["episode_index"]): r for r in rows}
        columns = ["episode_index", "length"]
        for cam in self.cameras:
            columns += [
                f"videos/{cam}/{c}"
                for c in ("chunk_index", "file_index", "from_timestamp", "to_timestamp")
            ]
        episodes = {}
        pattern = os.path.join(self.episodes_file, "**", "*.parquet")
        for path in sorted(glob.glob(pattern, recursive=True)):
            # only these columns: the rows also hold every feature's statistics
            wanted = [c for c in columns if c in _column_names(path)]
            for row in _read_parquet(path, wanted).to_pylist():
                episodes[row["episode_index"]] = row
        return episodes

    def data_files(self):
        """Every frame table of the dataset, in order (the sources a conversion streams through)."""
        pattern = os.path.join(self.folder, "data", "**", "*.parquet")
        return sorted(glob.glob(pattern, recursive=True))

    def video_span(self, camera, episode):
        """(the mp4 holding this episode's frames of `camera`, the span [start, stop) of its frames
        in it, seconds): v2.x one mp4 per episode; v3.0 from_timestamp, to_timestamp."""
        template = self.info.get("video_path")
        if self.version != "v3.0":
            chunk = episode // int(self.info.get("chunks_size", CHUNKS_SIZE))
            rel = template.format(episode_chunk=chunk, video_key=camera, episode_index=episode)
            return os.path.join(self.folder, rel), 0.0, math.inf
        row = self.episodes.get(episode, {})
        key = f"videos/{camera}"
        for field in ("from_timestamp", "to_timestamp"):
            if f"{key}/{field}" not in row:
                raise FormatError(
                    self.episodes_file, episode, f"{key}/{field}", "a row per episode"
                )
        rel = template.format(
            video_key=camera,
            chunk_index=row[f"{key}/chunk_index"],
            file_index=row[f"{key}/file_index"],
        )
        span = float(row[f"{key}/from_timestamp"]), float(row[f"{key}/to_timestamp"])
        return os.path.join(self.folder, rel), *span


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
# An episode's rows are paired with the images by time: row t with the frame of the video at the
# episode's start + the row's timestamp. A missing, extra or misplaced row, or an fps that is not
# the video's, would store states and actions beside another step's image, so every link of the
# chain is checked: frame_index, the episode table's length, timestamps one 1 / fps apart, the
# episode's span of the video, and each decoded frame's own time.
def decode_video(path, times, episode):
    """The frames uint8 (n, H, W, 3) of an mp4 at `times` (n ascending seconds), each of which must
    be a frame's time (within TIME_TOLERANCE): seek to the key frame before the first, decode."""
    av = _require("av")
    frames = []
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            for want, frame in zip(times, _frames_from(container, stream, times[0])):
                if frame.time is None or abs(frame.time - want) > TIME_TOLERANCE:
                    expected = f"frame {len(frames)} at {want:.4f} s (its row's time)"
                    raise FormatError(path, episode, "<video>", expected, _when(frame, stream))
                frames.append(frame.to_ndarray(format="rgb24"))
    except (OSError, av.error.FFmpegError, IndexError) as e:  # IndexError: no video stream
        raise FormatError(
            path, episode, "<video>", "a decodable mp4", f"{type(e).__name__}: {e}"
        ) from None
    if len(frames) < len(times):
        raise FormatError(
            path, episode, "<video>", f"{len(times)} frames from {times[0]:.3f} s on", len(frames)
        )
    return np.stack(frames)


def _frames_from(container, stream, start):
    """The decoded frames of a stream from time `start` (seconds) on: seek to the key frame before
    it, and pass over the frames before it."""
    if start > 0:
        container.seek(int(start / stream.time_base), stream=stream, backward=True)
    for frame in container.decode(stream):
        if frame.time is None or frame.time > start - TIME_TOLERANCE:
            yield frame


def _when(frame, stream):
    """Where a decoded frame lies in its video, for an error message."""
    if frame.time is None:
        return "a frame without a time"
    return f"a frame at {frame.time:.4f} s (the video runs at {stream.average_rate} fps)"


def _episode_runs(episode_of_row):
    """{episode index: [(first row, end row)] of each run of its rows}, in the order the episodes
    first appear. An episode's rows come in one run; a second is an error when it is loaded."""
    starts = np.flatnonzero(np.r_[True, episode_of_row[1:] != episode_of_row[:-1]])
    runs = {}
    for start, stop in zip(starts, np.r_[starts[1:], len(episode_of_row)]):
        runs.setdefault(int(episode_of_row[start]), []).append((int(start), int(stop)))
    return runs


def _check_one_run(runs, path, episode):
    """An episode's rows split in two places are an error (read as two episodes, each would be
    paired with the images of the first frames of its video)."""
    if len(runs) > 1:
        rows = " and ".join(f"{start}..{stop - 1}" for start, stop in runs)
        raise FormatError(path, episode, "episode_index", "its rows in one run", f"rows {rows}")


def _check_rows(dataset, rows, path, episode):
    """The rows of an episode must be its frames 0..n-1 in order, as many as its length in the
    episode table, their timestamps 1 / fps apart. Returns the timestamps (seconds)."""
    n = rows.num_rows
    frame_index = rows.column("frame_index").to_numpy()
    wrong = np.flatnonzero(frame_index != np.arange(n))
    if len(wrong):
        t = wrong[0]
        got = f"{frame_index[t]} at row {t}"
        raise FormatError(path, episode, "frame_index", f"0..{n - 1} in order", got)
    length = dataset.episodes.get(episode, {}).get("length")
    if length is None:
        raise FormatError(dataset.episodes_file, episode, "length", "a row per episode")
    if length != n:
        raise FormatError(
            path, episode, "<rows>", f"{length} (its length in {dataset.episodes_file})", n
        )
    timestamps = rows.column("timestamp").to_numpy().astype(np.float64)
    off = np.flatnonzero(np.abs(np.diff(timestamps) - 1 / dataset.fps) > TIME_TOLERANCE)
    if len(off):
        t = off[0] + 1
        expected = f"steps of 1 / fps = {1 / dataset.fps:.4f} s (info.json: {dataset.fps:g} fps)"
        got = f"{timestamps[t] - timestamps[t - 1]:.4f} s before frame {t}"
        raise FormatError(path, episode, "timestamp", expected, got)
    return timestamps


def _video_frames(dataset, camera, episode, timestamps, path):
    """The frames of an episode's rows: at its start in the video + their timestamps, each inside
    the episode's span of the video (v3.0: the next episode's frames follow it in the same mp4)."""
    video, start, stop = dataset.video_span(camera, episode)
    if timestamps[0] < -TIME_TOLERANCE or start + timestamps[-1] > stop - TIME_TOLERANCE:
        expected = (
            f"times in [0, {stop - start:.4f}) s, the episode's span in its video "
            f"(to_timestamp - from_timestamp in {dataset.episodes_file})"
        )
        got = f"{timestamps[0]:.4f}..{timestamps[-1]:.4f} s"
        raise FormatError(path, episode, "timestamp", expected, got)
    return decode_video(video, start + timestamps, episode)


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
    load() checks its rows against its frames (see above) and decodes them into a Bridge trajectory
    dict. source (what --include / --exclude match) is the task.
    camera: "imagesN" (the N-th camera of info.json), a camera's feature name or its last part."""
    key = choose_camera(dataset.cameras, camera, os.path.join(dataset.folder, "meta", "info.json"))
    image_column = [key] if dataset.info["features"][key]["dtype"] == "image" else []
    columns = ["episode_index", "frame_index", "timestamp", "task_index", STATE_KEY, ACTION_KEY]
    columns += image_column
    names = _column_names(path)
    missing = [c for c in columns if c not in names]
    if missing:
        raise FormatError(path, None, missing[0], "a column of the frame table", "nothing")
    table = _read_parquet(path, columns)  # only these: other cameras may be images in the table
    for episode, runs in _episode_runs(table.column("episode_index").to_numpy()).items():
        start, stop = runs[0]
        rows = table.slice(start, stop - start)
        task = dataset.tasks.get(rows.column("task_index")[0].as_py())

        def load(rows=rows, episode=episode, task=task, runs=runs):
            _check_one_run(runs, path, episode)
            if task is None:
                raise FormatError(path, episode, "task_index", f"one of {sorted(dataset.tasks)}")
            timestamps = _check_rows(dataset, rows, path, episode)
            n = rows.num_rows
            if n < 2:
                raise FormatError(
                    path, episode, "<frames>", "at least 2 frames (one transition)", n
                )
            states = _column(rows, STATE_KEY, path, episode, n)
            actions = _column(rows, ACTION_KEY, path, episode, n)
            if image_column:
                frames = _table_images(rows, key, path, episode)
            else:
                frames = _video_frames(dataset, key, episode, timestamps, path)
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
