"""The success classifier that labels real-robot rollouts for online fine-tuning (paper Appendix F,
"Reward classifier"; SPEC section 3): ResNet-34 -> small head -> one logit of P(success | image),
trained with BCE on success / failure images, augmented like the RL data.

    python classifier.py --pos door_open/ --neg door_closed/ --out clf.pt

--pos / --neg: a folder of png/jpg images, or Bridge-format data (every frame, or with --pos_last N
the last N frames of each trajectory). A fraction val_frac of each class is held out by group (an
image file, or a whole trajectory), and the balanced held-out accuracy is reported and stored with
the weights. This file owns the classifier file's format and the network's builder, and the rewards
where the environment gives none (make_labeler, for online.py): the classifier's labels
(load_labeler: r_t = 1 when the observation after action t is a success), else a person's answer.
"""

import argparse
import glob
import os
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cli import add_dataclass_args, dataclass_from_args, run_cli
from batches import Sampler, augment
from bridge import resize_image
from data import load_store
from fileio import atomic_write
from model import ARCHS, HEADS, NORMS, SuccessClassifier, make_encoder


CLF_FORMAT = 1  # the success classifier file's format (save_classifier, load_labeler)
THRESHOLD = 0.5  # P(success) above which a frame is labelled a success


@dataclass
class ClassifierConfig:
    """Success classifier (Appendix F, "Reward classifier"): ResNet-34 -> head -> logit, BCE."""

    arch: str = "resnet34"  # encoder (the paper's: ResNet-34)
    head: str = "spatial"  # encoder output: spatial | avgpool | softmax
    norm: str = "group"  # normalisation: group | batch
    image_size: int = 128  # images are resized to this square size
    steps: int = 2_000  # gradient steps
    batch_size: int = 64  # half positives, half negatives
    lr: float = 1e-4  # Adam learning rate
    val_frac: float = 0.2  # fraction of each class's groups held out for the accuracy


# ------------------------------------------------------------ success classifier files (Appendix F)
# this file writes them (save_classifier) and reads them (load_labeler) to label rollouts


def build_classifier(cfg):
    """cfg: a dict with arch, head, norm and image_size (as the classifier file stores it)."""
    return SuccessClassifier(make_encoder(cfg["arch"], cfg["head"], cfg["norm"], cfg["image_size"]))


@torch.no_grad()
def classifier_logits(clf, images, device, chunk=256):
    """uint8 (N, H, W, 3) numpy images -> (N,) CPU logits, a chunk at a time."""
    logits = []
    for i in range(0, len(images), chunk):
        x = torch.from_numpy(images[i : i + chunk]).permute(0, 3, 1, 2).to(device)
        logits.append(clf(x).float().cpu())
    return torch.cat(logits)


def load_labeler(path, device):
    """Rollout rewards from a trained classifier: r_t = 1 when the observation AFTER action t is a
    success. Returns labeler(frames) -> float32 (T,) rewards for T + 1 frames."""
    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"{path}: cannot read the classifier ({e})") from None
    if (
        not isinstance(doc, dict)
        or doc.get("kind") != "classifier"
        or doc.get("format") != CLF_FORMAT
    ):
        raise SystemExit(f"{path}: not a success classifier written by classifier.py")
    clf = build_classifier(doc["config"]).to(device).eval()
    clf.load_state_dict(doc["model"])
    size = doc["config"]["image_size"]

    def labeler(frames):
        images = np.stack([resize_image(f, size) for f in frames[1:]])
        p_success = torch.sigmoid(classifier_logits(clf, images, device))
        return (p_success > doc["threshold"]).float().numpy()

    return labeler


def make_labeler(env_name, classifier=None, device="cpu"):
    """Rewards where the env gives none (the real arm): the classifier file `classifier` run on
    `device`, else a person judges each episode. None: the env's own rewards (the simulator)."""
    if classifier:
        return load_labeler(classifier, device)
    if env_name != "widowx":
        return None

    def ask(frames):  # success: the last transition gets r = 1
        rewards = np.zeros(len(frames) - 1, np.float32)
        answer = input("episode over: did the robot succeed? [y/N] ")
        rewards[-1] = float(answer.strip().lower().startswith("y"))
        return rewards

    return ask


# ----------------------------------------------------------------------------- images


def _trajectory_frames(reader, tid, last):
    """uint8 (T + 1, H, W, 3) frames of one stored trajectory, or its last `last` (0: all)."""
    traj = reader.trajectory(int(tid))
    frames = torch.cat([traj["obs"], traj["next_obs"][-1:]]).permute(0, 2, 3, 1).numpy()
    return frames[-last:]


