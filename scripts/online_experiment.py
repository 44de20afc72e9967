"""Does online fine-tuning raise the sort? The paper's Section V-F (online fine-tuning with the
Cal-QL bound from the offline PTR checkpoint) on the simulated bin-sort, as one resumable command:

    python scripts/online_experiment.py --offline_ckpt runs/binsort/seed_0/ptr_q10 \\
        --prior runs/binsort/seed_0/data/prior --target runs/binsort/seed_0/data/target \\
        --out runs/online
    python scripts/online_experiment.py ... --out runs/online --table   # only rewrite the results

--offline_ckpt is a checkpoint (a path ending in .pt) or a fine-tuning run folder, whose
selection.json names the checkpoint select_ckpt.py chose (the offline protocol,
scripts/binsort_experiment.py). --offline_ckpt, --prior and --target may hold {seed}: training
seed s then starts from its own.

Every training seed s runs, in out/seed_<s>/, from that one checkpoint (online.py finetune, the
simulator's rewards unless marked, UTD 10, a checkpoint every --eval_every env steps):
    calql        Cal-QL online fine-tuning, batches 0.35 prior / 0.15 target / 0.5 online
    filtered_bc  the control: the actor imitates the target demos and its own successful
                 trajectories only, no critic (--filtered_bc)
    sacfd        (--sacfd 1) SAC from demonstrations: the same batches, no CQL term, the actor
                 maximising Q
    calql_ood    (--ood_finetune 1) Cal-QL collecting at the out-of-distribution starts
    calql_clf    (--classifier_reward 1) Cal-QL with rewards from a success classifier
                 (classifier.py) trained on simulated sort successes and failed attempts, as on the
                 real arm; its episodes keep the simulator's rewards beside the labels, and
                 results.md reports how often the two disagree
The other control, no fine-tuning, is the offline checkpoint itself. It and every saved checkpoint
of every run are evaluated the offline protocol's way (online.py eval: sampled actions, binarized
gripper) on the same development episodes (reset seeds dev_seed + i) and, reported apart, on the
same out-of-distribution starts (--ood, reset seeds ood_seed + i). These seeds are disjoint from the
offline protocol's development seeds (which chose the checkpoint) and test seeds, and from the
online rollouts' (check_seed_sets).

Everything lands in --out: seed_<s>/{one folder per run, clf_data/, classifier.pt, eval/, logs/},
then learning_curve.csv and .png (full sorts and stages against env steps, Wilson intervals) and
results.md (the last checkpoints against no fine-tuning, paired exact McNemar tests stratified over
training seeds, Holm-corrected; the classifier's disagreement; each run's wall time). Jobs run
--jobs at a time, one thread each, with scripts/binsort_experiment.py's scheduler: run it again to
resume (finished jobs are skipped, online runs continue with --resume).
"""

import argparse
import glob
import itertools
import json
import os
import re
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

# the project's leaves and the offline protocol's scheduler and tables: no torch, no pybullet
import binsort_experiment as offline  # noqa: E402
from cli import add_dataclass_args, dataclass_from_args  # noqa: E402
from fileio import atomic_write_text  # noqa: E402
from runfolder import PROGRESS_FILE, list_checkpoints  # noqa: E402
from stats import holm, wilson_interval  # noqa: E402

KEEP_IMITATING = 10**9  # --bc_steps past any run: the actor's offline loss goes on online
CLF_DATA_SEED = 7000  # the classifier's collections use seed CLF_DATA_SEED + s, not the data's s
CONDITIONS = {"dev": "development starts", "ood": "out-of-distribution starts"}
STAGES = ("grasped", "first_in_bin", "both_in_bins")
OOD_STARTS = ("objects", "arm", "both")  # the choices of online.py --ood other than "none"


