"""Update speed of the PTR agent: eager and compiled updates/s, counted FLOPs, fraction of the peak.

    python bench.py --arch resnet34 --batch 64 --image_size 128 --device cuda
    python bench.py --arch small --batch 64 --image_size 64

The arithmetic of the PTR ResNet-34 variant (SPEC section 4, 11.3 GFLOP per 128x128 image forward):
one CQL update at batch 64 runs the critic on s with gradient, the target on s', the policy on s
with gradient and on s' without, about 5.8 TFLOP, so a GPU at a dense bf16 peak of ~800 TFLOP/s
does at most ~140 updates/s.

One run builds two agents from the same seed, one eager and one compiled (cql.Agent.compile), and
times them in interleaved rounds, so both see the same machine load (shared CPUs); on CUDA the
throughput is timed as in training (back-to-back updates, one synchronisation). FLOPs are counted
(torch.utils.flop_counter) on the eager update; the compiled one does the same arithmetic. The
overhead ratio is the eager update's time over the summed time of the encoder passes it needs: the
rest is the MLP heads, losses, optimizer steps, target update and Python.
"""

import argparse
import dataclasses
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from cql import ALGOS, COMPILE_MODES, Agent, AgentConfig

# Dense bf16 tensor-core peaks of the vendors' datasheets (TFLOP/s); the first name contained in the
# device's name wins, so "H200 NVL" comes before "H200" (SXM).
GPU_PEAK_TFLOPS = (
    ("H200 NVL", 835),
    ("H200", 989),
    ("H100", 989),
    ("A100", 312),
    ("L40S", 362),
    ("4090", 165),
)
CPU_GHZ = 3.0
CPU_FLOP_PER_CYCLE = 32  # fp32 with AVX2 and 2 FMA units: 2 x 8 lanes x 2 FLOP


def assumed_peak(device):
    """(FLOP/s or None, description) of the hardware peak the fraction is reported against."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in GPU_PEAK_TFLOPS:
            if key in name:
                return tflops * 1e12, f"{name}: {tflops} TFLOP/s dense bf16 (datasheet)"
        return None, f"{name}: unknown peak (pass --peak_tflops)"
    threads = torch.get_num_threads()
    peak = threads * CPU_GHZ * 1e9 * CPU_FLOP_PER_CYCLE
    return peak, (
        f"CPU: {threads} threads x {CPU_GHZ} GHz x {CPU_FLOP_PER_CYCLE} fp32 FLOP/cycle "
        f"(AVX2, 2 FMA units), assumed"
    )


def random_batch(cfg, batch_size, device="cpu", seed=0):
    """A batch in batches.py's format (batches._make_batch) with random content for an agent of
    cfg: what the benchmark times updates on, and the tests' stand-in for sampled data."""
    g = torch.Generator().manual_seed(seed)
    img = lambda: torch.randint(
        0, 256, (batch_size, 3, cfg.image_size, cfg.image_size), generator=g, dtype=torch.uint8
    )
    batch = {
        "obs": img(),
        "next_obs": img(),
        "state": torch.randn(batch_size, cfg.state_dim, generator=g),
        "next_state": torch.randn(batch_size, cfg.state_dim, generator=g),
        "action": torch.rand(batch_size, cfg.action_dim, generator=g) * 1.98 - 0.99,
        "reward": torch.randint(0, 2, (batch_size,), generator=g).float() * 11 - 1,
        "task": torch.randint(0, cfg.num_tasks, (batch_size,), generator=g),
    }
    batch["mask"] = (batch["reward"] < 0).float()
    batch["mc_return"] = torch.randn(batch_size, generator=g) * 5
    return {k: v.to(device) for k, v in batch.items()}


def seconds(fn, cuda):
    """Wall time of fn(), with the GPU's queue drained before and after."""
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t


def encoder_passes(agent, batch):
    """{name: fn} of the encoder passes an update needs, each as in update()
    (autocast, grad or not)."""

    def fwd_bwd(net, images):
        for p in net.parameters():
            p.grad = None
        with agent._autocast():
            z = net.embed(images)
        z.float().sum().backward()

    def fwd(net, images):
        with torch.no_grad(), agent._autocast():
            net.embed(images)

    passes = {}
    if agent.bc_policy is not None:
        passes["bc encoder fwd+bwd s"] = lambda: fwd_bwd(agent.bc_policy, batch["obs"])
    if agent.critic is not None:
        passes["critic fwd+bwd s"] = lambda: fwd_bwd(agent.critic, batch["obs"])
        passes["policy fwd+bwd s"] = lambda: fwd_bwd(agent.policy, batch["obs"])
        passes["target fwd s'"] = lambda: fwd(agent.target_critic, batch["next_obs"])
        passes["policy fwd s'"] = lambda: fwd(agent.policy, batch["next_obs"])
    return passes


