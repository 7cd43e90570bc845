"""Fused softcapped cross-entropy: mean CE of softcap·tanh(z/softcap) without materialising logits.

`softcap_cross_entropy(z, targets, softcap, ignore_index=-100)` is the entry point; it runs the
Triton kernels when `z` is on CUDA and triton imports, else `softcap_cross_entropy_reference`
(the plain-torch definition). `softcap_cross_entropy_triton` always takes the Triton path, which
is what the tests drive on CPU under `TRITON_INTERPRET=1`.

Notable:
- Forward reads z once (bf16, fp16 or fp32; any leading shape, last dim V) with an online
  softmax over V in blocks and keeps one fp32 logsumexp per row; backward re-reads z and writes
  dz (z's dtype) in one pass: (softmax(c) - onehot) · (1 - tanh²(z/softcap)) · grad / N_valid.
- All math is fp32 in registers. tanh has no interpretable Triton primitive, so `_softcap_tanh`
  builds it from one exp plus a short odd polynomial below |x| 0.55 (≈1 ulp), and takes the
  derivative as 4e/(1+e)², which stays accurate where 1 - tanh² cancels.
- softcap 0 means no cap. Rows whose target is ignore_index add nothing and are left out of the
  mean; all rows ignored gives NaN, as torch's mean cross-entropy does. A target outside [0, V)
  that is not ignore_index makes the loss NaN rather than reading out of bounds.
- The mean's divisor stays on the device, so neither pass syncs with the host.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

SOFTCAP_CE_IGNORE_INDEX = -100


def softcap_cross_entropy_reference(z: torch.Tensor, targets: torch.Tensor, softcap: float,
                                    ignore_index: int = SOFTCAP_CE_IGNORE_INDEX) -> torch.Tensor:
    """Mean cross-entropy of softcap·tanh(z/softcap) (z itself when softcap is 0), in fp32."""
    logits = z.reshape(-1, z.shape[-1]).float()
    if softcap > 0:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, targets.reshape(-1).long(), ignore_index=ignore_index)


if triton is not None:

    @triton.jit
    def _softcap_tanh(x):
        """(tanh(x), 1 - tanh(x)²) for fp32 x."""
        a = tl.abs(x)
        e = tl.exp(-2.0 * a)
        r = 1.0 / (1.0 + e)
        s = x * x
        # Near 0, (1 - e)/(1 + e) cancels; this odd fit of tanh on |x| < 0.55 is within ~1 ulp.
        p = -0.006274237297475338 * s + 0.021071678027510643
        p = p * s - 0.05385230854153633
        p = p * s + 0.13332585990428925
        p = p * s - 0.33333316445350647
        small = a + a * (s * p)
        near0 = a < 0.55
        t_abs = tl.where(near0, small, (1.0 - e) * r)
        dt = tl.where(near0, 1.0 - small * small, 4.0 * e * r * r)
        return tl.where(x < 0, -t_abs, t_abs), dt

    @triton.jit
    def _softcap_ce_fwd_kernel(z_ptr, tgt_ptr, loss_ptr, lse_ptr, stride_row, V, softcap, inv_softcap,
                               ignore_index, HAS_CAP: tl.constexpr, BLOCK_V: tl.constexpr):
        # Inductor launches a kernel traced inside a compiled graph with fp64 float scalars.
        softcap, inv_softcap = tl.cast(softcap, tl.float32), tl.cast(inv_softcap, tl.float32)
        row = tl.program_id(0).to(tl.int64)
        z_row = z_ptr + row * stride_row
        cols = tl.arange(0, BLOCK_V)
        m = tl.full((), float("-inf"), tl.float32)
        acc = tl.full((), 0.0, tl.float32)
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            mask = offs < V
            c = tl.load(z_row + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_CAP:
                t, _ = _softcap_tanh(c * inv_softcap)
                c = softcap * t
            c = tl.where(mask, c, float("-inf"))
            m_new = tl.maximum(m, tl.max(c, axis=0))
            acc = acc * tl.exp(m - m_new) + tl.sum(tl.exp(c - m_new), axis=0)
            m = m_new
        lse = m + tl.log(acc)

        tgt = tl.load(tgt_ptr + row)
        c_t = tl.load(z_row + tgt, mask=(tgt >= 0) & (tgt < V), other=float("nan")).to(tl.float32)
        if HAS_CAP:
            t_t, _ = _softcap_tanh(c_t * inv_softcap)
            c_t = softcap * t_t
        tl.store(loss_ptr + row, tl.where(tgt == ignore_index, 0.0, lse - c_t))
        tl.store(lse_ptr + row, lse)

    @triton.jit
    def _softcap_ce_bwd_kernel(z_ptr, tgt_ptr, lse_ptr, scale_ptr, dz_ptr, stride_z, stride_dz, V,
                               softcap, inv_softcap, ignore_index, HAS_CAP: tl.constexpr,
                               BLOCK_V: tl.constexpr):
        softcap, inv_softcap = tl.cast(softcap, tl.float32), tl.cast(inv_softcap, tl.float32)
        row = tl.program_id(0).to(tl.int64)
        z_row = z_ptr + row * stride_z
        dz_row = dz_ptr + row * stride_dz
        cols = tl.arange(0, BLOCK_V)
        tgt = tl.load(tgt_ptr + row)
        lse = tl.load(lse_ptr + row)
        scale = tl.where(tgt == ignore_index, 0.0, tl.load(scale_ptr))
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            mask = offs < V
            c = tl.load(z_row + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_CAP:
                t, dt = _softcap_tanh(c * inv_softcap)
                c = softcap * t
            p = tl.exp(c - lse)
            g = tl.where(offs == tgt, p - 1.0, p) * scale
            if HAS_CAP:
                g = g * dt
            tl.store(dz_row + offs, g.to(dz_ptr.dtype.element_ty), mask=mask)


def _softcap_ce_launch(V: int) -> dict:
    # One program per row; 4096-wide blocks give each of 8 warps 16 contiguous elements per load.
    block = min(4096, triton.next_power_of_2(V))
    return {"BLOCK_V": block, "num_warps": 8 if block >= 2048 else 4}


class _SoftcapCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, targets, softcap, ignore_index):
        V = z.shape[-1]
        z2 = z.reshape(-1, V)
        if z2.stride(-1) != 1:
            z2 = z2.contiguous()
        tgt = targets.reshape(-1)
        if tgt.numel() != z2.shape[0]:
            raise ValueError(f"softcap_cross_entropy: {tgt.numel()} targets for {z2.shape[0]} rows of z")
        tgt = tgt.contiguous()
        n_rows = z2.shape[0]
        losses = torch.empty(n_rows, dtype=torch.float32, device=z.device)
        lse = torch.empty(n_rows, dtype=torch.float32, device=z.device)
        has_cap = softcap > 0
        inv = 1.0 / softcap if has_cap else 1.0
        _softcap_ce_fwd_kernel[(n_rows,)](z2, tgt, losses, lse, z2.stride(0), V, float(softcap), inv,
                                          ignore_index, HAS_CAP=has_cap, **_softcap_ce_launch(V))
        n_valid = (tgt != ignore_index).sum()
        ctx.save_for_backward(z2, tgt, lse, n_valid)
        ctx.softcap, ctx.ignore_index, ctx.z_shape = softcap, ignore_index, z.shape
        return losses.sum() / n_valid

    @staticmethod
    def backward(ctx, grad_out):
        z2, tgt, lse, n_valid = ctx.saved_tensors
        V = z2.shape[1]
        dz = torch.empty_like(z2)
        scale = (grad_out.float() / n_valid).reshape(1)
        has_cap = ctx.softcap > 0
        inv = 1.0 / ctx.softcap if has_cap else 1.0
        _softcap_ce_bwd_kernel[(z2.shape[0],)](z2, tgt, lse, scale, dz, z2.stride(0), dz.stride(0), V,
                                               float(ctx.softcap), inv, ctx.ignore_index,
                                               HAS_CAP=has_cap, **_softcap_ce_launch(V))
        return dz.view(ctx.z_shape), None, None, None


def softcap_cross_entropy_triton(z: torch.Tensor, targets: torch.Tensor, softcap: float,
                                 ignore_index: int = SOFTCAP_CE_IGNORE_INDEX) -> torch.Tensor:
    """The Triton path regardless of device (CPU tensors need TRITON_INTERPRET=1)."""
    if triton is None:
        raise RuntimeError("softcap_cross_entropy_triton: triton is not installed")
    return _SoftcapCrossEntropy.apply(z, targets, float(softcap), int(ignore_index))


def softcap_cross_entropy(z: torch.Tensor, targets: torch.Tensor, softcap: float,
                          ignore_index: int = SOFTCAP_CE_IGNORE_INDEX) -> torch.Tensor:
    """Mean CE (fp32 scalar) of softcapped logits z [..., V] against targets [...]."""
    if z.is_cuda and triton is not None:
        return softcap_cross_entropy_triton(z, targets, softcap, ignore_index)
    return softcap_cross_entropy_reference(z, targets, softcap, ignore_index)
