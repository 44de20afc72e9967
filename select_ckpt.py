"""PTR checkpoint selection from Q-values on held-out target demos (paper Section IV-B, Figure 3).

    python select_ckpt.py runs/ft_my_task  # ranked table, selection.json, qvalues.png, chosen path
    python select_ckpt.py runs/bc_ft --by val_loss   # the BC baselines' rule: validation error

The paper picks, by eye, the fine-tuning checkpoint whose Q-values on held-out target demonstrations
rise most monotonically along each trajectory: a valid Q-function of a successful demonstration
estimates the discounted return-to-go, which grows as the task nears completion. Early checkpoints
fluctuate, over-trained ones go flat. The paper calls a metric for this future work; ours is

    score(checkpoint) = mean over held-out trajectories of  rho * min(1, spread(Q) / spread(G))

- rho is Spearman's rank correlation between time t and Q_t (min over the two heads, the value the
  actor maximises): +1 for a strictly rising curve, -1 for a falling one, insensitive to the scale
  of Q, so it judges the shape alone, which is what the paper looks at;
- spread(.) is max - min along the trajectory and G the Monte-Carlo return-to-go of the same
  demonstration under the training rewards: the rise a correct Q-function would show. The factor
  penalises flat curves (the over-trained checkpoints of Figure 3) whose tiny wiggles can still be
  monotone; it saturates at 1 so a curve steeper than the true return is not rewarded for it.
Scores lie in [-1, 1]: rising > flat > falling. Ties go to the earlier checkpoint (fewer steps on 10
demos). A checkpoint whose trace holds a NaN or inf (Q-values or returns) gets no score and is never
chosen: the table lists it last with the reason (a diverged critic, or a NaN action in the target's
val data).
"""

import argparse
import glob
import json
import os
import re

import numpy as np
from PIL import Image, ImageDraw

from cli import run_cli
from fileio import atomic_write, atomic_write_text
from runfolder import QTRACE_PATTERN, VALLOSS_PATTERN, list_checkpoints

METRIC = (
    "mean over held-out trajectories of spearman(t, min-head Q) "
    "* min(1, spread(Q) / spread(MC return))"
)
COLORS = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
]


def rankdata(x):
    """Ranks 0..n-1 with ties averaged (what Spearman's rho needs)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    for value in np.unique(x):
        tie = x == value
        ranks[tie] = ranks[tie].mean()
    return ranks


def spearman(x, y):
    rx, ry = rankdata(x), rankdata(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = np.sqrt((rx**2).sum() * (ry**2).sum())
    return float((rx * ry).sum() / denom) if denom > 0 else 0.0


def trajectory_score(q, mc_return):
    """(score, rho, flatness factor) of one Q-value curve; see the module docstring."""
    q, g = np.asarray(q, dtype=np.float64), np.asarray(mc_return, dtype=np.float64)
    assert q.ndim == 1 and q.shape == g.shape, (q.shape, g.shape)
    rho = spearman(np.arange(len(q)), q)
    ref = g.max() - g.min()
    factor = min(1.0, (q.max() - q.min()) / ref) if ref > 0 else 1.0
    return rho * factor, rho, factor


def non_finite_reason(traces):
    """Why a checkpoint's trace cannot be scored (its first NaN / inf), or None when it can."""
    for i, t in enumerate(traces["trajectories"]):
        for field, values in (("q", t["q"]), ("mc_return", t["mc_return"])):
            values = np.asarray(values, dtype=np.float64)
            if not np.isfinite(values).all():
                bad = values[~np.isfinite(values)][0]
                return f"{field} of held-out trajectory {t.get('traj_id', i)} holds {bad}"
    return None


def checkpoint_score(traces):
    """Mean score over the held-out trajectories; a non-finite trace scores None with its reason."""
    reason = non_finite_reason(traces)
    if reason is not None:
        return {"score": None, "rho": None, "flatness": None, "rejected": reason}
    parts = np.array(
        [trajectory_score(np.min(t["q"], axis=0), t["mc_return"]) for t in traces["trajectories"]]
    )
    return {
        "score": float(parts[:, 0].mean()),
        "rho": float(parts[:, 1].mean()),
        "flatness": float(parts[:, 2].mean()),
    }