def counted_flops(agent, batch):
    """FLOPs of one eager update (matrix products and convolutions, forward and backward)."""
    with FlopCounterMode(display=False) as counter:
        agent.update(batch)
    return counter.get_total_flops()


def bench(args):
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest convolutions
    cfg = AgentConfig(
        arch=args.arch, image_size=args.image_size, algo=args.algo, num_tasks=args.num_tasks
    )
    eager = Agent(cfg, device)
    compiled = Agent(dataclasses.replace(cfg), device)  # the same seed: the same networks
    compiled.compile(args.compile_mode, args.backend)
    batch = random_batch(cfg, args.batch, device)
    updates = {
        "eager": lambda: eager.update(batch),
        "compiled": lambda: compiled.update(batch),
    }
    passes = encoder_passes(eager, batch)
    fns = {**updates, **passes}

    # warm-up: allocator, cuDNN algorithm search, compilation (first call), CUDA graph
    # recording (later ones)
    compile_s = seconds(updates["compiled"], cuda)
    for _ in range(args.warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(args.steps):
        for k, fn in fns.items():
            times[k].append(seconds(fn, cuda))
    per_update = {k: statistics.median(times[k]) for k in updates}
    memory = {}
    if cuda:  # throughput as in training: back-to-back updates, one synchronisation
        for k, fn in updates.items():
            torch.cuda.reset_peak_memory_stats(device)
            per_update[k] = seconds(lambda fn=fn: [fn() for _ in range(args.steps)], cuda)
            per_update[k] /= args.steps
            memory[k] = torch.cuda.max_memory_allocated(device)

    flops = counted_flops(eager, batch)
    peak, peak_desc = assumed_peak(device)
    if args.peak_tflops:
        peak, peak_desc = args.peak_tflops * 1e12, f"{args.peak_tflops} TFLOP/s (given)"
    print(
        f"bench: algo={cfg.algo} arch={cfg.arch} batch={args.batch} image_size={cfg.image_size} "
        f"device={device} threads={torch.get_num_threads()} steps={args.steps} "
        f"compile mode={args.compile_mode} backend={args.backend}"
    )
    print(f"counted {flops / 1e9:.4g} GFLOP/update; peak [{peak_desc}]")
    for k, t in per_update.items():
        rate = flops / t
        frac = f"{rate / peak:.1%} of peak" if peak else "fraction of peak n/a"
        line = (
            f"{k:9} {1.0 / t:8.3f} updates/s {t * 1e3:9.1f} ms/update "
            f"{rate / 1e9:9.4g} GFLOP/s = {frac}"
        )
        if k in memory:
            line += f", peak memory {memory[k] / 2**30:.2f} GiB (both agents resident)"
        print(line)
    print(
        f"compiled / eager {per_update['eager'] / per_update['compiled']:.3f}x "
        f"(first compiled update, with compilation: {compile_s:.1f} s)"
    )
    t_passes = {k: statistics.median(times[k]) for k in passes}
    total = sum(t_passes.values())
    t_eager = statistics.median(times["eager"])
    best = min(times["eager"]) / sum(min(times[k]) for k in passes)
    print(
        f"overhead ratio (eager) {t_eager / total:.3f} (medians; {best:.3f} from minima) = "
        f"update {t_eager * 1e3:.1f} ms / passes {total * 1e3:.1f} ms ("
        + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in t_passes.items())
        + ")"
    )


def main(argv=None):
    d = AgentConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default=d.arch)
    p.add_argument("--algo", default=d.algo, choices=ALGOS)
    p.add_argument("--batch", type=int, default=64, help="SPEC section 3 batch size")
    p.add_argument("--image_size", type=int, default=d.image_size)
    p.add_argument("--num_tasks", type=int, default=80, help="about the number of Bridge tasks")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=5, help="timed rounds (median), after the warm-up")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds after the first compile")
    p.add_argument("--compile_mode", default="default", choices=COMPILE_MODES)
    p.add_argument("--backend", default="inductor", help="torch.compile backend")
    p.add_argument(
        "--peak_tflops", type=float, default=None, help="override the assumed hardware peak"
    )
    bench(p.parse_args(argv))


if __name__ == "__main__":
    main()
