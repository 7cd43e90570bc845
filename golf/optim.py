"""Optimizers: Muon for the block matrices (sharded across ranks), AdamW for the rest, schedules.

Notable:
- `zeropower` orthogonalizes with a quintic Newton–Schulz iteration, batched over leading dims,
  with the Gram matrix always on the small side: the classic coefficients (3.4445, -4.7750,
  2.0315) or the Polar Express per-step ones (Amsel et al. 2025, arXiv:2505.16932, as used in
  modded-nanogpt).
- `Muon`: Nesterov momentum, optional MuonEq-R row normalization, `sqrt(max(1, rows/cols))` update
  scale, decoupled weight decay. Under torch.distributed it takes LOCAL grads and averages them
  itself: per-shape buckets are reduce-scattered so each rank owns a slice of the parameters,
  runs momentum + Newton–Schulz on that slice only and all-gathers the updated weights, with
  every collective async and overlapped with the Newton–Schulz work (the records' "parallel
  Muon", PR #399). `all_reduce_grads` averages everything else in one coalesced all-reduce.
- `build_optimizers` routes every trainable parameter to exactly one group by name, following the
  model contract in docs/architecture.md, and every group carries `base_lr` for the schedule.
- `lr_multiplier` (constant then linear warmdown to a floor), `muon_momentum_at` (linear warmup).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import nn

from golf.config import GolfError, TrainConfig
from golf.dist import world


class OptimError(GolfError, ValueError):
    """A parameter or optimizer setting the optimizers cannot handle."""


# ----------------------------------------------------------------------------- Newton–Schulz

# Keller Jordan's quintic: maximizes the slope at zero, so singular values land in ~[0.68, 1.2]
# rather than converging to 1 (which does not hurt training).
_NS_CLASSIC = (3.4445, -4.7750, 2.0315)
# Polar Express, 5 steps, computed by modded-nanogpt with a 2% safety factor (hence the input is
# divided by 1.02·‖G‖_F): each step is the minimax-optimal odd quintic for the interval the
# previous steps leave, so 5 steps map [1e-3, 1] into ~[0.85, 1.14].
_NS_POLAR = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
# Past the 5 tabulated steps, continue with the convergent Newton–Schulz quintic
# (15x − 10x³ + 3x⁵)/8: the Polar Express authors' own per-step list converges to it.
_NS_POLAR_TAIL = (1.875, -1.25, 0.375)
_NS_POLAR_SAFETY = 1.02


def _ns_schedule(coeffs: str, steps: int) -> tuple[list[tuple[float, float, float]], float, float]:
    """(per-step (a, b, c), norm safety factor, eps) for a coefficient set."""
    if steps < 1:
        raise OptimError(f"Newton–Schulz steps must be >= 1, got {steps}")
    if coeffs == "classic":
        return [_NS_CLASSIC] * steps, 1.0, 1e-7
    if coeffs == "polar":
        table = list(_NS_POLAR[:steps]) + [_NS_POLAR_TAIL] * max(0, steps - len(_NS_POLAR))
        return table, _NS_POLAR_SAFETY, 1e-6
    raise OptimError(f"muon_coeffs must be classic or polar, got {coeffs!r}")


def zeropower(G: torch.Tensor, steps: int = 5, coeffs: str = "classic",
              dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Approximate the orthogonal polar factor U·Vᵀ of each matrix in G (`[..., rows, cols]`).

    Runs in `dtype` (bf16 on the GPU; fp32 gives exact CPU references) and returns that dtype.
    """
    if G.ndim < 2:
        raise OptimError(f"zeropower needs a matrix or a batch of matrices, got shape {tuple(G.shape)}")
    table, safety, eps = _ns_schedule(coeffs, steps)
    X = G.to(dtype)
    tall = X.size(-2) > X.size(-1)
    if tall:  # work on the wide orientation so X·Xᵀ is min(rows, cols) square
        X = X.mT
    # Frobenius norm >= spectral norm, so every singular value starts in [0, 1].
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * safety + eps)
    for a, b, c in table:
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    return X.mT if tall else X


# ----------------------------------------------------------------------------- Muon


def _muon_reduce_scatter(output: torch.Tensor, inp: torch.Tensor):
    # torch >= 2.13 renames reduce_scatter_tensor (the old name warns); older torch lacks the new one.
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return fn(output, inp, op=dist.ReduceOp.SUM, async_op=True)


