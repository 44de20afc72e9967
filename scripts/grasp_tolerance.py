"""How forgiving is the simulator's grasp? For each object: move the fingertips above it with an
offset, descend to a closing height, close, lift, and count the grasps
(results/grasp_tolerance.txt; binsort_env.py, "Grasp assist").

    python scripts/grasp_tolerance.py --objects cube mug duck ball lego --resets 3
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import binsort_env  # noqa: E402
import sim_binsort  # noqa: E402

MAX_STEP = 0.025  # m per control step, as the scripted demos move


def move(env, goal, gripper, steps):
    for _ in range(steps):
        action = np.zeros(7)
        action[:3] = np.clip(goal - env.target_pos, -MAX_STEP, MAX_STEP)
        action[6] = gripper
        env.step(action)


def attempt(env, obj, offset, close_z, seed):
    """True when closing at (object + offset, close_z) and lifting holds the object."""
    env.reset(seed=seed, task=f"pick_{obj}_to_left")
    above = env.object_position(obj) + np.array([offset[0], offset[1], 0.0])
    above[2] = sim_binsort.HOVER_Z
    low = np.array([above[0], above[1], close_z])
    move(env, above, 1.0, 12)
    move(env, low, 1.0, 8)
    move(env, low, 0.0, 3)
    move(env, above, 0.0, 5)
    return env.held == obj


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--objects", nargs="+", default=["cube", "mug", "duck", "ball", "lego"])
    ap.add_argument("--offsets", type=float, nargs="+", default=[0.0, 0.01, 0.02, 0.03])
    ap.add_argument("--heights", type=float, nargs="+", default=[0.005, 0.02, 0.035])
    ap.add_argument(
        "--resets", type=int, default=3, help="resets per cell, offsets in 3 directions"
    )
    args = ap.parse_args()
    env = binsort_env.BinSortEnv("pick_cube_to_left", image_size=64, terminate_on_success=False)
    print(
        "grasps out of resets; rows: object, columns: (offset from the centre m, closing height m)"
    )
    print("object  " + " ".join(f"{d:.3f}/{z:.3f}" for d in args.offsets for z in args.heights))
    for obj in args.objects:
        cells = []
        for d in args.offsets:
            for z in args.heights:
                directions = np.linspace(0, 2 * np.pi, args.resets, endpoint=False)
                wins = 0
                for seed, angle in enumerate(directions):
                    offset = d * np.array([np.cos(angle), np.sin(angle)])
                    wins += attempt(env, obj, offset, z, seed)
                cells.append(f"{wins}/{args.resets}".center(11))
        print(f"{obj:<8}" + " ".join(cells), flush=True)
    env.close()


if __name__ == "__main__":
    main()
