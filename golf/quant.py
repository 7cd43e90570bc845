"""Post-training quantization: Hessian collection, GPTQ with SDClip scales, LQER, the size fitter.

Notable:
- `collect_hessians` hooks every linear input (H = ΣXᵀX / n in fp32, autocast off inside the
  hook); a looped layer accumulates once per pass. The tied embedding's Hessian comes from
  `model.hidden(ids)`, the final-normed states the head multiplies.
- SDClip: one scale per row, s = k·std(row)/q_max (population std), rounded to fp16 *before*
  GPTQ so the column sweep quantizes with exactly the scale that is stored. q is int8 in
  [−q_max, q_max], q_max = 2^(bits−1) − 1 (int6 → 31, int5 → 15).
- Column steps (`gptq_col_alpha` > 0): GPTQ's loss for an error in column j is err²·c_j, with
  c_j = 1/U_jj² from the Cholesky factor U of H⁻¹ (after act-order). Under a byte budget the
  best step grows as c_j^(−1/2); column j's step is the row scale × 2^(e_j/8), e_j the rounded
  8·log2 of (c_j / geometric mean c)^(−alpha/2), int8 within ±`COL_EXP_MAX`, stored per tensor
  (one byte per column). alpha 0.5 beat 0 and 1 in a CPU study of GPTQ's loss at equal entropy;
  on three 300 s record models it moved the quantization gap by −0.0005, −0.0005 and +0.0005
  BPB, so it is opt-in. The row's SDClip std is taken on the columns divided by their factors.
- GPTQ: dead columns (diag H ≤ 0) are decoupled and simply rounded (their weights are kept, not
  zeroed, in case the input is live on other data); act-order; blocks of `gptq_block_size`
  columns with error propagation through the upper Cholesky factor of H⁻¹. When a Cholesky fails
  the damping is multiplied by 10 and retried (`GPTQ_RETRIES` times; a zero damping retries from
  1e-3); only when every attempt fails is the tensor rounded to nearest, and the stats say so.
- Classes by name: `.attn.` attention, `.mlp.` MLP, `tok_emb`/`lm_head` embedding, the rest
  "other"; each class has its own bits and clip k in `QuantConfig`.
- Passthrough: non-matrix tensors and matrices with ≤ `passthrough_max_numel` values are kept
  as fp16 (fp32 if a value is outside the fp16 range; integer/bool tensors keep their dtype).
- Tied weights (`lm_head.weight` is `tok_emb.weight`) are stored once, also when the state dict
  holds two copies (bitwise-equal tensors are one tensor); the other name is an alias and
  `dequantize_state` restores both keys.
- LQER (`lqer_rank > 0`): the `lqer_tensors` tensors with the largest relative output error,
  ‖EX‖/‖WX‖ estimated as sqrt(tr(E H Eᵀ)/tr(W H Wᵀ)) with the calibration Hessian (relative
  Frobenius error when a tensor has none, i.e. H = I), get a rank-r SVD of E = W − Ŵ as A@B,
  A = U√S and B = √S Vᵀ, each quantized per row (absmax scale) at `lqer_bits`.
- Fisher allocation (`clip_alloc` "fisher" per tensor, "fisher_rows" per row): `collect_fisher`
  takes per-sequence gradients on training windows, `fisher_clip_k` gives each tensor (or row)
  the clip k at which its expected loss increase per stored value is the same as every other
  one's, at the class config's size.
- `fit_to_budget`, `fit_mode` "ladder": a fixed ladder (config as is, clip k +1 ×4, then one bit
  less for MLP, attention, other, embedding, repeated down to 4/4/4/6 bits), the first rung whose
  packed artifact fits. "scale": one factor on every k, searched to land just under the target
  (refining k when there is room), then the ladder's bit rungs if it cannot fit. Tensors whose
  settings did not change are not re-quantized.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from golf.config import Config, GolfError, ModelConfig, QuantConfig
from golf.data import TokenLoader, list_shards
from golf.model import quant_class

QUANT_CLASSES = ("embedding", "attention", "mlp", "other")
GPTQ_RETRIES = 4  # damping ×10 per retry: 0.01 → 0.1 → 1 → 10 → 100 (× mean diag H)
GPTQ_RETRY_MIN_DAMP = 1e-3  # a configured damping of 0 cannot be multiplied up
COL_EXP_MAX = 24  # column step factors 2^(e/8) stay within ×/÷8
FP16_MAX = 65504.0
FIT_K_STEP = 1.0  # clip k increase per fitter rung (attention, MLP, other)
FIT_K_STEPS = 4
FIT_SCALE_RANGE = (-1.0, 2.0)  # the scale fitter's log2 range for every k: ×0.5 … ×4
FIT_SCALE_TOLERANCE = 0.002  # the scale fitter stops within this fraction below the target
FIT_SCALE_ITERS = 8
FIT_BIT_FLOORS = (("mlp_bits", 4, "MLP", "clip_k_mlp"), ("attn_bits", 4, "attention", "clip_k_attn"),
                  ("other_bits", 4, "other", "clip_k_other"), ("embed_bits", 6, "embedding", "clip_k_embed"))


class QuantError(GolfError):
    """Inputs the quantizer cannot use (a Hessian of the wrong shape, an empty state dict)."""


class BudgetError(GolfError):
    """Even the last rung of the fitter's ladder does not fit the byte budget."""


