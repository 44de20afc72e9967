"""batches.py: PTR's training batches, from a converted store (data.py) or from online data.

PTR (Kumar et al., RSS 2023) labels the last n = 3 steps of every demo with reward +1 (Sec. IV-B
"Reward specification", App. E), puts a new task on a fresh one-hot slot or re-targets an existing
id (Sec. IV-A "Handling task identifiers"), mixes prior and target data in each batch (tau; 0.35 /
0.15 / 0.5 prior / target / online, Sec. V-F and App. E) and trains with random crop + color jitter
(Table X). This file holds those steps, top to bottom:
  target_task_ids() assigns the one-hot slots and assign_target_slots() does so in a model's task
  list with its reserved slots; rescale_actions() / unscale_actions() map raw actions
  to the policy's [-1, 1] and back; mc_returns() gives the Cal-QL bound; Sampler relabels a store's
  transitions (RewardConfig) and draws batches, MixedSampler mixes samplers by fraction,
  ReplayBuffer keeps online trajectories in a ring, Prefetcher draws batches ahead on a thread;
  augment() shifts and color-jitters a batch's images on its device.
Level 2 (SPEC section 2): of the project it imports only bridge.py. A sampler reads the store given
(store.Store) through its arrays and index: images, states, actions, terminals, traj_length,
traj_start, traj_task, traj_success, in_split(), task names, action bounds. torch is imported
inside the functions that make tensors, so that `python data.py convert` never loads it.
"""

import math
from collections import deque
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np

from bridge import describe, image_hw

# Rescaled data actions are clipped to +-ACTION_CLIP, inside the open interval of the tanh policy;
# rollout.py clips the policy's executed actions there too, so an executed action is a storable one.
ACTION_CLIP = 0.99
# The name of a one-hot slot that pre-training (train.py --extra_tasks) keeps free for a future
# target task (Sec. IV-A); assign_target_slots gives it to the first new task.
RESERVED_TASK = "<reserved {}>"
_GRAY = (0.2989, 0.587, 0.114)  # luma weights of torchvision's rgb_to_grayscale
_RGB2YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


@dataclass(frozen=True)
class RewardConfig:
    """Sparse relabelling (Sec. IV-B): the last n_last steps of a successful trajectory get r = 1,
    the others 0; a failed attempt (the store's traj_success False) gets r = 0 on every step. The
    batch's reward is scale * r + shift (+10 / -1); done = r (every rewarded step is terminal), or
    the file's terminals."""

    n_last: int = 3
    scale: float = 11.0
    shift: float = -1.0
    use_terminals: bool = False


# -------------------- task ids, actions, returns, batches
def target_task_ids(prior_tasks, target_tasks, target="new"):
    """One-hot slots for the target store's tasks (Sec. IV-A): target="new" puts target task i on
    the fresh slot len(prior_tasks) + i, never trained during pre-training; a prior task name
    re-targets that task's id. Returns (global index per target-store task, num_tasks)."""
    if target == "new":
        ids = np.arange(len(target_tasks), dtype=np.int64) + len(prior_tasks)
        return ids, len(prior_tasks) + len(target_tasks)
    if target not in prior_tasks:
        raise ValueError(
            f"target: expected 'new' or one of the prior tasks {list(prior_tasks)}, got {target!r}"
        )
    return np.full(len(target_tasks), list(prior_tasks).index(target), np.int64), len(prior_tasks)


def is_reserved(task_name):
    """Whether a one-hot slot is one train.py --extra_tasks reserved (RESERVED_TASK), not a task."""
    return task_name.startswith(RESERVED_TASK.format("")[:-1])


