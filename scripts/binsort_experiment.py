"""Does offline RL do the work? PTR against matched imitation on the simulated bin-sort, at laptop
scale (paper Section V-A, Table VII; SPEC section 7), as one resumable command:

    python scripts/binsort_experiment.py --out runs/binsort               # the development phase
    python scripts/binsort_experiment.py --out runs/binsort --test 1 --seeds 0,1,2   # final table
    python scripts/binsort_experiment.py --out runs/binsort --table       # only rewrite the tables

Two kinds of evaluation episodes, never mixed: development seeds (dev_seed + i) for every choice
(the dose-response of the actor's critic terms, the baselines' tau and dropout, per-checkpoint
curves, the selection study), and test seeds (test_seed + i), evaluated once per policy for the
final table. Each training seed s collects its own data (sim_binsort.py collect --seed s) and trains
every network with --seed s, in its own folder out/seed_<s>/.

The development phase (the first training seed only) trains
    cql_pre        multi-task CQL pre-training, one reserved one-hot slot, actor imitating (PTR 1)
    gbc_pre        Gaussian BC pre-training: the same actor and schedule by likelihood alone
    bc_pre_d<p>    BC (MSE) pre-training with dropout p
and fine-tunes on the 5 target demos with tau of prior data in each batch:
    ptr_q<lambda>  from cql_pre, the imitating actor plus lambda * normalised Q (TD3+BC); lambda 0
                   is Gaussian BC with a critic beside it, which only picks the checkpoint
    ptr_awr<beta>  from cql_pre, advantage-weighted likelihood (AWR / IQL extraction)
    gbc_ft_m<tau>  from gbc_pre (matched Gaussian BC)
    bc_ft_d<p>_m<tau>  from bc_pre_d<p> (BC finetune)
PTR's checkpoints are chosen by select_ckpt.py from Q-values on the held-out target demos (Section
IV-B), the BC baselines' by validation error on the same demos (select_ckpt.py --by val_loss).

The test phase (--test 1) takes, from the first seed's development evaluations, the best
critic-driven PTR setting, Gaussian BC's tau and BC finetune's tau and dropout; trains them (and PTR
with lambda 0) for every seed in --seeds, and evaluates each chosen checkpoint once on the test
seeds. The table shows each seed and the pooled rate with Wilson intervals, and paired exact
McNemar tests stratified over seeds, Holm-corrected over the table's comparisons. Adding a seed to
--seeds later resumes: finished jobs are skipped, unfinished ones resume (train.py / finetune.py
--resume).

Everything lands in --out: seed_<s>/{data, one run folder per job, logs/, eval/}, then results.md
and dose_response.png. Jobs run --jobs at a time, one thread each.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

# the project's leaves: no torch, no pybullet
from cli import add_dataclass_args, dataclass_from_args  # noqa: E402
from fileio import atomic_write_text, pid_alive  # noqa: E402
from runfolder import CKPT_PATTERN, LOCK_FILE, QTRACE_PATTERN, list_checkpoints  # noqa: E402
from stats import discordant, holm, mcnemar_exact_p, wilson_interval  # noqa: E402

SORT_TASK = "sort_mug_cube"  # the target's one-hot slot by name
PICK_TASKS = ("pick_cube_to_left", "pick_duck_to_right", "pick_mug_to_left", "pick_ball_to_right")
PAPER_FOOTNOTE = (
    "Paper (Section V-E, the simulated bin-sort at full scale, another simulator; 95% intervals): "
    "PTR 17.41 +- 1.77 %, BC finetune 4.88 +- 4.07 %, COG 8.00 +- 1.00 %, BC joint 7.00 +- 0.00 %."
)


@dataclass
class Protocol:
    """The laptop-scale protocol; results/binsort_cpu.md reports these values."""

    n_prior: int = 800  # pick-and-place demos over the 20 (object, bin) tasks
    n_target: int = 5  # full-sort demos (paper: 5), plus 3 held out for checkpoint selection
    sort_first: str = "cube"  # the object the sort demos place first ("": the goal's order)
    image_size: int = 64
    arch: str = "small"
    batch_size: int = 64
    alpha: float = 1.0  # the paper's simulation values (SPEC section 3)
    gamma: float = 0.98
    mix: float = 0.7  # PTR's tau: prior data per fine-tuning batch
    cql_pre_steps: int = 7500
    gbc_pre_steps: int = 7500
    bc_pre_steps: int = 7500
    ft_steps: int = 2000  # every fine-tuning run, PTR and baselines alike
    ft_save_every: int = 250  # checkpoints to choose from
    seeds: str = "0"  # training seeds; seed s also collects its own data
    dev_seed: int = 1000  # development episodes reset with dev_seed + i
    test_seed: int = 200000  # test episodes reset with test_seed + i (the final table only)
    sort_episodes: int = 50  # per chosen checkpoint
    ckpt_episodes: int = 20  # per saved checkpoint of the curve runs (development seeds)
    pick_episodes: int = 25  # per held-in pick-place task, pre-trained policies
    sample_actions: int = 1  # tanh-Gaussian actors act with sampled actions (BC: deterministic)
    # log-spaced: the likelihood's gradient on the actor's mean is (a - mu) / sigma^2, with sigma
    # ~0.1 about 100x the normalised Q term's at lambda 1, so the grid spans no effect to Q-led
    q_weights: str = "0,1,10,100"  # lambda of the imitating actor's Q term (development)
    awr_betas: str = "1,3"  # inverse temperatures of AWR's weights (development)
    q_warmup: int = 500  # fine-tuning updates before the Q term starts (the critic fits the target)
    q_ramp: int = 500  # then lambda ramps up linearly over this many updates
    gbc_mixes: str = "0.7,0.9"  # Gaussian BC's tau candidates (development)
    bc_mixes: str = "0.7,0.9"  # BC finetune's tau candidates (development)
    bc_dropouts: str = "0.4,0"  # BC's dropout candidates (development; Table XI: 0.4)
    curve_runs: str = "ptr_"  # runs (or name prefixes) whose every checkpoint is evaluated
    qmax_study: int = 0  # 1: also the paper's Q-maximising actor, with each suspected cure alone
    test: int = 0  # 1: the final table on the test seeds, for every seed in --seeds
    extra: list = field(default_factory=list)  # flags for every train.py command (last on the line)


@dataclass
class Job:
    name: str
    cmd: list
    deps: tuple = ()
    done_file: str = ""  # exists when the job is complete

    def done(self):
        return bool(self.done_file) and os.path.exists(self.done_file)


def numbers(text):
    return [float(x) for x in str(text).split(",") if x.strip()]


def seed_list(p):
    seeds = [int(x) for x in str(p.seeds).split(",") if x.strip()]
    if not seeds or len(set(seeds)) != len(seeds):
        raise SystemExit(f"binsort_experiment: --seeds {p.seeds!r}: expected distinct integers")
    return seeds


def tag(x):
    return f"{x:g}"


def python(*args):
    return [sys.executable, *args]


def ckpt_path(run_dir, step):
    return os.path.join(run_dir, CKPT_PATTERN.format(step))


def check_seed_sets(p):
    """Development and test episodes never share a reset seed."""
    dev = range(p.dev_seed, p.dev_seed + max(p.sort_episodes, p.ckpt_episodes, p.pick_episodes))
    test = range(p.test_seed, p.test_seed + p.sort_episodes)
    if set(dev) & set(test):
        raise SystemExit(
            f"binsort_experiment: development seeds {dev.start}..{dev.stop - 1} and test seeds "
            f"{test.start}..{test.stop - 1} overlap; choose --dev_seed / --test_seed apart"
        )


# ------------------------------------------------------------------------------------ the runs
def finetune_runs(p):
    """{run name: (pre-training run, finetune.py flags)} of the development phase."""
    start = p.cql_pre_steps + p.q_warmup
    imitate = ["--bc_steps", str(p.cql_pre_steps + p.ft_steps)]  # the actor never maximises Q alone
    runs = {}
    for lam in numbers(p.q_weights):
        q = ["--actor_q_weight", tag(lam), "--actor_q_start", str(start)]
        runs[f"ptr_q{tag(lam)}"] = ("cql_pre", [*imitate, *q, "--actor_q_ramp", str(p.q_ramp)])
    for beta in numbers(p.awr_betas):
        runs[f"ptr_awr{tag(beta)}"] = ("cql_pre", [*imitate, "--actor_awr_beta", tag(beta)])
    if p.qmax_study:
        runs.update(qmax_runs(p))
    for mix in numbers(p.gbc_mixes):
        runs[f"gbc_ft_m{tag(mix)}"] = ("gbc_pre", ["--mix", tag(mix)])
    for dropout in numbers(p.bc_dropouts):
        for mix in numbers(p.bc_mixes):
            runs[f"bc_ft_d{tag(dropout)}_m{tag(mix)}"] = (
                f"bc_pre_d{tag(dropout)}",
                ["--mix", tag(mix)],
            )
    return runs


def qmax_runs(p):
    """Why the paper's Q-maximising actor loses the pre-trained grasp: the actor maximises Q from
    the first fine-tuning update (as published), and each run changes one suspected cause alone.
    A diagnosis, never a candidate for the final table."""
    qmax = ["--bc_steps", str(p.cql_pre_steps)]
    later = ["--bc_steps", str(p.cql_pre_steps + p.q_warmup)]
    return {
        "qmax": ("cql_pre", qmax),  # the target slot starts at zero (finetune.py's default)
        "qmax_random_slot": ("cql_pre", [*qmax, "--no-zero_target_slot"]),  # cause 2
        "qmax_warm": ("cql_pre", later),  # cause 1: the critic fits the target slot first
        "qmax_alpha5": ("cql_pre", [*qmax, "--alpha", "5"]),  # cause 3: a stronger CQL gap
        "qmax_entropy": ("cql_pre", [*qmax, "--target_entropy", "0"]),  # cause 4: a wider actor
        "qmax_gripper": ("cql_pre", [*qmax, "--no-actor_q_gripper"]),  # cause 5: no Q on gripper
        "qmax_encoder": ("cql_pre", [*qmax, "--no-actor_q_encoder"]),  # cause 6: no Q in encoder
    }


Q_RULE = "Q-values (select_ckpt.py)"


def describe(run):
    """(actor objective, checkpoint rule) of a run, for the tables."""
    if run.startswith("ptr_q"):
        lam = run[5:]
        objective = "tanh-Gaussian likelihood" + (f" + {lam} x normalised Q" if lam != "0" else "")
        return objective + " (CQL critic)", Q_RULE
    if run.startswith("qmax"):
        return f"Q-maximising from the first fine-tuning update ({run})", Q_RULE
    if run.startswith("ptr_awr"):
        return f"likelihood weighted by exp({run[7:]} A / std A) (CQL critic)", Q_RULE
    if run.startswith("gbc_ft"):
        return f"tanh-Gaussian likelihood, no critic, tau {run.split('_m')[1]}", "validation NLL"
    if run.startswith("bc_ft"):
        dropout, mix = run[7:].split("_m")
        return f"MSE, dropout {dropout}, tau {mix}", "validation MSE"
    return run, "-"


def is_gaussian(run):
    return not run.startswith("bc_")


def pre_steps(p, pre):
    return {"cql_pre": p.cql_pre_steps, "gbc_pre": p.gbc_pre_steps}.get(pre, p.bc_pre_steps)


# ------------------------------------------------------------------------------------ the jobs
def seed_jobs(p, out, seed, runs, evals):
    """The jobs of one training seed: collection, the pre-trainings the runs need, the runs, their
    checkpoint selection and the evaluations in evals [(name, run, "chosen" | "last" | step,
    episodes, "dev" | "test")]."""
    s = os.path.join(out, f"seed_{seed}")
    d = os.path.join(s, "data")
    prior = os.path.join(d, "prior")
    target = os.path.join(d, "target")
    py = shlex.quote(sys.executable)
    size = f"--image_size {p.image_size} --seed {seed}"
    collect_sort = f"{py} sim_binsort.py collect --task sort --n {p.n_target} {size} --out {target}"
    if p.sort_first:
        collect_sort += f" --first {shlex.quote(p.sort_first)}"
    collect = [
        f"{py} sim_binsort.py collect --task pickplace --n {p.n_prior} {size} --workers 2 "
        f"--out {prior}",
        collect_sort,
        f"touch {os.path.join(d, 'collected')}",
    ]
    name = lambda job: f"s{seed}/{job}"  # noqa: E731
    jobs = [Job(name("collect"), ["bash", "-c", " && ".join(collect)], (), f"{d}/collected")]
    common = ["--arch", p.arch, "--batch_size", str(p.batch_size), "--log_every", "250"]
    common += ["--seed", str(seed), *p.extra]
    pre_flags = {
        "cql_pre": ["--algo", "cql", "--alpha", str(p.alpha)],
        "gbc_pre": ["--algo", "gbc"],
    }
    for dropout in numbers(p.bc_dropouts):
        pre_flags[f"bc_pre_d{tag(dropout)}"] = ["--algo", "bc", "--bc_dropout", tag(dropout)]
    pre_flags["cql_pre"] += ["--bc_steps", str(p.cql_pre_steps + p.ft_steps)]
    needed = sorted({runs[run][0] for run in runs}, key=list(pre_flags).index)
    for pre in needed:
        steps = pre_steps(p, pre)
        cmd = python("train.py", "--data", prior, "--out", os.path.join(s, pre))
        cmd += ["--steps", str(steps), "--save_every", str(max(steps // 4, 1))]
        cmd += [*pre_flags[pre], "--gamma", str(p.gamma), *common, "--extra_tasks", "1", "--resume"]
        jobs.append(Job(name(pre), cmd, (name("collect"),), ckpt_path(os.path.join(s, pre), steps)))
    for run, (pre, flags) in runs.items():
        mix = [] if "--mix" in flags else ["--mix", str(p.mix)]
        cmd = python("finetune.py", "--ckpt", ckpt_path(os.path.join(s, pre), pre_steps(p, pre)))
        cmd += ["--prior", prior, "--target", target, "--out", os.path.join(s, run), *mix]
        cmd += ["--steps", str(p.ft_steps), "--save_every", str(p.ft_save_every)]
        cmd += ["--batch_size", str(p.batch_size), "--log_every", "250", "--seed", str(seed)]
        cmd += [*flags, "--resume"]
        done = ckpt_path(os.path.join(s, run), p.ft_steps)
        jobs.append(Job(name(run), cmd, (name(pre),), done))
        rule = ["--by", "val_loss"] if run.startswith(("gbc_", "bc_")) else []
        select = python("select_ckpt.py", os.path.join(s, run), *rule)
        done = os.path.join(s, run, "selection.json")
        jobs.append(Job(name("select_" + run), select, (name(run),), done))
    for eval_name, run, which, episodes, phase, task in evals:
        run_dir = os.path.join(s, run)
        if which == "chosen":
            ckpt, dep = f"SELECTED:{run_dir}", "select_" + run
        elif which == "last":
            ckpt, dep = f"LAST:{run_dir}", run
        else:
            ckpt, dep = ckpt_path(run_dir, which), run
        json_path = os.path.join(s, "eval", eval_name + ".json")
        first = p.dev_seed if phase == "dev" else p.test_seed
        cmd = python("online.py", "eval", "--ckpt", ckpt, "--episodes", str(episodes))
        cmd += ["--seed", str(first), "--json", json_path, "--binarize_gripper", "--task", task]
        if p.sample_actions and is_gaussian(run):
            cmd.append("--sample_actions")
        jobs.append(Job(name("eval_" + eval_name), cmd, (name(dep),), json_path))
    return jobs


def dev_evals(p, runs):
    """The development evaluations of the first seed: held-in pick-place tasks of the pre-trained
    policies, the sort for every run's chosen and last checkpoint, every checkpoint of the curve
    runs."""
    evals = []
    pres = sorted({pre for pre, _ in runs.values()})
    for pre in pres:
        for task in PICK_TASKS:
            evals.append((f"dev_{pre}_{task}", pre, "last", p.pick_episodes, "dev", task))
    for run in runs:
        evals.append((f"dev_{run}", run, "chosen", p.sort_episodes, "dev", SORT_TASK))
        evals.append((f"dev_{run}_last", run, "last", p.sort_episodes, "dev", SORT_TASK))
    for run in curve_runs(p, runs):
        for step in range(p.ft_save_every, p.ft_steps + 1, p.ft_save_every):
            name = f"dev_{run}_step_{step:06d}"
            evals.append((name, run, step, p.ckpt_episodes, "dev", SORT_TASK))
    return evals


def curve_runs(p, runs):
    """The runs whose every saved checkpoint is evaluated: those p.curve_runs names or prefixes."""
    prefixes = [x for x in str(p.curve_runs).split(",") if x]
    return [run for run in runs if any(run.startswith(x) for x in prefixes)]


def test_runs(p, out):
    """{role: run name} of the final table, chosen from the first seed's development evaluations:
    the critic-driven PTR setting, Gaussian BC's tau and BC's (tau, dropout) with the highest
    development success (ties: the first in finetune_runs' order, the smaller lambda or beta)."""
    first = seed_list(p)[0]
    runs = finetune_runs(p)
    roles = {
        "ptr_critic": [r for r in runs if r.startswith("ptr_") and r != "ptr_q0"],
        "gbc": [r for r in runs if r.startswith("gbc_ft")],
        "bc": [r for r in runs if r.startswith("bc_ft")],
    }
    chosen = {"ptr_imitating": "ptr_q0"}
    for role, candidates in roles.items():
        results = [(load_eval(out, first, f"dev_{run}"), run) for run in candidates]
        missing = [run for r, run in results if r is None]
        if missing or not candidates:
            raise SystemExit(
                f"binsort_experiment: --test 1 needs the development evaluations of seed {first} "
                f"first (missing: {missing or role}); run without --test"
            )
        chosen[role] = max(results, key=lambda rr: (rr[0]["successes"], -candidates.index(rr[1])))[
            1
        ]
    return chosen


def build_jobs(p, out):
    """Every job: the development phase on the first seed; with p.test, the final table's runs on
    every seed and their test evaluations."""
    check_seed_sets(p)
    seeds = seed_list(p)
    runs = finetune_runs(p)
    jobs = seed_jobs(p, out, seeds[0], runs, dev_evals(p, runs))
    if not p.test:
        return jobs
    chosen = sorted(set(test_runs(p, out).values()))
    for seed in seeds:
        evals = [
            (f"test_{run}", run, "chosen", p.sort_episodes, "test", SORT_TASK) for run in chosen
        ]
        mine = seed_jobs(p, out, seed, {run: runs[run] for run in chosen}, evals)
        known = {job.name for job in jobs}
        jobs += [job for job in mine if job.name not in known]
    return jobs


def resolve(cmd):
    """Checkpoint placeholders filled in once the job that writes them is done: SELECTED:<run>
    (select_ckpt.py's choice), LAST:<run>, FIRST_AT:<run>:<step> (the run's first checkpoint at
    or after that step: online runs save at the first episode end past each multiple)."""
    resolved = []
    for arg in cmd:
        if arg.startswith("SELECTED:"):
            arg = json.load(open(os.path.join(arg[9:], "selection.json")))["chosen"]
        elif arg.startswith("LAST:"):
            arg = list_checkpoints(arg[5:])[-1][1]
        elif arg.startswith("FIRST_AT:"):
            run_dir, step = arg[9:].rsplit(":", 1)
            arg = next(path for s, path in list_checkpoints(run_dir) if s >= int(step))
        resolved.append(arg)
    return resolved


def owner_elsewhere(job):
    """The pid of a live process that holds the lock of the job's run folder (the same run started
    by hand or by another invocation), or None."""
    if "--out" not in job.cmd:
        return None
    lock = os.path.join(job.cmd[job.cmd.index("--out") + 1], LOCK_FILE)
    try:
        with open(lock) as f:
            pid = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if pid != os.getpid() and pid_alive(pid) else None


def run(jobs, out, max_jobs, poll=5.0):
    """Run the jobs, at most max_jobs at a time, each as soon as its dependencies are done (checked
    every poll seconds). A job whose run folder another live process owns is waited for, and
    counts as running."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    by_name = {job.name: job for job in jobs}
    running = {}
    t0 = time.time()
    while True:
        elsewhere = {job.name for job in jobs if not job.done() and owner_elsewhere(job)}
        elsewhere -= set(running)
        pending = [
            job for job in jobs if not job.done() and job.name not in set(running) | elsewhere
        ]
        for name, (proc, job, log) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[name]
            if proc.returncode != 0 or not job.done():
                raise SystemExit(
                    f"binsort_experiment: job {name} failed (exit {proc.returncode}); see "
                    f"{log_path(out, name)}, fix, and run again to resume"
                )
            print(f"[{elapsed(t0)}] done {name}", flush=True)
        if not pending and not running and not elsewhere:
            break
        for job in pending:
            if len(running) + len(elsewhere) >= max_jobs:
                break
            if all(by_name[dep].done() for dep in job.deps):
                cmd = resolve(job.cmd)
                path = log_path(out, job.name)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                os.makedirs(os.path.dirname(job.done_file), exist_ok=True)
                log = open(path, "a")
                log.write(f"\n$ {shlex.join(cmd)}\n")
                log.flush()
                proc = subprocess.Popen(
                    cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env
                )
                running[job.name] = (proc, job, log)
                print(f"[{elapsed(t0)}] start {job.name}", flush=True)
        time.sleep(poll)
        report(running, out, t0)


def log_path(out, job_name):
    seed, name = job_name.split("/", 1)
    return os.path.join(out, "seed_" + seed[1:], "logs", name + ".log")


_last_report = [0.0]


def report(running, out, t0):
    """One progress line a minute: the last log line of every running job."""
    if time.time() - _last_report[0] < 60 or not running:
        return
    _last_report[0] = time.time()
    parts = []
    for name in running:
        try:
            with open(log_path(out, name)) as f:
                tail = f.read().replace("\r", "\n").strip().splitlines()[-1][:60]
        except (OSError, IndexError):
            tail = ""
        parts.append(f"{name}: {tail}")
    print(f"[{elapsed(t0)}] " + " | ".join(parts), flush=True)


def elapsed(t0):
    s = int(time.time() - t0)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


# -------------------------------------------------------------------------------- the results
def load_eval(out, seed, name):
    path = os.path.join(out, f"seed_{seed}", "eval", name + ".json")
    return json.load(open(path)) if os.path.exists(path) else None


def outcomes(r):
    """The per-episode successes of an online.py eval JSON, in episode (reset seed) order."""
    return [bool(e["success"]) for e in r["per_episode"]]


def rate(k, n):
    """'31/50 = 62% [48, 74]': a rate with its Wilson 95% interval."""
    lo, hi = wilson_interval(k, n)
    return f"{k}/{n} = {100 * k / max(n, 1):.0f}% [{100 * lo:.0f}, {100 * hi:.0f}]"


def stage(r, key):
    count = r.get("stages", {}).get(key, {}).get("count")
    return "-" if count is None else f"{count}/{r['episodes']}"


def paired_test(a_results, b_results):
    """Exact McNemar over episodes paired by reset seed, stratified over training seeds (the
    discordant counts add up). -> (b, c, p)."""
    b = c = 0
    for ra, rb in zip(a_results, b_results):
        if ra["episodes"] != rb["episodes"]:
            raise SystemExit("binsort_experiment: paired evaluations of different episode counts")
        db, dc = discordant(outcomes(ra), outcomes(rb))
        b, c = b + db, c + dc
    return b, c, mcnemar_exact_p(b, c)


def dev_table(p, out):
    """Markdown lines of the development phase (first seed, development episodes)."""
    first = seed_list(p)[0]
    runs = finetune_runs(p)
    lines = [f"## Development phase (training seed {first}; episodes reset with seeds "]
    lines[0] += f"{p.dev_seed}..{p.dev_seed + p.sort_episodes - 1})"
    lines += ["", "Pre-trained policies on the held-in pick-place tasks, pooled over 4 tasks:", ""]
    lines += ["| pre-training | success [95% CI] | grasped |", "|---|---|---|"]
    for pre in sorted({pre for pre, _ in runs.values()}):
        results = [load_eval(out, first, f"dev_{pre}_{task}") for task in PICK_TASKS]
        if all(r is not None for r in results):
            k = sum(r["successes"] for r in results)
            n = sum(r["episodes"] for r in results)
            grasped = sum(r["stages"]["grasped"]["count"] for r in results)
            lines.append(f"| {pre} | {rate(k, n)} | {grasped}/{n} |")
    lines += ["", "The sort (exploratory: McNemar against ptr_q0, uncorrected):", ""]
    lines += [
        "| run | actor objective | checkpoint rule | chosen step | full sort, chosen [95% CI] | "
        "grasped | first in bin | last checkpoint | vs ptr_q0 (b, c, p) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    reference = load_eval(out, first, "dev_ptr_q0")
    for run in runs:
        r = load_eval(out, first, f"dev_{run}")
        if r is None:
            continue
        objective, rule = describe(run)
        last = load_eval(out, first, f"dev_{run}_last")
        selection = os.path.join(out, f"seed_{first}", run, "selection.json")
        step = json.load(open(selection))["step"] if os.path.exists(selection) else "-"
        versus = "-"
        if reference is not None and run != "ptr_q0":
            b, c, pv = paired_test([r], [reference])
            versus = f"{b}, {c}, {pv:.2g}"
        last_text = rate(last["successes"], last["episodes"]) if last else "-"
        lines.append(
            f"| {run} | {objective} | {rule} | {step} | {rate(r['successes'], r['episodes'])} | "
            f"{stage(r, 'grasped')} | {stage(r, 'first_in_bin')} | {last_text} | {versus} |"
        )
    lines += selection_study(p, out, first, runs)
    return lines


def selection_study(p, out, seed, runs):
    """Markdown lines: for every curve run, the full sorts of each saved checkpoint, and the one
    the run's rule chose against the last and the best (development episodes)."""
    lines = []
    steps = list(range(p.ft_save_every, p.ft_steps + 1, p.ft_save_every))
    header = "| run | chosen | last | best | " + " | ".join(map(str, steps)) + " |"
    for run in curve_runs(p, runs):
        points = dict(checkpoint_curve(p, out, seed, run))
        selection = os.path.join(out, f"seed_{seed}", run, "selection.json")
        if len(points) < len(steps) or not os.path.exists(selection):
            continue
        if not lines:
            lines += ["", "Checkpoint selection: full sorts of every saved checkpoint "]
            lines[-1] += f"({p.ckpt_episodes} development episodes each), steps below:"
            lines += ["", header, "|" + "---|" * (4 + len(steps))]
        chosen = json.load(open(selection))["step"]
        best = max(steps, key=lambda st: (points[st]["successes"], -st))
        k = {st: points[st]["successes"] for st in steps}
        cells = [f"{chosen}: {k[chosen]}", f"{steps[-1]}: {k[steps[-1]]}", f"{best}: {k[best]}"]
        lines.append(f"| {run} | " + " | ".join(cells + [str(k[st]) for st in steps]) + " |")
    return lines


def checkpoint_curve(p, out, seed, run):
    points = []
    for step in range(p.ft_save_every, p.ft_steps + 1, p.ft_save_every):
        r = load_eval(out, seed, f"dev_{run}_step_{step:06d}")
        if r is not None:
            points.append((step, r))
    return points


COMPARISONS = (  # (A, B, what A > B would mean)
    ("ptr_critic", "gbc", "the critic-driven actor beats matched imitation"),
    ("ptr_critic", "ptr_imitating", "the critic's term in the actor's loss helps"),
    ("ptr_imitating", "gbc", "CQL pre-training and Q-value checkpoint selection help imitation"),
    ("gbc", "bc", "the tanh-Gaussian likelihood beats MSE imitation"),
)


def test_table(p, out):
    """Markdown lines of the final table: every seed and the pooled rate on the test episodes,
    paired tests stratified over seeds, Holm-corrected."""
    seeds = seed_list(p)
    chosen = test_runs(p, out)
    lines = [f"## Final table (test episodes, reset seeds {p.test_seed}.."]
    lines[0] += f"{p.test_seed + p.sort_episodes - 1}; training seeds {', '.join(map(str, seeds))})"
    lines += ["", "| method | run | actor objective | evaluation | checkpoint rule | "]
    lines[-1] += " | ".join(f"seed {s}" for s in seeds) + " | pooled [95% CI] |"
    lines += ["|" + "---|" * (6 + len(seeds))]
    results = {}
    for role, run in chosen.items():
        per_seed = [load_eval(out, s, f"test_{run}") for s in seeds]
        objective, rule = describe(run)
        mode = "sampled" if p.sample_actions and is_gaussian(run) else "mean (deterministic)"
        cells = [rate(r["successes"], r["episodes"]) if r else "-" for r in per_seed]
        done = [r for r in per_seed if r is not None]
        pooled = "-"
        if len(done) == len(seeds):
            results[role] = done
            k = sum(r["successes"] for r in done)
            pooled = "**" + rate(k, sum(r["episodes"] for r in done)) + "**"
        lines.append(
            f"| {role} | {run} | {objective} | {mode} | {rule} | "
            + " | ".join(cells)
            + f" | {pooled} |"
        )
    rows = [(a, b, why) for a, b, why in COMPARISONS if a in results and b in results]
    if rows:
        tests = [paired_test(results[a], results[b]) for a, b, _ in rows]
        adjusted = holm([t[2] for t in tests])
        lines += [
            "",
            "Paired exact McNemar tests over the same test episodes, stratified over "
            "training seeds, Holm-corrected over these comparisons:",
            "",
        ]
        lines += ["| A vs B | A > B would mean | b (A only) | c (B only) | p | Holm p |"]
        lines += ["|---|---|---|---|---|---|"]
        for (a, b, why), (nb, nc, pv), adj in zip(rows, tests, adjusted):
            lines.append(f"| {a} vs {b} | {why} | {nb} | {nc} | {pv:.2g} | {adj:.2g} |")
    return lines


def write_critic_diagnostics(p, out):
    """critic_diagnostics.csv: per critic-driven run of the first seed and saved checkpoint, what
    tells whether the critic can steer the actor (finetune.py's Q-trace diagnostics): Q - MC return
    at the held-out demos' first step, |dQ/da| and the actor's sigma per action dimension."""
    first = seed_list(p)[0]
    rows = []
    for run in finetune_runs(p):
        for step in range(p.ft_save_every, p.ft_steps + 1, p.ft_save_every):
            path = os.path.join(out, f"seed_{first}", run, QTRACE_PATTERN.format(step))
            if not os.path.exists(path):
                continue
            diagnostics = json.load(open(path)).get("diagnostics")
            if diagnostics:
                values = [diagnostics["q_minus_mc_at_t0"]]
                values += diagnostics["dq_da"] + diagnostics["sigma"]
                rows.append(",".join([run, str(step)] + [f"{v:.4g}" for v in values]))
    if rows:
        dims = ("x", "y", "z", "roll", "pitch", "yaw", "gripper")
        header = ["run", "step", "q_minus_mc_t0"]
        header += [f"dq_da_{d}" for d in dims] + [f"sigma_{d}" for d in dims]
        text = ",".join(header) + "\n" + "\n".join(rows) + "\n"
        atomic_write_text(text, os.path.join(out, "critic_diagnostics.csv"))


def wall_time_lines(out, seconds=None):
    """Markdown lines with the wall time of the last invocation that ran jobs: `seconds` is kept in
    wall_time.json, so that --table, which runs nothing, still reports it."""
    wall_time = os.path.join(out, "wall_time.json")
    if seconds is not None:
        atomic_write_text(json.dumps({"seconds": round(seconds)}) + "\n", wall_time)
    if not os.path.exists(wall_time):
        return []
    minutes = json.load(open(wall_time))["seconds"] / 60
    return [f"Wall time of the last invocation that ran the jobs: {minutes:.0f} min.", ""]


def write_table(p, out, seconds=None):
    """results.md: the development tables, the final table when it exists, the commands."""
    lines = ["# Offline RL against matched imitation on the simulated bin-sort (CPU)", ""]
    lines += [f"Protocol: `{json.dumps(p.__dict__)}`", ""]
    lines += wall_time_lines(out, seconds)
    lines += dev_table(p, out)
    if p.test:
        lines += [""] + test_table(p, out)
    lines += ["", PAPER_FOOTNOTE, ""]
    lines += ["Commands: seed_<s>/logs/<job>.log (each starts with the exact command)."]
    atomic_write_text("\n".join(lines) + "\n", os.path.join(out, "results.md"))
    write_critic_diagnostics(p, out)
    plot_dose_response(p, out)


def plot_dose_response(p, out):
    """dose_response.png: development sort success against lambda and against AWR's beta, with
    Wilson intervals; Gaussian BC's chosen tau as a band."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("binsort_experiment: no matplotlib (pip install matplotlib): no dose_response.png")
        return
    first = seed_list(p)[0]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, prefix, values, label in (
        (axes[0], "ptr_q", numbers(p.q_weights), "lambda (normalised Q term)"),
        (axes[1], "ptr_awr", numbers(p.awr_betas), "beta (AWR inverse temperature)"),
    ):
        xs, ys, lo, hi = [], [], [], []
        for v in values:
            r = load_eval(out, first, f"dev_{prefix}{tag(v)}")
            if r is None:
                continue
            a, b = wilson_interval(r["successes"], r["episodes"])
            xs.append(v)
            ys.append(100 * r["success"])
            lo.append(100 * (r["success"] - a))
            hi.append(100 * (b - r["success"]))
        if xs:
            ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o-", capsize=4, label="PTR, chosen checkpoint")
        if prefix == "ptr_awr":  # beta = 0 is plain imitation, lambda = 0's run
            r = load_eval(out, first, "dev_ptr_q0")
            if r is not None:
                ax.axhline(100 * r["success"], color="k", ls="--", label="beta = 0 (ptr_q0)")
        gbc = [load_eval(out, first, f"dev_gbc_ft_m{tag(m)}") for m in numbers(p.gbc_mixes)]
        gbc = [r for r in gbc if r is not None]
        if gbc:
            best = max(gbc, key=lambda r: r["successes"])
            ax.axhspan(100 * best["success_lo"], 100 * best["success_hi"], color="C1", alpha=0.15)
            ax.axhline(100 * best["success"], color="C1", label="Gaussian BC (best tau)")
        if prefix == "ptr_q":  # lambda is log-spaced from 0
            ax.set_xscale("symlog", linthresh=1.0)
            ax.set_xlim(-0.3, 2 * max(values + [1.0]))
        ax.set_xlabel(label)
        ax.set_ylim(0, 100)
        ax.legend(fontsize=8)
    axes[0].set_ylabel(f"full sorts, development episodes (%), n = {p.sort_episodes}")
    fig.suptitle(f"Does more critic help? Training seed {first}, 95% Wilson intervals")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "dose_response.png"), dpi=120)


def parse_args(argv=None):
    """The command line: the Protocol (one flag per field; --extra takes the rest of the line,
    flags and all) and the namespace, for --out, --jobs and --table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/binsort")
    ap.add_argument("--jobs", type=int, default=2, help="jobs at a time (each one thread)")
    ap.add_argument("--table", action="store_true", help="only write results.md from what exists")
    add_dataclass_args(ap, Protocol, nargs={"extra": argparse.REMAINDER})
    args = ap.parse_args(argv)
    return dataclass_from_args(Protocol, args), args


def main(argv=None):
    p, args = parse_args(argv)
    out = os.path.abspath(args.out)
    t0 = time.time()
    if not args.table:
        run(build_jobs(p, out), out, args.jobs)
    write_table(p, out, None if args.table else time.time() - t0)
    print(open(os.path.join(out, "results.md")).read())


if __name__ == "__main__":
    main()
