"""Benchmark causal GQA attention forward+backward at the record shape on one CUDA GPU.

Rows: golf's `causal_attention` backends that can run here (sdpa, fa2, fa3), eager and
under torch.compile (a compiled region is what training runs), plus the kernel torch's SDPA
dispatcher picks by default. Then SDPA with each of its fused backends forced, on grouped kv
heads and on kv heads repeated to the query heads (no GQA reduction in the kernel's backward).
Each row is checked against the fp32 math reference.

    python tools/bench_attention.py [--batch 48] [--seq 2048] [--heads 8] [--kv-heads 4] [--head-dim 64]
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from golf.model import causal_attention, resolve_attn_backend

SDPA_FORCED = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION}


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    group = q.size(2) // k.size(2)
    k, v = (t.repeat_interleave(group, dim=2) for t in (k, v))
    y = F.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v)), is_causal=True)
    return y.transpose(1, 2)


def forced_sdpa(backend: SDPBackend, repeat_kv: bool):
    """Causal SDPA on [B, T, H, D] tensors with one fused backend forced; grouped kv heads, or
    repeated to the query heads first."""
    def attend(q, k, v):
        group = q.size(2) // k.size(2)
        if repeat_kv:
            k, v = (t.repeat_interleave(group, dim=2) for t in (k, v))
        with sdpa_kernel(backend):
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True, enable_gqa=k.size(2) != q.size(2))
        return y.transpose(1, 2)
    return attend


def kernel_names(fn) -> str:
    """The CUDA kernels one call launches whose names look like attention."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = {e.key for e in prof.key_averages() if any(w in e.key.lower() for w in ("attn", "fmha", "flash", "sdpa",
                                                                                     "cudnn", "attention"))}
    return "; ".join(sorted(n[:60] for n in names)) or "?"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_attention: needs a CUDA GPU", file=sys.stderr)
        return 2
    from triton.testing import do_bench

    torch.manual_seed(0)
    b, t, h, hkv, d = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
    q = torch.randn(b, t, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(b, t, hkv, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    dy = torch.randn(b, t, h, d, device="cuda", dtype=torch.bfloat16)
    ref = reference(q[:2], k[:2], v[:2])
    # fwd+bwd FLOPs of causal attention: 4·T²·D per head forward (QKᵀ, AV), halved by the mask, ×3.5 with backward
    flops = 4 * b * h * t * t * d / 2 * 3.5

    rows = []

    def measure(name: str, mode: str, attend) -> None:
        torch._dynamo.reset()  # each row compiles afresh: the closures share one code object's recompile limit
        fn = torch.compile(attend, dynamic=False) if mode == "compiled" else attend

        def step():
            return torch.autograd.grad(fn(q, k, v), (q, k, v), dy)

        try:
            step()
            err = ((fn(q[:2], k[:2], v[:2]).float() - ref).norm() / ref.norm()).item()
            ms = do_bench(step, warmup=10, rep=100, return_mode="median")
            rows.append((name, mode, ms, err, kernel_names(step)))
        except Exception as exc:  # noqa: BLE001 - a kernel that cannot run here is a row, not a crash
            rows.append((name, mode, float("nan"), float("nan"), f"FAILED: {str(exc).splitlines()[0][:80]}"))
        torch.cuda.empty_cache()

    for backend in ("sdpa", "fa2", "fa3"):
        try:
            resolve_attn_backend(backend)
        except Exception as exc:  # noqa: BLE001
            rows.append((backend, "-", float("nan"), float("nan"), str(exc)[:60]))
            continue
        for mode in ("eager", "compiled"):
            measure(backend, mode, lambda q, k, v, backend=backend: causal_attention(q, k, v, backend))
    for name, backend in SDPA_FORCED.items():
        for repeat_kv in (False, True):
            measure(f"{name}{'+rep' if repeat_kv else ''}", "compiled", forced_sdpa(backend, repeat_kv))

    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  cudnn {torch.backends.cudnn.version()}  "
          f"B={b} T={t} H={h} Hkv={hkv} D={d} bf16 causal, fwd+bwd")
    print(f"{'backend':<14}{'mode':<10}{'ms':>9}{'TFLOP/s':>9}{'rel err':>10}  kernels")
    for backend, mode, ms, err, names in rows:
        print(f"{backend:<14}{mode:<10}{ms:>9.3f}{flops / ms / 1e9:>9.0f}{err:>10.2e}  {names}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
