"""CQL / Cal-QL / BC / AW-BC losses and the PTR agent that owns the networks and optimizers.

Kumar, Singh, Ebert et al., RSS 2023 (paper/ptr_rss2023.txt), Section IV-A: multi-task CQL
with a one-hot task id; Appendix (Tables X, XI): the hyperparameters; Section V / Table IX:
advantage-weighted BC; online fine-tuning clips the push-down with the Monte-Carlo return
(Cal-QL, Nakamoto et al. 2023). SPEC section 3 has the release's details, all defaults
live in AgentConfig below:

  critic  sum over the 2 heads of  mean (Q(s,a) - y)^2  +  alpha * mean [ lse(s) - Q(s,a) ]
          y = r + gamma * mask * max_{j<N} min_heads Q_target(s', a'_j),  a'_j ~ pi(.|s')
              (no entropy term)
          lse(s) = temp * logsumexp_j over { (Q(s,a^pi_j) - log pi(a^pi_j)) / temp,
                                             (Q(s,a^u_j) - log 0.5^A) / temp }
          with N policy actions a^pi ~ pi(.|s) and N uniform a^u in [-1,1]^A
          (importance-sampled CQL(H));
          Cal-QL: Q(s,a^pi) -> max(Q(s,a^pi), mc_return) before the logsumexp.
          The TD term is the plain MSE of the release (the paper writes 1/2 TD + alpha * penalty),
          so alpha here weighs the penalty like 2 * alpha in the paper's equation: the release's
          alpha = 10 means this one.
  actor   mean [ temp * log pi(a|s) - min_heads Q(s,a) ],  a ~ pi;
          temperature: temp * (entropy - target)
          imitating (bc_steps): mean [ temp * log pi(a|s) ] - mean [ w * log pi(a_data|s) ]
                                 - lambda * mean [ min_heads Q(s,a) ] / mean |min_heads Q(s,a_data)|
          w = 1; with actor_awr_beta the AWR / AWAC / IQL weights exp(beta * normalised advantage),
          clipped and divided by their batch mean; with actor_awbc the awbc weights below, ditto.
          lambda (actor_q_weight, TD3+BC's normalised Q term) ramps up from actor_q_start.
  gbc     Gaussian BC: the imitating actor's loss alone, no critic (the matched imitation control)
  bc      MSE;  awbc: MSE weighted by exp(Q(s,a) - max_j Q(s,a^pi_j)), clipped at awbc_max_weight.

`python bench.py ...` measures update speed, eager and compiled (bench.py imports this file).
"""

import contextlib
import copy
import math
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F

from model import (
    BCPolicy,
    QNetwork,
    TanhGaussianPolicy,
    grow_task_inputs,
    make_encoder,
    zero_task_inputs,
)

ALGOS = ("cql", "bc", "awbc", "gbc")
# the networks each algo trains: an algo switch (set_config) stays within one family
ALGO_FAMILY = {"cql": "critic", "awbc": "critic", "bc": "bc", "gbc": "gaussian"}
# torch.compile modes of Agent.compile(): inductor's default, CUDA graphs (removes the
# launch overhead of the many small kernels of the MLP heads and losses), or autotuned
# kernels without CUDA graphs
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")
# Fields that fix tensor shapes: a checkpoint only loads into an agent that agrees on all of them.
STRUCTURE = (
    "arch",
    "head",
    "norm",
    "image_size",
    "embed_dim",
    "num_tasks",
    "action_dim",
    "state_dim",
    "hidden",
    "depth",
    "action_every_layer",
)


