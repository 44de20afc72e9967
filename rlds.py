"""rlds.py: RLDS / TFDS datasets (BridgeData V2, Open X-Embodiment) read without
TensorFlow.

A TFDS dataset folder (e.g. `bridge_dataset/1.0.0/`) holds `dataset_info.json`, `features.json` and
shards `<name>-<split>.tfrecord-NNNNN-of-NNNNN`. A shard is a sequence of TFRecord records
(uint64 length, masked CRC32C of the length, the bytes, masked CRC32C of the bytes); each record is
one episode serialized as a `tf.train.Example` protobuf whose features are the dataset's features
flattened with "/": `steps/observation/image_0` (one JPEG per step), `steps/observation/state`
(T x 7 floats), `steps/action` (T x 7), `steps/is_terminal`, `steps/language_instruction`,
`episode_metadata/file_path`. Both layers are decoded here directly (the protobuf wire
format of Example / Features / Feature is three small messages); the schema comes from the
dataset's own features.json, so other Open X-Embodiment datasets with other camera names
work with a camera choice. An interrupted download is an error, not a smaller dataset: every shard
that the names' `-of-NNNNN` count must be there, holding as many records as dataset_info.json's
shardLengths list.

An RLDS episode of T steps pairs observation t with action t; the last step's action has no next
observation, so it becomes a Bridge trajectory (SPEC section 5) of T - 1 transitions over
the T observations. The task of a Bridge episode is taken from its source out.npy path
(episode_metadata/file_path) by the numpy release's rule (`task_from_file_path`), or from
its language instruction.

Imports from the project bridge.py (the Bridge format, FormatError, choose_camera) and fileio.py
(atomic writes). The writers at the end make fixtures for the tests and scripts/bench_formats.py
(throughput and peak memory against the numpy reader).
"""

import glob
import io
import json
import math
import os
import re
import struct

import numpy as np
from PIL import Image

from bridge import FormatError, bridge_trajectory, choose_camera
from fileio import atomic_write, atomic_write_text

STATE_KEY = "steps/observation/state"
ACTION_KEY = "steps/action"
TERMINAL_KEY = "steps/is_terminal"
INSTRUCTION_KEY = "steps/language_instruction"
FILE_PATH_KEY = "episode_metadata/file_path"
TASK_SOURCES = ("path", "instruction")  # where a trajectory's task name comes from
SPLITS = {"train": "train", "val": "val", "validation": "val", "test": "val"}  # TFDS split -> ours
_SHARD = re.compile(
    r"(?P<prefix>.+-(?P<split>[A-Za-z0-9_]+)\.tfrecord)-(?P<index>\d{5})-of-(?P<count>\d{5})"
)
DATASET_FILES = ("dataset_info.json", "features.json")  # what TFDS writes beside the shards
SHARD_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"  # TFDS's default shard names


# ------------------------------------------------------- CRC32C (Castagnoli), vectorized with numpy
def _crc_table():
    t = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        t = np.where(t & 1, (t >> 1) ^ np.uint32(0x82F63B78), t >> 1).astype(np.uint32)
    return t


_CRC_TABLE = _crc_table()
_BITS = np.arange(32, dtype=np.uint32)


def _apply(op, x):
    """A linear map of the 32-bit CRC register (op: the images of the 32 basis vectors)
    applied to x (n,)."""
    bits = ((x[:, None] >> _BITS) & 1).astype(bool)
    return np.bitwise_xor.reduce(np.where(bits, op, np.uint32(0)), axis=1)


def _zero_bytes_op(n):
    """The register's map over n zero bytes, by repeated squaring of the one-byte map."""
    op = np.uint32(1) << _BITS
    step = _CRC_TABLE[op & 0xFF] ^ (op >> 8)
    while n:
        if n & 1:
            op = _apply(step, op)
        step = _apply(step, step)
        n >>= 1
    return op


