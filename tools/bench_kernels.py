"""Benchmark golf's Triton kernels, forward+backward, on one CUDA GPU.

Times (triton.testing.do_bench, median) each kernel against the eager torch reference and
torch.compile of it, at the record micro-batch, and checks its results against fp32:
- softcapped cross-entropy (golf.kernels.softcap_ce): 98,304 tokens, vocab 8,192, bf16 logits z.
  GB/s is against the least traffic the op needs (read z twice, write dz once); "peak GiB" is the
  allocation high-water mark above the inputs for one call.
- the LeakyReLU(0.5)² MLP (golf.kernels.leaky_mlp): 131,072 tokens, 512 → 2,048 → 512, bf16.
- the attention ops (golf.kernels.attention_ops: qk_norm_rope, xsa) against torch.compile of
  golf.model's formulas, on one record micro-batch: 64 × 2,048 tokens, 8 query / 4 kv heads of 64.
  These rows include the custom ops' Python dispatch, which training hides behind the GPU.
  GB/s is against the least traffic each needs (every input read once, every output written once).

    python tools/bench_kernels.py [--parts ce,mlp,attn] [--n 98304] [--v 8192] [--softcap 30]
                                  [--mlp-tokens 131072] [--no-compile]
"""

from __future__ import annotations

import argparse
import sys

import torch
from golf.kernels import leaky_mlp
from golf.kernels.attention_ops import qk_norm_rope, xsa
from golf.kernels.leaky_mlp import leaky_relu2_mlp_reference, leaky_relu2_mlp_triton
from golf.kernels.softcap_ce import softcap_cross_entropy_reference, softcap_cross_entropy_triton

from golf.model import RotaryCache, qk_prologue, xsa_project


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


def bench_ce(args, do_bench) -> bool:
    """The softcapped CE kernel against the eager and compiled torch reference."""
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
    print(f"{'fwd+bwd':<30}{'ms':>9}{'GB/s':>9}{'peak GiB':>10}{'speedup':>9}")
    for name, ms, gbs, peak in rows:
        print(f"{name:<30}{ms:>9.3f}{gbs:>9.0f}{peak:>10.2f}{eager_ms / ms:>8.2f}x")
    return ok


def bench_mlp(args, do_bench) -> bool:
    """Fused MLP kernels against torch.compile of the module path (cuBLAS matmuls, fused activation
    kernels), forward+backward on the same bf16 inputs; errors against an fp32 reference."""
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    d, hidden = 512, 2048
    x = torch.randn(args.mlp_tokens, d, device=dev, generator=g).bfloat16()
    w_fc = (torch.randn(hidden, d, device=dev, generator=g) / d**0.5).bfloat16()
    w_proj = (torch.randn(d, hidden, device=dev, generator=g) / hidden**0.5).bfloat16()
    grad_y = torch.randn(args.mlp_tokens, d, device=dev, generator=g).bfloat16()
    leaves = [t.requires_grad_() for t in (x, w_fc, w_proj)]

    def fwd_bwd(fn):
        return (fn(*leaves), *torch.autograd.grad(fn(*leaves), leaves, grad_y))

    ref_in = [t.detach().float().requires_grad_() for t in leaves]
    ref_y = leaky_relu2_mlp_reference(*ref_in)
    ref = (ref_y.detach(), *torch.autograd.grad(ref_y, ref_in, grad_y.float()))
    del ref_y, ref_in
    impls = {"eager reference": leaky_relu2_mlp_reference}
    if not args.no_compile:
        impls["torch.compile(reference)"] = torch.compile(leaky_relu2_mlp_reference, dynamic=False)
    # The portable kernel, then the Hopper (TMA, persistent) one at a few launch configs:
    # BLOCK_M×BLOCK_N×BLOCK_K/stages/warps, +ws with automatic warp specialization, +sub storing each
    # tile in two halves. A 128×256 tile with 3 stages and whole-tile stores needs 272 KB of shared
    # memory (H100: 227 KB); the halves bring it under.
    launches = {"triton fused (tl.dot)": None}
    for bm, bn, bk, stages, warps, ws, sub in ((128, 128, 64, 4, 8, False, False), (128, 128, 64, 4, 8, False, True),
                                               (128, 256, 64, 3, 8, False, True), (128, 256, 64, 3, 8, True, True),
                                               (256, 128, 64, 3, 8, False, True)):
        launches[f"tma {bm}x{bn}x{bk}/{stages}/{warps}{'+ws' if ws else ''}{'+sub' if sub else ''}"] = dict(
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_stages=stages, num_warps=warps, WARP_SPECIALIZE=ws,
            EPILOGUE_SUBTILE=sub)
    for name, launch in launches.items():
        def fused(*args, launch=launch):
            leaky_mlp.TMA_CONFIG = launch
            return leaky_relu2_mlp_triton(*args)
        impls[name] = fused
    flops = 6 * 2 * args.mlp_tokens * d * hidden  # two matmuls, forward + two backward each
    print(f"\nLeakyReLU² MLP: {args.mlp_tokens} tokens × {d} → {hidden} → {d}, bf16, forward + backward "
          f"({flops / 1e12:.2f} TFLOP)")
    print(f"{'fwd+bwd':<30}{'ms':>9}{'TFLOP/s':>9}{'err y':>10}{'err dx':>10}{'err dW_fc':>11}{'err dW_proj':>12}")
    ok = True
    for name, fn in impls.items():
        def step(fn=fn):
            y = fn(*leaves)
            return torch.autograd.grad(y, leaves, grad_y)

        try:
            errs = [rel_err(a, b) for a, b in zip(fwd_bwd(fn), ref)]  # also compiles / autotunes
            ms = do_bench(step, warmup=25, rep=200, return_mode="median")
        except Exception as exc:  # noqa: BLE001 - a launch config that cannot run here is a row, not a crash
            print(f"{name:<30} FAILED: {str(exc).splitlines()[0][:90]}")
            continue
        ok &= max(errs) < 2e-2
        print(f"{name:<30}{ms:>9.3f}{flops / (ms * 1e-3) / 1e12:>9.0f}" + "".join(f"{e:>10.1e}" for e in errs[:3])
              + f"{errs[3]:>12.1e}")
        torch.cuda.empty_cache()
    return ok