@dataclass
class AgentConfig:
    """The one place for the paper's defaults (Table X; SPEC section 3). A phase that changes the
    learner (finetune.py's --algo / --alpha, online.py's alpha and Cal-QL) hands the agent a new
    config, agent.set_config(dataclasses.replace(agent.cfg, ...)), which also sets the optimizers'
    learning rates. The trailing comments are the command-line help (cli.add_dataclass_args)."""

    num_tasks: int = 1  # size of the task one-hot
    arch: str = "resnet34"  # encoder: resnet18 | resnet34 | resnet50 | impala | small (Figure 7)
    head: str = "spatial"  # encoder output: spatial | avgpool | softmax (Table XIII)
    norm: str = "group"  # normalisation: group | batch (Table XV)
    image_size: int = 128  # square images of this size
    embed_dim: int = 256  # image embedding size (Linear -> LayerNorm -> tanh)
    action_dim: int = 7  # xyz, euler, gripper (SPEC section 5)
    state_dim: int = 7  # proprioceptive state, seen by the policy only
    hidden: int = 256  # width of the Q-head and policy MLPs
    depth: int = 3  # hidden layers of those MLPs
    action_every_layer: bool = True  # the action enters every Q-MLP layer (Table XIV)
    algo: str = "cql"  # cql | bc | awbc | gbc (Gaussian BC: the CQL actor by likelihood alone)
    alpha: float = 10.0  # CQL alpha, fixed (no Lagrange); sim: 1.0; online: 0.5
    gamma: float = 0.96  # discount; sim: 0.98
    num_actions: int = 4  # N policy + N uniform actions (penalty), N next actions (backup)
    cql_temp: float = 1.0  # temperature of the CQL logsumexp
    max_q_backup: bool = True  # max over the N next actions (release); False: a single a' ~ pi
    calql: bool = False  # Cal-QL: clip the CQL push-down at the MC return (online fine-tuning)
    critic_lr: float = 3e-4  # Adam learning rate of the Q-function (0 freezes it, Table IX)
    actor_lr: float = 1e-4  # ... of the policy (and the BC policy)
    temp_lr: float = 3e-4  # ... of the entropy temperature
    init_temp: float = 1.0  # initial entropy temperature
    target_entropy: float | None = None  # None -> -action_dim
    polyak: float = 0.005  # soft target update rate
    bc_steps: int = 0  # the first N actor updates imitate the data (max likelihood), not Q
    bc_dropout: float = 0.4  # dropout of the BC policy (Table XI)
    awbc_max_weight: float = 20.0  # ours: exp(advantage) clipped at 20 (advantage <= ln 20)
    actor_awbc: bool = False  # ours: the imitating actor weighs data actions by awbc's weights
    # the imitating actor's critic terms (SPEC section 3: TD3+BC's normalised Q, AWR extraction)
    actor_q_weight: float = 0.0  # lambda of the Q term: -lambda Q(s,a~pi) / mean|Q(s,a_data)|
    actor_q_start: int = 0  # the Q term starts at this update (counted from pre-training's first)
    actor_q_ramp: int = 0  # and lambda ramps linearly from 0 over this many updates
    actor_q_gripper: bool = True  # Q's gradient reaches the actor's gripper dimension
    actor_q_encoder: bool = True  # Q's gradient reaches the actor's encoder
    actor_awr_beta: float = 0.0  # inverse temperature of AWR weights on normalised advantages
    awr_max_weight: float = 100.0  # AWR weights are clipped here (IQL), then divided by their mean
    seed: int = 0  # network init and the agent's own sampling generator

    def __post_init__(self):
        if self.algo not in ALGOS:
            raise ValueError(f"cql.py: AgentConfig.algo={self.algo!r}, expected one of {ALGOS}")
        for name in ("num_tasks", "num_actions", "action_dim", "depth"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"cql.py: AgentConfig.{name}={getattr(self, name)}, expected >= 1")


# =========================================================================================== losses
def td_target(reward, mask, next_q, gamma, max_backup=True):
    """y = r + gamma * mask * V(s'); next_q (B, N, heads) are target-critic values at N actions
    a' ~ pi(.|s'): V = max over the N samples (or the first) of the min over heads (pessimism
    against overestimation)."""
    assert next_q.dim() == 3 and reward.shape == mask.shape == next_q.shape[:1], (
        reward.shape,
        mask.shape,
        next_q.shape,
    )
    v = next_q.min(-1).values
    v = v.max(1).values if max_backup else v[:, 0]
    return reward + gamma * mask * v


def uniform_log_density(action_dim):
    """log density of the uniform distribution on [-1, 1]^A: A * log 0.5."""
    return action_dim * math.log(0.5)


def calql_bound(q_pi, mc_return):
    """Cal-QL: policy-action Q values are not pushed below the data's Monte-Carlo return
    (gradient 0 there)."""
    assert mc_return.shape == q_pi.shape[:1], (mc_return.shape, q_pi.shape)
    return torch.maximum(q_pi, mc_return.to(q_pi.dtype)[:, None, None])


def importance_logsumexp(q_pi, log_pi, q_rand, log_rand, temp):
    """Importance-sampled soft maximum of Q over actions: q_pi (B, N, H) at a ~ pi with log pi
    (B, N), q_rand (B, M, H) at uniform actions of log density log_rand -> (B, H). Dividing by the
    sampling density turns the sum over samples into an estimate of the integral over the action
    space (up to log(N + M))."""
    assert log_pi.shape == q_pi.shape[:2] and q_rand.shape[0] == q_pi.shape[0], (
        q_pi.shape,
        log_pi.shape,
        q_rand.shape,
    )
    x = torch.cat([q_pi - log_pi[..., None], q_rand - log_rand], dim=1)
    return temp * torch.logsumexp(x / temp, dim=1)


def cql_penalty(q_data, q_pi, log_pi, q_rand, log_rand, temp, mc_return=None):
    """CQL(H) push-down minus push-up, per head: mean_B [ lse(s) - Q(s, a_data) ] -> (H,).
    Its gradient is +softmax weights on the sampled Q's (they sum to 1 per state) and -1 on
    Q(s, a_data), each / B."""
    assert q_data.shape == (q_pi.shape[0], q_pi.shape[2]), (q_data.shape, q_pi.shape)
    if mc_return is not None:
        q_pi = calql_bound(q_pi, mc_return)
    lse = importance_logsumexp(q_pi, log_pi, q_rand, log_rand, temp)
    return (lse - q_data).mean(0), {"cql_lse": lse.mean().detach()}