def crc32c(data):
    """CRC32C of bytes. The register update is linear, so the data is cut into ~sqrt(n) lanes that
    numpy runs side by side, and the lanes' registers are combined pairwise, each shifted over the
    zero bytes of the lanes after it (~120 MB/s, a Python loop does ~3). The initial 0xFFFFFFFF
    equals XOR-ing the first 4 bytes with 0xFF; leading zeros leave a zero register unchanged, so
    the front is zero-padded."""
    a = np.frombuffer(data, np.uint8)
    if len(a) < 64:
        c = 0xFFFFFFFF
        for b in a.tolist():
            c = int(_CRC_TABLE[(c ^ b) & 0xFF]) ^ (c >> 8)
        return c ^ 0xFFFFFFFF
    lanes = 1 << round(math.log2(math.sqrt(len(a))))
    m = -(-len(a) // lanes)
    pad = lanes * m - len(a)
    buf = np.zeros(lanes * m, np.uint8)
    buf[pad:] = a
    buf[pad : pad + 4] ^= 0xFF
    reg = np.zeros(lanes, np.uint32)
    for column in buf.reshape(lanes, m).T.copy():
        reg = _CRC_TABLE[(reg ^ column) & 0xFF] ^ (reg >> 8)
    span = m
    while len(reg) > 1:
        reg = _apply(_zero_bytes_op(span), reg[0::2]) ^ reg[1::2]
        span *= 2
    return int(reg[0]) ^ 0xFFFFFFFF


def masked_crc(data):
    """TFRecord's checksum: the CRC rotated right by 15 bits plus a constant (mod 2^32)."""
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# ---------------------------------------------------------------- TFRecord framing
def read_tfrecords(path):
    """Yield the records of a TFRecord file one at a time; a truncated or corrupt file raises
    FormatError naming the record (the records before it have been yielded)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        for i in range(1 << 62):
            header = f.read(12)
            if not header:
                return
            if len(header) < 12:
                raise FormatError(
                    path, i, "<record length>", "12 bytes", f"{len(header)} (truncated)"
                )
            (length,) = struct.unpack("<Q", header[:8])
            if struct.unpack("<I", header[8:])[0] != masked_crc(header[:8]):
                raise FormatError(path, i, "<record length>", "a matching CRC32C", "a mismatch")
            # the length is checked against the bytes left before reading: a corrupt length
            # would ask for up to 2^64 bytes at once (MemoryError) instead of naming the record
            left = size - f.tell()
            if length + 4 > left:
                raise FormatError(path, i, "<record>", f"{length + 4} bytes", f"{left} (truncated)")
            payload = f.read(length + 4)
            if struct.unpack("<I", payload[length:])[0] != masked_crc(payload[:length]):
                raise FormatError(path, i, "<record>", "a matching CRC32C", "a mismatch")
            yield payload[:length]


def write_tfrecords(path, records):
    """Write byte strings as a TFRecord file (atomically): fixtures and the bench."""

    def write(f):
        for r in records:
            length = struct.pack("<Q", len(r))
            f.write(length + struct.pack("<I", masked_crc(length)))
            f.write(r + struct.pack("<I", masked_crc(r)))

    atomic_write(path, write)


# ----------------------------------------------------------- tf.train.Example, protobuf wire format
# Example {Features features = 1}; Features {map<string, Feature> feature = 1}
# (entries: key 1, value 2); Feature {oneof: BytesList bytes_list = 1, FloatList float_list = 2,
# Int64List int64_list = 3}; each list is `repeated value = 1`, floats and ints packed (wire type 2)
# or one field per value (wire types 5, 0).
def _varint(buf, pos):
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _fields(buf):
    """(field number, wire type, value) of one message: value is an int (types 0, 5)
    or a bytes slice."""
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        wire = tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            n, pos = _varint(buf, pos)
            if pos + n > len(buf):
                raise ValueError("a length-delimited field runs past the end")
            value, pos = buf[pos : pos + n], pos + n
        elif wire == 5:
            value, pos = struct.unpack_from("<I", buf, pos)[0], pos + 4
        elif wire == 1:
            value, pos = struct.unpack_from("<Q", buf, pos)[0], pos + 8
        else:
            raise ValueError(f"wire type {wire}")
        yield tag >> 3, wire, value


def _feature_values(feature):
    """One Feature message -> a list of bytes, a float32 array or an int64 array."""
    for kind, _, body in _fields(feature):
        values = []
        for _, wire, v in _fields(body):
            if kind == 1:
                values.append(bytes(v))
            elif kind == 2 and wire == 2:
                values.extend(np.frombuffer(v, "<f4").tolist())
            elif kind == 2:
                values.append(struct.unpack("<f", struct.pack("<I", v))[0])
            elif wire == 2:
                pos = 0
                while pos < len(v):
                    x, pos = _varint(v, pos)
                    values.append(x)
            else:
                values.append(v)
        if kind == 1:
            return values
        if kind == 2:
            return np.array(values, np.float32)
        return np.array([x - (1 << 64) if x >= 1 << 63 else x for x in values], np.int64)
    return []  # a Feature with no list set


def parse_example(record):
    """A serialized tf.train.Example -> {feature name: list of bytes | float32 array |
    int64 array}."""
    buf, out = memoryview(record), {}
    for _, _, features in _fields(buf):
        for _, _, entry in _fields(features):
            key, value = "", b""
            for number, _, v in _fields(entry):
                if number == 1:
                    key = bytes(v).decode()
                else:
                    value = v
            out[key] = _feature_values(value)
    return out


def _encode_varint(x):
    out = bytearray()
    while True:
        out.append((x & 0x7F) | (0x80 if x > 0x7F else 0))
        x >>= 7
        if not x:
            return bytes(out)


def _field(number, body):
    return _encode_varint(number << 3 | 2) + _encode_varint(len(body)) + body


def encode_example(features):
    """{name: list of bytes | float array | int array} -> a serialized tf.train.Example
    (as TF writes it)."""
    entries = b""
    for key, values in features.items():
        if isinstance(values, list) and all(isinstance(v, bytes) for v in values):
            feature = _field(1, b"".join(_field(1, v) for v in values))
        elif np.asarray(values).dtype.kind == "f":
            feature = _field(2, _field(1, np.asarray(values, "<f4").tobytes()))
        else:
            ints = b"".join(_encode_varint(int(v) % (1 << 64)) for v in np.asarray(values))
            feature = _field(3, _field(1, ints))
        entries += _field(1, _field(1, key.encode()) + _field(2, feature))
    return _field(1, entries)


# ---------------------------------------------------------------- the dataset folder and its schema
def _shard_names(folder):
    """{shard path: the match of its name} of a folder, in order."""
    shards = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.tfrecord-*"))):
        m = _SHARD.fullmatch(os.path.basename(path))
        if m:
            shards[path] = m
    return shards


def is_rlds(folder):
    """A folder of TFRecord shards (find_shards checks that the rest of the dataset is there)."""
    return os.path.isdir(folder) and bool(_shard_names(folder))


def read_shard_lengths(folder):
    """{shard file name: its number of records} from dataset_info.json, whose splits list their
    shardLengths (TFDS writes them as strings) for shards named by SHARD_TEMPLATE; {} where it
    lists none (older writers), and then only the shard names tell what should be there."""
    path = os.path.join(folder, "dataset_info.json")
    try:
        with open(path) as f:
            info = json.load(f)
        lengths = {}
        for split in info.get("splits", []):
            if split.get("filepathTemplate", SHARD_TEMPLATE) != SHARD_TEMPLATE:
                continue  # shards named otherwise are not read (find_shards)
            counts = [int(n) for n in split.get("shardLengths", [])]
            prefix = f"{info['name']}-{split['name']}.tfrecord"
            for k, n in enumerate(counts):
                lengths[f"{prefix}-{k:05d}-of-{len(counts):05d}"] = n
        return lengths
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise FormatError(
            path, None, "splits", "TFDS split infos", f"unreadable ({type(e).__name__}: {e})"
        ) from None


def find_shards(folder):
    """[(shard path, split "train" | "val")] of a TFDS dataset folder, in order. An interrupted
    download must not convert into a smaller dataset: a missing dataset_info.json or features.json
    is an error, and so is a missing shard, which the `-of-NNNNN` in the names (and
    dataset_info.json's shardLengths) say should be there."""
    for name in DATASET_FILES:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise FormatError(path, None, "<file>", "a TFDS file beside the shards", "missing")
    shards = _shard_names(folder)
    expected = set(read_shard_lengths(folder))
    for m in shards.values():
        expected.update(f"{m['prefix']}-{k:05d}-of-{m['count']}" for k in range(int(m["count"])))
    missing = sorted(expected - {os.path.basename(path) for path in shards})
    if missing:
        raise FormatError(
            os.path.join(folder, missing[0]),
            None,
            "<file>",
            "a shard (the shard names' -of-NNNNN and dataset_info.json count them)",
            f"missing ({len(missing)} of {len(expected)} shards)",
        )
    return [(path, SPLITS.get(m["split"], "train")) for path, m in shards.items()]


def flatten_features(node, name="", per_step=False, out=None):
    """A features.json FeaturesDict -> {flat name: (kind "image" | "tensor" | "text", shape, dtype
    or image encoding, per step)}; names are joined with "/" as in the serialized Example."""
    out = {} if out is None else out
    cls = node.get("pythonClassName", "").rsplit(".", 1)[-1]
    if cls == "FeaturesDict":
        for key, child in node["featuresDict"]["features"].items():
            flatten_features(child, f"{name}/{key}" if name else key, per_step, out)
    elif cls == "Dataset":
        flatten_features(node["sequence"]["feature"], name, True, out)
    elif cls == "Image":
        dims = [int(d) for d in node["image"]["shape"]["dimensions"]]
        out[name] = ("image", dims, node["image"].get("encodingFormat", "png"), per_step)
    elif cls in ("Tensor", "Scalar"):
        dims = [int(d) for d in node["tensor"]["shape"].get("dimensions", [])]
        out[name] = ("tensor", dims, node["tensor"]["dtype"], per_step)
    elif cls == "Text":
        out[name] = ("text", [], "string", per_step)
    return out


def read_schema(folder):
    """-> (the flattened features, the camera features): per-step images under steps/observation/,
    by name. Checks what every Bridge trajectory needs: a 7-float state and a 7-float action."""
    path = os.path.join(folder, "features.json")
    try:
        with open(path) as f:
            features = flatten_features(json.load(f))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FormatError(
            path, None, "<file>", "a TFDS features.json", f"unreadable ({type(e).__name__}: {e})"
        ) from None
    for key in (STATE_KEY, ACTION_KEY):
        got = features.get(key)
        if got is None or got[:2] != ("tensor", [7]):
            raise FormatError(
                path, None, key, "a per-step tensor feature of shape [7]", got and f"{got[:2]}"
            )
    cameras = sorted(
        k for k, (kind, *_, per_step) in features.items() if kind == "image" and per_step
    )
    if not cameras:
        raise FormatError(path, None, "steps/observation/<image>", "at least one image feature")
    return features, cameras


def task_from_file_path(file_path):
    """The task of a Bridge episode from its source out.npy path, as in the numpy release:
    `.../<scene>/<task>/<collection number>/<split>/out.npy` -> <task> (the split folder and
    numbered collection folders are not tasks; the numpy release's own tree gives the same name)."""
    parts = file_path.replace("\\", "/").split("/")[:-1]
    if parts and parts[-1] in SPLITS:
        parts.pop()
    while parts and parts[-1].isdigit():
        parts.pop()
    return parts[-1] if parts else file_path


def decode_image(data, path, episode, field):
    """JPEG / PNG bytes -> uint8 (H, W, 3); an undecodable image raises FormatError."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise FormatError(
            path, episode, field, "a JPEG or PNG image", f"undecodable ({type(e).__name__}: {e})"
        ) from None


def _text(example, key):
    values = example.get(key)
    return values[0].decode("utf-8", "replace") if values else None


def _episode_trajectory(example, path, i, camera):
    """One parsed episode -> a Bridge trajectory of T - 1 transitions (see the module docstring)."""

    def get(key):
        values = example.get(key)
        if values is None or not len(values):
            raise FormatError(
                path, i, key, "a feature of every episode (features.json lists it)", "nothing"
            )
        return values

    jpegs = get(camera)
    T = len(jpegs)
    if T < 2:
        raise FormatError(path, i, camera, "at least 2 steps (one transition)", f"{T}")
    arrays = {}
    for key in (STATE_KEY, ACTION_KEY):
        values = get(key)
        if isinstance(values, list):  # a bytes_list: a tensor TFDS serialized as raw bytes
            raise FormatError(path, i, key, "a float_list of numbers", "a bytes_list")
        values = values.astype(np.float32)
        if values.size != 7 * T:
            raise FormatError(path, i, key, f"{T} x 7 floats (one row per step)", f"{values.size}")
        arrays[key] = values.reshape(T, 7)
    frames = [decode_image(b, path, i, f"{camera}[{t}]") for t, b in enumerate(jpegs)]
    observations = [{"image": f, "state": s} for f, s in zip(frames, arrays[STATE_KEY])]
    traj = bridge_trajectory(observations, arrays[ACTION_KEY][:-1])
    terminals = np.asarray(example.get(TERMINAL_KEY, np.zeros(T)), np.float32)
    if len(terminals) == T:  # step t + 1 is the next observation of transition t
        traj["terminals"] = terminals[1:]
    return traj


def read_shard(path, features, cameras, camera="images0", task_source="path"):
    """Yield (index, task, source, load) for each episode of one shard, streaming: load() decodes
    it into a Bridge trajectory dict. source is what --include / --exclude keywords match:
    the episode's file_path (else its shard). task is None where its feature is missing, task
    and source both for a record that is no Example; load() then raises, so that --skip_bad skips
    that episode alone. A shard that holds fewer records than dataset_info.json lists raises
    FormatError after its last one.
    camera: "imagesN" (the N-th camera by name), a camera's feature name or its
    last part ("image_1")."""
    schema = os.path.join(os.path.dirname(path), "features.json")
    key = choose_camera(cameras, camera, schema)
    if task_source not in TASK_SOURCES:
        raise ValueError(f"task_source: expected one of {TASK_SOURCES}, got {task_source!r}")
    task_key = FILE_PATH_KEY if task_source == "path" else INSTRUCTION_KEY
    if task_key not in features:
        raise FormatError(schema, None, task_key, "a text feature to name tasks by", "nothing")
    records = 0
    for i, record in enumerate(read_tfrecords(path)):
        records += 1
        try:
            example = parse_example(record)
        except (ValueError, IndexError, struct.error, UnicodeDecodeError) as e:
            # its framing and CRC are intact, so the records after it are sound: only this
            # episode is bad (its load() raises; --skip_bad skips it and reads on)
            error = FormatError(
                path, i, "<record>", "a serialized tf.train.Example", f"undecodable ({e})"
            )
            yield i, None, None, _raise(error)
            continue
        text = _text(example, task_key)
        task = None
        if text:
            task = task_from_file_path(text) if task_source == "path" else text

        def load(example=example, i=i, task=task):
            if task is None:
                raise FormatError(path, i, task_key, "a non-empty text (the task)", "nothing")
            return _episode_trajectory(example, path, i, key)

        yield i, task, _text(example, FILE_PATH_KEY) or path, load
    _check_record_count(path, records)


def _raise(error):
    """A load() that raises `error`: an episode that is bad before it is decoded."""

    def load():
        raise error

    return load


def _check_record_count(path, records):
    """A shard cut at a record boundary reads cleanly: only its count can tell. It must hold as
    many records as dataset_info.json's shardLengths say, or (where they are not listed) at least
    one, since an empty shard is what an interrupted download leaves."""
    expected = read_shard_lengths(os.path.dirname(path)).get(os.path.basename(path))
    if expected is None and records == 0:
        raise FormatError(path, None, "<records>", "at least one record (an episode)", 0)
    if expected is not None and records != expected:
        raise FormatError(
            path, None, "<records>", f"{expected} (dataset_info.json's shardLengths)", records
        )


# ---------------------------------------------------------------- writing: fixtures and the bench
def _feature_json(kind, shape=(), dtype="float32"):
    cls = "tensorflow_datasets.core.features."
    if kind == "image":
        image = {"shape": {"dimensions": [str(d) for d in shape]}, "dtype": "uint8"}
        return {
            "pythonClassName": cls + "image_feature.Image",
            "image": image | {"encodingFormat": "jpeg"},
        }
    if kind == "text":
        return {"pythonClassName": cls + "text_feature.Text", "text": {}}
    tensor = {"shape": {"dimensions": [str(d) for d in shape]} if shape else {}, "dtype": dtype}
    name = "tensor_feature.Tensor" if shape else "scalar.Scalar"
    return {"pythonClassName": cls + name, "tensor": tensor | {"encoding": "none"}}


def _features_dict(features):
    cls = "tensorflow_datasets.core.features.features_dict.FeaturesDict"
    return {"pythonClassName": cls, "featuresDict": {"features": features}}


def bridge_features_json(image_shape, num_cameras):
    """features.json of the TFDS `bridge_dataset` (its Bridge features; image_shape
    like (256, 256, 3))."""
    observation = {f"image_{c}": _feature_json("image", image_shape) for c in range(num_cameras)}
    observation["state"] = _feature_json("tensor", [7])
    step = {
        "observation": _features_dict(observation),
        "action": _feature_json("tensor", [7]),
        "reward": _feature_json("scalar"),
        "is_first": _feature_json("scalar", dtype="bool"),
        "is_last": _feature_json("scalar", dtype="bool"),
        "is_terminal": _feature_json("scalar", dtype="bool"),
        "language_instruction": _feature_json("text"),
    }
    steps = {
        "pythonClassName": "tensorflow_datasets.core.features.dataset_feature.Dataset",
        "sequence": {"feature": _features_dict(step), "length": "-1"},
    }
    metadata = _features_dict({"file_path": _feature_json("text")})
    return _features_dict({"steps": steps, "episode_metadata": metadata})


def _jpeg(image, quality):
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def bridge_example(traj, file_path, instruction, quality=95):
    """A Bridge trajectory (SPEC section 5, T actions) -> the serialized Example of its RLDS
    episode: T steps of (observations[t], actions[t]), the final next observation dropped,
    as the RLDS release did."""
    obs, T = traj["observations"], len(traj["actions"])
    cameras = sorted(k for k in obs[0] if re.fullmatch(r"images\d+", k))
    features = {
        f"steps/observation/image_{c}": [_jpeg(o[cam], quality) for o in obs]
        for c, cam in enumerate(cameras)
    }
    features[STATE_KEY] = np.stack([o["state"] for o in obs]).ravel()
    features[ACTION_KEY] = np.asarray(traj["actions"], np.float32).ravel()
    features["steps/reward"] = np.zeros(T, np.float32)
    features["steps/is_first"] = (np.arange(T) == 0).astype(np.int64)
    features["steps/is_last"] = (np.arange(T) == T - 1).astype(np.int64)
    features[TERMINAL_KEY] = np.zeros(T, np.int64)
    features[INSTRUCTION_KEY] = [instruction.encode()] * T
    features[FILE_PATH_KEY] = [file_path.encode()]
    return encode_example(features)


def write_bridge_rlds(
    folder, episodes, num_shards=1, split="train", name="bridge_dataset", quality=95
):
    """A TFDS dataset folder from [(Bridge trajectory, file_path, instruction)], the
    episodes dealt over num_shards shards in order: dataset_info.json, features.json,
    <name>-<split>.tfrecord-NNNNN-of-NNNNN."""
    obs = episodes[0][0]["observations"][0]
    num_cameras = sum(bool(re.fullmatch(r"images\d+", k)) for k in obs)
    features = bridge_features_json(obs["images0"].shape, num_cameras)
    atomic_write_text(json.dumps(features, indent=1), os.path.join(folder, "features.json"))
    per_shard = np.array_split(np.arange(len(episodes)), num_shards)
    _write_split_info(folder, name, split, [len(ids) for ids in per_shard])
    for k, ids in enumerate(per_shard):
        path = os.path.join(folder, f"{name}-{split}.tfrecord-{k:05d}-of-{num_shards:05d}")
        write_tfrecords(path, [bridge_example(*episodes[j], quality=quality) for j in ids])


def _write_split_info(folder, name, split, shard_lengths):
    """Add a split (its records per shard, as TFDS writes them) to the folder's
    dataset_info.json, keeping the other splits already listed."""
    path = os.path.join(folder, "dataset_info.json")
    info = {"name": name, "version": "1.0.0", "splits": []}
    if os.path.isfile(path):
        with open(path) as f:
            info = json.load(f)
    lengths = [str(n) for n in shard_lengths]
    entry = {"name": split, "filepathTemplate": SHARD_TEMPLATE, "shardLengths": lengths}
    info["splits"] = [s for s in info["splits"] if s["name"] != split] + [entry]
    atomic_write_text(json.dumps(info, indent=1), path)