def _muon_all_gather(output: torch.Tensor, inp: torch.Tensor):
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(output, inp, async_op=True)


def _muon_by_shape(params: list[torch.Tensor]) -> dict[tuple, list[torch.Tensor]]:
    """Params keyed by (shape, dtype, device), in order: each list is one batched Newton–Schulz."""
    out: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        out.setdefault((tuple(p.shape), p.dtype, p.device), []).append(p)
    return out


@dataclass
class _MuonBucket:
    """Same-shape params of one group, padded to a multiple of the world size; rank r owns
    rows [r·per_rank, (r+1)·per_rank) of the stacked buffers."""

    group_index: int  # groups are looked up per step: load_state_dict replaces the group dicts
    params: list[torch.Tensor]
    per_rank: int
    grads: torch.Tensor  # [per_rank·world, *shape]: local grads in, reduce-scatter input
    shard: torch.Tensor  # [per_rank, *shape]: this rank's summed grads
    gathered: torch.Tensor  # [per_rank·world, *shape]: every rank's updated params
    pending: list[Any] = field(default_factory=list)


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton–Schulz, for 2-D (or batched) weight matrices.

    Per parameter: buf = momentum·buf + g; u = g + momentum·buf (Nesterov) or buf; with `row_norm`
    each row of u is scaled to unit L2 norm (MuonEq-R); u = zeropower(u)·sqrt(max(1, rows/cols));
    p = p·(1 − lr·wd) − lr·u. Hyperparameters are read from the param group at every step, so the
    trainer drives the schedule through `group["lr"]` and `group["momentum"]`.

    Distributed contract (world size > 1): give Muon the LOCAL gradients of this rank. Muon sums
    them across ranks with one reduce-scatter per bucket and divides by the world size, so the
    trainer must NOT all-reduce these grads itself (no DDP over the whole model; average the other
    parameters with `all_reduce_grads`). Each rank keeps momentum buffers only for the params it
    owns, and after `step()` every rank holds identical weights. All ranks must call `step()`
    together; a param without a grad counts as a zero grad so the collectives always match.
    Gradient clipping before `step()` therefore sees this rank's local Muon grads, as in the records.
    `launch_reduce_scatters()` may be called early (e.g. before the AdamW step) to overlap the
    reduce-scatters with other work; `step()` launches them itself otherwise.
    """

    def __init__(self, params: Iterable[Any], lr: float = 0.02, momentum: float = 0.95,
                 nesterov: bool = True, backend_steps: int = 5, coeffs: str = "classic",
                 row_norm: bool = False, weight_decay: float = 0.0,
                 ns_dtype: torch.dtype = torch.bfloat16):
        _ns_schedule(coeffs, backend_steps)  # fail at construction, not at the first step
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, backend_steps=backend_steps,
                        coeffs=coeffs, row_norm=row_norm, weight_decay=weight_decay, ns_dtype=ns_dtype)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim < 2:
                    raise OptimError(f"Muon takes matrices only; got a parameter of shape {tuple(p.shape)}")
        self._buckets: list[_MuonBucket] = []
        self._bucket_world = 0
        self._launched = False

    def _make_buckets(self, world_size: int) -> list[_MuonBucket]:
        if self._bucket_world == world_size:
            return self._buckets
        buckets = []
        for index, group in enumerate(self.param_groups):
            for (shape, dtype, device), params in _muon_by_shape(group["params"]).items():
                per_rank = -(-len(params) // world_size)
                padded = per_rank * world_size
                buckets.append(_MuonBucket(
                    index, params, per_rank,
                    grads=torch.zeros((padded, *shape), dtype=dtype, device=device),
                    shard=torch.empty((per_rank, *shape), dtype=dtype, device=device),
                    gathered=torch.empty((padded, *shape), dtype=dtype, device=device)))
        self._buckets, self._bucket_world = buckets, world_size
        return buckets

    @torch.no_grad()
    def launch_reduce_scatters(self) -> None:
        """Copy the local grads into the bucket buffers and start every reduce-scatter (async)."""
        _, world_size = world()
        if world_size == 1 or self._launched:
            return
        for bucket in self._make_buckets(world_size):
            for i, p in enumerate(bucket.params):
                if p.grad is None:
                    bucket.grads[i].zero_()
                else:
                    bucket.grads[i].copy_(p.grad)
            bucket.pending = [_muon_reduce_scatter(bucket.shard, bucket.grads)]
        self._launched = True

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rank, world_size = world()
        if world_size == 1:
            for group in self.param_groups:
                for params in _muon_by_shape(group["params"]).values():
                    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
                    self._update(group, params, grads, params)
            return loss
        self.launch_reduce_scatters()
        buckets = self._make_buckets(world_size)
        # Buckets are processed in launch order: bucket i's Newton–Schulz runs while the
        # reduce-scatters of later buckets and the all-gathers of earlier ones are in flight.
        for bucket in buckets:
            bucket.pending.pop().wait()
            lo = rank * bucket.per_rank
            owned = bucket.params[lo:lo + bucket.per_rank]  # the last ranks may own only padding
            if owned:
                grads = list(bucket.shard[:len(owned)].mul_(1.0 / world_size))
                targets = list(bucket.grads[lo:lo + len(owned)])
                self._update(self.param_groups[bucket.group_index], owned, grads, targets)
            # the reduce-scatter input is free again: it carries this rank's new weights out
            bucket.pending.append(_muon_all_gather(bucket.gathered, bucket.grads[lo:lo + bucket.per_rank]))
        for bucket in buckets:
            bucket.pending.pop().wait()
            for i, p in enumerate(bucket.params):
                p.copy_(bucket.gathered[i])
        self._launched = False
        return loss

    def _update(self, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor],
                targets: list[torch.Tensor]) -> None:
        """Muon update of `params` from (averaged) `grads`, written into `targets` (may be params)."""
        momentum, lr, wd = group["momentum"], group["lr"], group["weight_decay"]
        stacked = torch.empty((len(params), *params[0].shape), dtype=torch.float32, device=params[0].device)
        for j, (p, g) in enumerate(zip(params, grads, strict=True)):
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32)
            buf = state["momentum_buffer"]
            buf.mul_(momentum).add_(g)
            if group["nesterov"]:
                torch.add(g, buf, alpha=momentum, out=stacked[j])
            else:
                stacked[j].copy_(buf)
        if group["row_norm"]:
            stacked.div_(stacked.norm(dim=-1, keepdim=True).clamp_min(1e-7))
        update = zeropower(stacked, group["backend_steps"], group["coeffs"], group["ns_dtype"])
        rows, cols = params[0].shape[-2], params[0].shape[-1]
        step_size = lr * math.sqrt(max(1.0, rows / cols))
        for j, (p, target) in enumerate(zip(params, targets, strict=True)):
            torch.mul(p, 1.0 - lr * wd, out=target)  # decoupled decay of the current weights
            target.add_(update[j], alpha=-step_size)


@torch.no_grad()
def all_reduce_grads(params: Iterable[torch.Tensor]) -> None:
    """Average the grads of `params` (the non-Muon ones) across ranks: one flat all-reduce per
    dtype/device (one in practice). No-op on one process. Every rank must hold grads for the same
    params, which holds when all ranks run the same graph."""
    _, world_size = world()
    if world_size == 1:
        return
    by_kind: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            by_kind.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    for grads in by_kind.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.mul_(1.0 / world_size)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


# ----------------------------------------------------------------------------- param routing

# Per-channel scales, gains, mixes, gates, skip weights, lambdas and lane routing are control
# parameters: AdamW at scalar_lr without decay, whatever their shape.
CONTROL_PARAM_KEYWORDS = ("scale", "gain", "mix", "gate", "skip", "lambda", "route")


def is_muon_param(name: str, param: torch.Tensor) -> bool:
    """Muon owns the weight matrices inside the blocks (attention and MLP projections)."""
    return (param.ndim >= 2 and name.startswith("blocks.")
            and not any(k in name for k in CONTROL_PARAM_KEYWORDS))


def build_optimizers(model: nn.Module, tcfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """[AdamW, Muon] over every trainable parameter of `model`, each in exactly one group.

    AdamW groups (betas (beta1, beta2), eps adam_eps):
    - `embed`: `tok_emb.weight` at tied_embed_lr when tied (no `lm_head.weight` is registered,
      the head reuses the embedding) else embed_lr; weight decay adam_wd.
    - `head`: the untied `lm_head.weight` at head_lr, adam_wd.
    - `matrix`: other matrices outside the blocks (the `bigram.*` table and projection) at
      tied_embed_lr with adam_wd: like the embedding they are lookups into the stream.
    - `scalar`: vectors, scalars and control params (see CONTROL_PARAM_KEYWORDS) at scalar_lr, no decay.
    Muon: every `is_muon_param` at matrix_lr with the muon_* settings. Every group has `base_lr`
    and a `name`. The trainer sets group["momentum"] of the Muon group for the warmup.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    tied = not any(n == "lm_head.weight" for n, _ in named)
    routes: dict[str, list[torch.Tensor]] = {"embed": [], "head": [], "matrix": [], "scalar": [], "muon": []}
    for name, p in named:
        if name == "tok_emb.weight":
            routes["embed"].append(p)
        elif name == "lm_head.weight":
            routes["head"].append(p)
        elif is_muon_param(name, p):
            routes["muon"].append(p)
        elif p.ndim >= 2 and not any(k in name for k in CONTROL_PARAM_KEYWORDS):
            routes["matrix"].append(p)
        else:
            routes["scalar"].append(p)
    t = tcfg
    settings = {
        "embed": (t.tied_embed_lr if tied else t.embed_lr, t.adam_wd),
        "head": (t.head_lr, t.adam_wd),
        "matrix": (t.tied_embed_lr, t.adam_wd),
        "scalar": (t.scalar_lr, 0.0),
    }
    adam_groups = [dict(params=routes[k], lr=lr, base_lr=lr, weight_decay=wd, name=k)
                   for k, (lr, wd) in settings.items() if routes[k]]
    _optim_check_coverage(named, [g["params"] for g in adam_groups] + [routes["muon"]])
    optimizers: list[torch.optim.Optimizer] = []
    if adam_groups:
        on_cuda = all(p.is_cuda for g in adam_groups for p in g["params"])
        optimizers.append(torch.optim.AdamW(adam_groups, betas=(t.beta1, t.beta2), eps=t.adam_eps,
                                            fused=True if on_cuda else None))
    if routes["muon"]:
        muon = Muon(routes["muon"], lr=t.matrix_lr, momentum=t.muon_momentum,
                    backend_steps=t.muon_backend_steps, coeffs=t.muon_coeffs,
                    row_norm=t.muon_row_norm, weight_decay=t.muon_wd)
        for g in muon.param_groups:
            g["base_lr"], g["name"] = t.matrix_lr, "muon"
        optimizers.append(muon)
    return optimizers