@dataclass
class OnlineProtocol:
    """The online experiment's settings (each field is a flag). The trailing comments are the
    command-line help (cli.add_dataclass_args)."""

    offline_ckpt: str = ""  # the offline PTR checkpoint (.pt) or its run folder; {seed} allowed
    prior: str = ""  # the prior data (Bridge tree or store); {seed} allowed
    target: str = ""  # the target sort demos; {seed} allowed
    env_steps: int = 2000  # environment steps of every online run
    eval_every: int = 250  # a checkpoint every N env steps, each evaluated (env_steps: a multiple)
    utd: int = 10  # gradient steps per environment step (paper: 10)
    mix_prior: float = 0.35  # batch fraction of prior data (paper); target next, online the rest
    mix_target: float = 0.15  # batch fraction of target demos (paper)
    batch_size: int = 64
    # The offline PTR actor imitates with a critic's term (--bc_steps up to the end of offline
    # fine-tuning); online its update count runs past --bc_steps and it would maximise Q alone.
    keep_actor: int = 1  # 1: the offline actor's loss goes on online; 0: Q-maximising (the paper)
    episodes: int = 50  # development episodes per evaluation
    ood: str = "objects"  # the out-of-distribution starts (online.py --ood: objects, arm, both)
    ood_episodes: int = 50  # out-of-distribution episodes per evaluation
    dev_seed: int = 300_000  # development episodes reset with dev_seed + i
    ood_seed: int = 400_000  # out-of-distribution episodes reset with ood_seed + i
    seeds: str = "0"  # training seeds: each runs every method in out/seed_<s>/
    sample_actions: int = 1  # tanh-Gaussian actors act with sampled actions (BC: deterministic)
    sacfd: int = 0  # 1: also SACfD (no CQL term, Q-maximising actor)
    ood_finetune: int = 0  # 1: also Cal-QL collecting at the out-of-distribution starts
    classifier_reward: int = 1  # 1: also Cal-QL with a success classifier's rewards
    clf_demos: int = 20  # sort demos the classifier learns from, and as many failed attempts
    clf_steps: int = 1000  # the classifier's gradient steps
    image_size: int = 64  # the classifier's collections and images (the offline protocol's)
    extra: list = field(default_factory=list)  # flags passed to every online.py finetune (last)


@dataclass
class RunJob(offline.Job):
    """An online run: done once its newest checkpoint is at or past env_steps (episodes end where
    they end, so the last checkpoint's step is known only then). done_file: a file of the run
    folder, which the scheduler creates."""

    env_steps: int = 0

    def done(self):
        saved = list_checkpoints(os.path.dirname(self.done_file))
        return bool(saved) and saved[-1][0] >= self.env_steps


# ------------------------------------------------------------------------------------ the runs
def online_runs(p, classifier_path):
    """{run name: (what it is, its online.py finetune flags)}."""
    keep = ["--bc_steps", str(KEEP_IMITATING)] if p.keep_actor else []
    runs = {"calql": ("Cal-QL", keep)}
    imitate = "filtered BC: imitating the demos and its own successes, no critic"
    runs["filtered_bc"] = (imitate, ["--filtered_bc"])
    if p.sacfd:
        sac = ["--alpha_offline", "0", "--alpha_online", "0", "--no-calql"]
        runs["sacfd"] = ("SACfD: no CQL term, Q-maximising actor", sac)
    if p.ood_finetune:
        elsewhere = "Cal-QL collecting at the out-of-distribution starts"
        runs["calql_ood"] = (elsewhere, [*keep, "--ood", p.ood])
    if p.classifier_reward:
        clf = [*keep, "--classifier", classifier_path]
        runs["calql_clf"] = ("Cal-QL, rewards from the success classifier", clf)
    return runs


def eval_steps(p):
    """The nominal env steps of the evaluated checkpoints: every eval_every up to env_steps."""
    return list(range(p.eval_every, p.env_steps + 1, p.eval_every))


def offline_checkpoint(p, seed):
    """--ckpt of seed `seed`: the checkpoint, or select_ckpt.py's choice in a run folder (read
    when the job starts, offline.resolve)."""
    path = p.offline_ckpt.format(seed=seed)
    return path if path.endswith(".pt") else f"SELECTED:{path}"