def assign_target_slots(task_names, target_names, target="new"):
    """The one-hot slots of a target store's tasks in a model with these task names (Sec. IV-A),
    for joint training, offline and online fine-tuning: target="new" gives target task i the
    fresh slot len(real tasks) + i, which takes a reserved slot where one is left (they sit right
    after the real tasks) and otherwise widens the one-hot; a task name re-targets that task's slot
    (target_task_ids). Returns (global index per target task as ints, task names after the
    assignment)."""
    real = [n for n in task_names if not is_reserved(n)]
    ids, _ = target_task_ids(real, list(target_names), target)
    names = list(task_names)
    if target == "new":
        for name, slot in zip(target_names, ids):
            if slot < len(names):
                names[slot] = name
            else:
                names.append(name)
    return [int(i) for i in ids], names


def _as_bounds(a, low, high):
    """low, high as arrays of a's kind (numpy, or torch on a's device and dtype)."""
    if isinstance(a, np.ndarray):
        return a.astype(np.float32), np.asarray(low, np.float32), np.asarray(high, np.float32)
    import torch

    low = torch.as_tensor(low, dtype=a.dtype, device=a.device)
    high = torch.as_tensor(high, dtype=a.dtype, device=a.device)
    return a, low, high


def rescale_actions(a, low, high):
    """Raw actions -> [-1, 1] by per-dimension bounds, clipped to +-ACTION_CLIP (numpy or torch in,
    same out)."""
    a, low, high = _as_bounds(a, low, high)
    return (2 * (a - low) / (high - low) - 1).clip(-ACTION_CLIP, ACTION_CLIP)


def unscale_actions(a, low, high):
    """[-1, 1] -> raw actions: the inverse of rescale_actions inside the clip range."""
    a, low, high = _as_bounds(a, low, high)
    return low + (a + 1) * 0.5 * (high - low)


def mc_returns(success, reward, mask, lengths, gamma):
    """Monte-Carlo return-to-go of back-to-back trajectories, with the backup's masks (the Cal-QL
    bound, SPEC section 3): G_t = reward_t + gamma * mask_t * G_{t+1}, G = reward at a trajectory's
    last step; a trajectory without success (success all 0) gets the constant reward / (1 - gamma).
    success: the binary r; reward: the scaled one (scale * r + shift); mask: 1 - done; all (N,),
    lengths sum to N."""
    lengths = np.asarray(lengths)
    traj = np.repeat(np.arange(len(lengths)), lengths)  # the trajectory of each step
    start = np.cumsum(lengths) - lengths
    step = np.arange(len(reward)) - start[traj]
    G = np.array(reward, np.float64)
    # every trajectory at once, one step at a time, backwards from each one's next-to-last step
    idx = np.flatnonzero(step < lengths[traj] - 1)
    idx = idx[np.argsort(-step[idx], kind="stable")]
    for group in np.split(idx, np.flatnonzero(np.diff(step[idx])) + 1):
        G[group] += gamma * mask[group] * G[group + 1]
    failed = (np.maximum.reduceat(success, start) <= 0)[traj]
    G[failed] = np.asarray(reward)[failed] / (1 - gamma)
    return G.astype(np.float32)


def _make_batch(images, states, frame, next_frame, action, reward, mask, mc_return, task):
    """The batch: obs, next_obs uint8 (B, 3, H, W), a permuted (channels-last) view made without a
    copy; state, next_state (B, 7), action (B, 7) in [-1, 1], reward, mask, mc_return (B,) float32;
    task int64 (B,)."""
    import torch

    B = len(frame)
    both = np.concatenate([frame, next_frame])
    image = torch.from_numpy(np.asarray(images[both])).permute(0, 3, 1, 2)
    state = torch.from_numpy(np.asarray(states[both], np.float32))
    floats = {"action": action, "reward": reward, "mask": mask, "mc_return": mc_return}
    return {
        "obs": image[:B],
        "next_obs": image[B:],
        "state": state[:B],
        "next_state": state[B:],
        **{k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in floats.items()},
        "task": torch.from_numpy(np.asarray(task, np.int64)),
    }


