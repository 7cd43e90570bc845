"""Benchmark softcapped cross-entropy forward+backward on one CUDA GPU.

Times (triton.testing.do_bench, median) the eager torch reference, torch.compile of it, and the
Triton kernels of golf.kernels.softcap_ce at the record micro-batch (98304 tokens, vocab 8192,
bf16 logits z), then checks the Triton loss and dz against an fp32 reference.

GB/s is measured against the least traffic the op needs: read z twice (forward, backward) and
write dz once. "peak GiB" is the allocation high-water mark above the inputs for one call.

    python tools/bench_kernels.py [--n 98304] [--v 8192] [--softcap 30] [--no-compile]
"""

from __future__ import annotations

import argparse
import sys

import torch
from golf.kernels.softcap_ce import softcap_cross_entropy_reference, softcap_cross_entropy_triton


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def check(z: torch.Tensor, t: torch.Tensor, softcap: float) -> tuple[float, float]:
    """Relative error of the Triton loss and dz against the fp32 reference on the same z values."""
    z_leaf = z.detach().requires_grad_()
    loss = softcap_cross_entropy_triton(z_leaf, t, softcap)
    (dz,) = torch.autograd.grad(loss, z_leaf)
    z32 = z.detach().float().requires_grad_()
    ref = softcap_cross_entropy_reference(z32, t, softcap)
    (ref_dz,) = torch.autograd.grad(ref, z32)
    return abs(loss.item() - ref.item()) / abs(ref.item()), rel_err(dz, ref_dz)


def peak_extra_gib(fn) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=98304, help="rows (tokens)")
    ap.add_argument("--v", type=int, default=8192, help="vocab size")
    ap.add_argument("--softcap", type=float, default=30.0)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_kernels: needs a CUDA GPU", file=sys.stderr)
        return 2
    from triton.testing import do_bench

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    # Pre-cap logits of a few tens, as a trained model's are; 1% of targets ignored.
    z = (torch.randn(args.n, args.v, device=dev, generator=g) * 8).bfloat16().requires_grad_()
    t = torch.randint(0, args.v, (args.n,), device=dev, generator=g)
    t[::100] = -100

    loss_err, dz_err = check(z, t, args.softcap)
    ok = loss_err < 1e-5 and dz_err < 1e-2  # dz is bf16, so its error floor is bf16 rounding
    torch.cuda.empty_cache()

    impls = {"eager reference": softcap_cross_entropy_reference}
    if not args.no_compile:
        impls["torch.compile(reference)"] = torch.compile(softcap_cross_entropy_reference, dynamic=False)
    impls["triton kernel"] = softcap_cross_entropy_triton

    min_bytes = 3 * z.numel() * z.element_size()
    rows = []
    for name, loss_fn in impls.items():
        def step(loss_fn=loss_fn):
            return torch.autograd.grad(loss_fn(z, t, args.softcap), z)

        step()  # compiles (torch.compile, triton) outside the timed region
        ms = do_bench(step, warmup=25, rep=200, return_mode="median")
        rows.append((name, ms, min_bytes / (ms * 1e-3) / 1e9, peak_extra_gib(step)))
        torch.cuda.empty_cache()

    print(f"device: {torch.cuda.get_device_name()}  N={args.n} V={args.v} softcap={args.softcap} z=bf16  "
          f"min traffic {min_bytes / 1e9:.2f} GB")
    print(f"triton vs fp32 reference: loss rel err {loss_err:.2e}, dz rel err {dz_err:.2e} "
          f"({'ok' if ok else 'MISMATCH'})")
    eager_ms = rows[0][1]
    print(f"{'fwd+bwd':<26}{'ms':>9}{'GB/s':>9}{'peak GiB':>10}{'speedup':>9}")
    for name, ms, gbs, peak in rows:
        print(f"{name:<26}{ms:>9.3f}{gbs:>9.0f}{peak:>10.2f}{eager_ms / ms:>8.2f}x")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
