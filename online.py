"""PTR in an environment: evaluate a policy and fine-tune it online with the Cal-QL bound (paper
Section V-F and Appendix F; SPEC section 3 "Online"). The success classifier that labels real-robot
rollouts is trained by classifier.py, which also gives the rewards (classifier.make_labeler).

    python online.py eval --ckpt runs/ft/ckpt_00005000.pt --env binsort --episodes 50 \
        --save_video videos/
    python online.py finetune --ckpt runs/ft/ckpt_00005000.pt --env binsort --prior data/prior \
        --target data/target --env_steps 20000 --out runs/online
    python classifier.py --pos door_open/ --neg door_closed/ --out clf.pt
    python online.py export --ckpt runs/ft/ckpt_00005000.pt --out ptr_policy.pt  # actors only
    python online.py finetune ... --env widowx --port /dev/ttyUSB0 --classifier clf.pt \
        --reset_ckpt reset.pt

`eval` and `export` are thin commands: rollout.run_evaluation runs the episodes (full success with
its 95% Wilson interval, and each stage's rate where the environment reports stages), and
checkpoint.export_policy writes the checkpoint's actors alone. --env binsort (the simulator), widowx
(the arm), or module:Class: a simulator of your own with SPEC section 2's interface, made as
Class(image_size=<render size>, max_steps=<--max_steps, when given>), whose rewards count unless
--classifier labels them and which resets itself unless --reset_ckpt is given (rollout.make_env):
    python online.py eval --ckpt policy.pt --env mysim.envs:MyEnv --episodes 20

Online fine-tuning alternates (Section IV-A, "Phase 2"): collect ONE trajectory with the current
stochastic policy into a replay buffer (MC returns computed on add), then take --utd (10) gradient
steps per transition collected. Batches mix prior / target / online data 0.35 / 0.15 / 0.5 (Appendix
F). Cal-QL is on throughout (Appendix F, "Method"): the CQL push-down on policy actions is clipped
from below by the MC return, on all data. CQL alpha: --alpha_offline (5) while the buffer is empty,
i.e. only in the optional --offline_steps warm-up (Cal-QL on prior + target mixed 0.7 / 0.3 before
the first rollout); --alpha_online (0.5) from the first online trajectory on. Without a warm-up
alpha is 0.5 throughout, the paper's offline phase (alpha 5) being the finetune.py run that produced
--ckpt. Everything counts in env steps: --env_steps, ckpt_<env step>.pt, progress.csv rows (one per
trajectory, plus deterministic evaluations every --eval_every env steps from step 0). Each online
trajectory is written once to episodes/episode_<n>.npz; a checkpoint lists those its buffer holds,
so --resume refills it and continues exactly. Ctrl-C or SIGTERM stops at the next env or gradient
step and saves (dropping an unfinished rollout); a second one aborts. Rewards: the simulator's; on
the robot --classifier's label of each next observation, else a person's answer after each episode.
Resets: the simulator resets itself; on the robot --reset_ckpt runs a reset policy after every
episode (Section V-F), otherwise the program waits for Enter. A kill -9 loses what came after the
newest checkpoint: --resume collects those episodes again, the same ones, over their files.

--classifier in the simulator: its labels are the rewards, the simulator does not end an episode at
its own success, and each episode file keeps the simulator's rewards (env_rewards) beside them.
--ood (simulator): episodes start where the data never did (binsort_env.OOD_STARTS).
--filtered_bc: the control of online fine-tuning: the same loop, but the checkpoint's actor only
imitates the target demos and the online trajectories that succeeded (finetune.imitation_learner),
no critic, no prior data. Wall time: progress.csv's wall_<part>_s columns (rollouts, evaluation,
updates, total) and a summary line at the end.
"""

