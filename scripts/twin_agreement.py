"""scripts/twin_agreement.py: how closely the real-robot path on the twin (twin.py, driven through
robot.py's WidowXEnv) follows the simulator the twin is built from (binsort_env.BinSortEnv).

One scripted sort demo runs in BinSortEnv; its actions are then replayed through WidowXEnv on a
twin of the same scene, from the same start joints and with the simulator's workspace box. Printed:
- the end-effector deviation (mm) between the two states after 10 and 40 steps (the Bridge state:
  PyBullet's end effector in the simulator, widowx.py's kinematics of the joints read over the bus
  on the twin, read at the tick while the arm may still be arriving);
- the control loop at 5 Hz through the pseudo-terminal: mean period and its jitter (std, max - min
  of the step-to-step times), with every servo answering at once and with one answering
  --slow_ms late (twin.py's slow fault).
The twin runs in real time; the script takes about a minute.
    python scripts/twin_agreement.py [--seed 0] [--slow_ms 50]
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import binsort_env  # noqa: E402
import robot  # noqa: E402
import sim_binsort  # noqa: E402
import twin  # noqa: E402
from arm import DynamixelArm, open_bus  # noqa: E402

STEPS_COMPARED = (10, 40)


def simulator_run(seed, steps):
    """A scripted sort demo in BinSortEnv -> (its actions, states, start joints, env seed)."""
    env = binsort_env.BinSortEnv("sort", image_size=64, terminate_on_success=False)
    observations, actions, _, _ = sim_binsort.scripted_episode(
        env, "sort", seed, extra_success_steps=steps
    )
    env.reset(seed=sim_binsort.env_seed_of(seed), task="sort")
    start = env._q.copy()  # the joints BinSortEnv resets to
    env.close()
    states = np.array([obs["state"] for obs in observations])
    return actions[:steps], states[: steps + 1], start, sim_binsort.env_seed_of(seed)


def twin_run(actions, start, scene_seed, slow_servo=None, slow_s=0.0):
    """The actions through WidowXEnv on a twin of the scene -> (states, step return times)."""
    faults = [twin.Fault("slow", slow_servo)] if slow_servo else []
    with twin.Twin("sort", scene_seed, faults=faults, slow_s=slow_s, log=lambda line: None) as arm:
        bus = open_bus(twin.PtyPort(arm.port))
        env = robot.WidowXEnv(
            arm=DynamixelArm(bus, log=lambda *a: None),
            camera=f"twin:{arm.port}",
            image_size=64,
            max_steps=len(actions),
            workspace=(binsort_env.WORKSPACE_LOW, binsort_env.WORKSPACE_HIGH),
            reset_joints=start,
            log=print,
        )
        with env:
            states = [env.reset()["state"]]
            times = [time.monotonic()]
            for action in actions:
                states.append(env.step(action)[0]["state"])
                times.append(time.monotonic())
    return np.array(states), np.array(times)


def loop_figures(times):
    """Step-to-step times -> 'period P ms, jitter std S ms, range R ms'."""
    periods = np.diff(times) * 1e3
    return (
        f"period {periods.mean():.1f} ms, jitter std {periods.std():.1f} ms, "
        f"range {periods.min():.1f}-{periods.max():.1f} ms over {len(periods)} steps"
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=0, help="the scripted demo's seed")
    p.add_argument("--slow_ms", type=float, default=50.0, help="how late the slow servo answers")
    p.add_argument("--slow_servo", type=int, default=4)
    args = p.parse_args(argv)
    steps = max(STEPS_COMPARED)
    actions, sim_states, start, scene_seed = simulator_run(args.seed, steps)
    if len(actions) < steps:
        raise SystemExit(f"the scripted demo ended after {len(actions)} steps, before {steps}")
    twin_states, times = twin_run(actions, start, scene_seed)
    for k in STEPS_COMPARED:
        deviation = np.linalg.norm(twin_states[k, :3] - sim_states[k, :3]) * 1e3
        gripper = f"gripper {sim_states[k, 6]:.2f} (sim) vs {twin_states[k, 6]:.2f} (twin)"
        print(f"after {k} steps: end-effector deviation {deviation:.1f} mm, {gripper}")
    print(f"5 Hz loop on the twin: {loop_figures(times)}")
    _, slow_times = twin_run(actions[:20], start, scene_seed, args.slow_servo, args.slow_ms / 1e3)
    servo = f"servo {args.slow_servo} answering {args.slow_ms:.0f} ms late"
    print(f"5 Hz loop with {servo}: {loop_figures(slow_times)}")


if __name__ == "__main__":
    main()
