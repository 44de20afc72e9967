"""The data pipeline's figures (README, Benchmarks): a synthetic Bridge tree of 4 out.npy files is
converted by `data.py convert` in a child process (MB/s and the child's peak RSS against the bound
of 2 x the largest file + 300 MB), then the store is sampled for 3 s (transitions/s, obs and next
obs) against unpickling an out.npy per batch, and a batch of 64 obs + 64 next obs is augmented
(ms, one CPU thread; CUDA too where there is one).

    python scripts/bench_data.py [--transitions 20000] [--image_size 128]

scripts/bench_formats.py compares the source formats' conversion.
"""

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from bench_formats import DATA_PY, LAUNCHER  # this folder: the peak-RSS launcher, data.py's path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from batches import Sampler, augment  # noqa: E402
from bridge import read_bridge_file, synthetic_trajectory, write_bridge_file  # noqa: E402
from store import Store  # noqa: E402


def bench(transitions=20000, image_size=128, B=64):
    """Conversion MB/s and peak RSS, sampling vs unpickling transitions/s (one core), augmentation
    ms."""
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
        command = [sys.executable, DATA_PY, "convert", os.path.join(tmp, "tree")]
        command += ["--out", os.path.join(tmp, "store")]
        t = time.time()
        launched = subprocess.run(
            [sys.executable, "-c", LAUNCHER, *command],
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


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--transitions", type=int, default=20000, help="size of the synthetic tree")
    p.add_argument("--image_size", type=int, default=128)
    args = p.parse_args()
    bench(args.transitions, args.image_size)


if __name__ == "__main__":
    main()