def read_images(src, image_size, last=0, log=print):
    """(uint8 (N, S, S, 3), group per image) from a folder of png/jpg (a group per file) or
    Bridge-format data (every frame, or the last `last` of each trajectory; a group per trajectory,
    so the held-out split never shares a trajectory with training)."""
    files = sorted(
        f
        for f in glob.glob(os.path.join(src, "**", "*"), recursive=True)
        if f.lower().endswith((".png", ".jpg", ".jpeg"))
    )
    if files:
        images = [resize_image(np.asarray(Image.open(f).convert("RGB")), image_size) for f in files]
        return np.stack(images), np.arange(len(files))
    store = load_store(src, image_size=image_size, log=log)
    reader = Sampler(store, "train", gamma=0.99)  # (gamma is unused: only the frames are read)
    images = []
    groups = []
    for split in ("train", "val"):
        for tid in store.trajectory_ids(split):
            frames = _trajectory_frames(reader, tid, last)
            groups.extend([len(images)] * len(frames))
            images.append(frames)
    if not images:
        raise SystemExit(f"{src}: no images (png/jpg) and no Bridge trajectories found")
    return np.concatenate(images), np.asarray(groups)


# ----------------------------------------------------------------------------- the network


def classifier_loss(images, labels, clf):
    """BCE on the logit of P(success | image); images already augmented."""
    logits = clf(images)
    loss = F.binary_cross_entropy_with_logits(logits, labels)  # raises unless both are (B,)
    accuracy = ((logits > 0) == (labels > 0.5)).float().mean()
    return loss, {"clf_loss": loss.detach(), "clf_acc": accuracy}


def split_held_out(images, groups, val_frac, rng):
    """(training images as a tensor, held-out images): a fraction val_frac of the groups, at least
    one when there are two or more."""
    ids = rng.permutation(np.unique(groups))
    n_val = max(1, round(len(ids) * val_frac)) if len(ids) > 1 else 0
    val = np.isin(groups, ids[:n_val])
    return torch.from_numpy(images[~val]), images[val]


def held_out_accuracy(clf, images, label, device):
    if not len(images):
        return float("nan")
    return float(((classifier_logits(clf, images, device) > 0) == label).float().mean())


def train_classifier(pos, neg, cfg, device="cpu", seed=0, log=print):
    """pos / neg: (images, groups). A fraction val_frac of each class's groups is held out. Balanced
    batches, augmented like the RL data. Returns the classifier and the held-out accuracy of each
    class."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    train_pos, val_pos = split_held_out(*pos, cfg.val_frac, rng)
    train_neg, val_neg = split_held_out(*neg, cfg.val_frac, rng)
    clf = build_classifier(asdict(cfg)).to(device)
    opt = torch.optim.Adam(clf.parameters(), lr=cfg.lr)
    half = cfg.batch_size // 2
    labels = torch.cat([torch.ones(half), torch.zeros(half)]).to(device)
    for step in range(1, cfg.steps + 1):
        picks = [t[rng.integers(len(t), size=half)] for t in (train_pos, train_neg)]
        x = torch.cat(picks).permute(0, 3, 1, 2)
        loss, info = classifier_loss(augment(x.to(device)), labels, clf)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == cfg.steps:
            log(
                f"step {step}/{cfg.steps} | loss {info['clf_loss']:.4f} | "
                f"batch accuracy {info['clf_acc']:.3f}"
            )
    clf.eval()
    accuracies = [
        held_out_accuracy(clf, val_pos, True, device),
        held_out_accuracy(clf, val_neg, False, device),
    ]
    return clf, accuracies


# ----------------------------------------------------------------------------- the classifier file


def save_classifier(clf, cfg, accuracy, path):
    doc = {
        "format": CLF_FORMAT,
        "kind": "classifier",
        "threshold": THRESHOLD,
        "val_accuracy": accuracy,
        "config": {k: getattr(cfg, k) for k in ("arch", "head", "norm", "image_size")},
        "model": {k: v.cpu() for k, v in clf.state_dict().items()},
    }
    atomic_write(path, lambda f: torch.save(doc, f))


# ----------------------------------------------------------------------------- CLI


def add_classifier_args(p):
    """The options of this file's CLI."""
    p.add_argument(
        "--pos", required=True, help="success images: a folder of png/jpg, or Bridge-format data"
    )
    p.add_argument("--neg", required=True, help="failure images, the same formats")
    p.add_argument("--out", required=True, help="the classifier file to write")
    p.add_argument(
        "--pos_last",
        type=int,
        default=0,
        help="Bridge --pos: only the last N frames of each trajectory",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_dataclass_args(p, ClassifierConfig, choices={"arch": ARCHS, "head": HEADS, "norm": NORMS})


def cmd_classifier(args):
    """Train on --pos / --neg, report and return the balanced held-out accuracy, write --out."""
    cfg = dataclass_from_args(ClassifierConfig, args)
    pos = read_images(args.pos, cfg.image_size, args.pos_last)
    neg = read_images(args.neg, cfg.image_size)
    print(
        f"{len(pos[0])} positive / {len(neg[0])} negative images; {cfg.arch} at {cfg.image_size}px"
    )
    clf, (acc_pos, acc_neg) = train_classifier(pos, neg, cfg, args.device, args.seed)
    accuracy = (acc_pos + acc_neg) / 2  # balanced: the classes may be of very different sizes
    print(f"held-out accuracy {accuracy:.3f} (positives {acc_pos:.3f}, negatives {acc_neg:.3f})")
    save_classifier(clf, cfg, accuracy, args.out)
    return accuracy


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_classifier_args(p)
    return cmd_classifier(p.parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