def rollout_seeds(p, seed):
    """The env.reset seeds of training seed `seed`'s online rollouts (online.rollout_seed): at
    most one episode per environment step."""
    first = 1_000_003 * (seed + 1)
    return range(first, first + p.env_steps)


def check_protocol(p):
    """One-line errors for settings no run can honour; then check_seed_sets."""
    if not (p.offline_ckpt and p.prior and p.target):
        raise SystemExit("online_experiment: --offline_ckpt, --prior and --target are required")
    if p.ood not in OOD_STARTS:
        raise SystemExit(f"online_experiment: --ood {p.ood!r}: expected one of {OOD_STARTS}")
    if p.eval_every < 1 or p.env_steps % p.eval_every:
        raise SystemExit(
            f"online_experiment: --env_steps {p.env_steps}: expected a multiple of --eval_every "
            f"{p.eval_every} (>= 1)"
        )
    check_seed_sets(p)


def check_seed_sets(p):
    """Every set of reset seeds apart from every other: this experiment's development and
    out-of-distribution episodes, the offline protocol's development episodes (they chose the
    checkpoint: a choice flatters itself on them) and test episodes (its default seeds), and the
    online rollouts of each training seed."""
    ref = offline.Protocol()
    dev_count = max(ref.sort_episodes, ref.ckpt_episodes, ref.pick_episodes)
    sets = {
        "development": range(p.dev_seed, p.dev_seed + p.episodes),
        "out-of-distribution": range(p.ood_seed, p.ood_seed + p.ood_episodes),
        "the offline protocol's development": range(ref.dev_seed, ref.dev_seed + dev_count),
        "the offline protocol's test": range(ref.test_seed, ref.test_seed + ref.sort_episodes),
    }
    for seed in offline.seed_list(p):
        sets[f"seed {seed}'s rollout"] = rollout_seeds(p, seed)
    for (a, ra), (b, rb) in itertools.combinations(sets.items(), 2):
        if ra.start < rb.stop and rb.start < ra.stop:
            raise SystemExit(
                f"online_experiment: {a} seeds {ra.start}..{ra.stop - 1} and {b} seeds "
                f"{rb.start}..{rb.stop - 1} overlap; choose --dev_seed / --ood_seed apart"
            )


# ------------------------------------------------------------------------------------ the jobs
def classifier_jobs(p, s, seed):
    """Collect sort demos (successes) and failed sort attempts (sim_binsort.py collect --style
    teleop --imperfect 1: every attempt kept as it failed or was cut short), then train the
    classifier: the last 3 frames of each success against every frame of the failures."""
    d = os.path.join(s, "clf_data")
    py = shlex.quote(sys.executable)
    common = f"--task sort --n {p.clf_demos} --image_size {p.image_size} --first cube "
    common += f"--seed {CLF_DATA_SEED + seed}"
    success = os.path.join(d, "success")
    failure = os.path.join(d, "failure")
    collect = [
        f"{py} sim_binsort.py collect {common} --out {shlex.quote(success)}",
        f"{py} sim_binsort.py collect {common} --style teleop --imperfect 1 "
        f"--out {shlex.quote(failure)}",
        f"touch {shlex.quote(os.path.join(d, 'collected'))}",
    ]
    data_job = offline.Job(
        f"s{seed}/clf_data", ["bash", "-c", " && ".join(collect)], (), os.path.join(d, "collected")
    )
    out = os.path.join(s, "classifier.pt")
    cmd = offline.python("classifier.py", "--pos", success, "--pos_last", "3", "--neg", failure)
    cmd += ["--out", out, "--arch", "small", "--image_size", str(p.image_size)]
    cmd += ["--steps", str(p.clf_steps), "--seed", str(seed)]
    return [data_job, offline.Job(f"s{seed}/clf", cmd, (data_job.name,), out)]


