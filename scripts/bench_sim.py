"""The simulator's figures (README, Benchmarks): environment steps/s of scripted pick-place
episodes on one core (resets and the scripted policy included), the share of a step that rendering
takes, and collection throughput with several worker processes (process start-up included).

    python scripts/bench_sim.py [--image_size 128] [--episodes 6] [--workers 4]
"""

import argparse
import os
import sys
import tempfile
import time
import timeit

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from binsort_env import BinSortEnv  # noqa: E402
from sim_binsort import CollectOptions, collect, scripted_episode  # noqa: E402


def bench(image_size=128, episodes=6, workers=2):
    env = BinSortEnv("pickplace", image_size, terminate_on_success=False)
    t0 = time.perf_counter()
    steps = sum(len(scripted_episode(env, "pickplace", seed)[1]) for seed in range(episodes))
    seconds = time.perf_counter() - t0
    render_ms = timeit.timeit(env.render, number=20) / 20 * 1e3
    env.close()
    print(
        f"{steps / seconds:.1f} steps/s (scripted pick-place at {image_size}x{image_size} "
        f"on one core, TinyRenderer; rendering takes {render_ms:.1f} ms of a step)"
    )
    with tempfile.TemporaryDirectory() as d:
        s = collect(
            "pickplace",
            episodes * workers,
            d,
            CollectOptions(workers=workers, image_size=image_size, min_val=0),
            log=None,
        )
    print(
        f"collect: {s['demos'] / s['seconds']:.2f} demos/s, "
        f"{s['steps'] / s['seconds']:.0f} steps/s with --workers {workers} "
        f"at {image_size}x{image_size} ({s['demos']} demos, process start-up included)"
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--image_size", type=int, default=128)
    ap.add_argument("--episodes", type=int, default=6, help="scripted episodes timed on one core")
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    args = ap.parse_args()
    bench(args.image_size, args.episodes, args.workers)


if __name__ == "__main__":
    main()