def _optim_check_coverage(named: list[tuple[str, torch.Tensor]], groups: list[list[torch.Tensor]]) -> None:
    counts: dict[int, int] = {}
    for params in groups:
        for p in params:
            counts[id(p)] = counts.get(id(p), 0) + 1
    for name, p in named:
        if counts.get(id(p), 0) != 1:
            raise OptimError(f"parameter {name} lands in {counts.get(id(p), 0)} optimizer groups, expected 1")
    if len(counts) != len({id(p) for _, p in named}):
        raise OptimError("an optimizer group holds a tensor that is not a trainable model parameter")


# ----------------------------------------------------------------------------- schedules


def lr_multiplier(progress: float, warmdown_frac: float, lr_floor: float) -> float:
    """1.0 until progress reaches 1 − warmdown_frac, then linear to lr_floor at progress 1."""
    if warmdown_frac <= 0.0:
        return 1.0
    t = (progress - (1.0 - warmdown_frac)) / warmdown_frac
    t = min(max(t, 0.0), 1.0)
    return 1.0 - t * (1.0 - lr_floor)


def muon_momentum_at(step: int, tcfg: TrainConfig) -> float:
    """Linear from muon_momentum_warmup_start to muon_momentum over the warmup steps."""
    if tcfg.muon_momentum_warmup_steps <= 0:
        return tcfg.muon_momentum
    frac = min(max(step / tcfg.muon_momentum_warmup_steps, 0.0), 1.0)
    return (1.0 - frac) * tcfg.muon_momentum_warmup_start + frac * tcfg.muon_momentum