def critic_loss(q_data, q_pi, log_pi, q_rand, next_q, batch, cfg):
    """q_data (B, H) at the data action, q_pi / q_rand (B, N, H) at policy / uniform actions at s
    (log_pi (B, N), detached), next_q (B, N, H) from the target critic at s'. batch: reward, mask
    (and mc_return for Cal-QL). Returns the sum over heads of TD + alpha * penalty."""
    y = td_target(batch["reward"], batch["mask"], next_q, cfg.gamma, cfg.max_q_backup).detach()
    td = (q_data - y[:, None]).pow(2).mean(0)
    pen, info = cql_penalty(
        q_data,
        q_pi,
        log_pi,
        q_rand,
        uniform_log_density(cfg.action_dim),
        cfg.cql_temp,
        batch["mc_return"] if cfg.calql else None,
    )
    loss = (td + cfg.alpha * pen).sum()
    info.update(
        critic_loss=loss.detach(),
        td_loss=td.mean().detach(),
        cql_penalty=pen.mean().detach(),
        q_data=q_data.mean().detach(),
        q_pi=q_pi.mean().detach(),
        q_rand=q_rand.mean().detach(),
        target_q=y.mean().detach(),
        cql_gap=(q_data.mean() - q_pi.mean()).detach(),
    )
    return loss, info


def actor_loss(q_pi, log_pi, temp):
    """Maximise min-over-heads Q plus entropy: q_pi (B, N, H) at reparameterised
    a ~ pi, log_pi (B, N)."""
    assert q_pi.shape[:2] == log_pi.shape, (q_pi.shape, log_pi.shape)
    loss = (temp * log_pi - q_pi.min(-1).values).mean()
    return loss, {"actor_loss": loss.detach(), "entropy": -log_pi.mean().detach()}


def actor_imitation_loss(log_pi, log_pi_data, temp, weights=None):
    """The actor's warm-up (cfg.bc_steps; the CQL reference code's policy_eval_start): maximise the
    log-likelihood of the data action plus entropy while the critic is still uninformative. log_pi
    (B, N) at reparameterised samples, log_pi_data (B,) at the data action; weights (B,), treated
    as constants, weigh each data action's likelihood (cfg.actor_awbc)."""
    assert log_pi.shape[0] == log_pi_data.shape[0], (log_pi.shape, log_pi_data.shape)
    info = {"entropy": -log_pi.mean().detach()}
    likelihood = log_pi_data
    if weights is not None:
        assert weights.shape == log_pi_data.shape, (weights.shape, log_pi_data.shape)
        likelihood = weights.detach() * log_pi_data
        info["actor_weight_max"] = weights.max().detach()
    loss = (temp * log_pi).mean() - likelihood.mean()
    return loss, {"actor_loss": loss.detach(), **info}


def actor_q_term(q_pi, q_data, q_weight):
    """TD3+BC's critic term, added to the imitating actor's loss: -lambda * mean min-heads
    Q(s, a~pi) / mean |min-heads Q(s, a_data)|. Dividing by the data's Q scale (a constant) makes
    lambda independent of the reward scale. q_pi (B, N, H) at reparameterised policy actions with
    the critic's parameters detached, q_data (B, H); q_weight a float or 0-d tensor."""
    assert q_pi.dim() == 3 and q_data.shape == (q_pi.shape[0], q_pi.shape[2]), (
        q_pi.shape,
        q_data.shape,
    )
    scale = q_data.detach().min(-1).values.abs().mean().clamp_min(1e-6)
    q = q_pi.min(-1).values.mean()
    loss = -q_weight * q / scale
    return loss, {"actor_q": q.detach(), "actor_q_scale": scale, "actor_q_term": loss.detach()}


def awr_weights(q_data, q_pi, beta, max_weight):
    """AWR / AWAC / IQL policy extraction: w = exp(beta * A / std(A)) with the advantage
    A = min-heads Q(s, a_data) - V(s) and the mean baseline V(s) = mean_j min-heads Q(s, a_j),
    a_j ~ pi (N samples). Normalising A by its batch standard deviation makes beta scale-free;
    weights are clipped at max_weight, then divided by their batch mean so the step size stays
    plain imitation's. Returns (w (B,) detached, info with the effective sample size fraction
    (sum w)^2 / (B sum w^2): 1 when all weigh alike, 1/B when one transition carries the batch)."""
    assert q_data.dim() == 2 and q_pi.shape[0] == q_data.shape[0], (q_data.shape, q_pi.shape)
    adv = q_data.min(-1).values - q_pi.min(-1).values.mean(1)
    adv = adv.detach()
    std = adv.std(correction=0).clamp_min(1e-6)
    w = (beta * adv / std).exp().clamp(max=max_weight)
    w = w / w.mean()
    ess = w.sum() ** 2 / (w.numel() * (w**2).sum())
    return w, {"awr_ess": ess, "awr_weight_max": w.max(), "advantage_std": std}