def load_traces(run_dir):
    """{step: traces} for every Q-value file that has a checkpoint beside it."""
    ckpts = dict(list_checkpoints(run_dir))
    found = {}
    for path in sorted(glob.glob(os.path.join(run_dir, QTRACE_PATTERN.replace("{:08d}", "*")))):
        m = re.search(r"(\d+)\.json$", path)
        if not m or int(m.group(1)) not in ckpts:
            continue
        try:
            with open(path) as f:
                doc = json.load(f)
            assert doc["trajectories"] and all(len(t["q"]) == 2 for t in doc["trajectories"])
        except (OSError, ValueError, KeyError, AssertionError, TypeError):
            raise SystemExit(
                f"{path}: not a Q-value trace file written by finetune.py (expected 'trajectories' "
                f"with 'q' of 2 heads and 'mc_return')"
            ) from None
        found[int(m.group(1))] = doc
    return found, ckpts


def rank(run_dir):
    if not os.path.isdir(run_dir):
        raise SystemExit(f"{run_dir}: no such run folder")
    traces, ckpts = load_traces(run_dir)
    if not traces:
        raise SystemExit(
            f"{run_dir}: no checkpoint with Q-value traces ({QTRACE_PATTERN.format(0)} ...); "
            f"run finetune.py with a --target that has held-out (val) trajectories"
        )
    rows = [
        dict(step=step, ckpt=ckpts[step], **checkpoint_score(doc)) for step, doc in traces.items()
    ]
    scored = sorted(
        (r for r in rows if r["score"] is not None), key=lambda r: (-r["score"], r["step"])
    )
    rejected = sorted((r for r in rows if r["score"] is None), key=lambda r: r["step"])
    if not scored:
        reasons = "; ".join(f"step {r['step']}: {r['rejected']}" for r in rejected)
        raise SystemExit(
            f"{run_dir}: no checkpoint has finite Q-value traces, none can be chosen ({reasons})"
        )
    return scored + rejected, traces


def rank_by_val_loss(run_dir):
    """The BC baselines' rule (the paper picks them by validation error): checkpoints ranked by
    the policy's imitation error on the held-out target demos (finetune.py's valloss files),
    lowest first; ties go to the earlier checkpoint."""
    if not os.path.isdir(run_dir):
        raise SystemExit(f"{run_dir}: no such run folder")
    ckpts = dict(list_checkpoints(run_dir))
    rows = []
    for step, ckpt in ckpts.items():
        path = os.path.join(run_dir, VALLOSS_PATTERN.format(step))
        if not os.path.exists(path):
            continue
        try:
            with open(path) as f:
                doc = json.load(f)
            value = float(doc["val_loss"])
        except (OSError, ValueError, KeyError, TypeError):
            raise SystemExit(
                f"{path}: not a validation-loss file written by finetune.py (expected 'val_loss')"
            ) from None
        if np.isfinite(value):
            rows.append(
                {"step": step, "ckpt": ckpt, "val_loss": value, "metric": doc.get("metric")}
            )
    if not rows:
        raise SystemExit(
            f"{run_dir}: no checkpoint with a finite validation loss ({VALLOSS_PATTERN.format(0)} "
            f"...); run finetune.py with a --target that has held-out (val) trajectories"
        )
    return sorted(rows, key=lambda r: (r["val_loss"], r["step"]))


def _dashed(draw, points, fill, dash=5):
    """A polyline drawn as dashes of `dash` pixels (PIL has no dashed style)."""
    for k in range(0, len(points) - 1, 2):
        draw.line(points[k : k + 2], fill=fill, width=1)


def _lighter(rgb, amount=0.45):
    return tuple(int(c + (255 - c) * amount) for c in rgb)