# -------------------- samplers and the replay buffer
class _Seeded:
    """The RNG state as python ints, for an exact resume from a weights_only checkpoint."""

    def state_dict(self):
        return {"rng": self._rng.bit_generator.state}

    def load_state_dict(self, d):
        self._rng.bit_generator.state = d["rng"]


class Sampler(_Seeded):
    """Uniform transitions of one split of a store (split=None: all). Rewards, masks, MC returns and
    global task ids are computed once for every transition here, so a batch is a handful of gathers.
    Rewards follow RewardConfig: only a successful trajectory is relabelled; a failed attempt keeps
    r = 0 on every step (reward = shift, -1; mask 1, as done = r) and, having no success, the
    constant MC return shift / (1 - gamma) (mc_returns, the Cal-QL bound)."""

    def __init__(
        self,
        store,
        split="train",
        *,
        gamma,
        reward=RewardConfig(),
        task_ids=None,
        action_low=None,
        action_high=None,
        seed=0,
    ):
        self.store = store
        self.split = split
        self.image_size = store.image_size
        if task_ids is None:
            task_ids = np.arange(len(store.task_names))
        self.task_ids = np.asarray(task_ids, np.int64)
        if self.task_ids.shape != (len(store.task_names),):
            raise ValueError(
                f"task_ids: expected one per store task ({len(store.task_names)}), "
                f"got shape {self.task_ids.shape}"
            )
        if action_low is None:
            action_low = store.action_low
        if action_high is None:
            action_high = store.action_high
        self.action_low = np.asarray(action_low, np.float32)
        self.action_high = np.asarray(action_high, np.float32)
        lengths = store.traj_length
        traj = np.repeat(np.arange(len(lengths)), lengths)  # the trajectory of each transition
        step = np.arange(len(traj)) - store.traj_start[traj]
        # r = 1 on the last n_last steps of a successful trajectory; a failed attempt has no r = 1
        last_steps = step >= lengths[traj] - reward.n_last
        success = (last_steps & store.traj_success[traj]).astype(np.float32)
        done = np.asarray(store.terminals, np.float32) if reward.use_terminals else success
        self._reward = (reward.scale * success + reward.shift).astype(np.float32)
        self._mask = 1 - done
        self._mc_return = mc_returns(success, self._reward, self._mask, lengths, gamma)
        self._task = self.task_ids[store.traj_task[traj]]
        # transition g of trajectory k: its obs is frame g + k, its next obs frame g + k + 1
        self._frame = np.arange(len(traj)) + traj
        self._idx = np.flatnonzero(store.in_split(split)[traj])
        self._rng = np.random.default_rng(seed)

    def sample(self, batch_size):
        if not len(self._idx):
            raise ValueError(
                f"{self.store.path}: split '{self.split}' has no transitions to sample"
            )
        drawn = self._idx[self._rng.integers(0, len(self._idx), batch_size)]
        # sorted: the memmap gather walks the file forward (the order in a batch carries no meaning)
        return self._batch(np.sort(drawn))

    def trajectory(self, traj_id):
        start = self.store.traj_start[traj_id]
        return self._batch(start + np.arange(self.store.traj_length[traj_id]))

    def _batch(self, g):
        raw = np.asarray(self.store.actions[g])
        return _make_batch(
            self.store.images,
            self.store.states,
            self._frame[g],
            self._frame[g] + 1,
            rescale_actions(raw, self.action_low, self.action_high),
            self._reward[g],
            self._mask[g],
            self._mc_return[g],
            self._task[g],
        )