def temperature_loss(log_temp, log_pi, target_entropy):
    """Auto-tuned entropy temperature: raises temp when the entropy is below
    target, lowers it above."""
    temp = log_temp.exp()
    loss = temp * (-log_pi.detach().mean() - target_entropy)
    return loss, {"temperature": temp.detach(), "temp_loss": loss.detach()}


def bc_loss(pred, action, weights=None):
    """(Weighted) mean squared error of a deterministic BC policy; weights (B,) are
    treated as constants."""
    assert pred.shape == action.shape, (pred.shape, action.shape)
    per_sample = (pred - action).pow(2).mean(-1)
    if weights is None:
        loss = per_sample.mean()
        return loss, {"bc_loss": loss.detach()}
    assert weights.shape == per_sample.shape, (weights.shape, per_sample.shape)
    loss = (weights.detach() * per_sample).mean()
    return loss, {"bc_loss": loss.detach(), "awbc_weight": weights.mean().detach()}


def awbc_weights(q_data, q_samples, max_weight):
    """Table IX: w = exp(Q(s,a) - max_j Q(s,a_j)) with a_j sampled from the policy
    (min over heads), clipped."""
    adv = q_data.min(-1).values - q_samples.min(-1).values.max(1).values
    return adv.exp().clamp(max=max_weight).detach()