def eval_job(p, s, seed, label, condition, ckpt, deps):
    """online.py eval of one checkpoint on one condition's episodes, into
    eval/<condition>_<label>.json."""
    json_path = os.path.join(s, "eval", f"{condition}_{label}.json")
    first, n = (p.dev_seed, p.episodes) if condition == "dev" else (p.ood_seed, p.ood_episodes)
    cmd = offline.python("online.py", "eval", "--ckpt", ckpt, "--episodes", str(n))
    cmd += ["--seed", str(first), "--json", json_path, "--binarize_gripper"]
    cmd += ["--task", offline.SORT_TASK]
    if condition == "ood":
        cmd += ["--ood", p.ood]
    if p.sample_actions:
        cmd.append("--sample_actions")
    return offline.Job(f"s{seed}/eval_{condition}_{label}", cmd, deps, json_path)


def seed_jobs(p, out, seed):
    """The jobs of one training seed: the classifier (when asked), every online run, and the
    evaluations of the offline checkpoint and of every run's saved checkpoints."""
    s = os.path.join(out, f"seed_{seed}")
    ckpt = offline_checkpoint(p, seed)
    jobs = classifier_jobs(p, s, seed) if p.classifier_reward else []
    evals = [("offline", ckpt, ())]  # (label, --ckpt, the jobs it waits for)
    for run, (_, flags) in online_runs(p, os.path.join(s, "classifier.pt")).items():
        run_dir = os.path.join(s, run)
        cmd = offline.python("online.py", "finetune", "--ckpt", ckpt, "--out", run_dir)
        cmd += ["--prior", p.prior.format(seed=seed), "--target", p.target.format(seed=seed)]
        cmd += ["--env_steps", str(p.env_steps), "--save_every", str(p.eval_every)]
        cmd += ["--eval_every", "0", "--utd", str(p.utd), "--batch_size", str(p.batch_size)]
        cmd += ["--mix_prior", str(p.mix_prior), "--mix_target", str(p.mix_target)]
        cmd += ["--seed", str(seed), "--binarize_gripper", *flags, *p.extra, "--resume"]
        deps = (f"s{seed}/clf",) if "--classifier" in flags else ()
        done = os.path.join(run_dir, PROGRESS_FILE)
        jobs.append(RunJob(f"s{seed}/{run}", cmd, deps, done, env_steps=p.env_steps))
        for step in eval_steps(p):
            evals.append((f"{run}_{step:06d}", f"FIRST_AT:{run_dir}:{step}", (f"s{seed}/{run}",)))
    for label, ckpt_arg, deps in evals:
        for condition in CONDITIONS:
            jobs.append(eval_job(p, s, seed, label, condition, ckpt_arg, deps))
    return jobs


def build_jobs(p, out):
    check_protocol(p)
    return [job for seed in offline.seed_list(p) for job in seed_jobs(p, out, seed)]


# -------------------------------------------------------------------------------- the results
def point_label(run, step):
    """The evaluation of a run at a nominal env step; step 0 is the offline checkpoint."""
    return "offline" if step == 0 else f"{run}_{step:06d}"


def curve(p, out, run, condition):
    """[(nominal env step, [eval JSON per training seed])] of the points every seed has, from the
    offline checkpoint at step 0."""
    points = []
    for step in [0, *eval_steps(p)]:
        results = [
            offline.load_eval(out, seed, f"{condition}_{point_label(run, step)}")
            for seed in offline.seed_list(p)
        ]
        if all(r is not None for r in results):
            points.append((step, results))
    return points


def pooled(results):
    """{episodes, successes, success, lo, hi, <stage>: count} over the seeds' evaluations."""
    n = sum(r["episodes"] for r in results)
    k = sum(r["successes"] for r in results)
    lo, hi = wilson_interval(k, n)
    row = {"episodes": n, "successes": k, "success": k / max(n, 1), "lo": lo, "hi": hi}
    for name in STAGES:
        row[name] = sum(r.get("stages", {}).get(name, {}).get("count", 0) for r in results)
    return row


def ckpt_step(result, step):
    """The env step of the checkpoint evaluated at nominal `step` (0: the offline one)."""
    m = re.search(r"ckpt_(\d+)\.pt$", str(result.get("ckpt", "")))
    return int(m.group(1)) if step and m else 0