class MixedSampler:
    """Each batch draws floor(B * f_i) transitions from sampler i and the rest from the last one
    with f_i > 0: tau = 0.9 prior / 0.1 target offline (Sec. IV-A), 0.35 / 0.15 / 0.5 prior / target
    / online (Sec. V-F)."""

    def __init__(self, samplers, fractions):
        if len(samplers) != len(fractions) or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
            raise ValueError(
                f"fractions: expected {len(samplers)} non-negative numbers summing to 1, "
                f"got {fractions}"
            )
        self.samplers = list(samplers)
        self.fractions = list(fractions)

    def counts(self, batch_size):
        n = [math.floor(batch_size * f + 1e-9) for f in self.fractions]  # 1e-9: 0.7 * 10 = 6.999...
        last = np.flatnonzero(self.fractions)[-1]  # never a 0 fraction (an empty buffer)
        n[last] += batch_size - sum(n)
        return n

    def sample(self, batch_size):
        import torch

        counts = self.counts(batch_size)
        parts = [s.sample(n) for s, n in zip(self.samplers, counts) if n > 0]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def state_dict(self):
        return {"samplers": [s.state_dict() for s in self.samplers]}

    def load_state_dict(self, d):
        for sampler, state in zip(self.samplers, d["samplers"]):
            sampler.load_state_dict(state)


class ReplayBuffer(_Seeded):
    """Online data in the batch format of Sampler, first in first out by whole trajectories, in a
    ring of `capacity` frames (a trajectory of T steps takes T + 1). Rewards are the binary r of the
    env or the success classifier, done = r, scale / shift apply; MC returns are computed when a
    trajectory is added. Transition arrays are indexed by the obs frame. state_dict: the RNG, not
    the data."""

    def __init__(self, capacity, image_size, *, gamma, reward=RewardConfig(), seed=0):
        self.capacity = capacity
        self.image_size = image_hw(image_size)
        self.gamma = gamma
        self.reward = reward
        # np.zeros is a calloc: memory is used as it is written
        self.images = np.zeros((capacity, *self.image_size, 3), np.uint8)
        self.states = np.zeros((capacity, 7), np.float32)
        self.actions = np.zeros((capacity, 7), np.float32)
        self.rewards = np.zeros(capacity, np.float32)  # scaled: scale * r + shift
        self.masks = np.zeros(capacity, np.float32)
        self.mc_returns = np.zeros(capacity, np.float32)
        self.tasks = np.zeros(capacity, np.int64)
        self.live = np.zeros(capacity, bool)  # a transition starts at this frame
        self._lengths = deque()  # steps of the trajectories in the ring, oldest first
        self._start = 0  # the oldest trajectory's first frame
        self._used = 0  # frames in use
        self._rng = np.random.default_rng(seed)

    def __len__(self):
        return sum(self._lengths)

    def add_trajectory(self, images, states, actions, rewards, task):
        """images uint8 (T+1, H, W, 3), states (T+1, 7), actions (T, 7) in [-1, 1], rewards (T,) in
        {0, 1}."""
        images = np.asarray(images)
        states = np.asarray(states, np.float32)
        actions = np.asarray(actions, np.float32)
        success = np.asarray(rewards, np.float32)
        T = len(actions)
        fits = (
            images.shape == (T + 1, *self.image_size, 3)
            and images.dtype == np.uint8
            and 1 <= T < self.capacity
            and states.shape == (T + 1, 7)
            and actions.shape == (T, 7)
            and success.shape == (T,)
            and np.isin(success, (0, 1)).all()
        )
        if not fits:
            raise ValueError(
                f"ReplayBuffer.add_trajectory: expected images uint8 (T+1, *{self.image_size}, 3), "
                f"states (T+1, 7), actions (T, 7), rewards (T,) in {{0, 1}}, 1 <= T < "
                f"{self.capacity}; got {describe(images)}, states {states.shape}, "
                f"actions {actions.shape}, {success}"
            )
        while self._used + T + 1 > self.capacity:  # drop the oldest trajectories until it fits
            n = self._lengths.popleft() + 1
            self.live[(self._start + np.arange(n)) % self.capacity] = False
            self._start = (self._start + n) % self.capacity
            self._used -= n
        frames = (self._start + self._used + np.arange(T + 1)) % self.capacity
        steps = frames[:-1]
        reward = (self.reward.scale * success + self.reward.shift).astype(np.float32)
        mask = 1 - success
        self.images[frames] = images
        self.states[frames] = states
        self.actions[steps] = actions
        self.rewards[steps] = reward
        self.masks[steps] = mask
        self.mc_returns[steps] = mc_returns(success, reward, mask, [T], self.gamma)
        self.tasks[steps] = task
        self.live[steps] = True
        self._lengths.append(T)
        self._used += T + 1

    def sample(self, batch_size):
        ring = (
            self._start + np.arange(self._used)
        ) % self.capacity  # oldest first: a refill samples alike
        live = ring[self.live[ring]]
        if not len(live):
            raise ValueError("ReplayBuffer.sample: the buffer is empty")
        f = live[self._rng.integers(0, len(live), batch_size)]
        return _make_batch(
            self.images,
            self.states,
            f,
            (f + 1) % self.capacity,
            self.actions[f],
            self.rewards[f],
            self.masks[f],
            self.mc_returns[f],
            self.tasks[f],
        )


