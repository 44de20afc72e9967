"""Conversion throughput of each source format: the same Bridge-like episodes written
as a numpy tree of out.npy, an RLDS / TFDS folder of several shards, and LeRobot v2.1 (h264, one
file per episode) and v3.0 (AV1, several episodes per file) folders, each converted by `data.py
convert --image_size 128` in a child process. Prints episodes/s, MB/s of source bytes and the
child's peak RSS.

    python scripts/bench_formats.py [--episodes 48] [--steps 38] [--size 256]

The images are smooth with a little noise, so their JPEGs are about as large as Bridge's (~15 KB at
256 x 256); one camera is written in every format.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bridge  # noqa: E402
import lerobot  # noqa: E402
import rlds  # noqa: E402

DATA_PY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data.py")
TASKS = 4
# reports the conversion's own peak RSS (a direct child would inherit this process's peak)
LAUNCHER = (
    "import resource, subprocess as s, sys; s.run(sys.argv[1:], check=True, stdout=s.DEVNULL); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def episode(T, size, rng):
    """A Bridge trajectory of T actions: a moving smooth gradient with noise, states and actions."""
    y, x = np.mgrid[0:size, 0:size] / size
    obs = []
    for t in range(T + 1):
        base = np.stack([x, y, (x + y) / 2], -1) * 150 + 40 + 2 * t
        image = (base + rng.normal(0, 4, base.shape)).clip(0, 255).astype(np.uint8)
        obs.append({"image": image, "state": rng.normal(size=7).astype(np.float32)})
    return bridge.bridge_trajectory(obs, rng.uniform(-1, 1, (T, 7)))


def folder_bytes(folder):
    return sum(
        os.path.getsize(os.path.join(d, f))
        for d, _, files in os.walk(folder)
        for f in files
        if ".ptr_store" not in d
    )


def convert(src, store):
    """(seconds, peak RSS in bytes) of `data.py convert src --out store --image_size 128`."""
    start = time.time()
    command = [sys.executable, "-c", LAUNCHER, sys.executable, DATA_PY, "convert", src]
    command += ["--out", store, "--image_size", "128"]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return time.time() - start, 1024 * int(out)  # ru_maxrss: KiB on Linux


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--episodes", type=int, default=48)
    p.add_argument("--steps", type=int, default=38, help="actions per episode (Bridge: ~38)")
    p.add_argument("--size", type=int, default=256, help="image size written (Bridge RLDS: 256)")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    trajs = [episode(args.steps, args.size, rng) for _ in range(args.episodes)]
    tmp = tempfile.mkdtemp(prefix="ptr_bench_formats_")
    try:
        sources = {"numpy out.npy": os.path.join(tmp, "tree")}
        for k in range(TASKS):
            path = os.path.join(tmp, "tree", "kitchen", f"task_{k}", "train", "out.npy")
            bridge.write_bridge_file(path, trajs[k::TASKS])
        paths = [f"/bridge/kitchen/task_{k % TASKS}/{k}/train/out.npy" for k in range(len(trajs))]
        episodes = [(t, path, "put it in the pot") for t, path in zip(trajs, paths)]
        sources["RLDS (4 shards)"] = os.path.join(tmp, "rlds")
        rlds.write_bridge_rlds(sources["RLDS (4 shards)"], episodes, num_shards=4)
        tasks = [(t, f"task {k % TASKS}") for k, t in enumerate(trajs)]
        sources["LeRobot v2.1 (h264)"] = os.path.join(tmp, "lerobot21")
        lerobot.write_lerobot(sources["LeRobot v2.1 (h264)"], tasks, version="v2.1")
        sources["LeRobot v3.0 (AV1)"] = os.path.join(tmp, "lerobot30")
        lerobot.write_lerobot(
            sources["LeRobot v3.0 (AV1)"], tasks, version="v3.0", episodes_per_file=12
        )
        print(
            f"{args.episodes} episodes of {args.steps} steps, {args.size}x{args.size} images, "
            "converted to 128x128 (one process, one camera)"
        )
        for name, src in sources.items():
            seconds, rss = convert(src, os.path.join(tmp, "store_" + os.path.basename(src)))
            mb = folder_bytes(src) / 1e6
            print(
                f"{name:22} {args.episodes / seconds:6.1f} episodes/s {mb / seconds:7.1f} MB/s "
                f"({mb:.0f} MB in {seconds:.1f} s with interpreter start), "
                f"peak RSS {rss / 1e6:.0f} MB"
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
