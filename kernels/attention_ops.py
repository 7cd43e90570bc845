"""Fused attention glue: the q/k prologue (RMS norm, partial RoPE, gain) and XSA, one pass each way.

- `qk_norm_rope(x, cos, sin, gain, eps)` maps x [B, T, H, D] to gain[h] · RoPE(x · rsqrt(mean(x²) + eps)),
  RoPE rotating the first 2·cos.size(-1) dims of each head as half-split pairs (golf.model's
  `apply_rotary`), the other dims passing through.
- `xsa(y, v)` is y − (y·v̂)v̂ per position and query head, v̂ = v / max(‖v‖, 1e-12) the value vector
  of the head's kv head (query head h reads kv head h // (H / Hkv), golf.model's GQA mapping).

Both are torch custom ops, so a compiled block sees one opaque node with its own backward where
inductor made several passes over q, k and the attention output: four forward and four backward
over q for the prologue, three forward and two backward for XSA (docs/benchmarks.md).

Notable:
- On CUDA with triton and power-of-two tile sizes, one Triton program handles QK_BLOCK_ROWS
  (token, head) rows of q or k, or XSA_BLOCK_TOKENS positions of one kv head and its query
  group. Each input is read once (RoPE partners come from the same cache lines) and each output
  written once. The backward passes recompute the norms from their inputs, so nothing but the
  inputs is saved.
- The gain's gradient is summed per program, then over programs: no atomics, deterministic.
- Elsewhere the ops run the same math in plain torch, which the tests also hold the kernels to;
  the `_*_triton` launchers take the Triton path on any device (CPU needs TRITON_INTERPRET=1).
- Math is fp32 (float64 stays float64); outputs and input gradients take their input's dtype,
  and every output is contiguous whatever the input strides.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

QK_BLOCK_ROWS = 64  # (token, head) rows per qk program, 8 warps: the best of 64–256 × 4/8 warps on an H100
XSA_BLOCK_TOKENS = 64  # positions per XSA program, 4 warps: the best of 32–128 on an H100
FP32_EPS = 1.1920928955078125e-07  # torch.finfo(torch.float32).eps: F.rms_norm's on bf16 and fp32
XSA_NORM_EPS = 1e-12  # F.normalize's default


def _use_triton(x: Tensor, *sizes: int) -> bool:
    """CUDA, triton, and a power-of-two head dim (and other tile sizes): Triton tiles need them."""
    return x.is_cuda and triton is not None and all(n > 0 and n & (n - 1) == 0 for n in (x.shape[-1], *sizes))


# ----------------------------------------------------------------------------- q/k prologue


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, inverse: bool = False) -> Tensor:
    """Half-split partial RoPE of fp32 x [B, T, H, D] with cos/sin [T, R/2]; `inverse` rotates back."""
    half = cos.size(-1)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    if inverse:
        s = -s
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    return torch.cat((x1 * c + x2 * s, x2 * c - x1 * s, rest), dim=-1)


def _qk_forward_torch(x: Tensor, cos: Tensor, sin: Tensor, gain: Tensor | None, eps: float) -> Tensor:
    wide = torch.promote_types(x.dtype, torch.float32)  # fp32 math; float64 stays (gradcheck)
    xw = x.to(wide)
    y = _rotate(xw * torch.rsqrt(xw.square().mean(-1, keepdim=True) + eps), cos.to(wide), sin.to(wide))
    if gain is not None:
        y = y * gain.to(wide)[:, None]
    return y.to(x.dtype)


def _qk_backward_torch(grad: Tensor, x: Tensor, cos: Tensor, sin: Tensor, gain: Tensor | None,
                       eps: float) -> tuple[Tensor, Tensor]:
    wide = torch.promote_types(x.dtype, torch.float32)
    xw, g, cos, sin = x.to(wide), grad.to(wide), cos.to(wide), sin.to(wide)
    rstd = torch.rsqrt(xw.square().mean(-1, keepdim=True) + eps)
    grad_gain = torch.zeros(0, device=x.device, dtype=torch.float32)
    if gain is not None:
        grad_gain = (g * _rotate(xw * rstd, cos, sin)).sum(dim=(0, 1, 3)).to(gain.dtype)
        g = g * gain.to(wide)[:, None]
    grad_u = _rotate(g, cos, sin, inverse=True)
    dot = (grad_u * xw).mean(-1, keepdim=True)
    return (rstd * grad_u - rstd.pow(3) * xw * dot).to(x.dtype), grad_gain


if triton is not None:

    # Rows are (token, head) pairs, contiguous in memory, so a program reads and writes one
    # contiguous block. The RoPE partner of dim d is d ± HALF_ROT (dim groups of HALF_ROT swap in
    # pairs); past the rotated dims sin is 0 and the partner's value unused. Partner offsets are
    # an arange plus a per-group constant, which the alignment analysis can keep as wide loads:
    # 2.4–2.7 TB/s on an H100, against 1.5–1.9 for [tokens, groups, HALF_ROT] tiles of one head
    # per program (docs/benchmarks.md).
    @triton.jit
    def _qk_rows(cos_ptr, sin_ptr, block, n_rows, seq_len, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                 HALF_ROT: tl.constexpr, BLOCK_R: tl.constexpr):
        """Rows of one program: their offsets, partner offsets, mask, head index, cos and signed sin."""
        rows = block * BLOCK_R + tl.arange(0, BLOCK_R)
        dims = tl.arange(0, HEAD_DIM)
        mask = (rows < n_rows)[:, None]
        base = (rows.to(tl.int64) * HEAD_DIM)[:, None]
        partner = dims + tl.where((dims // HALF_ROT) % 2 == 0, HALF_ROT, -HALF_ROT)
        rotated = mask & (dims < 2 * HALF_ROT)[None, :]
        trig = (((rows // HEADS) % seq_len) * HALF_ROT)[:, None] + (dims % HALF_ROT)[None, :]
        c = tl.load(cos_ptr + trig, mask=rotated, other=1.0).to(tl.float32)
        s = tl.load(sin_ptr + trig, mask=rotated, other=0.0).to(tl.float32)
        s = tl.where((dims < HALF_ROT)[None, :], s, -s)
        return base + dims[None, :], base + partner[None, :], mask, rows % HEADS, c, s

    @triton.jit
    def _qk_norm_rope_fwd_kernel(x_ptr, cos_ptr, sin_ptr, gain_ptr, out_ptr, n_rows, seq_len, eps,
                                 HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HALF_ROT: tl.constexpr,
                                 HAS_GAIN: tl.constexpr, BLOCK_R: tl.constexpr):
        eps = tl.cast(eps, tl.float32)  # inductor may launch with an fp64 scalar
        offs, partner_offs, mask, head, c, s = _qk_rows(cos_ptr, sin_ptr, tl.program_id(0), n_rows, seq_len,
                                                        HEADS, HEAD_DIM, HALF_ROT, BLOCK_R)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x_partner = tl.load(x_ptr + partner_offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / HEAD_DIM + eps)[:, None]
        y = (x * c + x_partner * s) * rstd
        if HAS_GAIN:
            y = y * tl.load(gain_ptr + head).to(tl.float32)[:, None]
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _qk_norm_rope_bwd_kernel(grad_ptr, x_ptr, cos_ptr, sin_ptr, gain_ptr, grad_x_ptr, grad_gain_ptr,
                                 n_rows, seq_len, eps, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                                 HALF_ROT: tl.constexpr, HAS_GAIN: tl.constexpr, BLOCK_R: tl.constexpr):
        eps = tl.cast(eps, tl.float32)
        block = tl.program_id(0)
        offs, partner_offs, mask, head, c, s = _qk_rows(cos_ptr, sin_ptr, block, n_rows, seq_len,
                                                        HEADS, HEAD_DIM, HALF_ROT, BLOCK_R)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        grad = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        grad_partner = tl.load(grad_ptr + partner_offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / HEAD_DIM + eps)[:, None]
        if HAS_GAIN:
            x_partner = tl.load(x_ptr + partner_offs, mask=mask, other=0.0).to(tl.float32)
            per_row = tl.sum(grad * (x * c + x_partner * s) * rstd, axis=1)
            # BLOCK_R is a multiple of HEADS, so row i of the block belongs to head i % HEADS.
            per_head = tl.sum(tl.reshape(per_row, (BLOCK_R // HEADS, HEADS)), axis=0)
            tl.store(grad_gain_ptr + block * HEADS + tl.arange(0, HEADS), per_head)
            gain = tl.load(gain_ptr + head).to(tl.float32)[:, None]
            grad, grad_partner = grad * gain, grad_partner * gain
        # The inverse rotation: the partner term's sign flips.
        grad_u = grad * c - grad_partner * s
        dot = (tl.sum(grad_u * x, axis=1) / HEAD_DIM)[:, None]
        grad_x = rstd * grad_u - rstd * rstd * rstd * dot * x
        tl.store(grad_x_ptr + offs, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)


def _qk_launch(x: Tensor, cos: Tensor, gain: Tensor | None) -> tuple[tuple[int], dict]:
    grid = (triton.cdiv(x.numel() // x.shape[-1], QK_BLOCK_ROWS),)
    meta = dict(HEADS=x.shape[2], HEAD_DIM=x.shape[3], HALF_ROT=cos.shape[-1], HAS_GAIN=gain is not None,
                BLOCK_R=QK_BLOCK_ROWS, num_warps=8)
    return grid, meta


def _qk_forward_triton(x: Tensor, cos: Tensor, sin: Tensor, gain: Tensor | None, eps: float) -> Tensor:
    x, cos, sin = x.contiguous(), cos.contiguous(), sin.contiguous()
    out = torch.empty_like(x)
    grid, meta = _qk_launch(x, cos, gain)
    _qk_norm_rope_fwd_kernel[grid](x, cos, sin, x if gain is None else gain, out,
                                   x.numel() // x.shape[-1], x.shape[1], float(eps), **meta)
    return out


def _qk_backward_triton(grad: Tensor, x: Tensor, cos: Tensor, sin: Tensor, gain: Tensor | None,
                        eps: float) -> tuple[Tensor, Tensor]:
    grad, x, cos, sin = grad.contiguous(), x.contiguous(), cos.contiguous(), sin.contiguous()
    grad_x = torch.empty_like(x)
    grid, meta = _qk_launch(x, cos, gain)
    partials = torch.empty((grid[0], x.shape[2]) if gain is not None else (0,), device=x.device,
                           dtype=torch.float32)
    _qk_norm_rope_bwd_kernel[grid](grad, x, cos, sin, x if gain is None else gain, grad_x, partials,
                                   x.numel() // x.shape[-1], x.shape[1], float(eps), **meta)
    grad_gain = partials.sum(0).to(gain.dtype) if gain is not None else partials
    return grad_x, grad_gain


def _qk_triton_ok(x: Tensor, cos: Tensor) -> bool:
    # A power-of-two head count divides QK_BLOCK_ROWS, so every block holds whole tokens' heads.
    return _use_triton(x, cos.shape[-1], x.shape[2]) and x.shape[2] <= QK_BLOCK_ROWS


@torch.library.custom_op("golf::qk_norm_rope", mutates_args=())
def _qk_norm_rope(x: Tensor, cos: Tensor, sin: Tensor, gain: Tensor | None, eps: float) -> Tensor:
    return (_qk_forward_triton if _qk_triton_ok(x, cos) else _qk_forward_torch)(x, cos, sin, gain, eps)


@_qk_norm_rope.register_fake
def _qk_norm_rope_fake(x, cos, sin, gain, eps):
    return x.new_empty(x.shape)


@torch.library.custom_op("golf::qk_norm_rope_backward", mutates_args=())
def _qk_norm_rope_backward(grad: Tensor, x: Tensor, cos: Tensor, sin: Tensor, gain: Tensor | None,
                           eps: float) -> tuple[Tensor, Tensor]:
    return (_qk_backward_triton if _qk_triton_ok(x, cos) else _qk_backward_torch)(grad, x, cos, sin, gain, eps)


@_qk_norm_rope_backward.register_fake
def _qk_norm_rope_backward_fake(grad, x, cos, sin, gain, eps):
    grad_gain = torch.empty(0 if gain is None else gain.shape[0], device=x.device,
                            dtype=torch.float32 if gain is None else gain.dtype)
    return x.new_empty(x.shape), grad_gain


def _qk_setup_context(ctx, inputs, output):
    x, cos, sin, gain, eps = inputs
    ctx.save_for_backward(x, cos, sin, gain)
    ctx.eps = eps


def _qk_backward(ctx, grad):
    x, cos, sin, gain = ctx.saved_tensors
    grad_x, grad_gain = _qk_norm_rope_backward(grad, x, cos, sin, gain, ctx.eps)
    return grad_x, None, None, grad_gain if gain is not None else None, None


_qk_norm_rope.register_autograd(_qk_backward, setup_context=_qk_setup_context)


def qk_norm_rope(x: Tensor, cos: Tensor, sin: Tensor, gain: Tensor | None = None,
                 eps: float = FP32_EPS) -> Tensor:
    """gain[h] · RoPE(RMSNorm(x)) for x [B, T, H, D], cos/sin [T, R/2] (R rotated dims), gain [H] or None.

    The default eps is float32's machine epsilon, what `F.rms_norm` uses on the record model's
    16-bit q and k (it normalizes in fp32)."""
    return _qk_norm_rope(x, cos, sin, gain, eps)


# ----------------------------------------------------------------------------- XSA


def _grouped(y: Tensor, v: Tensor) -> Tensor:
    """y [B, T, H, D] viewed as [B, T, Hkv, H/Hkv, D]: each query head beside its kv head."""
    b, t, h, d = y.shape
    return y.reshape(b, t, v.size(2), h // v.size(2), d)


def _xsa_forward_torch(y: Tensor, v: Tensor) -> Tensor:
    wide = torch.promote_types(y.dtype, torch.float32)  # fp32 math; float64 stays (gradcheck)
    yg, vn = _grouped(y.to(wide), v), F.normalize(v.to(wide), dim=-1, eps=XSA_NORM_EPS).unsqueeze(3)
    return (yg - (yg * vn).sum(-1, keepdim=True) * vn).reshape(y.shape).to(y.dtype)


def _xsa_backward_torch(grad: Tensor, y: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    wide = torch.promote_types(y.dtype, torch.float32)
    vw = v.to(wide)
    norm = vw.norm(dim=-1, keepdim=True)
    vn = (vw / norm.clamp_min(XSA_NORM_EPS)).unsqueeze(3)
    yg, g = _grouped(y.to(wide), v), _grouped(grad.to(wide), v)
    s, t = (yg * vn).sum(-1, keepdim=True), (g * vn).sum(-1, keepdim=True)
    grad_y = g - t * vn
    grad_vn = -(s * g + t * yg).sum(3)
    vn = vn.squeeze(3)
    tangent = grad_vn - (grad_vn * vn).sum(-1, keepdim=True) * vn
    grad_v = torch.where(norm < XSA_NORM_EPS, grad_vn, tangent) / norm.clamp_min(XSA_NORM_EPS)
    return grad_y.reshape(y.shape).to(y.dtype), grad_v.to(v.dtype)


if triton is not None:

    @triton.jit
    def _unit_values(v_ptr, rows_v, dims, mask):
        v = tl.load(v_ptr + rows_v[:, None] + dims[None, :], mask=mask, other=0.0).to(tl.float32)
        norm = tl.sqrt(tl.sum(v * v, axis=1))
        return v / tl.maximum(norm, 1e-12)[:, None], norm

    @triton.jit
    def _xsa_fwd_kernel(y_ptr, v_ptr, out_ptr, n_tokens, HEADS: tl.constexpr, KV_HEADS: tl.constexpr,
                        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
        kv_head = tl.program_id(1)
        tokens = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        mask = (tokens < n_tokens)[:, None]
        dims = tl.arange(0, HEAD_DIM)
        vn, _ = _unit_values(v_ptr, (tokens * KV_HEADS + kv_head) * HEAD_DIM, dims, mask)
        for i in tl.static_range(GROUP):
            rows = (tokens * HEADS + kv_head * GROUP + i) * HEAD_DIM
            y = tl.load(y_ptr + rows[:, None] + dims[None, :], mask=mask, other=0.0).to(tl.float32)
            out = y - tl.sum(y * vn, axis=1)[:, None] * vn
            tl.store(out_ptr + rows[:, None] + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _xsa_bwd_kernel(grad_ptr, y_ptr, v_ptr, grad_y_ptr, grad_v_ptr, n_tokens, HEADS: tl.constexpr,
                        KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
        kv_head = tl.program_id(1)
        tokens = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        mask = (tokens < n_tokens)[:, None]
        dims = tl.arange(0, HEAD_DIM)
        rows_v = (tokens * KV_HEADS + kv_head) * HEAD_DIM
        vn, norm = _unit_values(v_ptr, rows_v, dims, mask)
        grad_vn = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
        for i in tl.static_range(GROUP):
            rows = (tokens * HEADS + kv_head * GROUP + i) * HEAD_DIM
            y = tl.load(y_ptr + rows[:, None] + dims[None, :], mask=mask, other=0.0).to(tl.float32)
            g = tl.load(grad_ptr + rows[:, None] + dims[None, :], mask=mask, other=0.0).to(tl.float32)
            s = tl.sum(y * vn, axis=1)[:, None]
            t = tl.sum(g * vn, axis=1)[:, None]
            tl.store(grad_y_ptr + rows[:, None] + dims[None, :], (g - t * vn).to(grad_y_ptr.dtype.element_ty),
                     mask=mask)
            grad_vn -= s * g + t * y
        # Through v̂ = v / max(‖v‖, eps): project out v̂ and divide by the norm (just eps where clamped).
        clamped = (norm < 1e-12)[:, None]
        tangent = grad_vn - tl.sum(grad_vn * vn, axis=1)[:, None] * vn
        grad_v = tl.where(clamped, grad_vn, tangent) / tl.maximum(norm, 1e-12)[:, None]
        tl.store(grad_v_ptr + rows_v[:, None] + dims[None, :], grad_v.to(grad_v_ptr.dtype.element_ty), mask=mask)


def _xsa_launch(y: Tensor, v: Tensor) -> tuple[tuple[int, int], dict]:
    n_tokens = y.shape[0] * y.shape[1]
    grid = (triton.cdiv(n_tokens, XSA_BLOCK_TOKENS), v.shape[2])
    meta = dict(HEADS=y.shape[2], KV_HEADS=v.shape[2], GROUP=y.shape[2] // v.shape[2], HEAD_DIM=y.shape[3],
                BLOCK_N=XSA_BLOCK_TOKENS, num_warps=4)
    return grid, meta


def _xsa_forward_triton(y: Tensor, v: Tensor) -> Tensor:
    y, v = y.contiguous(), v.contiguous()
    out = torch.empty_like(y)
    grid, meta = _xsa_launch(y, v)
    _xsa_fwd_kernel[grid](y, v, out, y.shape[0] * y.shape[1], **meta)
    return out


def _xsa_backward_triton(grad: Tensor, y: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    grad, y, v = grad.contiguous(), y.contiguous(), v.contiguous()
    grad_y, grad_v = torch.empty_like(y), torch.empty_like(v)
    grid, meta = _xsa_launch(y, v)
    _xsa_bwd_kernel[grid](grad, y, v, grad_y, grad_v, y.shape[0] * y.shape[1], **meta)
    return grad_y, grad_v


@torch.library.custom_op("golf::xsa", mutates_args=())
def _xsa(y: Tensor, v: Tensor) -> Tensor:
    return (_xsa_forward_triton if _use_triton(y) else _xsa_forward_torch)(y, v)


@_xsa.register_fake
def _xsa_fake(y, v):
    return y.new_empty(y.shape)


@torch.library.custom_op("golf::xsa_backward", mutates_args=())
def _xsa_backward(grad: Tensor, y: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    return (_xsa_backward_triton if _use_triton(y) else _xsa_backward_torch)(grad, y, v)


@_xsa_backward.register_fake
def _xsa_backward_fake(grad, y, v):
    return y.new_empty(y.shape), v.new_empty(v.shape)


def _xsa_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _xsa_grad(ctx, grad):
    y, v = ctx.saved_tensors
    return _xsa_backward(grad, y, v)


_xsa.register_autograd(_xsa_grad, setup_context=_xsa_setup_context)


def xsa(y: Tensor, v: Tensor) -> Tensor:
    """y − (y·v̂)v̂ for y [B, T, H, D] and v [B, T, Hkv, D] (H a multiple of Hkv); y's dtype."""
    return _xsa(y, v)