class Prefetcher:
    """Batches of a sampler drawn by a background thread while the device trains on earlier ones
    (an input pipeline that does not starve a GPU): `depth` batches ahead, each in pinned memory
    when CUDA is available, so that train.prepare_batch's non_blocking copy overlaps with compute;
    augmentation stays on the device. A drop-in for the sampler of a training loop (sample,
    state_dict, load_state_dict) at one batch size. Exact resume: each batch is drawn together with
    the sampler's state right after it, and state_dict() is the state after the last batch handed
    out, not after those still waiting, so a checkpoint continues where the consumed batches end,
    with or without a Prefetcher (the format is the sampler's own). For samplers whose data is fixed
    while it runs (Sampler, MixedSampler); not for a ReplayBuffer that grows between updates (a
    batch drawn ahead would miss the newest trajectories)."""

    def __init__(self, sampler, batch_size, depth=2, pin_memory=None):
        import torch

        if depth < 1:
            raise ValueError(f"Prefetcher: depth={depth}, expected >= 1")
        self.sampler = sampler
        self.batch_size = batch_size
        self.depth = depth
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        # one worker: the batches are drawn one after another, in the order the
        # sampler alone gives them
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ptr-prefetch")
        self._pending = deque()  # futures of (batch, sampler state after it), oldest first
        self._state = None  # the state after the last batch handed out; None: the sampler's own

    def _draw(self):
        batch = self.sampler.sample(self.batch_size)
        state = self.sampler.state_dict()
        if self.pin_memory:
            batch = {k: v.pin_memory() for k, v in batch.items()}
        return batch, state

    def _fill(self):
        while len(self._pending) < self.depth:
            self._pending.append(self._pool.submit(self._draw))

    def _drain(self):
        """Drop the batches drawn ahead; afterwards no draw is running and the
        sampler may be touched."""
        for future in self._pending:
            future.cancel()
        wait(self._pending)
        self._pending.clear()

    def sample(self, batch_size):
        if batch_size != self.batch_size:
            raise ValueError(
                f"Prefetcher.sample({batch_size}): this prefetcher draws batches of "
                f"{self.batch_size}"
            )
        self._fill()
        batch, self._state = self._pending.popleft().result()  # a draw's error is raised here
        self._fill()
        return batch

    def state_dict(self):
        if self._state is None:  # nothing handed out yet, so nothing drawn: the sampler is idle
            return self.sampler.state_dict()
        return self._state

    def load_state_dict(self, d):
        self._drain()
        self.sampler.load_state_dict(d)
        self._state = None

    def close(self):
        self._drain()
        self._pool.shutdown()