def plot(rows, traces, path, chosen_step, panel=(270, 190), cols=4):
    """One panel per checkpoint, in step order: for every held-out demo, its Q-values along the demo
    (solid: min over the 2 heads, the value the actor maximises) and its Monte-Carlo return-to-go
    under the training rewards (dashed, lighter: the curve a correct Q-function would follow). The
    y axis is in return units (stored rewards +10 / -1, SPEC section 3), the x axis the demo's time
    step; the chosen checkpoint has a red frame."""
    rows = sorted(rows, key=lambda r: r["step"])
    n_rows = (len(rows) + cols - 1) // cols
    w, h = panel
    legend_h = 34
    img = Image.new("RGB", (cols * w, legend_h + n_rows * h), "white")
    draw = ImageDraw.Draw(img)
    draw.text(
        (6, 4),
        "Q-values on held-out target demos per fine-tuning checkpoint (select_ckpt.py). Solid: "
        "Q(s_t, a_t), min of the 2 heads; dashed: Monte-Carlo return G_t; one colour per demo.",
        fill="black",
    )
    draw.text(
        (6, 18),
        "y: Q / return (reward +10 on the last 3 steps, -1 before);  x: time step t of the demo;  "
        "red frame: the chosen checkpoint (highest score).",
        fill="black",
    )
    for i, row in enumerate(rows):
        x0 = (i % cols) * w
        y0 = legend_h + (i // cols) * h
        box = (x0 + 40, y0 + 22, x0 + w - 8, y0 + h - 26)
        demos = traces[row["step"]]["trajectories"]
        curves = []
        for t in demos:
            q = np.nan_to_num(np.min(t["q"], axis=0), nan=0.0, posinf=0.0, neginf=0.0)
            curves.append((q, np.asarray(t.get("mc_return", q), dtype=float)))
        lo = min(min(float(q.min()), float(g.min())) for q, g in curves)
        hi = max(max(float(q.max()), float(g.max())) for q, g in curves)
        span = hi - lo if hi > lo else 1.0
        chosen = row["step"] == chosen_step
        draw.rectangle(
            box, outline=(200, 0, 0) if chosen else (120, 120, 120), width=3 if chosen else 1
        )
        longest = 1
        for j, (q, g) in enumerate(curves):
            longest = max(longest, len(q))
            if len(q) > 1:
                xs = np.linspace(box[0] + 2, box[2] - 2, len(q))
            else:
                xs = np.array([box[0] + 2.0])
            color = COLORS[j % len(COLORS)]
            for values, dashed in ((g, True), (q, False)):
                ys = box[3] - 2 - (values - lo) / span * (box[3] - box[1] - 4)
                points = list(zip(xs.tolist(), ys.tolist()))
                if dashed:
                    _dashed(draw, points, _lighter(color))
                else:
                    draw.line(points, fill=color, width=2)
        if row["score"] is None:
            score = "rejected (not finite)"
        else:
            score = f"score {row['score']:.2f}"
        title = f"step {row['step']}  {score}" + ("  CHOSEN" if chosen else "")
        draw.text((x0 + 4, y0 + 6), title, fill=(200, 0, 0) if chosen else "black")
        draw.text((x0 + 2, box[1]), f"{hi:.3g}", fill="black")
        draw.text((x0 + 2, box[3] - 10), f"{lo:.3g}", fill="black")
        draw.text((box[0], box[3] + 4), "t = 0", fill="black")
        draw.text((box[2] - 44, box[3] + 4), f"t = {longest - 1}", fill="black")
    atomic_write(path, lambda f: img.save(f, format="PNG"))


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("run_dir", help="a finetune.py run folder")
    p.add_argument("--plot", default=None, help="PNG path (default RUN_DIR/qvalues.png)")
    p.add_argument(
        "--by",
        choices=("qvalues", "val_loss"),
        default="qvalues",
        help="qvalues: PTR's rule (Section IV-B); val_loss: the lowest imitation error on the "
        "held-out demos (the BC baselines' rule)",
    )
    args = p.parse_args(argv)
    if args.by == "val_loss":
        rows = rank_by_val_loss(args.run_dir)
        for i, r in enumerate(rows):
            print(f"{i + 1:>4} {r['step']:>9} {r['metric']} {r['val_loss']:>9.4f}  {r['ckpt']}")
        doc = {"chosen": rows[0]["ckpt"], "step": rows[0]["step"], "ranking": rows}
        doc["metric"] = f"lowest validation {rows[0]['metric']} on the held-out target demos"
        atomic_write_text(
            json.dumps(doc, indent=2) + "\n", os.path.join(args.run_dir, "selection.json")
        )
        print(rows[0]["ckpt"])
        return
    rows, traces = rank(args.run_dir)
    best = rows[0]
    print(f"{'rank':>4} {'step':>9} {'score':>7} {'rho':>7} {'flat':>6}  checkpoint")
    for i, r in enumerate(rows):
        if r["score"] is None:
            print(f"{'-':>4} {r['step']:>9} {'-':>7} {'-':>7} {'-':>6}  {r['ckpt']}")
            print(f"{'':>4} rejected, never chosen: {r['rejected']}")
            continue
        scores = f"{r['score']:>7.3f} {r['rho']:>7.3f} {r['flatness']:>6.2f}"
        print(f"{i + 1:>4} {r['step']:>9} {scores}  {r['ckpt']}")
    doc = {
        "chosen": best["ckpt"],
        "step": best["step"],
        "score": best["score"],
        "ranking": rows,
        "metric": METRIC,
    }
    atomic_write_text(
        json.dumps(doc, indent=2) + "\n", os.path.join(args.run_dir, "selection.json")
    )
    plot(rows, traces, args.plot or os.path.join(args.run_dir, "qvalues.png"), best["step"])
    print(best["ckpt"])


if __name__ == "__main__":
    run_cli(main)