import argparse
import contextlib
import copy
import dataclasses
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from cli import POSITIVE, add_dataclass_args, check_flags, dataclass_from_args, run_cli
from batches import MixedSampler, ReplayBuffer
from checkpoint import (
    CheckpointError,
    agent_from_checkpoint,
    build_checkpoint,
    capture_rng,
    export_policy,
    restore_rng,
    run_payload,
    save_checkpoint,
    source_ckpt,
)
from data import add_data_args
from finetune import imitation_learner, open_run_from_flags, target_assignment, task_samplers
from classifier import make_labeler
from rollout import (
    EvalConfig,
    Policy,
    add_env_args,
    add_eval_args,
    close_env,
    evaluate,
    make_env,
    make_resetter,
    no_reset,
    run_episode,
    run_evaluation,
    summarize,
)
from runfolder import (
    RunLog,
    claim_run_folder,
    episode_path,
    read_episode,
    write_config,
    write_episode,
)
from train import (
    RUN_RULES,
    StopFlag,
    add_learner_overrides,
    add_run_args,
    learner_overrides,
    train_step,
)

# Learner fields that online fine-tuning sets itself (online_learner), so they
# have no override flag.
ONLINE_SETS = ("algo", "alpha", "calql")


@dataclass
class OnlineConfig:
    """Online fine-tuning defaults, the paper's unless marked 'ours' (Section V-F, Appendix F). The
    trailing comments are the command-line help (cli.add_dataclass_args)."""

    mix_prior: float = 0.35  # batch fraction of prior (Bridge) data
    mix_target: float = 0.15  # ... of offline target demos; the online buffer gets the rest (0.5)
    utd: int = 10  # gradient steps per collected environment step
    alpha_offline: float = 5.0  # CQL alpha while the buffer is empty (the --offline_steps warm-up)
    alpha_online: float = 0.5  # CQL alpha from the first online trajectory on
    calql: bool = True  # Cal-QL: clip the CQL push-down at the MC return ("Method", Appendix F)
    env_steps: int = 20_000  # environment steps in total (Figure 8: 20K)
    eval_every: int = 5_000  # environment steps between evaluations (0: none; Figure 8: 5K)
    eval_episodes: int = 10  # episodes per evaluation (Figure 8: 10 trials)
    eval_seed: int = 0  # evaluation episode i resets with eval_seed + i
    save_every: int = 5_000  # ours: a checkpoint every N environment steps
    offline_steps: int = 0  # ours: Cal-QL warm-up steps on prior + target before the first rollout
    buffer_capacity: int = 0  # ours: frames in the ReplayBuffer's ring (0: keep every transition)
    filtered_bc: bool = False  # ours: the control: imitate target demos + own successes, no critic


@dataclass
class LoopState:
    """Where online fine-tuning stands: python values only, saved in every checkpoint (as a dict),
    so that a resumed run continues exactly."""

    env_steps: int = 0  # environment steps collected
    grad_steps: int = 0  # gradient updates taken, warm-up included
    episodes: int = 0  # online trajectories collected
    pending: int = 0  # updates still owed to the last trajectory (utd * its length)
    offline_done: int = 0  # warm-up updates taken
    next_eval: int = 0  # env step at which the next evaluation is due
    last_eval: int = -1  # env step of the last evaluation
    next_save: int = 0  # env step at which the next checkpoint is due
    next_log: int = 0  # env step at which the next progress row is due
    sums: dict = field(default_factory=dict)  # losses summed since the last row
    n_updates: int = 0  # updates in those sums
    rollouts: list = field(default_factory=list)  # [return, success, length] since the last row
    held_rows: list = field(default_factory=list)  # [env step, row] written before any update
    train_keys: list | None = None  # the update's info keys, known after the first update
    live: list = field(default_factory=list)  # [episode, length] the buffer holds, oldest first


@dataclass
class WallTime:
    """Seconds of the online loop by what they were spent on, summed over the run and its resumes;
    progress.csv's wall_<part>_s columns, and the line that ends the run. Saved in every checkpoint
    beside LoopState, not in it: a resumed run reproduces LoopState exactly, and no clock does."""

    rollouts: float = 0.0  # collecting trajectories: the policy acting and the env stepping
    evaluation: float = 0.0  # evaluation episodes
    updates: float = 0.0  # gradient steps: sampling the batch, augmenting it, the update
    total: float = 0.0  # the whole loop; the rest is checkpoints, episode files and logs