# -------------------- augmentation (Table X: crop + jitter)
def _random_shift(images, pad, generator):
    """Edge pad + random crop back to size, an offset per image. That equals the shifted pixel
    coordinates clamped into the image: one gather, no padded copy. uint8 (B, 3, H, W) -> same."""
    import torch

    B, _, H, W = images.shape
    device = images.device
    shift = torch.randint(-pad, pad + 1, (B, 2, 1), device=device, generator=generator)
    rows = (torch.arange(H, device=device) + shift[:, 0]).clamp(0, H - 1)  # (B, H)
    cols = (torch.arange(W, device=device) + shift[:, 1]).clamp(0, W - 1)  # (B, W)
    image_offset = torch.arange(B, device=device).view(B, 1, 1) * H
    pixel = (image_offset + rows[:, :, None]) * W + cols[:, None, :]  # (B, H, W) flat indices
    flat = images.permute(0, 2, 3, 1).reshape(B * H * W, 3)
    return flat.index_select(0, pixel.view(-1)).view(B, H, W, 3).permute(0, 3, 1, 2)


def augment(
    images,
    pad=4,
    brightness=0.2,
    contrast=0.1,
    saturation=0.1,
    hue=0.03,
    p_jitter=0.8,
    generator=None,
):
    """Random shift (edge pad + random crop back to size), then color jitter on each image with
    probability p_jitter, independent random parameters per image, on the images' device. Jitter:
    torchvision's ranges in the fixed order brightness, contrast, saturation, hue (torchvision's
    ColorJitter shuffles the order per call; a fixed one is simpler and keeps every pass batched
    over the images); hue rotates the chroma plane in YIQ space by hue * 2 pi (linear, cheap, close
    to the HSV shift). uint8 (B, 3, H, W) -> same; deterministic under torch.manual_seed."""
    import torch

    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"augment: expected uint8 images (B, 3, H, W), got {images.dtype} {tuple(images.shape)}"
        )
    B, _, H, W = images.shape
    device = images.device

    def uniform(*shape):  # in [0, 1)
        return torch.rand(shape, device=device, generator=generator)

    if pad > 0:
        images = _random_shift(images, pad, generator)
    if p_jitter <= 0:
        return images
    # an image left out (prob. 1 - p_jitter) gets identity factors: exact after rounding, and no
    # select pass is needed
    apply = (uniform(B, 1, 1) < p_jitter).float()

    def factor(strength):  # uniform in [1 - strength, 1 + strength] where applied, else 1
        return (1 + apply * strength * (2 * uniform(B, 1, 1) - 1)).clamp(min=0)

    luma = torch.tensor(_GRAY, device=device).view(1, 1, 3)
    # channels first: the broadcasts and the bmm below are ~10x faster on a CPU
    x = images.contiguous().float().view(B, 3, H * W)
    x = x.mul_(factor(brightness)).clamp_(0, 255)  # in place where possible: this also runs on CPUs
    contrast_factor = factor(contrast)
    saturation_factor = factor(saturation)
    mean_gray = (luma @ x).mean(2, keepdim=True)
    x = x.mul_(contrast_factor).add_(mean_gray * (1 - contrast_factor)).clamp_(0, 255)
    gray = luma @ x  # (B, 1, H*W)
    x = x.mul_(saturation_factor).add_(gray * (1 - saturation_factor)).clamp_(0, 255)
    theta = apply.view(B) * (2 * uniform(B) - 1) * hue * 2 * math.pi
    cos = theta.cos()
    sin = theta.sin()
    one = torch.ones_like(theta)
    zero = torch.zeros_like(theta)
    rotation = torch.stack([one, zero, zero, zero, cos, -sin, zero, sin, cos], 1).view(B, 3, 3)
    to_yiq = torch.tensor(_RGB2YIQ, dtype=torch.float32, device=device)
    to_rgb = torch.tensor(np.linalg.inv(_RGB2YIQ), dtype=torch.float32, device=device)
    x = torch.bmm(to_rgb @ rotation @ to_yiq, x)
    return x.clamp_(0, 255).round_().to(torch.uint8).view(B, 3, H, W)