def write_curve_csv(p, out, runs):
    """learning_curve.csv: per run, condition and nominal env step, each seed's and the pooled
    full sorts and stage counts."""
    header = ["run", "condition", "env_step", "seed", "ckpt_step", "episodes", "successes"]
    header += ["success", "success_lo", "success_hi", *STAGES]
    lines = [",".join(header)]
    seeds = offline.seed_list(p)
    for run in runs:
        for condition in CONDITIONS:
            for step, results in curve(p, out, run, condition):
                rows = [(str(s), ckpt_step(r, step), pooled([r])) for s, r in zip(seeds, results)]
                rows.append(("pooled", "", pooled(results)))
                for seed, at, row in rows:
                    cells = [run, condition, step, seed, at, row["episodes"], row["successes"]]
                    cells += [f"{row[k]:.4f}" for k in ("success", "lo", "hi")]
                    cells += [row[name] for name in STAGES]
                    lines.append(",".join(map(str, cells)))
    atomic_write_text("\n".join(lines) + "\n", os.path.join(out, "learning_curve.csv"))


def plot_curves(p, out, runs):
    """learning_curve.png: full sorts, the first object in its bin and a grasp (rows) against env
    steps, development (left) and out-of-distribution starts (right), pooled over seeds, 95%
    Wilson intervals (the runs' points dodged apart a little); no fine-tuning as a dashed line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("online_experiment: no matplotlib (pip install matplotlib): no learning_curve.png")
        return
    panels = (("successes", "full sorts"), ("first_in_bin", "first object in its bin"))
    panels += (("grasped", "an object grasped"),)
    dodge = 0.01 * p.env_steps
    fig, axes = plt.subplots(len(panels), 2, figsize=(11, 10), sharex=True, sharey=True)
    for col, (condition, title) in enumerate(CONDITIONS.items()):
        for row, (key, what) in enumerate(panels):
            ax = axes[row][col]
            start = [
                offline.load_eval(out, s, f"{condition}_offline") for s in offline.seed_list(p)
            ]
            if all(r is not None for r in start):
                base = pooled(start)
                level = 100 * base[key] / base["episodes"]
                ax.axhline(level, color="k", ls="--", lw=1, label="no fine-tuning")
            for i, run in enumerate(runs):
                points = curve(p, out, run, condition)
                xs = [step + dodge * (i - (len(runs) - 1) / 2) for step, _ in points]
                counts = [pooled(results) for _, results in points]
                k = [c[key] for c in counts]
                n = [c["episodes"] for c in counts]
                ys = [100 * a / b for a, b in zip(k, n)]
                bounds = [wilson_interval(a, b) for a, b in zip(k, n)]
                err = [
                    [y - 100 * lo for y, (lo, _) in zip(ys, bounds)],
                    [100 * hi - y for y, (_, hi) in zip(ys, bounds)],
                ]
                if points:
                    ax.errorbar(xs, ys, yerr=err, fmt="o-", capsize=3, color=f"C{i}", label=run)
            ax.set_title(f"{what}, {title}", fontsize=10)
            ax.set_ylim(-2, 102)
            if row == len(panels) - 1:
                ax.set_xlabel("environment steps")
            if col == 0:
                ax.set_ylabel("% of episodes")
    axes[0][0].legend(fontsize=8)
    seeds = ", ".join(map(str, offline.seed_list(p)))
    fig.suptitle(f"Online fine-tuning from the offline PTR checkpoint (training seeds {seeds})")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "learning_curve.png"), dpi=120)


def final_table(p, out, runs, condition):
    """Markdown lines: every run's last evaluated checkpoint against no fine-tuning (and Cal-QL
    against filtered BC) on one condition's episodes: paired exact McNemar, stratified over
    training seeds, Holm-corrected over the table's comparisons."""
    last = eval_steps(p)[-1]
    first, n = (p.dev_seed, p.episodes) if condition == "dev" else (p.ood_seed, p.ood_episodes)
    lines = [f"## {CONDITIONS[condition].capitalize()} (reset seeds {first}..{first + n - 1})"]
    lines += ["", f"Checkpoints at env step {last} (the first saved at or after it):", ""]
    lines += ["| method | full sort [95% CI] | grasped | first in bin |", "|---|---|---|---|"]
    results = {}
    methods = [("no fine-tuning", "offline")] + [(run, f"{run}_{last:06d}") for run in runs]
    for name, label in methods:
        per_seed = [offline.load_eval(out, s, f"{condition}_{label}") for s in offline.seed_list(p)]
        if any(r is None for r in per_seed):
            lines.append(f"| {name} | - | - | - |")
            continue
        results[name] = per_seed
        row = pooled(per_seed)
        total = row["episodes"]
        lines.append(
            f"| {name} | {offline.rate(row['successes'], total)} | {row['grasped']}/{total} | "
            f"{row['first_in_bin']}/{total} |"
        )
    pairs = [(run, "no fine-tuning") for run in runs] + [("calql", "filtered_bc")]
    pairs = [(a, b) for a, b in pairs if a in results and b in results]
    if pairs:
        tests = [offline.paired_test(results[a], results[b]) for a, b in pairs]
        adjusted = holm([t[2] for t in tests])
        lines += ["", "Paired exact McNemar tests over these episodes, Holm-corrected:", ""]
        lines += ["| A vs B | b (A only) | c (B only) | p | Holm p |", "|---|---|---|---|---|"]
        for (a, b), (nb, nc, pv), adj in zip(pairs, tests, adjusted):
            lines.append(f"| {a} vs {b} | {nb} | {nc} | {pv:.2g} | {adj:.2g} |")
    return lines