@dataclass(frozen=True)
class RunOptions:
    """What OnlineLoop reads of the run's own options (train.add_run_args, --max_steps): where
    it writes, what it keeps, how it logs, its batch size, seed and episode length cap."""

    out: str  # the run folder
    seed: int = 0  # online trajectory n resets with rollout_seed(seed, n)
    batch_size: int = 64  # transitions per gradient step
    max_steps: int = 0  # episode length cap (0: the env's own limit)
    log_every: int = 1  # a progress row every N environment steps
    keep_last: int = 0  # keep the newest N checkpoints, delete older ones (0: keep all)
    keep_steps: tuple = ()  # checkpoints (by env step) that keep_last never deletes
    tensorboard: bool = False  # also log to TensorBoard


def wall_summary(wall, env_steps, grad_steps):
    """One line: where a run's wall time went, with the rates of its two main parts."""

    def part(seconds):
        return f"{seconds:.1f} s ({100 * seconds / max(wall.total, 1e-9):.0f}%)"

    other = wall.total - wall.rollouts - wall.evaluation - wall.updates
    env_rate = env_steps / max(wall.rollouts, 1e-9)
    update_rate = grad_steps / max(wall.updates, 1e-9)
    return (
        f"wall time {wall.total:.1f} s: rollouts {part(wall.rollouts)}, {env_steps} env steps at "
        f"{env_rate:.2f}/s; evaluation {part(wall.evaluation)}; updates {part(wall.updates)}, "
        f"{grad_steps} at {update_rate:.2f}/s; checkpoints, files and logs {part(other)}"
    )


# ----------------------------------------------------------------------------- online fine-tuning


def online_learner(cfg, online, buffer_filled):
    """The phase switch of online fine-tuning (Appendix F), as one config change: Cal-QL
    (online.calql) for the whole run; CQL alpha online.alpha_offline while the buffer is still empty
    (the --offline_steps warm-up), online.alpha_online from the first online trajectory on.
    Filtered BC has no critic: its learner stays as it is."""
    if online.filtered_bc:
        return cfg
    alpha = online.alpha_online if buffer_filled else online.alpha_offline
    return dataclasses.replace(cfg, calql=online.calql, alpha=alpha)


def refill_buffer(buffer, run_dir, live):
    """Re-add the trajectories [episode, length] a checkpoint's buffer held, oldest first
    (its FIFO drops whole)."""
    for episode, _ in live:
        path = episode_path(run_dir, episode)
        if not os.path.isfile(path):
            raise CheckpointError(
                f"{path}: missing, but the checkpoint's replay buffer holds this online trajectory"
            )
        buffer.add_trajectory(*read_episode(path))


def rollout_seed(run_seed, episode):
    """The env.reset seed of online trajectory `episode` of a run with --seed run_seed: far from
    the evaluation seeds (eval_seed + i)."""
    return 1_000_003 * (run_seed + 1) + episode