# ----------------------------------------------------------------------------- records


@dataclass
class LqerFactors:
    """Low-rank error correction A@B, A [rows, r] and B [r, cols], each int8 with per-row fp16 scales."""

    bits: int
    a_q: Tensor
    a_scale: Tensor
    b_q: Tensor
    b_scale: Tensor

    def matrix(self) -> Tensor:
        a = self.a_q.float() * self.a_scale.float()[:, None]
        b = self.b_q.float() * self.b_scale.float()[:, None]
        return a @ b


@dataclass
class QuantRecord:
    """One stored tensor. kind "quant": q int8 + per-row fp16 scale (+ per-column step exponents);
    kind "passthrough": data."""

    name: str
    kind: str  # "quant" | "passthrough"
    klass: str  # embedding | attention | mlp | other
    bits: int  # quant: 2..8; passthrough: bits of the stored dtype
    shape: tuple[int, ...]
    q: Tensor | None = None
    scale: Tensor | None = None
    data: Tensor | None = None
    lqer: LqerFactors | None = None
    aliases: list[str] = field(default_factory=list)
    clip_k: float = 0.0  # the SDClip k used (quant only)
    col_exp: Tensor | None = None  # int8 [cols]: column j's step is scale × 2^(col_exp[j]/8)

    def dequantize(self) -> Tensor:
        if self.kind == "passthrough":
            return self.data.float() if self.data.is_floating_point() else self.data.clone()
        w = self.q.float() * self.scale.float()[:, None]
        if self.col_exp is not None:
            w = w * col_step_factors(self.col_exp)[None, :]
        if self.lqer is not None:
            w = w + self.lqer.matrix()
        return w


@dataclass
class QuantStats:
    rel_err: dict[str, float] = field(default_factory=dict)  # ‖W − Ŵ‖ / ‖W‖
    out_err: dict[str, float] = field(default_factory=dict)  # sqrt(tr(EHEᵀ)/tr(WHWᵀ)), with a Hessian
    method: dict[str, str] = field(default_factory=dict)  # gptq | rtn | rtn-fallback
    retries: dict[str, int] = field(default_factory=dict)  # damping increases a Cholesky needed
    damp: dict[str, float] = field(default_factory=dict)  # relative damping GPTQ ran with
    lqer: list[str] = field(default_factory=list)
    seconds: float = 0.0
    fit_attempts: list[tuple[str, int]] = field(default_factory=list)  # (rung, packed bytes)

    def summary(self) -> str:
        counts = {m: sum(1 for v in self.method.values() if v == m) for m in ("gptq", "rtn", "rtn-fallback")}
        worst = max(self.rel_err.items(), key=lambda kv: kv[1], default=("-", 0.0))
        return (f"{len(self.method)} quantized tensors (gptq {counts['gptq']}, rtn {counts['rtn']}, "
                f"fallback {counts['rtn-fallback']}), {sum(1 for r in self.retries.values() if r)} "
                f"needed damping retries, lqer on {len(self.lqer)}, worst rel err {worst[1]:.4f} "
                f"({worst[0]}), {self.seconds:.1f}s")


@dataclass
class QuantizedState:
    records: dict[str, QuantRecord]  # stored name → record, in state-dict order
    stats: QuantStats = field(default_factory=QuantStats)
    quant_config: dict[str, Any] = field(default_factory=dict)  # the QuantConfig it was made with


# ----------------------------------------------------------------------------- classification


def quant_alias_groups(state: dict[str, Tensor]) -> dict[str, list[str]]:
    """Stored name → the other names of the same tensor, in state-dict order.

    Tied weights must be stored once however the state dict was made: a copy per key (e.g.
    `.cpu()` of each CUDA tensor) breaks storage sharing, so tensors also match when they are
    bitwise equal with the same shape and dtype (values identical → storing one is exact). Meta
    tensors (the size predictor) carry no data and match on object identity (keep_vars=True).
    """
    groups: dict[str, list[str]] = {}
    seen: dict[Any, list[str]] = {}  # (shape, dtype, device) → stored names
    for name, t in state.items():
        if t.device.type == "meta":
            key: Any = id(t)
            match = seen.get(key, [None])[0]
        else:
            key = (tuple(t.shape), t.dtype, str(t.device))
            match = next((m for m in seen.get(key, []) if _quant_same_tensor(state[m], t)), None)
        if match is not None:
            groups[match].append(name)
        else:
            seen.setdefault(key, []).append(name)
            groups[name] = []
    return groups