def curve_table(p, out, runs):
    """Markdown lines: pooled full sorts of every run at every evaluated env step."""
    steps = [0, *eval_steps(p)]
    lines = ["## Learning curves (full sorts pooled over seeds; learning_curve.csv / .png)", ""]
    lines += ["| run | starts | " + " | ".join(map(str, steps)) + " |"]
    lines += ["|" + "---|" * (2 + len(steps))]
    for run in runs:
        for condition in CONDITIONS:
            found = dict(curve(p, out, run, condition))
            cells = []
            for step in steps:
                row = pooled(found[step]) if step in found else None
                cells.append(f"{row['successes']}/{row['episodes']}" if row else "-")
            lines.append(f"| {run} | {condition} | " + " | ".join(cells) + " |")
    return lines


def label_agreement(run_dir):
    """How the classifier's labels (an episode's rewards) agree with the simulator's own rewards
    (env_rewards) over a run's online episodes: per step and per episode (any success)."""
    import numpy as np

    counts = dict.fromkeys(("steps", "false_pos", "false_neg", "episodes", "episode_diff"), 0)
    for path in sorted(glob.glob(os.path.join(run_dir, "episodes", "episode_*.npz"))):
        with np.load(path) as z:
            if "env_rewards" not in z.files:
                continue
            label = z["rewards"] > 0
            truth = z["env_rewards"] > 0
        counts["steps"] += len(label)
        counts["false_pos"] += int((label & ~truth).sum())
        counts["false_neg"] += int((~label & truth).sum())
        counts["episodes"] += 1
        counts["episode_diff"] += int(label.any() != truth.any())
    return counts


