"""Updates/s of the CQL update with the factored Q heads (model.QNetwork.heads) against the same
update with heads computed as Figure 2 draws them (QNetwork.heads_concatenated), measured in one
run, interleaved so that other load on the machine affects both alike.

    OMP_NUM_THREADS=1 python scripts/bench_qheads.py  # small encoder, 64 px, batch 64, 5 rounds
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import bench  # noqa: E402
import cql  # noqa: E402
import model  # noqa: E402


def concatenated_heads(self, z, action, task_onehot, detach_params=False):
    """heads() through the reference form (with detach_params, as the actor loss needs it)."""
    single = action.dim() == 2
    a = action[:, None] if single else action
    q = self.heads_concatenated(z, a, task_onehot, detach_params)
    return q[:, 0] if single else q


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="small")
    ap.add_argument("--image_size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--num_tasks", type=int, default=21)
    ap.add_argument("--updates", type=int, default=10, help="updates per timed round")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    cfg = cql.AgentConfig(arch=args.arch, image_size=args.image_size, num_tasks=args.num_tasks)
    agent = cql.Agent(cfg)
    batch = bench.random_batch(cfg, args.batch)
    factored = model.QNetwork.heads
    times = {"factored": [], "concatenated": []}
    for round_ in range(args.rounds + 1):  # round 0 warms up
        for name in times:
            model.QNetwork.heads = factored if name == "factored" else concatenated_heads
            t0 = time.perf_counter()
            for _ in range(args.updates):
                agent.update(batch)
            if round_ > 0:
                times[name].append((time.perf_counter() - t0) / args.updates)
    model.QNetwork.heads = factored
    rate = {name: 1.0 / statistics.median(t) for name, t in times.items()}
    print(
        f"CQL update, {args.arch} {args.image_size}px batch {args.batch}, "
        f"{torch.get_num_threads()} thread(s), median of {args.rounds} rounds of {args.updates}:"
    )
    for name, r in rate.items():
        print(f"  {name:>12} heads: {r:.3f} updates/s ({1e3 / r:.1f} ms/update)")
    print(f"  speed-up {rate['factored'] / rate['concatenated']:.3f}x")


if __name__ == "__main__":
    main()
