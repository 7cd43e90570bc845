"""golf.kernels: softcap_ce's torch reference against its closed form, and the Triton kernels of
softcap_ce, leaky_mlp and attention_ops (qk_norm_rope, xsa) against their references, run on CPU by the Triton
interpreter; the attention ops' torch paths against golf.model's formulas, and on a GPU inside a
compiled graph.

TRITON_INTERPRET must be set before triton is imported, so the kernel cases run once in a child
process (this file as a script) that prints one JSON line of per-case errors.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from golf.kernels.attention_ops import qk_norm_rope, xsa
from golf.kernels.leaky_mlp import leaky_relu2_mlp, leaky_relu2_mlp_reference
from golf.kernels.softcap_ce import softcap_cross_entropy, softcap_cross_entropy_reference

from golf.model import RotaryCache, apply_rotary, xsa_project

# Shapes straddle the 4096-wide block: one partial block, an exact multiple, a ragged tail.
INTERP_CASES = {
    "cap30_v1000": dict(n=37, v=1000, softcap=30.0, scale=20.0),
    "nocap_v4103": dict(n=16, v=4103, softcap=0.0, scale=3.0),
    "cap30_v8192": dict(n=6, v=8192, softcap=30.0, scale=10.0),
    "cap15_saturated": dict(n=9, v=300, softcap=15.0, scale=60.0),
    "cap30_tiny_z": dict(n=11, v=257, softcap=30.0, scale=1e-3),
    "cap30_3d_int32_grad2.5": dict(n=10, v=777, softcap=30.0, scale=20.0, lead=(2, 5), int32=True,
                                   grad=2.5),
    "cap30_row_strided": dict(n=13, v=999, softcap=30.0, scale=20.0, pad=13),
    "cap30_bf16": dict(n=24, v=5000, softcap=30.0, scale=20.0, dtype=torch.bfloat16),
    "cap30_fp16": dict(n=24, v=5000, softcap=30.0, scale=20.0, dtype=torch.float16),
    "all_ignored": dict(n=5, v=100, softcap=30.0, scale=5.0, ignore_every=1),
    "target_out_of_range": dict(n=5, v=100, softcap=30.0, scale=5.0, bad_target=True),
}
NAN_CASES = ("all_ignored", "target_out_of_range")


def make_case(n, v, softcap, scale, lead=None, int32=False, grad=1.0, pad=0, dtype=torch.float32,
              ignore_every=4, bad_target=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, v + pad, generator=g) * scale
    z = z[:, :v].to(dtype)
    t = torch.randint(0, v, (n,), generator=g)
    t[::ignore_every] = -100
    if bad_target:
        t[1] = v
    if lead is not None:
        z, t = z.reshape(*lead, v), t.reshape(lead)
    return z, t.int() if int32 else t


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def analytic(z, t, softcap):
    """Loss and dz from the closed form, in float64."""
    z, t = z.double().reshape(-1, z.shape[-1]), t.reshape(-1)
    tc = torch.tanh(z / softcap) if softcap > 0 else None
    c = softcap * tc if softcap > 0 else z
    valid = t != -100
    lse = torch.logsumexp(c, dim=1)
    tgt = t.clamp(min=0)
    loss = ((lse - c.gather(1, tgt[:, None])[:, 0]) * valid).sum() / valid.sum()
    g = torch.softmax(c, dim=1) - F.one_hot(tgt, z.shape[1])
    if softcap > 0:
        g = g * (1 - tc * tc)
    return loss, g * valid[:, None] / valid.sum()


@pytest.mark.parametrize("softcap", [0.0, 30.0])
def test_reference_matches_closed_form(softcap):
    z, t = make_case(20, 301, softcap, scale=25.0)
    z.requires_grad_()
    loss = softcap_cross_entropy_reference(z, t, softcap)
    (dz,) = torch.autograd.grad(loss, z)
    want_loss, want_dz = analytic(z.detach(), t, softcap)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert abs(loss.item() - want_loss.item()) < 1e-5 * want_loss.item()
    assert rel(dz, want_dz) < 1e-5


def test_reference_ignore_index_and_nocap():
    z, t = make_case(12, 64, 0.0, scale=4.0)
    assert torch.equal(softcap_cross_entropy_reference(z, t, 0.0), F.cross_entropy(z, t))
    keep = t != -100
    assert torch.allclose(softcap_cross_entropy_reference(z, t, 30.0),
                          softcap_cross_entropy_reference(z[keep], t[keep], 30.0), rtol=1e-6)
    assert torch.isnan(softcap_cross_entropy_reference(z, torch.full_like(t, -100), 30.0))


def test_dispatcher_on_cpu_is_reference():
    z, t = make_case(6, 50, 30.0, scale=20.0, lead=(2, 3), dtype=torch.bfloat16)
    z.requires_grad_()
    got = softcap_cross_entropy(z, t, 30.0)
    (dz,) = torch.autograd.grad(got, z)
    assert torch.equal(got, softcap_cross_entropy_reference(z, t, 30.0))
    assert got.dtype == torch.float32 and dz.dtype == torch.bfloat16 and dz.shape == z.shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_softcap_ce_inside_a_compiled_graph_matches_eager_on_gpu():
    """Compiled whole (compile_scope=model), inductor re-launches the kernels with fp64 scalars."""
    z, t = make_case(64, 8192, 30.0, scale=20.0, dtype=torch.bfloat16)
    z, t = z.cuda().requires_grad_(), t.cuda()
    eager = softcap_cross_entropy(z, t, 30.0)
    (eager_dz,) = torch.autograd.grad(eager, z)
    compiled = torch.compile(lambda a, b: softcap_cross_entropy(a, b, 30.0), dynamic=False)(z, t)
    (compiled_dz,) = torch.autograd.grad(compiled, z)
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(compiled_dz, eager_dz, rtol=1e-2, atol=1e-6)


# (leading shape, K, hidden, out, dtype): ragged against the interpreter's 32-wide blocks, K not a
# multiple of the block, a 3-D input, and the record's 16-bit dtype.
MLP_CASES = {
    "mlp_fp32_ragged": ((70,), 48, 100, 40, torch.float32),
    "mlp_fp32_3d": ((2, 35), 64, 96, 64, torch.float32),
    "mlp_bf16": ((3, 40), 64, 128, 64, torch.bfloat16),
}


def mlp_case(lead, k, hidden, out, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=g).to(dtype)
    w_fc = (torch.randn(hidden, k, generator=g) / math.sqrt(k)).to(dtype)
    w_proj = (torch.randn(out, hidden, generator=g) / math.sqrt(hidden)).to(dtype)
    return x, w_fc, w_proj


def run_mlp_cases() -> dict:
    """Output and the three gradients of the fused MLP, relative to the float64 reference; the
    same for the plain-torch path in the case's dtype (the rounding the model has without it)."""
    from golf.kernels.leaky_mlp import leaky_relu2_mlp_triton

    out = {}
    for name, spec in MLP_CASES.items():
        inputs = mlp_case(*spec)
        ref_in = [t.double().requires_grad_() for t in inputs]
        ref_y = leaky_relu2_mlp_reference(*ref_in)
        grad_y = torch.randn(ref_y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        ref_grads = torch.autograd.grad(ref_y, ref_in, grad_y)
        errors = {}
        for path, fn in (("triton", leaky_relu2_mlp_triton), ("torch", leaky_relu2_mlp_reference)):
            leaves = [t.clone().requires_grad_() for t in inputs]
            y = fn(*leaves)
            grads = torch.autograd.grad(y, leaves, grad_y.to(y.dtype))
            errors[path] = [rel(y, ref_y)] + [rel(a, b) for a, b in zip(grads, ref_grads)]
            errors[f"{path}_dtypes_kept"] = all(t.dtype == inputs[0].dtype for t in (y, *grads))
        out[name] = errors
    return out


def run_hopper_matmul_cases() -> dict:
    """The Hopper kernel's two epilogue matmuls on a ragged fp32 case (the interpreter's bf16 dot
    is wrong): h and a = leaky(h)², and grad_a·leaky'(h), each relative to float64."""
    from golf.kernels.leaky_mlp import _mm_leaky_tma

    g = torch.Generator().manual_seed(2)
    m, k, n = 70, 48, 100
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) / k**0.5
    grad_y, w_proj = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g) / k**0.5
    ref_h = x.double() @ w.double().t()
    ref_grad_h = (grad_y.double() @ w_proj.double()) * torch.where(ref_h > 0, 2 * ref_h, 0.5 * ref_h)
    out = {}
    for subtile in (False, True):
        launch = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, WARP_SPECIALIZE=False, EPILOGUE_SUBTILE=subtile)
        h, a, grad_h = torch.empty(m, n), torch.empty(m, n), torch.empty(m, n)
        _mm_leaky_tma(x, w, h, a, False, launch)
        _mm_leaky_tma(grad_y, w_proj.t().contiguous(), grad_h, h, True, launch)
        tag = "_subtile" if subtile else ""
        out.update({f"h{tag}": rel(h, ref_h), f"a{tag}": rel(a, F.leaky_relu(ref_h, 0.5).square()),
                    f"grad_h{tag}": rel(grad_h, ref_grad_h)})
    return out