# ============================================================================================ agent
def _allreduce_mean_(params):
    """Average gradients over ranks (torchrun / DDP mode) in one flat all_reduce per optimizer."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    # only the gradients that exist (the same set on every rank): a zero-filled one would let Adam's
    # momentum move a parameter that a single process would leave alone
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat.div_(dist.get_world_size())
    for g, f in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(f.view_as(g))


class Agent:
    """The learner: networks, target critic, optimizers, entropy temperature and a sampling
    generator, all built in __init__ for cfg.algo. cql: critic (QNetwork) + target +
    TanhGaussianPolicy + temperature; awbc: the cql set, still trained with CQL, plus a BCPolicy
    (MSE weighted by the critic's advantages) that act() uses; gbc: TanhGaussianPolicy and
    temperature (Gaussian BC); bc: BCPolicy. set_config switches algo within an ALGO_FAMILY (cql to
    awbc adds the BCPolicy: finetune.py's AW-BC from a PTR checkpoint). The paper's frozen
    Q-function (Table IX): a fine-tuned PTR checkpoint, then set_config with critic_lr = 0. Its
    state is saved and restored by checkpoint.py (agent_state, load_agent_state)."""

    def __init__(self, cfg: AgentConfig, device="cpu"):
        self.cfg, self.device = cfg, torch.device(device)
        self.cuda = self.device.type == "cuda"
        family = ALGO_FAMILY[cfg.algo]
        self.nets = {}  # built in this order: it fixes which seeded draws initialise which network
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
            torch.manual_seed(cfg.seed)
            if family == "critic":
                self.nets["critic"] = QNetwork(
                    self._encoder(),
                    cfg.num_tasks,
                    cfg.action_dim,
                    cfg.hidden,
                    cfg.depth,
                    cfg.action_every_layer,
                )
                self.nets["target_critic"] = copy.deepcopy(self.nets["critic"])
                self.nets["target_critic"].requires_grad_(False)
            if family in ("critic", "gaussian"):
                self.nets["policy"] = TanhGaussianPolicy(
                    self._encoder(),
                    cfg.num_tasks,
                    cfg.state_dim,
                    cfg.action_dim,
                    cfg.hidden,
                    cfg.depth,
                )
        for net in self.nets.values():
            self._place(net)
        self.critic, self.target_critic = self.nets.get("critic"), self.nets.get("target_critic")
        self.policy, self.bc_policy = self.nets.get("policy"), None
        self.log_temp = torch.nn.Parameter(
            torch.tensor(math.log(cfg.init_temp), device=self.device)
        )
        # sampling stream: differs per rank under torchrun (the networks' init above does not)
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self.generator = torch.Generator(self.device).manual_seed(cfg.seed + rank)
        # one Adam per name; params[name] and lr_fields[name] (the cfg field of its learning rate)
        self.params, self.optimizers, self.lr_fields = {}, {}, {}
        if self.critic is not None:
            self._add_optimizer("critic", list(self.critic.parameters()), "critic_lr")
        if self.policy is not None:
            self._add_optimizer("actor", list(self.policy.parameters()), "actor_lr")
            self._add_optimizer("temp", [self.log_temp], "temp_lr")
        if cfg.algo in ("bc", "awbc"):
            self.add_bc_policy()
        self.updates = 0
        self._training = None  # the train / eval mode of every network (None: not yet set)
        self.compile_mode = None  # compile() sets it and replaces self.compute_losses

    def _encoder(self):
        cfg = self.cfg
        return make_encoder(cfg.arch, cfg.head, cfg.norm, cfg.image_size, cfg.embed_dim)

    def _place(self, net):
        net.to(self.device)
        if self.cuda:  # NHWC convolutions are the fast path of cuDNN with bf16
            net.to(memory_format=torch.channels_last)
            net.encoder.channels_last = True

    def _add_optimizer(self, name, params, lr_field):
        # fused Adam: one kernel over all parameters (on CPU ~6x faster than the per-tensor loop)
        self.params[name], self.lr_fields[name] = params, lr_field
        self.optimizers[name] = torch.optim.Adam(params, lr=getattr(self.cfg, lr_field), fused=True)

    def add_bc_policy(self):
        """The BCPolicy of algo bc and awbc, and its optimizer; set_config, and loading a state that
        holds one (checkpoint.load_agent_state), add it to a CQL agent (AW-BC). Seeded on its own:
        the same network whenever it is built."""
        if self.bc_policy is not None:
            return
        cfg = self.cfg
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + 1)
            self.bc_policy = BCPolicy(
                self._encoder(),
                cfg.num_tasks,
                cfg.state_dim,
                cfg.action_dim,
                cfg.hidden,
                cfg.depth,
                cfg.bc_dropout,
            )
        if self.policy is not None:  # AW-BC from a CQL agent: the state as its policy sees it
            self.bc_policy.state_norm.load_state_dict(self.policy.state_norm.state_dict())
        self._place(self.bc_policy)
        self.nets["bc_policy"] = self.bc_policy
        self._add_optimizer("bc", list(self.bc_policy.parameters()), "actor_lr")
        self._training = None

    # ------------------------------------------------------------------------------------ helpers
    def set_config(self, cfg):
        """A new phase's learner settings (algo, alpha, Cal-QL, learning rates...): the network
        shapes (STRUCTURE) must stay; the optimizers take the new learning rates from here on."""
        diff = [k for k in STRUCTURE if getattr(cfg, k) != getattr(self.cfg, k)]
        if diff:
            raise ValueError(
                f"cql.py: set_config cannot change {diff} (the network shapes); build a new agent "
                f"(or grow_tasks for num_tasks)"
            )
        self.cfg = replace(cfg)
        if self.cfg.algo == "awbc" and self.critic is not None:
            self.add_bc_policy()
        self._check_networks()
        for name, opt in self.optimizers.items():
            for g in opt.param_groups:
                g["lr"] = getattr(self.cfg, self.lr_fields[name])

    def _check_networks(self):
        """Raise unless the networks built serve cfg.algo (a caller may edit cfg in place)."""
        algo = self.cfg.algo
        if algo not in ALGOS:
            raise ValueError(f"cql.py: AgentConfig.algo={algo!r}, expected one of {ALGOS}")
        built = "critic" if self.critic is not None else "bc" if self.policy is None else "gaussian"
        if ALGO_FAMILY[algo] != built:
            raise ValueError(
                f"cql.py: AgentConfig.algo={algo!r} trains {ALGO_FAMILY[algo]} networks, but this "
                f"agent was built with {built} networks (algo in "
                f"{[a for a, f in ALGO_FAMILY.items() if f == built]})"
            )
        if self.bc_policy is None and algo == "awbc":
            raise ValueError("cql.py: AgentConfig.algo='awbc' needs the BC policy set_config adds")

    def _mode(self, training):
        if self._training != training:
            for net in self.nets.values():
                net.train(training)
            self._training = training

    def _autocast(self):
        """bf16 autocast around the encoders on CUDA; MLPs and losses stay fp32 (Q up to ~250)."""
        return (
            torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else contextlib.nullcontext()
        )

    def _onehot(self, task):
        return F.one_hot(task.to(self.device).long(), self.cfg.num_tasks).float()

    # ------------------------------------------------------------------------------------- update
    def compile(self, mode="default", backend="inductor"):
        """torch.compile compute_losses (all network passes and losses) and so its backward; the
        all-reduce, optimizer steps and target update stay eager (fused Adam is one kernel). Shapes
        are static; what the graph depends on (cfg.alpha, cfg.algo, grow_tasks) recompiles when it
        changes. self.generator's draws (dynamo cannot trace a Generator) run eagerly between the
        captured pieces, so the random stream and an exact resume are the eager ones; the BC
        policy's dropout masks (torch's global RNG) differ. mode: one of COMPILE_MODES (inductor);
        "reduce-overhead" replays CUDA graphs, whose outputs (the info tensors) last until the next
        update. Losses equal the eager ones up to floating-point reassociation (test_ptr.py)."""
        if mode not in COMPILE_MODES:
            raise ValueError(f"cql.py: compile mode={mode!r}, expected one of {COMPILE_MODES}")
        self.compile_mode = mode
        # the one place the compiled path enters: update() calls self.compute_losses, which this
        # instance attribute now holds (compiled from the class's method, so compile() may repeat)
        eager = type(self).compute_losses.__get__(self)
        self.compute_losses = torch.compile(eager, mode=mode, backend=backend, dynamic=False)

    def update(self, batch):
        """One gradient step on every network. batch: batches.py's batch, on self.device, already
        augmented. Returns {name: 0-d detached tensor} (no host sync)."""
        self._check_networks()
        self._mode(True)
        if self.compile_mode == "reduce-overhead":
            # a new step for the CUDA graphs: the previous update's outputs are no longer read
            torch.compiler.cudagraph_mark_step_begin()
        # the actor imitates the data for its first cfg.bc_steps updates (gbc: always), then
        # maximises Q; computed here, outside compute_losses, so the count never enters its graph
        imitate = self.critic is not None and self.updates < self.cfg.bc_steps
        q_weight = self.actor_q_weight() if imitate else 0.0
        # a tensor, so that a compiled update does not recompile for every value of the ramp
        q_weight = torch.tensor(q_weight, device=self.device) if q_weight > 0 else None
        loss, info = self.compute_losses(batch, imitate, q_weight)
        info.update(self._step(loss))
        if self.critic is not None:  # Polyak average of the target critic
            with torch.no_grad():
                torch._foreach_lerp_(
                    list(self.target_critic.parameters()), self.params["critic"], self.cfg.polyak
                )
                for tb, sb in zip(self.target_critic.buffers(), self.critic.buffers()):
                    tb.copy_(sb)  # BatchNorm statistics (norm="batch") follow the online critic
        self.updates += 1
        return info

    def _step(self, loss):
        """One backward through the summed loss, then every optimizer's step (ranks averaged)."""
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        loss.backward()
        info = {}
        for name, opt in self.optimizers.items():
            _allreduce_mean_(self.params[name])
            grads = [p.grad for p in self.params[name] if p.grad is not None]
            if grads:
                info[f"grad_norm_{name}"] = torch.nn.utils.get_total_norm(grads).detach()
            opt.step()
        return info

    def actor_q_weight(self):
        """lambda of the imitating actor's Q term at this update: 0 before cfg.actor_q_start, then
        ramped linearly to cfg.actor_q_weight over cfg.actor_q_ramp updates."""
        cfg = self.cfg
        if cfg.actor_q_weight <= 0 or self.updates < cfg.actor_q_start:
            return 0.0
        ramp = min(1.0, (self.updates - cfg.actor_q_start + 1) / max(cfg.actor_q_ramp, 1))
        return cfg.actor_q_weight * ramp

    def compute_losses(self, batch, imitate=False, q_weight=None):
        """The forward half of update(): every network pass and loss of cfg.algo, no parameter
        changed; compile() captures this. imitate: the actor's warm-up loss (cfg.bc_steps);
        q_weight: lambda of its Q term (None: no Q term). -> (summed loss, info)."""
        if self.cfg.algo == "bc":
            return self._bc_losses(batch)
        if self.cfg.algo == "gbc":
            return self._gaussian_bc_losses(batch)
        return self._cql_losses(batch, imitate, q_weight)  # cql, awbc

    def _bc_losses(self, batch):
        """algo bc: the BC policy's mean squared error at the data actions."""
        onehot = self._onehot(batch["task"])
        with self._autocast():
            z_bc = self.bc_policy.embed(batch["obs"]).float()
        return bc_loss(self.bc_policy.head(z_bc, batch["state"], onehot), batch["action"])

    def _gaussian_bc_losses(self, batch):
        """algo gbc: the imitating actor and its temperature, nothing else."""
        onehot, state, action = self._onehot(batch["task"]), batch["state"], batch["action"]
        with self._autocast():
            z_pi = self.policy.embed(batch["obs"]).float()
        _, log_pi = self.policy.sample(z_pi, state, onehot, self.cfg.num_actions, self.generator)
        log_pi_data = self.policy.log_prob(z_pi, state, onehot, action)
        a_loss, a_info = actor_imitation_loss(log_pi, log_pi_data, self.log_temp.exp().detach())
        t_loss, t_info = self._temperature_loss(log_pi)
        return a_loss + t_loss, {**a_info, **t_info}

    def _cql_losses(self, batch, imitate, q_weight):
        """algo cql and awbc: critic + actor + temperature (+ AW-BC's BC policy). Each encoder runs
        at most once per image batch: critic on s, target on s', policy on s and s', BC policy on s.
        self.generator draws N next, N policy, N uniform actions, then _q_term_actions' samples."""
        cfg = self.cfg
        onehot, state, action = self._onehot(batch["task"]), batch["state"], batch["action"]
        b, n = action.shape[0], cfg.num_actions
        temp = self.log_temp.exp().detach()
        use_bc = cfg.algo == "awbc"
        with self._autocast():
            z_bc = self.bc_policy.embed(batch["obs"]).float() if use_bc else None
            z_pi = self.policy.embed(batch["obs"]).float()
            z_q = self.critic.embed(batch["obs"]).float()
            with torch.no_grad():
                z_next_t = self.target_critic.embed(batch["next_obs"]).float()
                z_next_pi = self.policy.embed(batch["next_obs"]).float()
        # critic: TD backup from the target critic at a' ~ pi(.|s'), CQL penalty at s
        with torch.no_grad():
            a_next, _ = self.policy.sample(
                z_next_pi, batch["next_state"], onehot, n, self.generator
            )
            next_q = self.target_critic.heads(z_next_t, a_next, onehot)
        a_pi, log_pi = self.policy.sample(z_pi, state, onehot, n, self.generator)
        a_rand = torch.rand(b, n, cfg.action_dim, generator=self.generator, device=self.device)
        a_rand = a_rand * 2 - 1  # uniform in [-1, 1]^A
        # one head evaluation for the data action, N policy actions (detached: the critic loss must
        # not move the policy) and N uniform actions, all sharing the embedding of s
        q_all = self.critic.heads(
            z_q, torch.cat([action[:, None], a_pi.detach(), a_rand], 1), onehot
        )
        q_data, q_pi, q_rand = q_all[:, 0], q_all[:, 1 : n + 1], q_all[:, n + 1 :]
        c_loss, info = critic_loss(q_data, q_pi, log_pi.detach(), q_rand, next_q, batch, cfg)
        # actor: imitate the data actions (weighted, plus lambda * Q), or maximise Q
        if imitate:
            log_pi_data = self.policy.log_prob(z_pi, state, onehot, action)
            w, w_info = self._imitation_weights(q_data.detach(), q_pi.detach())
            a_loss, a_info = actor_imitation_loss(log_pi, log_pi_data, temp, w)
            a_info.update(w_info)
            if q_weight is not None:
                q_actor = self._actor_q(z_q, a_pi, z_pi, state, onehot)
                q_loss, q_info = actor_q_term(q_actor, q_data, q_weight)
                a_loss = a_loss + q_loss
                a_info.update(q_info, actor_loss=a_loss.detach(), actor_q_weight=q_weight.detach())
        else:
            a_loss, a_info = actor_loss(self._actor_q(z_q, a_pi, z_pi, state, onehot), log_pi, temp)
        t_loss, t_info = self._temperature_loss(log_pi)
        loss = c_loss + a_loss + t_loss  # disjoint parameter sets: one backward serves all three
        info.update(a_info, **t_info, alpha=torch.full((), cfg.alpha, device=self.device))
        if use_bc:  # AW-BC (Section V-D): the BC policy's MSE weighted by the critic's advantages
            w = awbc_weights(q_data.detach(), q_pi.detach(), cfg.awbc_max_weight)
            b_loss, b_info = bc_loss(self.bc_policy.head(z_bc, state, onehot), action, w)
            loss = loss + b_loss
            info.update(b_info)
        return loss, info

    def _temperature_loss(self, log_pi):
        cfg = self.cfg
        target = cfg.target_entropy if cfg.target_entropy is not None else -float(cfg.action_dim)
        return temperature_loss(self.log_temp, log_pi, target)

    def _actor_q(self, z_q, a_pi, z_pi, state, onehot):
        """Q(s, a ~ pi) (B, N, heads), the critic's embedding and parameters detached."""
        a_q = self._q_term_actions(a_pi, z_pi, state, onehot)
        return self.critic.heads(z_q.detach(), a_q, onehot, detach_params=True)

    def _imitation_weights(self, q_data, q_pi):
        """Per-transition weights of the imitating actor's likelihood, each with mean 1 so the
        step size stays plain imitation's and the critic only chooses which data actions weigh
        most: AWR's (cfg.actor_awr_beta), Section V-D's AW-BC (cfg.actor_awbc), or None."""
        cfg = self.cfg
        if cfg.actor_awr_beta > 0:
            return awr_weights(q_data, q_pi, cfg.actor_awr_beta, cfg.awr_max_weight)
        if cfg.actor_awbc:
            w = awbc_weights(q_data, q_pi, cfg.awbc_max_weight)
            return w / w.mean(), {}
        return None, {}

    def _q_term_actions(self, a_pi, z_pi, state, onehot):
        """The policy actions that Q's gradient reaches the actor through (the imitating actor's Q
        term, or the Q-maximising actor's loss): a_pi itself, or, where it must not reach the
        actor's encoder (cfg.actor_q_encoder False), fresh samples from the detached embedding;
        the gripper dimension detached unless cfg.actor_q_gripper."""
        if not self.cfg.actor_q_encoder:
            a_pi, _ = self.policy.sample(
                z_pi.detach(), state, onehot, self.cfg.num_actions, self.generator
            )
        if not self.cfg.actor_q_gripper:
            a_pi = torch.cat([a_pi[..., :-1], a_pi[..., -1:].detach()], -1)
        return a_pi

    # ---------------------------------------------------------------------------------- inference
    def _acting_embedding(self, images, state, task):
        """The acting policy (the BCPolicy for algo bc and awbc, else the tanh-Gaussian one) in
        eval mode, its embedding of the images, and state and one-hot on self.device."""
        self._check_networks()
        self._mode(False)
        net = self.bc_policy if self.cfg.algo in ("bc", "awbc") else self.policy
        with self._autocast():
            z = net.embed(images.to(self.device)).float()
        return net, z, state.to(self.device).float(), self._onehot(task)

    @torch.no_grad()
    def act(self, images, state, task, deterministic=True):
        """Actions in [-1, 1] (B, A) from uint8 images (B, 3, H, W), state (B, S),
        task int64 (B,)."""
        net, z, state, onehot = self._acting_embedding(images, state, task)
        if isinstance(net, BCPolicy):
            return net.head(z, state, onehot).clamp(-1.0, 1.0)
        if deterministic:
            return net.deterministic(z, state, onehot)
        return net.sample(z, state, onehot, generator=self.generator)[0]

    @torch.no_grad()
    def q_values(self, batch):
        """Q(s, a_data) of both heads, (B, 2), from batch obs / action / task."""
        if self.critic is None:
            raise ValueError(
                f"cql.py: q_values needs a critic, but AgentConfig.algo={self.cfg.algo!r} has none"
            )
        self._mode(False)
        action, onehot = batch["action"].to(self.device).float(), self._onehot(batch["task"])
        with self._autocast():
            z = self.critic.embed(batch["obs"].to(self.device)).float()
        return self.critic.heads(z, action, onehot)

    @torch.no_grad()
    def validation_loss(self, batch):
        """The acting policy's imitation error on held-out (s, a) pairs in eval mode (no dropout):
        the BC policy's MSE (algo bc, awbc), else the tanh-Gaussian policy's negative
        log-likelihood; the paper picks BC checkpoints by it. -> (float, metric name)."""
        net, z, state, onehot = self._acting_embedding(batch["obs"], batch["state"], batch["task"])
        action = batch["action"].to(self.device).float()
        if isinstance(net, BCPolicy):
            return bc_loss(net.head(z, state, onehot), action)[0].item(), "mse"
        return -net.log_prob(z, state, onehot, action).mean().item(), "nll"

    def critic_diagnostics(self, batch):
        """What tells whether the critic can steer the actor, on (s, a) pairs: the mean |dQ/da|
        per action dimension at the data action (min over heads), and the actor's mean sigma per
        dimension (pre-tanh). -> {name: list of action_dim floats}."""
        self._mode(False)
        obs, state = batch["obs"].to(self.device), batch["state"].to(self.device).float()
        onehot = self._onehot(batch["task"])
        action = batch["action"].to(self.device).float().requires_grad_(True)
        with torch.no_grad(), self._autocast():
            z_q = self.critic.embed(obs).float()
            z_pi = self.policy.embed(obs).float()
        with torch.enable_grad():
            q = self.critic.heads(z_q, action, onehot, detach_params=True).min(-1).values
            (grad,) = torch.autograd.grad(q.sum(), action)
        with torch.no_grad():
            log_std = self.policy.dist(z_pi, state, onehot)[1]
        return {"dq_da": grad.abs().mean(0).tolist(), "sigma": log_std.exp().mean(0).tolist()}

    def set_state_statistics(self, mean, std):
        """The per-dimension mean and std of the training data's proprioceptive states, which every
        policy normalizes its state input with (model.StateNormalizer). Set once, before the first
        update: the weights learned afterwards assume them, and checkpoints carry them."""
        for name in ("policy", "bc_policy"):
            if name in self.nets:
                self.nets[name].state_norm.set_statistics(mean, std)

    # --------------------------------------------------------------------------------- task slots
    def zero_task_slots(self, slots):
        """Set the input weights of these one-hot slots (and their Adam moments) to zero, which is
        how grow_tasks creates a slot: a new task then starts from the task-agnostic part of every
        network. A slot reserved at pre-training (train.py --extra_tasks) saw no data, so it still
        holds its random initial weights, an arbitrary offset for the task fine-tuning gives it."""
        zero_task_inputs(self.nets.values(), slots, self.optimizers.values())

    def grow_tasks(self, num_tasks):
        """Widen the task one-hot to num_tasks slots (offline fine-tuning on new tasks,
        Section IV-A). The new input weights are zero, so old tasks' outputs are unchanged and new
        tasks start from the task-agnostic part of the network. Each widened weight is a new
        Parameter in the old one's place (model.grow_task_inputs), its Adam moments with zero rows
        and the shared step count, so old rows train on undisturbed; new rows, under a bias
        correction of ~1, take steps up to a few times lr at first, small for one-hot rows."""
        old = self.cfg.num_tasks
        if num_tasks < old:
            raise ValueError(
                f"cql.py: grow_tasks({num_tasks}) cannot shrink the one-hot from {old} tasks"
            )
        grow_task_inputs(self.nets.values(), num_tasks, self.optimizers.values())
        for name, opt in self.optimizers.items():  # the widened weights are in the param groups
            self.params[name] = [p for group in opt.param_groups for p in group["params"]]
        self.cfg.num_tasks = num_tasks
