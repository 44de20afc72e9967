"""The Bridge numpy format (SPEC section 5), both ways: writing, reading and checking out.npy files.

PTR (Kumar et al., RSS 2023, Sec. V) pre-trains on Bridge: one folder per task, each holding
train/ and val/ with an out.npy, an np.save'd list of trajectory dicts (observations,
next_observations, actions, terminals; an observation holds images0.. uint8 (H, W, 3) and a
7-d state).
- Writing: bridge_trajectory() builds one trajectory dict from T + 1 observations,
  write_bridge_file() stores a list of them as the release does (np.save of an object array,
  atomically). Every producer of data (sim collection, robot recording, the readers of other
  formats, synthetic test trees) goes through these two; synthetic_trajectory() makes random ones.
- Reading: read_bridge_file() is the only place that unpickles; parse_trajectory() checks one
  trajectory and names the file, the trajectory, the field, what was expected and what was found;
  trajectory_success() reads whether it succeeded from its optional `rewards`.
- Other formats (rlds.py, lerobot.py) turn their episodes into the same dicts: FormatError names
  the file, the episode and the field of their bad input, and choose_camera() maps a --camera
  choice (imagesN, the Bridge names) to one of their camera features.
data.py finds the files and converts them into a store, resizing the images with resize_image(),
which rollout.py also uses for the camera's frames.
"""

import os
import re

import numpy as np
from PIL import Image

from cli import ExpectedError
from fileio import atomic_write

SOURCE_NAME = "out.npy"  # the Bridge release's file name (SPEC section 5)


class FormatError(ValueError):
    """Bad input in a data source:
    `<file>: episode <i>: field '<field>': expected <...>, got <...>`."""

    unit = "episode"

    def __init__(self, file, episode, field, expected, got=None):
        where = f"{file}: " + ("" if episode is None else f"{self.unit} {episode}: ")
        super().__init__(
            f"{where}field '{field}': expected {expected}" + ("" if got is None else f", got {got}")
        )


class BridgeFormatError(ExpectedError, FormatError):
    """A source file that does not follow the Bridge numpy format (SPEC section 5): names the file,
    the trajectory (its index in the file), the field, what was expected and what was found."""

    unit = "trajectory"  # FormatError's message: "<file>: trajectory <i>: field ..."


# describe() and image_hw() serve data.py, store.py and batches.py too: the lowest file needing them
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
    returned as it is when it has that size already. The store's frames (data.py) and the env's
    camera images (rollout.py) both go through here: a policy sees images resized as its training
    data were."""
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


def bridge_trajectory(observations, actions, rewards=None, camera="images0"):
    """One Bridge trajectory dict from T + 1 observations {"image", "state"} and T actions.
    next_observations[t] IS observations[t + 1], so pickle stores each image once."""
    actions = np.asarray(actions, dtype=np.float32)
    if len(observations) != len(actions) + 1:
        raise ValueError(
            f"bridge.py: a trajectory of {len(actions)} actions needs {len(actions) + 1} "
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


def synthetic_trajectory(T, image_size, rng, cameras=("images0",)):
    """A Bridge-format trajectory of random images, states and actions in the release's ranges
    (tests, bench). It has several cameras per step, so it builds its dict itself
    (bridge_trajectory takes one); next_observations share their dicts with observations (the
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


def trajectory_success(traj, path, index):
    """Whether a trajectory succeeded, from its optional `rewards` (SPEC section 5): a trajectory
    whose rewards have no positive entry is a failed attempt (sim collection keeps the env's
    rewards, so a failure stays one); a trajectory without rewards counts as a success, as the
    Bridge release's demonstrations do. Call it after parse_trajectory(): rewards must then be one
    finite number per action, else a BridgeFormatError names the field."""
    if traj.get("rewards") is None:
        return True
    T = len(traj["actions"])

    def fail(field, expected, got=None):
        return BridgeFormatError(path, index, field, expected, got)

    rewards = _numbers(
        traj["rewards"], fail, "rewards", f"{T} numbers", lambda s: s == (T,), steps=True
    )
    return bool((rewards > 0).any())


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