# Attention ops: (kind, batch, seq, heads, kv heads or rotated half, gain, dtype). Row and token
# counts are ragged against the kernels' 64-wide blocks; full and partial rotation; grouped and
# plain heads.
ATTN_CASES = {
    "qk_partial_gain_fp32": ("qk", 2, 37, 4, 8, True, torch.float32),
    "qk_full_rotation_bf16": ("qk", 1, 70, 2, 32, False, torch.bfloat16),
    "qk_partial_gain_bf16": ("qk", 3, 50, 8, 8, True, torch.bfloat16),
    "xsa_gqa_fp32": ("xsa", 2, 37, 8, 4, False, torch.float32),
    "xsa_mha_bf16": ("xsa", 1, 70, 2, 2, False, torch.bfloat16),
    "xsa_gqa_bf16": ("xsa", 3, 50, 8, 2, False, torch.bfloat16),
}
FP32_EPS = torch.finfo(torch.float32).eps


def attn_case(kind, batch, seq, heads, extra, gain, dtype, seed=0):
    """(inputs, the op's extra arguments, its float64 definition from golf.model) for one case;
    the xsa cases include a zero value vector (F.normalize's clamp)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "qk":
        x = torch.randn(batch, seq, heads, 64, generator=g, dtype=torch.float64) * 3
        w = torch.rand(heads, generator=g, dtype=torch.float64) + 0.5
        cos, sin = RotaryCache(2 * extra, 10000.0)(seq)

        def definition(x, *w):
            y = apply_rotary(F.rms_norm(x, (64,), eps=FP32_EPS), cos.double(), sin.double())
            return y * w[0][:, None] if w else y
        return [x, w] if gain else [x], (cos, sin), definition
    y = torch.randn(batch, seq, heads, 64, generator=g, dtype=torch.float64)
    v = torch.randn(batch, seq, extra, 64, generator=g, dtype=torch.float64)
    v[0, 0, 0] = 0.0
    return [y, v], (), xsa_project


def run_attn_cases() -> dict:
    """Output and gradients of the Triton and the plain-torch path of each op in the case's
    dtype, relative to the float64 definition."""
    from golf.kernels import attention_ops

    out = {}
    for name, (kind, *spec) in ATTN_CASES.items():
        dtype = spec[-1]
        inputs, extra, definition = attn_case(kind, *spec)
        ref_in = [t.clone().requires_grad_() for t in inputs]
        ref_y = definition(*ref_in)
        grad = torch.randn(ref_y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        ref_grads = torch.autograd.grad(ref_y, ref_in, grad)
        errors = {}
        for path in ("triton", "torch"):
            forward = getattr(attention_ops, f"_{kind}_forward_{path}")
            backward = getattr(attention_ops, f"_{kind}_backward_{path}")
            if kind == "qk":
                x, w = inputs[0].to(dtype), inputs[1].float() if len(inputs) > 1 else None
                y = forward(x, *extra, w, FP32_EPS)
                grads = backward(grad.to(dtype), x, *extra, w, FP32_EPS)[: len(inputs)]
            else:
                args = [t.to(dtype) for t in inputs]
                y, grads = forward(*args), backward(grad.to(dtype), *args)
            errors[path] = [rel(y, ref_y)] + [rel(a, b) for a, b in zip(grads, ref_grads)]
            errors[f"{path}_dtype_kept"] = y.dtype == grads[0].dtype == dtype
        out[name] = errors
    return out


def run_interp_cases() -> dict:
    from golf.kernels.softcap_ce import softcap_cross_entropy_triton

    out = {}
    for name, spec in INTERP_CASES.items():
        z, t = make_case(**spec)
        sc, grad = spec["softcap"], spec.get("grad", 1.0)
        z.requires_grad_()
        loss = softcap_cross_entropy_triton(z, t, sc)
        (dz,) = torch.autograd.grad(loss * grad, z)
        r = out[name] = dict(loss=loss.item(), dz_abs=dz.abs().max().item(), same_dtype=dz.dtype == z.dtype,
                             same_shape=dz.shape == z.shape)
        if name not in NAN_CASES:
            z32 = z.detach().float().requires_grad_()
            ref = softcap_cross_entropy_reference(z32, t, sc)
            (ref_dz,) = torch.autograd.grad(ref * grad, z32)
            r.update(ref_loss=ref.item(), dz_rel=rel(dz, ref_dz))
    return out


@pytest.fixture(scope="module")
def interp_results():
    import numpy
    import triton

    old = tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 7)
    if old and int(numpy.__version__.split(".")[0]) >= 2:  # seen with 3.6 (torch 2.11's); 3.9 works
        pytest.skip(f"triton {triton.__version__}'s interpreter cannot loop over a scalar argument under numpy 2")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("name", list(INTERP_CASES))
def test_triton_interpreter_matches_reference(interp_results, name):
    r = interp_results[name]
    assert r["same_dtype"] and r["same_shape"]
    if name in NAN_CASES:
        assert math.isnan(r["loss"])
        # Ignored rows get an exact zero gradient even though the mean divides by zero.
        assert name != "all_ignored" or r["dz_abs"] == 0.0
        return
    assert abs(r["loss"] - r["ref_loss"]) < 1e-5 * abs(r["ref_loss"])
    # A half-precision dz carries its rounding; the interpreter truncates fp32 -> bf16 (2^-8
    # relative) where the GPU rounds to nearest. fp32 must match to 1e-5.
    tol = {torch.bfloat16: 4e-3, torch.float16: 5e-4}.get(INTERP_CASES[name].get("dtype"), 1e-5)
    assert r["dz_rel"] < tol


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("name", list(MLP_CASES))
def test_fused_mlp_interpreter_matches_reference(interp_results, name):
    """y, dx, dW_fc, dW_proj of the fused kernels against float64: within 1e-5 in fp32, and in
    bf16 no further off than the plain-torch path in bf16 (2× and 1e-3 of slack)."""
    r = interp_results["mlp"][name]
    assert r["triton_dtypes_kept"]
    for got, plain in zip(r["triton"], r["torch"]):
        if MLP_CASES[name][-1] == torch.float32:
            assert got < 1e-5
        else:
            assert got < 2 * plain + 1e-3


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_hopper_mlp_matmuls_interpreter_match_reference(interp_results):
    assert all(err < 1e-5 for err in interp_results["hopper"].values()), interp_results["hopper"]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("name", list(ATTN_CASES))
def test_attention_op_kernels_interpreter_match_definition(interp_results, name):
    """qk_norm_rope and xsa, forward and every gradient, against float64: within 1e-5 in fp32, and
    in bf16 no further off than the plain-torch path (2× and 1e-3 of slack: the interpreter
    truncates to bf16 where the GPU rounds)."""
    r = interp_results["attn"][name]
    assert r["triton_dtype_kept"] and r["torch_dtype_kept"]
    for got, plain in zip(r["triton"], r["torch"]):
        if ATTN_CASES[name][-1] == torch.float32:
            assert got < 1e-5 and plain < 1e-5
        else:
            assert got < 2 * plain + 1e-3


@pytest.mark.parametrize("name", ["qk_partial_gain_fp32", "xsa_gqa_fp32"])
def test_attention_ops_are_their_definition_with_its_gradients(name):
    """On CPU the custom ops run plain torch: gradcheck in float64, and equal to golf.model's formulas."""
    kind, batch, _, heads, extra, gain, _ = ATTN_CASES[name]
    inputs, args, definition = attn_case(kind, batch, 5, heads, extra, gain, torch.float64)
    leaves = [t.clone().requires_grad_() for t in inputs]
    if kind == "qk":
        op = lambda x, w: qk_norm_rope(x, *(a.double() for a in args), w, FP32_EPS)  # noqa: E731
    else:
        op = xsa
    assert torch.autograd.gradcheck(op, leaves)
    torch.testing.assert_close(op(*leaves), definition(*leaves), rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["qk_partial_gain_bf16", "xsa_gqa_bf16"])