def classifier_table(p, out):
    """Markdown lines: the classifier's held-out accuracy (its log) and its labels against the
    simulator's rewards in the calql_clf run's episodes, per seed."""
    lines = ["## Rewards from the success classifier (calql_clf)", ""]
    lines += ["| seed | held-out accuracy | steps labelled | false positives | false negatives | "]
    lines[-1] += "episodes whose success the labels and the simulator disagree on |"
    lines += ["|---|---|---|---|---|---|"]
    for seed in offline.seed_list(p):
        accuracy = "-"
        log = offline.log_path(out, f"s{seed}/clf")
        if os.path.exists(log):
            found = re.findall(r"held-out accuracy ([0-9.]+)", open(log).read())
            accuracy = found[-1] if found else "-"
        c = label_agreement(os.path.join(out, f"seed_{seed}", "calql_clf"))
        steps = max(c["steps"], 1)
        lines.append(
            f"| {seed} | {accuracy} | {c['steps']} | {c['false_pos']} "
            f"({100 * c['false_pos'] / steps:.1f}%) | {c['false_neg']} "
            f"({100 * c['false_neg'] / steps:.1f}%) | {c['episode_diff']}/{c['episodes']} |"
        )
    return lines


def duration(seconds):
    """'42 s' under ten minutes, else '12.5 min'."""
    return f"{seconds:.0f} s" if seconds < 600 else f"{seconds / 60:.1f} min"


def wall_table(p, out, runs):
    """Markdown lines: where each online run's wall time went (its progress.csv's last row)."""
    import csv

    lines = ["## Wall time of the online runs (progress.csv, summed over resumes)", ""]
    lines += ["| run | seed | total | rollouts | evaluation | updates | env steps/s | updates/s |"]
    lines += ["|---|---|---|---|---|---|---|---|"]
    for run in runs:
        for seed in offline.seed_list(p):
            path = os.path.join(out, f"seed_{seed}", run, PROGRESS_FILE)
            if not os.path.exists(path):
                continue
            with open(path) as f:
                rows = list(csv.DictReader(f))
            if not rows or "wall_total_s" not in rows[-1]:
                continue
            last = {k: float(v) for k, v in rows[-1].items() if v}
            parts = [last[f"wall_{k}_s"] for k in ("total", "rollouts", "evaluation", "updates")]
            env_rate = last["step"] / max(parts[1], 1e-9)
            update_rate = last["grad_steps"] / max(parts[3], 1e-9)
            cells = [duration(x) for x in parts]
            cells += [f"{env_rate:.2f}", f"{update_rate:.2f}"]
            lines.append(f"| {run} | {seed} | " + " | ".join(cells) + " |")
    return lines


def write_results(p, out, seconds=None):
    """results.md, learning_curve.csv and learning_curve.png from what exists."""
    runs = list(online_runs(p, "classifier.pt"))
    lines = ["# Online fine-tuning on the simulated bin-sort (paper Section V-F)", ""]
    lines += [f"Protocol: `{json.dumps(asdict(p))}`", ""]
    lines += offline.wall_time_lines(out, seconds)
    lines += ["| run | method |", "|---|---|"]
    lines += [f"| no fine-tuning | the offline checkpoint ({p.offline_ckpt}) |"]
    for run, (description, _) in online_runs(p, "classifier.pt").items():
        lines.append(f"| {run} | {description} |")
    for condition in CONDITIONS:
        lines += [""] + final_table(p, out, runs, condition)
    lines += [""] + curve_table(p, out, runs)
    if p.classifier_reward:
        lines += [""] + classifier_table(p, out)
    lines += [""] + wall_table(p, out, runs)
    lines += ["", "Commands: seed_<s>/logs/<job>.log (each starts with the exact command)."]
    atomic_write_text("\n".join(lines) + "\n", os.path.join(out, "results.md"))
    write_curve_csv(p, out, runs)
    plot_curves(p, out, runs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/online_experiment")
    ap.add_argument("--jobs", type=int, default=2, help="jobs at a time (each one thread)")
    ap.add_argument("--table", action="store_true", help="only write the results from what exists")
    add_dataclass_args(ap, OnlineProtocol, nargs={"extra": argparse.REMAINDER})
    args = ap.parse_args(argv)
    p = dataclass_from_args(OnlineProtocol, args)
    out = os.path.abspath(args.out)
    t0 = time.time()
    if not args.table:
        offline.run(build_jobs(p, out), out, args.jobs)
    write_results(p, out, None if args.table else time.time() - t0)
    print(open(os.path.join(out, "results.md")).read())


if __name__ == "__main__":
    main()