def _quant_same_tensor(a: Tensor, b: Tensor) -> bool:
    if (a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
            and a.storage_offset() == b.storage_offset() and a.stride() == b.stride()):
        return True
    return bool(torch.equal(a, b))


# ----------------------------------------------------------------------------- Hessians


def calibration_batches(cfg: Config, device: torch.device | str, rank: int = 0, world_size: int = 1):
    """GPTQ calibration windows from the TRAINING shards (never validation), rank-disjoint.

    gptq_calib_batches batches of gptq_calib_seqs windows in all, split over the ranks; the
    stream is seeded apart from training's (seed + 1).
    """
    q, t = cfg.quant, cfg.train
    files = list_shards(cfg.data.data_path, cfg.data.train_files)
    loader = TokenLoader(files, t.train_seq_len, rank=rank, world_size=world_size, seed=t.seed + 1,
                         doc_packed=cfg.data.doc_packed)
    for _ in range(max(1, q.gptq_calib_batches // world_size)):
        yield loader.next_batch(q.gptq_calib_seqs, device)[0]


def collect_hessians(model: nn.Module, batches: Iterable[Tensor], device: torch.device | str | None = None
                     ) -> dict[str, Tensor]:
    """H = ΣXᵀX / n (fp32) for every linear weight, keyed by the weight's state-dict name.

    `batches` are int64 [B, T] ids from TRAINING data. The model runs as configured (set its
    looping first) under the caller's autocast; pass the uncompiled module (hooks on a compiled
    graph do not fire). The head's Hessian (`tok_emb.weight` when tied, else `lm_head.weight`)
    is built from `model.hidden(ids)`; models without `hidden` run `model(ids)` and the head is
    hooked like any linear.
    """
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    has_hidden = callable(getattr(model, "hidden", None))
    head = getattr(model, "lm_head", None) if has_hidden else None
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}

    def accumulate(key: str, x: Tensor) -> None:
        # XᵀX in fp32 even under bf16 autocast: low-precision Hessians break the Cholesky.
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.detach().reshape(-1, x.shape[-1]).float()
            if key not in sums:
                sums[key] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
                counts[key] = 0
            sums[key].addmm_(x.t(), x)
            counts[key] += x.shape[0]

    handles = []
    for mod_name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module is not head:
            key = f"{mod_name}.weight"
            handles.append(module.register_forward_hook(
                lambda mod, inputs, output, key=key: accumulate(key, inputs[0])))
    head_key = None
    if head is not None:
        emb = getattr(model, "tok_emb", None)
        tied = emb is not None and head.weight is emb.weight
        head_key = "tok_emb.weight" if tied else "lm_head.weight"
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for ids in batches:
                ids = ids.to(device, non_blocking=True)
                if has_hidden:
                    states = model.hidden(ids)
                    if head_key is not None:
                        accumulate(head_key, states)
                else:
                    model(ids)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not sums:
        raise QuantError("collect_hessians saw no calibration batch (empty batches iterable?)")
    return {key: sums[key] / max(counts[key], 1) for key in sums}


def collect_fisher(model: nn.Module, batches: Iterable[Tensor], max_seqs: int,
                   device: torch.device | str | None = None) -> dict[str, Tensor]:
    """Empirical Fisher per row: mean over sequences of Σ_col (∂L_seq/∂W)², for every 2-D parameter.

    One backward per sequence of the TRAINING batches (next-token loss on the window's own
    tokens), at most `max_seqs`: the Fisher needs per-sample gradients, and squaring a batch
    mean would measure the mean gradient instead (large while a short run is still descending).
    Keys are parameter names (a tied head counts under `tok_emb.weight`, both uses included);
    runs under the caller's autocast on the uncompiled model; gradients are cleared after.
    """
    if device is None:
        device = next(model.parameters()).device
    params = {name: p for name, p in model.named_parameters() if p.dim() == 2 and p.requires_grad}
    sums = {name: torch.zeros(p.shape[0], dtype=torch.float32, device=p.device) for name, p in params.items()}
    was_training, seen = model.training, 0
    model.eval()
    try:
        for ids in batches:
            for row in ids.to(device, non_blocking=True):
                if seen >= max_seqs:
                    break
                model.zero_grad(set_to_none=True)
                model.loss(row[None, :-1], row[None, 1:]).backward()
                for name, p in params.items():
                    if p.grad is not None:
                        sums[name] += p.grad.float().square().sum(dim=1)
                seen += 1
            if seen >= max_seqs:
                break
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if not seen:
        raise QuantError("collect_fisher saw no calibration sequence (empty batches, or max_seqs 0?)")
    return {name: total / seen for name, total in sums.items()}


def fisher_clip_k(state: dict[str, Tensor], fisher: dict[str, Tensor],
                  qcfg: QuantConfig) -> dict[str, float | Tensor]:
    """Clip k from the Fisher: the same expected loss increase per stored value everywhere.

    Rounding row r with step Δ = k·std_r/q_max adds ≈ ½·F_r·Δ²/12 to the loss (F_r the row's
    Fisher sum), and doubling k saves about one bit per value. At a fixed total of bits the loss
    is smallest when every value costs the same (reverse water-filling): per tensor ("fisher")
    k_i ∝ q_max·sqrt(n_i / Σ_r F_r·std_r²); per row ("fisher_rows", a tensor of k per row: the
    row scales are stored anyway, so this costs no bytes) k_r ∝ q_max / sqrt(F_r·std_r²). The
    constant keeps Σ values·log k at the class config's, so the predicted size stays where the
    class config puts it; each k is clamped to [1/fisher_k_range, fisher_k_range]× its class k.
    Tensors without a Fisher keep the class k.
    """
    per_row = qcfg.clip_alloc == "fisher_rows"
    log_k, log_ref, counts = {}, {}, {}  # log k (up to one shared constant), class log k, values per entry
    for name, aliases in quant_alias_groups(state).items():
        t = state[name]
        f = next((fisher[n] for n in (name, *aliases) if n in fisher), None)
        if f is None or not qcfg.quantizes(t):
            continue
        bits, k = qcfg.class_bits_k(quant_class(name))
        rows = f.float().cpu() * t.detach().float().cpu().var(dim=1, unbiased=False)  # F_r·std_r²
        if per_row:  # a row with no sensitivity gets the coarsest k the clamp allows
            log_k[name] = math.log(2 ** (bits - 1) - 1) - 0.5 * rows.clamp_min(1e-30).log()
            counts[name] = torch.full_like(rows, t.shape[1])
        else:
            sensitivity = float(rows.sum())
            if not (sensitivity > 0 and math.isfinite(sensitivity)):
                continue
            log_k[name] = torch.tensor(math.log(2 ** (bits - 1) - 1) + 0.5 * math.log(t.numel() / sensitivity))
            counts[name] = torch.tensor(float(t.numel()))
        log_ref[name] = math.log(k)
    if not log_k:
        return {}
    total = sum(float(c.sum()) for c in counts.values())
    shift = sum(float((counts[n] * (log_ref[n] - log_k[n])).sum()) for n in log_k) / total
    bound = math.log(qcfg.fisher_k_range)
    out = {}
    for n in log_k:
        k = torch.exp(log_ref[n] + (log_k[n] + shift - log_ref[n]).clamp(-bound, bound))
        out[n] = k if per_row else float(k)
    return out


# ----------------------------------------------------------------------------- SDClip / GPTQ


def sdclip_scale(w: Tensor, bits: int, k: float | Tensor) -> Tensor:
    """Per-row SDClip scale k·std(row)/q_max, rounded to fp16 (returned as fp32 for the math).

    k is one value or one per row. A row whose scale is 0 in fp16 (constant or tiny row) falls
    back to absmax/q_max, then 1.
    """
    qmax = 2 ** (bits - 1) - 1
    w = w.float()
    k = torch.as_tensor(k, dtype=torch.float32, device=w.device)
    scale = (k * w.std(dim=1, unbiased=False) / qmax).clamp(max=FP16_MAX).half().float()
    absmax = (w.abs().amax(dim=1) / qmax).clamp(max=FP16_MAX).half().float()
    scale = torch.where(scale > 0, scale, absmax)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def col_step_factors(col_exp: Tensor) -> Tensor:
    """fp32 column step factors 2^(e/8) of stored int8 exponents e."""
    return torch.exp2(col_exp.float() / 8)


def col_step_exponents(c: Tensor, alpha: float) -> Tensor:
    """int8 exponents e with 2^(e/8) ≈ (c / geometric mean c)^(−alpha/2), within ±COL_EXP_MAX."""
    log_rel = c.log2() - c.log2().mean()
    return torch.round(-4 * alpha * log_rel).clamp(-COL_EXP_MAX, COL_EXP_MAX).to(torch.int8)


def rtn_quantize(w: Tensor, scale: Tensor, bits: int) -> Tensor:
    """Round-to-nearest with a fixed per-row scale: int8 q in [−q_max, q_max]."""
    qmax = 2 ** (bits - 1) - 1
    return torch.clamp(torch.round(w.float() / scale[:, None]), -qmax, qmax).to(torch.int8)


def _quant_hinv_upper(h: Tensor, damp_abs: float) -> Tensor | None:
    """Upper Cholesky factor of (H + damp·I)⁻¹, or None when a factorization fails."""
    hd = h.clone()
    hd.diagonal().add_(damp_abs)
    lower, info = torch.linalg.cholesky_ex(hd)
    if int(info) != 0 or not bool(torch.isfinite(lower).all()):
        return None
    upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
    if int(info) != 0 or not bool(torch.isfinite(upper).all()):
        return None
    return upper


@dataclass
class GPTQResult:
    q: Tensor  # int8 [rows, cols]
    scale: Tensor  # fp32 values of the fp16 scale [rows]
    method: str  # gptq | rtn-fallback
    retries: int
    damp: float
    col_exp: Tensor | None = None  # int8 [cols] with column steps, else None


def gptq_quantize(w: Tensor, h: Tensor, bits: int, k: float | Tensor, block_size: int = 128, damp: float = 0.01,
                  act_order: bool = True, max_retries: int = GPTQ_RETRIES, col_alpha: float = 0.0) -> GPTQResult:
    """GPTQ of W [rows, cols] against H [cols, cols] with the SDClip scale fixed per row (and,
    with col_alpha > 0, a step factor per column from GPTQ's own column weights)."""
    rows, cols = w.shape
    if tuple(h.shape) != (cols, cols):
        raise QuantError(f"Hessian of shape {tuple(h.shape)} does not fit a weight with {cols} columns")
    dev = h.device
    qmax = 2 ** (bits - 1) - 1
    W = w.detach().to(dev, torch.float32).clone()
    H = h.detach().to(torch.float32).clone()
    # Dead inputs: decouple them (zero row/col, unit diagonal) so they are rounded on their own.
    dead = ~(H.diagonal() > 0) & torch.isfinite(H.diagonal())
    H[dead, :] = 0
    H[:, dead] = 0
    H.diagonal()[dead] = 1.0
    perm = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    mean_diag = float(H.diagonal().mean())
    upper, used, tries = None, damp, 0
    for attempt in range(max_retries + 1):
        used = damp if attempt == 0 else max(damp, GPTQ_RETRY_MIN_DAMP) * 10 ** attempt
        if math.isfinite(mean_diag):
            upper = _quant_hinv_upper(H, used * mean_diag)
        if upper is not None:
            break
        tries = attempt + 1
    if upper is None:
        scale = sdclip_scale(w.to(dev), bits, k)
        q = rtn_quantize(w.to(dev), scale, bits).cpu()
        return GPTQResult(q, scale.cpu(), "rtn-fallback", tries, used)
    col_exp = col_step_exponents(upper.diagonal() ** -2, col_alpha) if col_alpha > 0 else None
    factors = col_step_factors(col_exp) if col_exp is not None else torch.ones(cols, device=dev)
    scale = sdclip_scale(W / factors[None, :], bits, k)
    Q = torch.zeros_like(W)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1, U1 = W[:, i1:i2].clone(), upper[i1:i2, i1:i2]
        Q1, E1 = torch.zeros_like(W1), torch.zeros_like(W1)
        for i in range(i2 - i1):
            col, step = W1[:, i], scale * factors[i1 + i]
            q = torch.clamp(torch.round(col / step), -qmax, qmax)
            Q1[:, i] = q
            err = (col - q * step) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            E1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= E1 @ upper[i1:i2, i2:]
    if perm is not None:
        inverse = torch.argsort(perm)
        Q = Q[:, inverse]
        col_exp = col_exp[inverse] if col_exp is not None else None
    return GPTQResult(Q.to(torch.int8).cpu(), scale.cpu(), "gptq", tries, used,
                      col_exp.cpu() if col_exp is not None else None)


def _quant_absmax_rows(x: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    qmax = 2 ** (bits - 1) - 1
    scale = (x.abs().amax(dim=1) / qmax).clamp(max=FP16_MAX).half()
    scale = torch.where(scale.float() > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(x / scale.float()[:, None]), -qmax, qmax).to(torch.int8)
    return q, scale


def lqer_factors(err: Tensor, rank: int, bits: int) -> LqerFactors:
    """Rank-r SVD of the quantization error, split as A = U√S, B = √S Vᵀ, quantized per row."""
    u, s, vh = torch.linalg.svd(err.float(), full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    a_q, a_s = _quant_absmax_rows(u[:, :r] * root[None, :], bits)
    b_q, b_s = _quant_absmax_rows(root[:, None] * vh[:r], bits)
    return LqerFactors(bits, a_q.contiguous(), a_s.contiguous(), b_q.contiguous(), b_s.contiguous())


def _quant_errors(w: Tensor, w_hat: Tensor, h: Tensor | None) -> tuple[float, float | None]:
    """(‖E‖/‖W‖, sqrt(tr(EHEᵀ)/tr(WHWᵀ)) or None), on the Hessian's device when there is one."""
    dev = h.device if h is not None else w.device
    w, w_hat = w.to(dev, torch.float32), w_hat.to(dev, torch.float32)
    e = w - w_hat
    rel = float(e.norm() / w.norm().clamp_min(1e-30))
    if h is None:
        return rel, None
    h = h.float()
    den = float(((w @ h) * w).sum())
    num = float(((e @ h) * e).sum())
    if not (math.isfinite(num) and math.isfinite(den)) or den <= 0:
        return rel, None
    return rel, math.sqrt(max(num, 0.0) / den)


# ----------------------------------------------------------------------------- state


def _quant_state_dict(model_or_state_dict: nn.Module | dict[str, Tensor]) -> dict[str, Tensor]:
    if isinstance(model_or_state_dict, nn.Module):
        return model_or_state_dict.state_dict()
    if not isinstance(model_or_state_dict, dict) or not model_or_state_dict:
        raise QuantError("quantize_state needs a model or a non-empty state dict")
    return model_or_state_dict


def _quant_passthrough(name: str, t: Tensor, klass: str, aliases: list[str]) -> QuantRecord:
    t = t.detach().cpu()
    if t.is_floating_point():
        # fp16 unless a value would overflow it (then fp32 keeps it exact enough).
        finite_max = float(t.float().abs().max()) if t.numel() else 0.0
        t = t.half() if finite_max <= FP16_MAX else t.float()
    t = t.contiguous()
    return QuantRecord(name, "passthrough", klass, t.element_size() * 8, tuple(t.shape), data=t,
                       aliases=list(aliases))


def quantize_state(model_or_state_dict: nn.Module | dict[str, Tensor], qcfg: QuantConfig,
                   hessians: dict[str, Tensor] | None = None, cache: dict | None = None,
                   clip_k: dict[str, float] | None = None) -> QuantizedState:
    """Quantize every matrix of a model / state dict per `qcfg` (GPTQ where a Hessian exists).

    `cache` (any dict, reused across calls) keeps per-tensor results keyed by their settings,
    so a caller that varies the config (the fitter) only re-quantizes tensors that changed.
    `clip_k` (stored name → k) overrides the class's clip k per tensor (`fisher_clip_k`, the fitter).
    """
    t0 = time.perf_counter()
    state = _quant_state_dict(model_or_state_dict)
    hessians = hessians or {}
    cache = {} if cache is None else cache
    stats = QuantStats()
    records: dict[str, QuantRecord] = {}
    hess_of: dict[str, Tensor | None] = {}
    for name, aliases in quant_alias_groups(state).items():
        t = state[name]
        klass = quant_class(name)
        if not qcfg.quantizes(t):
            records[name] = _quant_passthrough(name, t, klass, aliases)
            continue
        bits, k = qcfg.class_bits_k(klass)
        k = (clip_k or {}).get(name, k)
        k_key = k if isinstance(k, float) else k.numpy().tobytes()  # a per-row k keys by its values
        h = next((hessians[n] for n in (name, *aliases) if n in hessians), None) if qcfg.gptq else None
        key = (name, bits, k_key, h is not None, qcfg.gptq_block_size, qcfg.gptq_damp, qcfg.gptq_act_order,
               qcfg.gptq_col_alpha)
        if key not in cache:
            w = t.detach().float()
            if h is not None:
                res = gptq_quantize(w, h, bits, k, qcfg.gptq_block_size, qcfg.gptq_damp, qcfg.gptq_act_order,
                                    col_alpha=qcfg.gptq_col_alpha)
                cache[key] = (res.q, res.scale.half(), res.col_exp, res.method, res.retries, res.damp)
            else:
                scale = sdclip_scale(w.cpu(), bits, k)
                cache[key] = (rtn_quantize(w.cpu(), scale, bits), scale.half(), None, "rtn", 0, 0.0)
        q, scale, col_exp, method, retries, damp = cache[key]
        records[name] = QuantRecord(name, "quant", klass, bits, tuple(t.shape), q=q, scale=scale,
                                    aliases=list(aliases), clip_k=quant_k_summary(k), col_exp=col_exp)
        hess_of[name] = h
        stats.method[name] = method
        if method != "rtn":
            stats.retries[name], stats.damp[name] = retries, damp
    errors = {name: _quant_errors(state[name].detach(), records[name].dequantize(), h)
              for name, h in hess_of.items()}
    if qcfg.lqer_rank > 0 and qcfg.lqer_tensors > 0:
        # Worst first by relative output error (relative Frobenius error without a Hessian).
        badness = {n: (out if out is not None else rel) for n, (rel, out) in errors.items()}
        ranked = sorted(errors, key=lambda n: (-badness[n], n))
        for name in ranked[: qcfg.lqer_tensors]:
            rec = records[name]
            rec.lqer = lqer_factors(state[name].detach().float().cpu() - rec.dequantize(), qcfg.lqer_rank,
                                    qcfg.lqer_bits)
            stats.lqer.append(name)
            errors[name] = _quant_errors(state[name].detach(), rec.dequantize(), hess_of[name])
    for name, (rel, out) in errors.items():
        stats.rel_err[name] = rel
        if out is not None:
            stats.out_err[name] = out
    stats.seconds = time.perf_counter() - t0
    return QuantizedState(records, stats, dataclasses.asdict(qcfg))


def quant_k_summary(k: float | Tensor) -> float:
    """The k a record stores: itself, or the geometric mean of a per-row k."""
    return float(k) if isinstance(k, float) else float(k.float().log().mean().exp())


def dequantize_state(qs: QuantizedState) -> dict[str, Tensor]:
    """fp32 state dict (integer/bool tensors keep their dtype) with every alias restored."""
    out: dict[str, Tensor] = {}
    for name, rec in qs.records.items():
        t = rec.dequantize()
        out[name] = t
        for alias in rec.aliases:
            out[alias] = t
    return out


# ----------------------------------------------------------------------------- fitter


def fit_ladder(qcfg: QuantConfig) -> list[tuple[QuantConfig, list[str]]]:
    """The fitter's rungs in order: (config, the changes from `qcfg` in words)."""
    rungs = [(qcfg, [])]
    cur = qcfg
    for step in range(1, FIT_K_STEPS + 1):
        d = step * FIT_K_STEP
        cur = dataclasses.replace(cur, clip_k_attn=qcfg.clip_k_attn + d, clip_k_mlp=qcfg.clip_k_mlp + d,
                                  clip_k_other=qcfg.clip_k_other + d)
        rungs.append((cur, [f"clip k +{d:g} for attention/MLP/other (attention {cur.clip_k_attn:g}, "
                            f"MLP {cur.clip_k_mlp:g}, other {cur.clip_k_other:g})"]))
    changes = list(rungs[-1][1])
    while True:
        moved = False
        for bits_field, floor, label, k_field in FIT_BIT_FLOORS:
            bits = getattr(cur, bits_field)
            if bits <= floor:
                continue
            # One bit less with the class's configured k: a coarser grid than any k step above.
            k0 = getattr(qcfg, k_field)
            cur = dataclasses.replace(cur, **{bits_field: bits - 1, k_field: k0})
            changes = changes + [f"{label} bits {bits} → {bits - 1} (clip k back to {k0:g})"]
            rungs.append((cur, changes))
            moved = True
        if not moved:
            return rungs


def fit_to_budget(state_dict: dict[str, Tensor], hessians: dict[str, Tensor] | None, qcfg: QuantConfig,
                  model_cfg: ModelConfig | dict, tokenizer_meta: dict, code_bytes: int,
                  target: int | None = None, run_config: dict | None = None,
                  fisher: dict[str, Tensor] | None = None) -> tuple[QuantizedState, bytes, list[str]]:
    """Quantize + pack until the artifact is <= target bytes; returns the state, the artifact
    bytes and the changes made to `qcfg` in words (empty when it fit as is).

    Clip k: the class's, or with `clip_alloc` "fisher"/"fisher_rows" `fisher_clip_k` of `fisher`.
    `fit_mode` "ladder" walks `fit_ladder`. "scale" multiplies every k by one factor 2^s and
    searches s (secant steps inside a bracket) for the finest grid that fits within
    FIT_SCALE_TOLERANCE below the target: it coarsens when over and refines when the config
    leaves room; if even the coarsest factor does not fit, the ladder's bit rungs follow.
    target defaults to size_cap_bytes − size_margin_bytes − code_bytes. With codec "auto" the
    per-stream codec choice of the first attempt is reused for the later ones.
    """
    # golf.pack comes after golf.quant in the flow order; an in-function import is bundle-safe.
    from golf.pack import pack_with_stats

    if target is None:
        target = qcfg.size_cap_bytes - qcfg.size_margin_bytes - code_bytes
    if qcfg.clip_alloc != "class" and not fisher:
        raise QuantError(f"clip_alloc={qcfg.clip_alloc} needs the calibration Fisher (collect_fisher)")
    cache: dict = {}
    codecs = None
    attempts: list[tuple[str, int]] = []

    def attempt(cfg: QuantConfig, clip_k: dict[str, float], label: str) -> tuple[QuantizedState, bytes]:
        nonlocal codecs
        qs = quantize_state(state_dict, cfg, hessians, cache=cache, clip_k=clip_k)
        blob, pstats = pack_with_stats(qs, model_cfg, tokenizer_meta, cfg, codecs=codecs, run_config=run_config)
        codecs = codecs or {st.name: st.codec for st in pstats.streams}
        attempts.append((label, len(blob)))
        qs.stats.fit_attempts = list(attempts)
        return qs, blob

    def tensor_k(cfg: QuantConfig) -> dict[str, float]:
        return fisher_clip_k(state_dict, fisher, cfg) if cfg.clip_alloc != "class" else {}

    rungs = fit_ladder(qcfg)
    if qcfg.fit_mode == "scale":
        found = _fit_scale(state_dict, qcfg, tensor_k(qcfg), target, attempt)
        if found is not None:
            found[0].stats.fit_attempts = list(attempts)  # the chosen one need not be the last
            return found
        bits = lambda c: (c.mlp_bits, c.attn_bits, c.other_bits, c.embed_bits)  # noqa: E731
        rungs = [(cfg, changes) for cfg, changes in rungs if bits(cfg) != bits(qcfg)]
    for rung_cfg, changes in rungs:
        qs, blob = attempt(rung_cfg, tensor_k(rung_cfg), "; ".join(changes) or "config as is")
        if len(blob) <= target:
            return qs, blob, list(changes)
    raise BudgetError(f"no rung of the fitter fits {target:,} bytes: the last "
                      f"({attempts[-1][0]}) packs to {attempts[-1][1]:,} bytes")


def _fit_scale(state_dict: dict[str, Tensor], qcfg: QuantConfig, allocated: dict[str, float], target: int,
               attempt) -> tuple[QuantizedState, bytes, list[str]] | None:
    """The "scale" search of `fit_to_budget`: every k × 2^s; None when even the largest s is over."""
    base = {}
    for name in quant_alias_groups(state_dict):
        if qcfg.quantizes(state_dict[name]):
            base[name] = allocated.get(name, qcfg.class_bits_k(quant_class(name))[1])
    values = sum(state_dict[n].numel() for n in base)
    lo, hi = FIT_SCALE_RANGE
    tolerance = int(target * FIT_SCALE_TOLERANCE)
    aim = target - tolerance // 2
    what = {"class": "clip k", "fisher": "Fisher-allocated clip k",
            "fisher_rows": "Fisher-allocated per-row clip k"}[qcfg.clip_alloc] if allocated else "clip k"
    sizes: dict[float, int] = {}
    best = None
    s = 0.0
    for _ in range(FIT_SCALE_ITERS):
        label = f"{what} ×{2 ** s:.4f} for every tensor"
        qs, blob = attempt(qcfg, {n: k * 2 ** s for n, k in base.items()}, label)
        sizes[s] = len(blob)
        if len(blob) <= target and (best is None or s < best[0]):
            best = (s, qs, blob, label)
        if target - tolerance <= len(blob) <= target:
            break
        over = [x for x, size in sizes.items() if size > target]
        fits = [x for x, size in sizes.items() if size <= target]
        if over and fits:  # bracketed: secant between its ends, kept off either end
            a, b = max(over), min(fits)
            nxt = a + (sizes[a] - aim) * (b - a) / (sizes[a] - sizes[b])
            nxt = min(max(nxt, a + 0.1 * (b - a)), b - 0.1 * (b - a))
        else:  # one side only: about one bit per value per doubling of k, or the measured slope
            pts = sorted(sizes)
            slope = ((sizes[pts[-1]] - sizes[pts[0]]) / (pts[-1] - pts[0]) if len(pts) > 1 else -values / 8)
            nxt = min(max(s + (aim - len(blob)) / min(slope, -1.0), lo), hi)
        nxt = round(nxt, 4)
        if nxt in sizes:  # at the end of the range, or converged onto a point already packed
            break
        s = nxt
    if best is None:
        return None
    _, qs, blob, label = best
    changed = best[0] != 0.0 or bool(allocated)
    return qs, blob, [label] if changed else []