def next_multiple(step, every):
    """The first multiple of `every` after `step`: when the next evaluation, row or save is due."""
    return (step // every + 1) * every


@dataclass
class OnlineLoop:
    """Online fine-tuning's loop (module docstring): collect a trajectory, then online.utd gradient
    steps per transition, until online.env_steps. loop() runs it; the methods before it are its
    parts, in the order it calls them. state (a resumed run's LoopState) and wall (its WallTime so
    far) are copied, not changed; every checkpoint saves them, so a resumed run continues exactly.
    online.filtered_bc: only the successful trajectories enter the buffer (every one is written to
    episodes/), and while the buffer is empty the updates draw from `offline`."""

    agent: object  # the learner (cql.Agent)
    env: object  # the environment (rollout.make_env)
    policy: Policy  # the agent acting in env
    buffer: ReplayBuffer  # the online trajectories
    mixed: MixedSampler  # the batches once the buffer holds data
    offline: MixedSampler  # the batches before: the warm-up; filtered BC before its first success
    run: RunOptions
    online: OnlineConfig
    payload: dict  # every checkpoint's fixed fields (checkpoint.run_payload)
    state: LoopState
    resetter: Callable = no_reset  # runs after every episode (rollout.make_resetter)
    labeler: Callable | None = None  # rewards where the env gives none (classifier.make_labeler)
    wall: WallTime | None = None

    def __post_init__(self):
        self.state = copy.deepcopy(self.state)
        self.wall = dataclasses.replace(self.wall) if self.wall else WallTime()
        self.log = RunLog(
            self.run.out,
            self.online.env_steps,
            self.state.env_steps,
            tensorboard=self.run.tensorboard,
        )
        self.started = time.perf_counter() - self.wall.total
        self.stop = StopFlag()
        # torch's and the agent's random state before the rollout under way (None: no rollout is),
        # to rewind to if that rollout is dropped
        self.rng_before_rollout = None

    @contextlib.contextmanager
    def timed(self, part):
        """Adds the seconds of the block to wall.<part>."""
        start = time.perf_counter()
        yield
        setattr(self.wall, part, getattr(self.wall, part) + time.perf_counter() - start)

    def clock(self):
        """The WallTime, its total brought up to now."""
        self.wall.total = time.perf_counter() - self.started
        return self.wall

    def enter_phase(self):
        """The learner of the buffer's phase (online_learner): alpha changes when it first fills."""
        cfg = online_learner(self.agent.cfg, self.online, buffer_filled=len(self.buffer) > 0)
        if cfg != self.agent.cfg:
            self.agent.set_config(cfg)

    def update(self, sampler):
        """One gradient step on a batch of `sampler`; its losses are summed for the next row."""
        state = self.state
        with self.timed("updates"):
            info = train_step(self.agent, sampler, self.run.batch_size, state.grad_steps + 1)
        state.grad_steps += 1
        state.sums = {k: state.sums.get(k, 0.0) + float(v) for k, v in info.items()}
        state.n_updates += 1
        state.train_keys = sorted(info)

    def take_owed_updates(self):
        """The warm-up's updates not yet taken, then those owed to the last trajectory (UTD); a stop
        ends them at the next step."""
        state = self.state
        while state.offline_done < self.online.offline_steps and not self.stop.requested:
            self.update(self.offline)
            state.offline_done += 1
        while state.pending > 0 and not self.stop.requested:
            # the offline batches while the buffer is empty (filtered BC: no success yet)
            self.update(self.mixed if len(self.buffer) else self.offline)
            state.pending -= 1

    def evaluation_due(self, done):
        """Every online.eval_every env steps from step 0, and at the end."""
        if not self.online.eval_every:
            return False
        state = self.state
        return state.env_steps >= state.next_eval or (done and state.last_eval != state.env_steps)

    def evaluate(self):
        """Deterministic episodes at this env step: their summary (rollout.summarize), or None when
        a stop ended them."""
        steps = self.state.env_steps
        with self.timed("evaluation"):
            results = evaluate(
                self.env,
                self.policy,
                self.online.eval_episodes,
                self.online.eval_seed,
                self.run.max_steps,
                self.resetter,
                self.stop,
                labeler=self.labeler,
                log=lambda line: None,
            )
        if results is None:
            return None
        evaluation = summarize(results)
        self.state.next_eval = next_multiple(steps, self.online.eval_every)
        self.state.last_eval = steps
        print(f"env step {steps}: evaluation {evaluation['text']}", flush=True)
        return evaluation

    def progress_row(self, evaluation):
        """progress.csv's row: the losses averaged since the last row, the counts, the rollouts'
        means, the evaluation's results (NaN without one) and the wall time."""
        state = self.state
        rollouts = np.array(state.rollouts, np.float64).reshape(-1, 3)
        row = {k: v / state.n_updates for k, v in state.sums.items()}
        row.update(
            grad_steps=state.grad_steps,
            episodes=state.episodes,
            buffer_transitions=len(self.buffer),
            alpha=self.agent.cfg.alpha,
        )
        for i, k in enumerate(("return", "success", "length")):
            row[f"rollout_{k}"] = rollouts[:, i].mean() if len(rollouts) else float("nan")
        for k in ("success", "success_lo", "success_hi", "return", "length"):
            row[f"eval_{k}"] = evaluation[k] if evaluation else float("nan")
        for part, seconds in asdict(self.clock()).items():
            row[f"wall_{part}_s"] = round(seconds, 3)
        return row

    def write_row(self, evaluation):
        """Log progress_row and start the next one's sums. RunLog fixes its columns at the first
        row: rows are held until an update has named the losses."""
        state = self.state
        row = self.progress_row(evaluation)
        state.sums = {}
        state.n_updates = 0
        state.rollouts = []
        state.held_rows.append([state.env_steps, row])
        if state.train_keys:
            for step, held in state.held_rows:
                self.log.log(step, {**{k: float("nan") for k in state.train_keys}, **held})
            state.held_rows = []

    def log_on_schedule(self, evaluation, done):
        """A row with every evaluation, every run.log_every env steps when trajectories came in,
        and at the end."""
        state = self.state
        if evaluation or (state.rollouts and (state.env_steps >= state.next_log or done)):
            self.write_row(evaluation)
            state.next_log = next_multiple(state.env_steps, self.run.log_every)

    def save(self):
        """ckpt_<env step>.pt with the loop state and wall time, then retention."""
        state = self.state
        ckpt = build_checkpoint(
            self.payload,
            state.env_steps,
            self.agent,
            self.mixed.state_dict(),
            capture_rng(),
            grad_steps=state.grad_steps,
            loop=asdict(state),
            wall=asdict(self.clock()),
        )
        save_checkpoint(ckpt, self.run)

    def save_on_schedule(self, done):
        """A checkpoint every online.save_every env steps, and at the end."""
        state = self.state
        if state.env_steps >= state.next_save or done:
            self.save()
            state.next_save = next_multiple(state.env_steps, self.online.save_every)

    def collect_episode(self):
        """One trajectory of the stochastic policy, the env reset after it; None when a stop
        dropped it."""
        # policy noise comes from the agent's generator: both are rewound if the rollout is dropped
        self.rng_before_rollout = (capture_rng(), self.agent.generator.get_state())
        seed = rollout_seed(self.run.seed, self.state.episodes)
        with self.timed("rollouts"):
            episode = run_episode(
                self.env,
                self.policy,
                seed,
                False,
                self.run.max_steps,
                self.stop,
                labeler=self.labeler,
            )
            if episode is not None:
                self.resetter()
        return episode

    def add_episode(self, ep):
        """Write the trajectory to episodes/, add it to the buffer (filtered BC: a success only),
        and owe online.utd updates per step of it."""
        state = self.state
        traj = (ep["images"], ep["states"], ep["actions"], ep["rewards"], self.policy.task)
        path = episode_path(self.run.out, state.episodes)
        # a labelled episode also keeps the simulator's own rewards, to compare the labels with
        write_episode(path, *traj, env_rewards=ep["env_rewards"] if self.labeler else None)
        if ep["success"] or not self.online.filtered_bc:
            self.buffer.add_trajectory(*traj)
            state.live.append([state.episodes, ep["length"]])
        self.enter_phase()
        while sum(n for _, n in state.live) > len(self.buffer):  # the buffer dropped the oldest
            state.live.pop(0)
        self.rng_before_rollout = None
        state.env_steps += ep["length"]
        state.episodes += 1
        state.pending = self.online.utd * ep["length"]
        state.rollouts.append([ep["return"], float(ep["success"]), ep["length"]])

    def save_stopped(self):
        """Ctrl-C or SIGTERM: save where the loop stands and exit with the signal's status. A
        dropped rollout's random state is rewound first, so that a resumed run collects that same
        episode again."""
        if self.rng_before_rollout is not None:
            restore_rng(self.rng_before_rollout[0])
            self.agent.generator.set_state(self.rng_before_rollout[1])
        self.save()
        print(
            f"stopped at env step {self.state.env_steps}; continue with --resume", file=sys.stderr
        )
        raise SystemExit(self.stop.exit_status)

    def loop(self):
        """Until online.env_steps (the last trajectory may run past it) or a stop (save_stopped);
        returns the final LoopState."""
        self.enter_phase()
        with self.stop:
            while True:
                self.take_owed_updates()
                if self.stop.requested:
                    break
                done = self.state.env_steps >= self.online.env_steps
                evaluation = None
                if self.evaluation_due(done):
                    evaluation = self.evaluate()
                    if evaluation is None:  # stopped mid-evaluation
                        break
                self.log_on_schedule(evaluation, done)
                self.save_on_schedule(done)
                if done:
                    break
                episode = self.collect_episode()
                if episode is None:  # stopped mid-rollout
                    break
                self.add_episode(episode)
            print(
                wall_summary(self.clock(), self.state.env_steps, self.state.grad_steps), flush=True
            )
            if self.stop.requested:
                self.save_stopped()
        return self.state


def cmd_finetune(args):
    with claim_run_folder(args.out, args.resume):
        online_finetune(args)


def online_finetune(args):
    """Online fine-tuning in a run folder this process owns (module docstring)."""
    online = dataclass_from_args(
        OnlineConfig, args, env_steps=args.steps, save_every=args.save_every
    )
    mix_online = 1.0 - online.mix_prior - online.mix_target
    if min(online.mix_prior, online.mix_target, mix_online) < 0:
        raise SystemExit(
            f"--mix_prior {online.mix_prior} --mix_target {online.mix_target}: expected a sum <= 1"
        )
    resumed, source, source_path, prior, target, size = open_run_from_flags(args)
    agent = agent_from_checkpoint(source, args.device, source_path)
    if online.filtered_bc:
        agent = imitation_learner(agent, source_path)
    elif agent.critic is None:
        raise SystemExit(
            f"{source_path}: a {agent.cfg.algo} checkpoint has no Q-function to fine-tune online "
            f"(use a CQL one)"
        )
    agent.set_config(dataclasses.replace(agent.cfg, **learner_overrides(args, skip=ONLINE_SETS)))
    names, target_ids = target_assignment(source, source_path, target, agent, args.task)
    low = source["action_low"]
    high = source["action_high"]
    gamma = agent.cfg.gamma
    prior_s, target_s = task_samplers(
        prior, target, names, target_ids, source, gamma, args.seed, args.prior
    )
    # >= T + 1 frames per T steps; unused pages cost nothing
    capacity = online.buffer_capacity or 2 * online.env_steps + 1000
    buffer = ReplayBuffer(capacity, size, gamma=gamma, seed=args.seed + 104729)
    if online.filtered_bc:
        # the control imitates the target demos and its own successes (the buffer), with the
        # fractions the RL run gives them; while no rollout has succeeded, the demos alone
        demos = online.mix_target / max(online.mix_target + mix_online, 1e-12)
        offline = MixedSampler([target_s], [1.0])
        mixed = MixedSampler([target_s, buffer], [demos, 1 - demos])
    else:
        offline_prior = online.mix_prior / max(online.mix_prior + online.mix_target, 1e-12)
        offline = MixedSampler([prior_s, target_s], [offline_prior, 1 - offline_prior])
        mixed = MixedSampler(
            [prior_s, target_s, buffer], [online.mix_prior, online.mix_target, mix_online]
        )
    task = target_ids[0]  # the environment runs the (first) target task
    policy = Policy(agent, low, high, task, names[task], args.binarize_gripper)
    torch.manual_seed(args.seed)
    state = LoopState(next_save=online.save_every)
    wall = WallTime()
    if resumed is not None:
        refill_buffer(buffer, args.out, resumed["loop"]["live"])
        mixed.load_state_dict(resumed["sampler"])
        restore_rng(resumed["rng"])
        state = LoopState(**resumed["loop"])
        wall = WallTime(**resumed.get("wall", {}))  # none saved: the clock starts at zero
    payload = run_payload(
        "online",
        names,
        low,
        high,
        target_task_ids=target_ids,
        target_tasks=list(target.task_names),
        online_task=task,
        source_ckpt=source_ckpt(source, source_path),
    )
    derived = dict(
        task_names=names,
        target_task_ids=target_ids,
        online_task=task,
        capacity=capacity,
        image_size=size,
    )
    write_config(args.out, {**vars(args), **derived})
    if online.filtered_bc:
        print(
            f"filtered BC online, task {task} ({names[task]}) in {args.env}: "
            f"{agent.cfg.algo} imitating target/successes {demos:.2f}/{1 - demos:.2f}, "
            f"UTD {online.utd}, no critic"
        )
    else:
        print(
            f"online fine-tuning task {task} ({names[task]}) in {args.env}: prior/target/online "
            f"{online.mix_prior}/{online.mix_target}/{mix_online:.2f}, UTD {online.utd}, "
            f"alpha {online.alpha_online}, Cal-QL {online.calql}"
        )
    env = make_env(
        args.env,
        args.env_image_size or size,
        policy.task_name,
        args.max_steps,
        args.port,
        args.backend,
        args.env_camera,
        ood=args.ood,
        terminate_on_success=not args.classifier,
    )
    try:
        labeler = make_labeler(args.env, args.classifier, args.device)
        resetter = make_resetter(args.env, env, args.reset_ckpt, args.device)
        run = dataclass_from_args(RunOptions, args, keep_steps=tuple(args.keep_steps))
        OnlineLoop(
            agent,
            env,
            policy,
            buffer,
            mixed,
            offline,
            run,
            online,
            payload,
            state,
            resetter,
            labeler,
            wall,
        ).loop()
    finally:
        close_env(env)


def cmd_eval(args):
    """rollout.run_evaluation, with the rewards of --classifier or a person (make_labeler)."""
    cfg = dataclass_from_args(EvalConfig, args)
    return run_evaluation(cfg, make_labeler(cfg.env, cfg.classifier, cfg.device))


def cmd_export(args):
    """Write the checkpoint's actors alone (checkpoint.export_policy) with how to evaluate them
    (task, sampled or mean actions, binarized gripper), which `eval` then uses."""
    evaluation = {"sample_actions": args.sample_actions, "binarize_gripper": args.binarize_gripper}
    if args.task is not None:
        evaluation["task"] = args.task
    export_policy(args.ckpt, args.out, evaluation)
    size = os.path.getsize(args.out) / 1e6
    print(f"wrote {args.out} ({size:.1f} MB): the actors of {args.ckpt}, for online.py eval")


# ----------------------------------------------------------------------------- CLI


def add_eval_parser(sub):
    e = sub.add_parser(
        "eval", help="reproducible episodes: success rate with a 95%% Wilson interval"
    )
    add_eval_args(e)


def add_export_parser(sub):
    x = sub.add_parser("export", help="a checkpoint's actors alone, to share: `eval` loads it")
    x.add_argument("--ckpt", required=True)
    x.add_argument("--out", required=True)
    x.add_argument("--task", default=None, help="the task eval runs (default: the target)")
    x.add_argument(
        "--sample_actions", action="store_true", help="eval samples actions (see eval's flag)"
    )
    x.add_argument(
        "--binarize_gripper", action="store_true", help="eval binarizes the gripper command"
    )


def add_finetune_parser(sub):
    d = OnlineConfig()
    f = sub.add_parser("finetune", help="online fine-tuning (Section V-F)")
    f.add_argument(
        "--ckpt",
        default=None,
        help="a finetune.py (or train.py) checkpoint; not needed with --resume",
    )
    for name in ("prior", "target"):
        f.add_argument(
            f"--{name}", required=True, help=f"the {name} data (Bridge format), as in finetune.py"
        )
        f.add_argument(
            f"--{name}_store", default=None, help="where its store is built (default: inside it)"
        )
    f.add_argument(
        "--task", default="new", help="pre-trained --ckpt only: 'new' slot or a task to re-target"
    )
    # online RL counts in environment steps
    add_run_args(
        f,
        steps=d.env_steps,
        save_every=d.save_every,
        keep_last=0,
        log_every=1,
        out=os.path.join("runs", "online"),
        unit="environment steps",
        steps_flags=("--env_steps",),
    )
    add_data_args(f)
    add_env_args(f, camera_flag="--env_camera")
    g = f.add_argument_group("online fine-tuning (OnlineConfig)")
    add_dataclass_args(g, OnlineConfig, skip=("env_steps", "save_every"))
    add_learner_overrides(f, skip=ONLINE_SETS)


# The flags each command checks before any work (cli.check_flags): an evaluation of no episode has
# no success rate; online fine-tuning counts steps as train.py does.
COMMAND_RULES = {"eval": {"--episodes": POSITIVE}, "finetune": RUN_RULES, "export": {}}


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    add_eval_parser(sub)
    add_finetune_parser(sub)
    add_export_parser(sub)
    args = p.parse_args(argv)
    check_flags(args, COMMAND_RULES[args.cmd])
    commands = {
        "eval": cmd_eval,
        "finetune": cmd_finetune,
        "export": cmd_export,
    }
    return commands[args.cmd](args)


if __name__ == "__main__":
    run_cli(main)
