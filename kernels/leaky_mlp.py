"""The LeakyReLU(0.5)² MLP with its activation inside the matmuls: y = leaky(x·W_fcᵀ, 0.5)²·W_projᵀ.

`leaky_relu2_mlp(x, w_fc, w_proj)` is the entry point (16-bit CUDA tensors, weights already in
x's dtype); `leaky_relu2_mlp_reference` is the plain-torch definition. `leaky_relu2_mlp_triton`
always takes the Triton path, which the tests drive on CPU under `TRITON_INTERPRET=1`.

Why: on an H100 the record model's MLP hidden is [131,072 tokens × 2,048] per micro-batch, and
the separate activation kernels around the matmuls move it through memory four times (forward:
read h, write a; backward: read grad_a and h, write grad_h), about 6% of a looped training step
(docs/benchmarks.md). Here the forward matmul's epilogue writes h and a = leaky(h)² from its fp32
accumulator, and the backward matmul grad_a = grad_y·W_proj multiplies by the activation's
derivative (2h for h > 0, h/2 below) before it stores grad_h, so grad_a never reaches memory.
The other three matmuls (a·W_projᵀ, and the weight and input gradients) stay with cuBLAS.

On Hopper the two epilogue matmuls load and store through TMA descriptors in persistent
programs (`_mm_leaky_tma_kernel`); elsewhere, and under the interpreter, plain `tl.dot` tiles.

Status: not used by the model. On an H100 (tools/bench_kernels.py, docs/benchmarks.md), forward
+ backward take 3.245 ms with the best Hopper launch and 3.651 ms with the portable kernel. For
torch.compile of the module path they take 3.282 ms. The traffic saved only pays for the matmul
time lost to cuBLAS.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def leaky_relu2_mlp_reference(x: torch.Tensor, w_fc: torch.Tensor, w_proj: torch.Tensor) -> torch.Tensor:
    return F.linear(F.leaky_relu(F.linear(x, w_fc), 0.5).square(), w_proj)


if triton is not None:

    def _mm_configs() -> list:
        # H100 shapes of the record MLP, forward and backward alike: M = 131,072, K = 512, N = 2,048.
        shapes = [(128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (128, 128, 64, 4, 8), (128, 128, 64, 4, 4),
                  (64, 256, 64, 4, 4)]
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_stages=s, num_warps=w)
                for m, n, k, s, w in shapes]

    @triton.jit
    def _grouped_tile(tile, num_m, num_n, GROUP_M: tl.constexpr):
        """(row block, column block) of tile number `tile` in grouped order: GROUP_M row blocks
        share each column block of B while it sits in L2."""
        per_group = GROUP_M * num_n
        first_m = (tile // per_group) * GROUP_M
        rows_here = tl.minimum(num_m - first_m, GROUP_M)
        return first_m + (tile % per_group) % rows_here, (tile % per_group) // rows_here

    @triton.jit
    def _mm_leaky_kernel(a_ptr, b_ptr, out_ptr, aux_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                         stride_om, stride_on, BACKWARD: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                         DOT_FP32: tl.constexpr = False):
        """C = A·B [M, N] in fp32, then: forward, out = C (h) and aux = leaky(C)² (a); backward,
        out = C · leaky²'(aux), with aux = h."""
        pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + rm[:, None].to(tl.int64) * stride_am + rk[None, :] * stride_ak
        b_ptrs = b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a = tl.load(a_ptrs, mask=(rm[:, None] < M) & (rk[None, :] < K - k0), other=0.0)
            b = tl.load(b_ptrs, mask=(rk[:, None] < K - k0) & (rn[None, :] < N), other=0.0)
            if DOT_FP32:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b, acc)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
        offs = rm[:, None].to(tl.int64) * stride_om + rn[None, :] * stride_on
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        if BACKWARD:
            h = tl.load(aux_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(out_ptr + offs, (acc * tl.where(h > 0, 2.0 * h, 0.5 * h)).to(out_ptr.dtype.element_ty),
                     mask=mask)
        else:
            tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
            act = tl.where(acc > 0, acc, 0.5 * acc)
            tl.store(aux_ptr + offs, (act * act).to(aux_ptr.dtype.element_ty), mask=mask)

    _mm_leaky_tuned = triton.autotune(configs=_mm_configs(), key=["M", "N", "K", "BACKWARD"])(_mm_leaky_kernel)

    @triton.jit
    def _leaky_epilogue(out_desc, aux_desc, acc, om, on, BACKWARD: tl.constexpr):
        if BACKWARD:
            h = aux_desc.load([om, on]).to(tl.float32)
            out_desc.store([om, on], (acc * tl.where(h > 0, 2.0 * h, 0.5 * h)).to(out_desc.dtype))
        else:
            out_desc.store([om, on], acc.to(out_desc.dtype))
            act = tl.where(acc > 0, acc, 0.5 * acc)
            aux_desc.store([om, on], (act * act).to(aux_desc.dtype))

    @triton.jit
    def _mm_leaky_tma_kernel(a_desc, b_desc, out_desc, aux_desc, M, N, K, BACKWARD: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
                             EPILOGUE_SUBTILE: tl.constexpr):
        """`_mm_leaky_kernel` for Hopper: TMA loads and stores through descriptors (A [M, K], B as
        [N, K], out and aux [M, N], or [M, N/2] blocks with EPILOGUE_SUBTILE), one persistent
        program per SM walking the tiles, so one tile's epilogue overlaps the next tile's loads.
        EPILOGUE_SUBTILE stores each tile in two column halves, halving the epilogue's shared memory."""
        num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_SMS, flatten=True,
                             warp_specialize=WARP_SPECIALIZE):
            pid_m, pid_n = _grouped_tile(tile, num_m, num_n, GROUP_M)
            om, on = pid_m * BLOCK_M, pid_n * BLOCK_N
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                acc = tl.dot(a_desc.load([om, k0]), b_desc.load([on, k0]).T, acc)
            if EPILOGUE_SUBTILE:
                left, right = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
                _leaky_epilogue(out_desc, aux_desc, left, om, on, BACKWARD)
                _leaky_epilogue(out_desc, aux_desc, right, om, on + BLOCK_N // 2, BACKWARD)
            else:
                _leaky_epilogue(out_desc, aux_desc, acc, om, on, BACKWARD)


# The Hopper kernel's launch (None: the portable kernel): the fastest of tools/bench_kernels.py's
# sweep at the record MLP's shapes on an H100.
TMA_CONFIG: dict | None = {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8, "num_stages": 3,
                           "num_warps": 8, "WARP_SPECIALIZE": True, "EPILOGUE_SUBTILE": True}


def _mm_leaky_tma(a: torch.Tensor, b_nk: torch.Tensor, out: torch.Tensor, aux: torch.Tensor, backward: bool,
                  config: dict) -> None:
    """The Hopper launch for contiguous A [M, K], B as [N, K], out and aux [M, N]."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    (M, K), N = a.shape, b_nk.shape[0]
    bm, bn, bk = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    bn_out = bn // 2 if config["EPILOGUE_SUBTILE"] else bn
    sms = torch.cuda.get_device_properties(a.device).multi_processor_count if a.is_cuda else 4  # 4: interpreter
    descs = (TensorDescriptor.from_tensor(a, [bm, bk]), TensorDescriptor.from_tensor(b_nk, [bn, bk]),
             TensorDescriptor.from_tensor(out, [bm, bn_out]), TensorDescriptor.from_tensor(aux, [bm, bn_out]))
    grid = (min(sms, triton.cdiv(M, bm) * triton.cdiv(N, bn)),)
    _mm_leaky_tma_kernel[grid](*descs, M, N, K, BACKWARD=backward, NUM_SMS=sms, **config)


def _use_tma(t: torch.Tensor) -> bool:
    return TMA_CONFIG is not None and t.is_cuda and torch.cuda.get_device_capability(t.device)[0] >= 9


def _mm_leaky(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, aux: torch.Tensor, backward: bool) -> None:
    """Launch for A [M, K] and B [K, N] (any strides); out and aux are contiguous [M, N]."""
    (M, K), N = a.shape, b.shape[1]
    args = (a, b, out, aux, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0),
            out.stride(1))
    if _INTERPRET:  # the CPU interpreter: one small config, no autotuning; its bf16 dot is wrong, so fp32
        _mm_leaky_kernel[(triton.cdiv(M, 32) * triton.cdiv(N, 32),)](
            *args, BACKWARD=backward, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, DOT_FP32=True)
        return

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    _mm_leaky_tuned[grid](*args, BACKWARD=backward)


# Custom ops: torch.compile (the training blocks) treats each as one opaque call, whatever the
# device, instead of tracing into Triton launches. The forward also returns h and a, the tensors
# its backward needs.
@torch.library.custom_op("golf::leaky_relu2_mlp_fwd", mutates_args=())
def _mlp_fwd(x: torch.Tensor, w_fc: torch.Tensor, w_proj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor]:
    h = x.new_empty(x.shape[0], w_fc.shape[0])
    a = torch.empty_like(h)
    if _use_tma(x):
        _mm_leaky_tma(x, w_fc, h, a, False, TMA_CONFIG)
    else:
        _mm_leaky(x, w_fc.t(), h, a, backward=False)
    return a @ w_proj.t(), h, a


@_mlp_fwd.register_fake
def _(x, w_fc, w_proj):
    h = x.new_empty(x.shape[0], w_fc.shape[0])
    return x.new_empty(x.shape[0], w_proj.shape[0]), h, torch.empty_like(h)


@torch.library.custom_op("golf::leaky_relu2_mlp_bwd", mutates_args=())
def _mlp_bwd(grad_y: torch.Tensor, x: torch.Tensor, w_fc: torch.Tensor, w_proj: torch.Tensor, h: torch.Tensor,
             a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_h = torch.empty_like(h)
    if _use_tma(grad_y):
        _mm_leaky_tma(grad_y, w_proj.t().contiguous(), grad_h, h, True, TMA_CONFIG)
    else:
        _mm_leaky(grad_y, w_proj, grad_h, h, backward=True)
    return grad_h @ w_fc, grad_h.t() @ x, grad_y.t() @ a


@_mlp_bwd.register_fake
def _(grad_y, x, w_fc, w_proj, h, a):
    return torch.empty_like(x), torch.empty_like(w_fc), torch.empty_like(w_proj)


def _mlp_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs, *output[1:])


def _mlp_backward(ctx, grad_y, _grad_h, _grad_a):
    x, w_fc, w_proj, h, a = ctx.saved_tensors
    return _mlp_bwd(grad_y.to(h.dtype).contiguous(), x, w_fc, w_proj, h, a)


_mlp_fwd.register_autograd(_mlp_backward, setup_context=_mlp_setup_context)


def leaky_relu2_mlp_triton(x: torch.Tensor, w_fc: torch.Tensor, w_proj: torch.Tensor) -> torch.Tensor:
    """The Triton path regardless of device (CPU tensors need TRITON_INTERPRET=1)."""
    if triton is None:
        raise RuntimeError("leaky_relu2_mlp_triton: triton is not installed")
    if not (x.dtype == w_fc.dtype == w_proj.dtype):
        raise ValueError(f"leaky_relu2_mlp: x {x.dtype}, w_fc {w_fc.dtype}, w_proj {w_proj.dtype} must match")
    y, _, _ = _mlp_fwd(x.reshape(-1, x.shape[-1]).contiguous(), w_fc.contiguous(), w_proj.contiguous())
    return y.view(*x.shape[:-1], w_proj.shape[0])


def leaky_relu2_mlp(x: torch.Tensor, w_fc: torch.Tensor, w_proj: torch.Tensor) -> torch.Tensor:
    """leaky(x·W_fcᵀ, 0.5)²·W_projᵀ: the fused kernels for 16-bit CUDA tensors, else the reference."""
    if x.is_cuda and triton is not None and x.dtype in (torch.bfloat16, torch.float16):
        return leaky_relu2_mlp_triton(x, w_fc, w_proj)
    return leaky_relu2_mlp_reference(x, w_fc, w_proj)