def test_attention_ops_on_gpu_eager_and_compiled_match_definition(name):
    """The Triton kernels at a training-like shape, eager and inside a compiled graph (where the
    op is one opaque node), against float64: no further off than the plain-torch path."""
    kind, _, _, heads, extra, gain, dtype = ATTN_CASES[name]
    inputs, args, definition = attn_case(kind, 8, 2048, heads, extra, gain, dtype)
    ref_in = [t.clone().requires_grad_() for t in inputs]
    ref_y = definition(*ref_in)
    grad = torch.randn_like(ref_y)
    ref_grads = torch.autograd.grad(ref_y, ref_in, grad)
    if kind == "qk":
        args = tuple(a.cuda() for a in args)
        op = lambda x, w: qk_norm_rope(x, *args, w)  # noqa: E731
        leaves = [inputs[0].to("cuda", dtype), inputs[1].float().cuda()]
    else:
        op, leaves = xsa, [t.to("cuda", dtype) for t in inputs]
    plain = [rel(definition(*[t.double().cpu() for t in leaves]).to(dtype), ref_y)]
    for fn in (op, torch.compile(op, dynamic=False)):
        leaves = [t.detach().requires_grad_() for t in leaves]
        y = fn(*leaves)
        grads = torch.autograd.grad(y, leaves, grad.to("cuda", dtype))
        assert y.dtype == grads[0].dtype == dtype
        assert rel(y.cpu(), ref_y) < 2 * plain[0] + 1e-3
        for got, want in zip(grads, ref_grads):
            assert rel(got.cpu(), want) < 1e-2


def test_fused_mlp_falls_back_to_the_reference_on_cpu():
    x, w_fc, w_proj = mlp_case((4, 9), 16, 32, 16, torch.float32)
    assert torch.equal(leaky_relu2_mlp(x, w_fc, w_proj), leaky_relu2_mlp_reference(x, w_fc, w_proj))


if __name__ == "__main__":
    print(json.dumps({**run_interp_cases(), "mlp": run_mlp_cases(), "hopper": run_hopper_matmul_cases(),
                      "attn": run_attn_cases()}))