def bench_attention_ops(do_bench) -> bool:
    """The fused q/k prologue and XSA against torch.compile of golf.model's formulas (what the
    compiled blocks run without them), forward+backward on the same bf16 inputs."""
    dev, g = torch.device("cuda"), torch.Generator(device="cuda").manual_seed(0)
    b, t, h, hkv, hd = 64, 2048, 8, 4, 64
    q = torch.randn(b, t, h, hd, device=dev, generator=g).bfloat16()
    k = torch.randn(b, t, hkv, hd, device=dev, generator=g).bfloat16()
    gain = torch.full((h,), 5.0, device=dev)
    cos, sin = RotaryCache(16, 10000.0).to(dev)(t)
    y = torch.randn(b, t, h, hd, device=dev, generator=g).bfloat16()
    v = torch.randn(b, t, hkv, hd, device=dev, generator=g).bfloat16()

    def qk_formulas(q, k, gain):
        return qk_prologue(q, k, cos, sin, gain)

    def qk_fused(q, k, gain):
        return qk_norm_rope(q, cos, sin, gain), qk_norm_rope(k, cos, sin)

    unit = q.numel() * q.element_size()
    cases = {  # name: (inputs, outputs, least bytes moved, {impl: fn})
        "qk norm+RoPE+gain": ((q, k, gain), 2, 5 * 1.5 * unit,
                              {"torch.compile(formulas)": torch.compile(qk_formulas, dynamic=False),
                               "attention_ops.qk_norm_rope": qk_fused}),
        "XSA": ((y, v), 1, (2.5 + 4) * unit,
                {"torch.compile(formulas)": torch.compile(xsa_project, dynamic=False), "attention_ops.xsa": xsa}),
    }
    ok = True
    print(f"\nattention ops: {b} × {t} tokens, {h} query / {hkv} kv heads of {hd}, bf16, forward + backward")
    print(f"{'fwd+bwd':<44}{'ms':>9}{'GB/s':>9}{'err out':>10}{'err grads':>11}")
    for case, (inputs, n_out, least_bytes, impls) in cases.items():
        leaves = [x.detach().requires_grad_() for x in inputs]
        grad_outs = [torch.randn_like(x) for x in inputs[:n_out]]
        ref = None
        for name, fn in impls.items():
            def step(fn=fn, leaves=leaves, grad_outs=grad_outs):
                outs = fn(*leaves)
                outs = outs if isinstance(outs, tuple) else (outs,)
                return outs + torch.autograd.grad(outs, leaves, grad_outs)

            got = step()  # compiles outside the timed region
            ref = ref or got
            errs = [rel_err(a, b) for a, b in zip(got, ref)]
            ok &= max(errs) < 2e-2
            ms = do_bench(step, warmup=25, rep=200, return_mode="median")
            print(f"{case + ': ' + name:<44}{ms:>9.3f}{least_bytes / (ms * 1e-3) / 1e9:>9.0f}"
                  f"{max(errs[:n_out]):>10.1e}{max(errs[n_out:]):>11.1e}")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=98304, help="rows (tokens)")
    ap.add_argument("--v", type=int, default=8192, help="vocab size")
    ap.add_argument("--softcap", type=float, default=30.0)
    ap.add_argument("--mlp-tokens", type=int, default=131072, help="tokens of the MLP benchmark")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    ap.add_argument("--parts", default="ce,mlp,attn", help="comma-separated: ce, mlp, attn")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    if not torch.cuda.is_available():
        print("bench_kernels: needs a CUDA GPU", file=sys.stderr)
        return 2
    from triton.testing import do_bench

    ok = True
    if "ce" in parts:
        ok &= bench_ce(args, do_bench)
    if "mlp" in parts:
        ok &= bench_mlp(args, do_bench)
    if "attn" in parts:
        ok &= bench_attention_ops(do_bench)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
