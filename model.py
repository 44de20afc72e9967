"""PTR networks: image encoders, the Q-network, the tanh-Gaussian policy, the BC policy,
the success classifier; and the surgery on the task one-hot that a new task needs (widen it, zero
a slot), which carries each changed weight's optimizer state along.

Kumar, Singh, Ebert et al., "Pre-Training for Robots: Offline RL Enables Learning New Tasks
from a Handful of Trials", RSS 2023 (paper/ptr_rss2023.txt). Section IV-B and Figure 2 give
the design choices, Appendix E (Tables XIII-XV, Figure 7) their ablations; every one of them is
a constructor argument here:

  arch  resnet18 | resnet34 (paper) | resnet50 | impala | small      (Figure 7: capacity scaling)
  norm  group (paper: GroupNorm, 4 groups) | batch                   (Table XV: BatchNorm
                                                                      destabilises TD)
  head  spatial (paper: learned spatial embeddings) | avgpool | softmax   (Table XIII)
  action_every_layer  True (paper: action fed to every Q layer) | False   (Table XIV)

Images enter as uint8 (B, 3, H, W) and are scaled inside, so data pipelines never hold float images.
This file imports nothing from the project and can be copied alone.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

ARCHS = ("resnet18", "resnet34", "resnet50", "impala", "small")
HEADS = ("spatial", "avgpool", "softmax")
NORMS = ("group", "batch")
GROUPS = 4  # GroupNorm groups (SPEC section 4)
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0
HIDDEN_GAIN, OUTPUT_GAIN = math.sqrt(2.0), 1e-2  # orthogonal init gains (SPEC section 4)


def _norm_layer(norm):
    if norm == "group":
        return lambda channels: nn.GroupNorm(GROUPS, channels)
    if norm == "batch":
        return nn.BatchNorm2d
    raise ValueError(f"model.py: norm={norm!r}, expected one of {NORMS}")


# -------------------------------------------------------------------------------------- conv trunks
def resnet_trunk(arch, norm):
    """A torchvision ResNet without avgpool/fc, with PTR's strides: stem conv/2 + maxpool/2, then
    only the second stage (layer2) downsamples, so 128x128 -> 16x16 (x512, x2048 for resnet50).
    Keeping layer3/layer4 at 16x16 keeps the spatial detail the learned spatial embeddings
    read (Section IV-B)."""
    # here, not at the top: it costs seconds at start-up and only the ResNets need it
    import torchvision

    net = getattr(torchvision.models, arch)(weights=None, norm_layer=_norm_layer(norm))
    for stage in (net.layer3, net.layer4):
        for m in stage.modules():  # BasicBlock: conv1 + downsample; Bottleneck: conv2 + downsample
            if isinstance(m, nn.Conv2d) and m.stride != (1, 1):
                m.stride = (1, 1)
    return nn.Sequential(
        net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4
    )


def small_trunk(norm):
    """The 'small' 3-conv-layer encoder of the scaling study (Figure 7), /4 overall. The
    norm layer follows every conv as in the ResNets, so the norm ablation means the same
    thing for every arch."""
    n = _norm_layer(norm)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, 2, 1),
        n(32),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, 2, 1),
        n(64),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, 1, 1),
        n(64),
        nn.ReLU(),
    )


class _ImpalaResidual(nn.Module):
    def __init__(self, c, norm):
        super().__init__()
        n = _norm_layer(norm)
        self.body = nn.Sequential(
            nn.ReLU(), nn.Conv2d(c, c, 3, 1, 1), n(c), nn.ReLU(), nn.Conv2d(c, c, 3, 1, 1), n(c)
        )

    def forward(self, x):
        return x + self.body(x)


def impala_trunk(norm, channels=(16, 32, 32)):
    """IMPALA ResNet (Espeholt et al. 2018): 3 stacks of conv + maxpool/2 + 2 residual
    blocks = 15 convs, /8."""
    layers, c_in = [], 3
    for c in channels:
        layers += [
            nn.Conv2d(c_in, c, 3, 1, 1),
            nn.MaxPool2d(3, 2, 1),
            _ImpalaResidual(c, norm),
            _ImpalaResidual(c, norm),
        ]
        c_in = c
    return nn.Sequential(*layers, nn.ReLU())


# ------------------------------------------------------------------------------------ pooling heads
class SpatialEmbedding(nn.Module):
    """Learned spatial embeddings (Section IV-B, Figure 2): multiply the (C, H, W) feature map
    point-wise by K learned (C, H, W) maps and sum over H, W -> C*K features. Unlike pooling it
    keeps *where* things are."""

    def __init__(self, c, h, w, k):
        super().__init__()
        self.kernel = nn.Parameter(
            torch.randn(c, h, w, k) / math.sqrt(c * h * w)
        )  # LeCun-normal fan-in
        self.out_dim = c * k

    def forward(self, f):
        b = f.shape[0]
        # einsum batches over channels: (C, B, HW) @ (C, HW, K)
        kernel = self.kernel.flatten(1, 2).to(f.dtype)
        return torch.einsum("bcp,cpk->bck", f.flatten(2), kernel).reshape(b, self.out_dim)


class AvgPool(nn.Module):
    """Global average pooling (ablation, Table XIII)."""

    def __init__(self, c, h, w):
        super().__init__()
        self.out_dim = c

    def forward(self, f):
        return f.mean(dim=(2, 3))


class SpatialSoftmax(nn.Module):
    """Spatial softmax keypoints (Levine et al. 2016; ablation, Table XIII): per channel, the
    expected (x, y) under a softmax over positions, with a learned temperature -> 2C features."""

    def __init__(self, c, h, w):
        super().__init__()
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        self.register_buffer(
            "pos", torch.stack([xs.flatten(), ys.flatten()], 1), persistent=False
        )  # (HW, 2)
        self.log_temp = nn.Parameter(torch.zeros(()))
        self.out_dim = 2 * c

    def forward(self, f):
        attn = torch.softmax(f.flatten(2).float() / self.log_temp.exp(), dim=-1)  # (B, C, HW)
        return (attn @ self.pos).flatten(1)


class Encoder(nn.Module):
    """uint8 images (B, 3, H, W) -> (B, embed_dim): trunk, pooling head,
    Linear -> LayerNorm -> tanh. The same projection follows every head, so heads are swappable with
    identical downstream shapes."""

    def __init__(self, trunk, head, feature_shape, embed_dim, k):
        super().__init__()
        c, h, w = feature_shape
        self.trunk = trunk
        if head == "spatial":
            self.pool = SpatialEmbedding(c, h, w, k)
        else:
            self.pool = (AvgPool if head == "avgpool" else SpatialSoftmax)(c, h, w)
        self.proj = nn.Sequential(
            nn.Linear(self.pool.out_dim, embed_dim), nn.LayerNorm(embed_dim), nn.Tanh()
        )
        self.feature_shape, self.embed_dim = tuple(feature_shape), embed_dim
        self.channels_last = False  # set by the agent on CUDA (faster convolutions with cuDNN)

    def forward(self, images):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(
                f"model.py: Encoder expects uint8 images (B, 3, H, W), "
                f"got {images.dtype} {tuple(images.shape)}"
            )
        if self.channels_last:
            images = images.contiguous(
                memory_format=torch.channels_last
            )  # permute the 1-byte data, not floats
        x = images.float().div_(255.0)
        return self.proj(self.pool(self.trunk(x)))


def make_encoder(arch="resnet34", head="spatial", norm="group", image_size=128, embed_dim=256):
    """Build an encoder; the feature-map size is found by a dry forward on the meta
    device (no compute)."""
    if arch not in ARCHS:
        raise ValueError(f"model.py: arch={arch!r}, expected one of {ARCHS}")
    if head not in HEADS:
        raise ValueError(f"model.py: head={head!r}, expected one of {HEADS}")
    _norm_layer(norm)
    if int(image_size) < 32:
        raise ValueError(f"model.py: image_size={image_size}, expected >= 32")
    if arch.startswith("resnet"):
        trunk = resnet_trunk(arch, norm)
    else:
        trunk = small_trunk(norm) if arch == "small" else impala_trunk(norm)
    meta = {k: v.to("meta") for k, v in [*trunk.named_parameters(), *trunk.named_buffers()]}
    probe = functional_call(
        trunk, meta, (torch.empty(1, 3, image_size, image_size, device="meta"),)
    )
    k = 4 if arch == "resnet50" else 8  # SPEC section 4: K = 8, 4 for the 2048-channel ResNet-50
    return Encoder(trunk, head, probe.shape[1:], embed_dim, k)


# --------------------------------------------------------------------------------------- MLP pieces
def _orthogonal_(linear, gain):
    nn.init.orthogonal_(linear.weight, gain)
    nn.init.zeros_(linear.bias)
    return linear


class StackedLinear(nn.Module):
    """`num` independent Linear layers evaluated with one batched matmul: x (num, M, in) -> (num, M,
    out). Used for the 2 Q heads, which are separate MLPs that only share the encoder."""

    def __init__(self, num, in_features, out_features, gain):
        super().__init__()
        w = torch.empty(num, in_features, out_features)
        for i in range(num):  # orthogonal per head, stored transposed (in, out) for baddbmm
            w[i] = nn.init.orthogonal_(torch.empty(out_features, in_features), gain).T
        self.weight = nn.Parameter(w)
        self.bias = nn.Parameter(torch.zeros(num, 1, out_features))

    def forward(self, x, detach_params=False):
        w, b = (
            (self.weight.detach(), self.bias.detach())
            if detach_params
            else (self.weight, self.bias)
        )
        return torch.baddbmm(b, x, w)


class QNetwork(nn.Module):
    """One encoder shared by `num_qs` Q heads (Figure 2). Each head is an MLP (hidden x depth, ReLU)
    whose first layer sees [task one-hot, action, embedding] and every later layer (output included)
    [hidden, action, embedding]: re-feeding the action stops the Q-function from ignoring
    it when s and a are strongly correlated in demonstrations (Section IV-B, Table XIV).
    action_every_layer=False feeds the action at the input only (the embedding still enters every
    layer). The critic does not see the proprioceptive state."""

    def __init__(
        self,
        encoder,
        num_tasks,
        action_dim=7,
        hidden=256,
        depth=3,
        action_every_layer=True,
        num_qs=2,
    ):
        super().__init__()
        self.encoder, self.num_tasks, self.action_dim = encoder, num_tasks, action_dim
        self.action_every_layer, self.num_qs = action_every_layer, num_qs
        d, side = encoder.embed_dim, action_dim + encoder.embed_dim
        widths = [num_tasks + side] + [hidden + (side if action_every_layer else d)] * depth
        self.layers = nn.ModuleList(
            StackedLinear(num_qs, widths[i], hidden, HIDDEN_GAIN) for i in range(depth)
        )
        self.layers.append(StackedLinear(num_qs, widths[-1], 1, OUTPUT_GAIN))

    def action_columns(self, i):
        """Input rows of layer i's weight that multiply the action (None where the
        action is not fed)."""
        if i == 0:
            return slice(self.num_tasks, self.num_tasks + self.action_dim)
        h = self.layers[i].weight.shape[1] - self.action_dim - self.encoder.embed_dim
        return slice(h, h + self.action_dim) if self.action_every_layer else None

    def embed(self, images):
        return self.encoder(images)

    def heads(self, z, action, task_onehot, detach_params=False):
        """Q values of every head. action (B, A) -> (B, num_qs); action (B, N, A) -> (B, N, num_qs),
        N actions per state sharing that state's embedding. detach_params: no gradient
        into the heads (actor loss).

        Every layer's input is [task one-hot or hidden, action, embedding]. The task and
        embedding parts are the same for the N actions of a state, so their product with the
        weights is computed once per state and broadcast over the N actions: the same function
        as one matmul on the concatenated input, at about half the multiply-adds for the 1 + 2N
        actions of a CQL update."""
        single = action.dim() == 2
        a = action[:, None] if single else action
        b, n, num_a = a.shape
        d = self.encoder.embed_dim
        assert z.shape == (b, d), f"embedding {tuple(z.shape)} vs action {tuple(action.shape)}"
        assert task_onehot.shape == (b, self.num_tasks), (
            f"task one-hot {tuple(task_onehot.shape)}, expected ({b}, {self.num_tasks})"
        )
        a = a.reshape(1, b * n, num_a)
        z = z.to(a.dtype)[None]  # (1, B, D): matmul broadcasts it over the heads
        x = task_onehot.to(a.dtype)[None]  # layer 0's first input part is per state too
        for i, layer in enumerate(self.layers):
            w = layer.weight.detach() if detach_params else layer.weight  # (num_qs, in, out)
            bias = layer.bias.detach() if detach_params else layer.bias  # (num_qs, 1, out)
            width = x.shape[-1]  # rows of w for the first part: task one-hot (layer 0) or hidden
            per_state = torch.matmul(z, w[:, -d:]) + bias  # (num_qs, B, out)
            if i == 0:
                per_state = per_state + torch.matmul(x, w[:, :width])
                per_pair = torch.matmul(a, w[:, width : width + num_a])
            else:
                per_pair = torch.matmul(F.relu(x), w[:, :width])
                if self.action_every_layer:
                    per_pair = per_pair + torch.matmul(a, w[:, width : width + num_a])
            out = per_pair.shape[-1]
            x = (per_pair.view(-1, b, n, out) + per_state[:, :, None]).view(-1, b * n, out)
        q = x.squeeze(-1).T.reshape(b, n, self.num_qs)
        return q[:, 0] if single else q

    def heads_concatenated(self, z, action, task_onehot, detach_params=False):
        """heads() written as Figure 2 draws it: every layer one matmul on the concatenated [task
        one-hot or hidden, action, embedding] of each (state, action) pair. The same function
        as heads(), slower; kept as its reference (test_ptr.py, scripts/bench_qheads.py). action
        (B, N, A) -> (B, N, num_qs)."""
        b, n, _ = action.shape
        embedding = z.to(action.dtype)[:, None].expand(b, n, -1)
        side = torch.cat([action, embedding], -1).reshape(1, b * n, -1).expand(self.num_qs, -1, -1)
        task = task_onehot.to(action.dtype)[:, None].expand(b, n, -1).reshape(1, b * n, -1)
        x = torch.cat([task.expand(self.num_qs, -1, -1), side], -1)
        for i, layer in enumerate(self.layers):
            x = layer(x, detach_params)
            if i + 1 < len(self.layers):
                fed = side if self.action_every_layer else side[..., self.action_dim :]
                x = torch.cat([F.relu(x), fed], -1)
        return x.squeeze(-1).T.reshape(b, n, self.num_qs)

    def forward(self, images, action, task_onehot):
        return self.heads(self.embed(images), action, task_onehot)


def mlp(in_dim, hidden, depth, out_dim, dropout=0.0):
    layers = []
    for i in range(depth):
        layers += [
            _orthogonal_(nn.Linear(in_dim if i == 0 else hidden, hidden), HIDDEN_GAIN),
            nn.ReLU(),
        ]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, _orthogonal_(nn.Linear(hidden, out_dim), OUTPUT_GAIN))


# ----------------------------------------------------------------------------------------- policies
STATE_STD_MIN = 1e-3  # a state dimension that varies less than this is centred, not blown up


class StateNormalizer(nn.Module):
    """(state - mean) / std with the training data's per-dimension statistics, kept as buffers so
    that they travel with the weights (fine-tuning and evaluation see the state as pre-training
    did). The state's units differ by orders of magnitude (metres, radians, a 0..1 gripper):
    unscaled, a 4 cm height difference is 0.04 at the input of an MLP whose image features are O(1),
    and a policy learns slowly when to close the gripper. Identity until set_statistics (and in
    checkpoints written before it)."""

    def __init__(self, dim):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def set_statistics(self, mean, std):
        mean = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std = torch.as_tensor(std, dtype=torch.float32).flatten()
        if mean.shape != self.mean.shape or std.shape != self.std.shape:
            raise ValueError(
                f"model.py: state statistics of shape {tuple(mean.shape)} / {tuple(std.shape)}, "
                f"expected ({self.mean.numel()},) each"
            )
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all() and (std >= 0).all()):
            raise ValueError("model.py: state statistics must be finite, with std >= 0")
        self.mean.copy_(mean)
        self.std.copy_(std.clamp_min(STATE_STD_MIN))

    def forward(self, state):
        return (state - self.mean) / self.std


def tanh_log_det(u):
    """log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)), exact and stable for large
    |u| (summed over dims)."""
    return (2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))).sum(-1)


def tanh_gaussian_sample(mean, log_std, num_samples=None, generator=None):
    """Reparameterised sample a = tanh(mean + std * eps) and its log-probability.
    mean, log_std (B, A) -> action (B, A), log_prob (B,); with num_samples=N: (B, N, A), (B, N)."""
    if num_samples is not None:
        mean, log_std = (t[:, None].expand(-1, num_samples, -1) for t in (mean, log_std))
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    u = mean + log_std.exp() * eps
    log_normal = (-0.5 * eps.pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
    return torch.tanh(u), log_normal - tanh_log_det(u)


def tanh_gaussian_log_prob(mean, log_std, action, eps=1e-6):
    """log pi(action) for a given squashed action in (-1, 1) (clipped by eps to
    keep atanh finite)."""
    u = torch.atanh(action.clamp(-1 + eps, 1 - eps))
    z = (u - mean) / log_std.exp()
    return (-0.5 * z.pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1) - tanh_log_det(u)


class TanhGaussianPolicy(nn.Module):
    """pi(a | s, task): its own encoder (Appendix E: encoders are not shared with the critic), an
    MLP on [embedding, normalized state, task one-hot], a Gaussian squashed by tanh into [-1, 1]^A,
    log-std clipped to [-5, 2]."""

    def __init__(self, encoder, num_tasks, state_dim=7, action_dim=7, hidden=256, depth=3):
        super().__init__()
        self.encoder, self.num_tasks, self.action_dim = encoder, num_tasks, action_dim
        self.state_norm = StateNormalizer(state_dim)
        self.net = mlp(encoder.embed_dim + state_dim + num_tasks, hidden, depth, 2 * action_dim)

    def embed(self, images):
        return self.encoder(images)

    def dist(self, z, state, task_onehot):
        """-> (mean, log_std), each (B, A), of the pre-tanh Gaussian."""
        assert task_onehot.shape[1] == self.num_tasks, (
            f"task one-hot width {task_onehot.shape[1]} != {self.num_tasks}"
        )
        x = torch.cat([z.float(), self.state_norm(state), task_onehot], -1)
        mean, log_std = self.net(x).chunk(2, -1)
        return mean, log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)

    def sample(self, z, state, task_onehot, num_samples=None, generator=None):
        return tanh_gaussian_sample(*self.dist(z, state, task_onehot), num_samples, generator)

    def log_prob(self, z, state, task_onehot, action):
        return tanh_gaussian_log_prob(*self.dist(z, state, task_onehot), action)

    def deterministic(self, z, state, task_onehot):
        return torch.tanh(self.dist(z, state, task_onehot)[0])

    def forward(self, images, state, task_onehot):
        return self.deterministic(self.embed(images), state, task_onehot)


class BCPolicy(nn.Module):
    """Behaviour-cloning baseline (Appendix, Table XI): same encoder and MLP inputs, deterministic
    output regressed with MSE, dropout 0.4, no tanh (following Ebert et al.; the agent
    clips actions to [-1, 1])."""

    def __init__(
        self, encoder, num_tasks, state_dim=7, action_dim=7, hidden=256, depth=3, dropout=0.4
    ):
        super().__init__()
        self.encoder, self.num_tasks, self.action_dim = encoder, num_tasks, action_dim
        self.state_norm = StateNormalizer(state_dim)
        self.net = mlp(
            encoder.embed_dim + state_dim + num_tasks, hidden, depth, action_dim, dropout
        )

    def embed(self, images):
        return self.encoder(images)

    def head(self, z, state, task_onehot):
        assert task_onehot.shape[1] == self.num_tasks, (
            f"task one-hot width {task_onehot.shape[1]} != {self.num_tasks}"
        )
        return self.net(torch.cat([z.float(), self.state_norm(state), task_onehot], -1))

    def forward(self, images, state, task_onehot):
        return self.head(self.embed(images), state, task_onehot)


class SuccessClassifier(nn.Module):
    """Reward classifier for online fine-tuning on a real robot (SPEC section 3):
    encoder -> MLP -> one logit of P(success | image). Train with BCE on logits."""

    def __init__(self, encoder, hidden=256, depth=1):
        super().__init__()
        self.encoder = encoder
        self.net = mlp(encoder.embed_dim, hidden, depth, 1)

    def forward(self, images):
        return self.net(self.encoder(images).float()).squeeze(-1)


# ------------------------------------------------------------------------------- task one-hot slots
def task_input(net):
    """(layer, column of one-hot slot 0 in layer.weight) of the one layer of net that reads the task
    one-hot, whose slots are columns along dim 1 of its weight: a QNetwork's first head layer
    ([task, action, z], weight (heads, in, out)), a policy's first MLP layer ([z, state, task],
    weight (out, in))."""
    if isinstance(net, QNetwork):
        return net.layers[0], 0
    if isinstance(net, (TanhGaussianPolicy, BCPolicy)):
        layer = net.net[0]
        return layer, layer.weight.shape[1] - net.num_tasks
    raise TypeError(f"model.py: {type(net).__name__} has no task one-hot")


def insert_zeros(t, dim, index, count):
    """t with `count` zero slices inserted along dim before position index."""
    shape = list(t.shape)
    shape[dim] = count
    return torch.cat(
        [t.narrow(dim, 0, index), t.new_zeros(shape), t.narrow(dim, index, t.shape[dim] - index)],
        dim,
    )


def _optimizer_of(weight, optimizers):
    """The optimizer among these whose param groups hold weight, or None (a target network)."""
    for opt in optimizers:
        if any(p is weight for group in opt.param_groups for p in group["params"]):
            return opt
    return None


@torch.no_grad()
def zero_task_inputs(nets, slots, optimizers=()):
    """Set the input weights of these one-hot slots to zero in every net, and the same entries of
    the optimizer state shaped like the weight (Adam's moments), so the slot restarts from nothing:
    a task on it starts from the task-agnostic part of every network."""
    for net in nets:
        layer, first = task_input(net)
        opt = _optimizer_of(layer.weight, optimizers)
        moments = opt.state.get(layer.weight, {}) if opt is not None else {}
        for slot in slots:
            assert 0 <= slot < net.num_tasks, (slot, net.num_tasks)
            layer.weight[:, first + slot] = 0
            for v in moments.values():
                if torch.is_tensor(v) and v.shape == layer.weight.shape:
                    v[:, first + slot] = 0


def grow_task_inputs(nets, num_tasks, optimizers=()):
    """Widen every net's task one-hot to num_tasks slots, the new slots after the old ones with zero
    input weights, so the old tasks' outputs stay as they were. A widened weight is a new Parameter,
    so it takes the old one's place everywhere the old one was: in its module, in its optimizer's
    param group, and in that optimizer's state, where tensors shaped like the weight (Adam's
    moments) get zero slots and the rest (the step count) stays."""
    for net in nets:
        layer, first = task_input(net)
        index, count = first + net.num_tasks, num_tasks - net.num_tasks
        old = layer.weight
        new = nn.Parameter(insert_zeros(old.detach(), 1, index, count), old.requires_grad)
        layer.weight = new
        net.num_tasks = num_tasks
        opt = _optimizer_of(old, optimizers)
        if opt is None:
            continue
        for group in opt.param_groups:
            group["params"] = [new if p is old else p for p in group["params"]]
        state = opt.state.pop(old, {})
        opt.state[new] = {
            k: insert_zeros(v, 1, index, count)
            if torch.is_tensor(v) and v.shape == old.shape
            else v
            for k, v in state.items()
        }
