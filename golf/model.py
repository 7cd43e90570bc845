"""The GPT: the April-2026 record architecture with every technique behind a `ModelConfig` switch.

Notable:
- Tied embedding head as a real module: `lm_head` is a `CastedLinear` whose weight *is*
  `tok_emb.weight`, so LoRA hooks and GPTQ treat the head like any other linear.
- Weights stay fp32 and are cast to the activation dtype in `CastedLinear`; the residual stream
  stays fp32 under bf16 autocast (the official baseline's arrangement) unless `stream_dtype` is
  bfloat16 (the record preset). Logits are fp32; with `fused_ce` the training loss never
  materializes them (golf.kernels.softcap_ce reads the bf16 head output).
- Depth recurrence is a plain python list of layer indices (`layer_order()`); `set_looping`
  swaps it, and torch.compile keeps one graph per order. A new model starts with looping ON
  (the graph the finished model is evaluated with); the trainer switches it off for the early
  part of training.
- U-Net skips run over the *virtual* layer sequence: its first half pushes, its second half pops.
  The skip parameters are sized for the longest (looped) sequence; shorter orders use a prefix.
- BOS (id 1) starts a document: SmearGate is masked there and the BigramHash treats a BOS like
  position 0, so nothing of a previous document reaches a document's first position.
- Attention backend: FlashAttention 3, then 2, then torch SDPA (`attn_backend` forces one);
  CPU tensors always take SDPA. XSA and the output gate run on the [B, T, H, D] output, no
  loops over heads.
- Speed switches compute the same function: `fused_qk_rope` / `fused_xsa` run the q/k prologue
  and XSA as golf.kernels.attention_ops custom ops (Triton on CUDA), and `scales_in_weights`
  applies attn_scale / mlp_scale to the output projections' weight rows.
"""

from __future__ import annotations

import contextlib
import math
from functools import partial
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from golf.config import ATTN_BACKENDS, ConfigError, GolfError, ModelConfig
from golf.data import BOS_ID
from golf.kernels.attention_ops import qk_norm_rope, xsa
from golf.kernels.softcap_ce import softcap_cross_entropy

try:  # FlashAttention 3 (Hopper build)
    from flash_attn_interface import flash_attn_func as _fa3_attn_func
except (ImportError, OSError):
    _fa3_attn_func = None
try:
    from flash_attn import flash_attn_func as _fa2_attn_func
except (ImportError, OSError):
    _fa2_attn_func = None

GATE_INPUT_DIMS = 12  # SmearGate and the attention output gate read x[:12] (the April-2026 records)
ROPE_INITIAL_LEN = 2048  # rotary tables start at the record's sequence length and grow on demand


class AttnBackendError(GolfError):
    """A forced attention backend that cannot run here."""


def quant_class(name: str) -> str:
    """The quantization class of a parameter, by its name: embedding | attention | mlp | other."""
    if ".attn." in name:
        return "attention"
    if ".mlp." in name:
        return "mlp"
    if name.startswith(("tok_emb", "lm_head")) or ".tok_emb" in name or ".lm_head" in name:
        return "embedding"
    return "other"


class CastedLinear(nn.Linear):
    """Bias-free linear with fp32 master weights cast to the input dtype (bf16 under autocast).

    `lora`, when set (LoRA TTT), holds per-batch-row adapters (A [B, in, r], B [B, r, out]) added
    as x·A·B; a plain attribute, so it is neither a parameter nor in the state dict."""

    def __init__(self, in_features: int, out_features: int, zero_init: bool = False):
        super().__init__(in_features, out_features, bias=False)
        if zero_init:  # output projections start at zero, as in the official baseline
            nn.init.zeros_(self.weight)
        self.lora: tuple[Tensor, Tensor] | None = None

    def forward(self, x: Tensor, out_scale: Tensor | None = None) -> Tensor:
        """x·Wᵀ, each output channel times `out_scale` when given: folded into the weight, whose
        gradient then carries the scale's, so no pass over the activations sums it."""
        weight = self.weight if out_scale is None else self.weight * out_scale[:, None]
        y = F.linear(x, weight.to(x.dtype))
        if self.lora is not None:
            a, b = self.lora
            lora = torch.bmm(torch.bmm(x, a.to(x.dtype)), b.to(x.dtype))
            y = y + (lora if out_scale is None else lora * out_scale.to(x.dtype)).to(y.dtype)
        return y


def resolve_attn_backend(choice: str) -> str:
    """`auto` → fa3 | fa2 | sdpa, the first that can run; a forced backend must be available.

    On an H100 with torch 2.11, SDPA itself dispatches causal GQA attention to cuDNN's sm90 flash
    kernels (docs/benchmarks.md), so the fallback is a fast one."""
    cuda = torch.cuda.is_available()
    available = {"fa3": cuda and _fa3_attn_func is not None,
                 "fa2": cuda and _fa2_attn_func is not None, "sdpa": True}
    if choice == "auto":
        return next(name for name, ok in available.items() if ok)
    if choice not in available:
        raise ConfigError(f"attn_backend must be {'|'.join(ATTN_BACKENDS)}, got {choice!r}")
    if not available[choice]:
        module = "flash_attn_interface" if choice == "fa3" else "flash_attn"
        raise AttnBackendError(f"attn_backend={choice} needs CUDA and an importable {module}")
    return choice


def causal_attention(q: Tensor, k: Tensor, v: Tensor, backend: str) -> Tensor:
    """Causal GQA attention on [B, T, H, D] q and [B, T, Hkv, D] k/v; returns [B, T, H, D].

    Query head h reads kv head h // (H / Hkv) in every backend. FlashAttention needs CUDA and
    16-bit inputs: it runs in v's dtype (the linears' compute dtype: bf16 under autocast, while
    the normed q/k may have been promoted to fp32), or bf16 for an fp32 model, and returns v's
    dtype. CPU tensors always use SDPA.
    """
    if backend != "sdpa" and q.is_cuda:
        half = v.dtype if v.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
        fn = _fa3_attn_func if backend == "fa3" else _fa2_attn_func
        y = fn(q.to(half), k.to(half), v.to(half), causal=True)
        if isinstance(y, tuple):  # some FA3 builds also return the log-sum-exp
            y = y[0]
        return y.to(v.dtype)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=True, enable_gqa=k.size(2) != q.size(2))
    return y.transpose(1, 2)


class RotaryCache(nn.Module):
    """cos/sin tables for the rotated dims of a head, cached as non-persistent buffers."""

    def __init__(self, rot_dims: int, base: float):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, rot_dims, 2, dtype=torch.float32) / rot_dims))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("cos_cached", torch.empty(0), persistent=False)
        self.register_buffer("sin_cached", torch.empty(0), persistent=False)
        self._grow(ROPE_INITIAL_LEN)

    def _grow(self, length: int) -> None:
        t = torch.arange(length, dtype=torch.float32, device=self.inv_freq.device)
        freqs = torch.outer(t, self.inv_freq.float())
        self.cos_cached, self.sin_cached = freqs.cos(), freqs.sin()

    def forward(self, seq_len: int) -> tuple[Tensor, Tensor]:
        if seq_len > self.cos_cached.size(0):  # a python int: compile guards on it, no host sync
            self._grow(max(seq_len, 2 * self.cos_cached.size(0)))
        return self.cos_cached[:seq_len], self.sin_cached[:seq_len]


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first 2·cos.size(-1) dims of each head of x [B, T, H, D] (half-split pairs)."""
    rot = 2 * cos.size(-1)
    cos, sin = cos.to(x.dtype)[None, :, None, :], sin.to(x.dtype)[None, :, None, :]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)
    return rotated if x_pass.size(-1) == 0 else torch.cat((rotated, x_pass), dim=-1)


def qk_prologue(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, gain: Tensor | None,
                qk_norm: bool = True) -> tuple[Tensor, Tensor]:
    """q [B, T, H, D], k [B, T, Hkv, D] → per-head RMS norm (with qk_norm), partial RoPE, and the
    per-head q gain (when given): the formulas golf.kernels.attention_ops.qk_norm_rope fuses."""
    if qk_norm:
        q, k = F.rms_norm(q, (q.size(-1),)), F.rms_norm(k, (k.size(-1),))
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    return (q if gain is None else q * gain.to(q.dtype)[:, None]), k


def xsa_project(y: Tensor, v: Tensor) -> Tensor:
    """XSA: y − (y·v̂)v̂ per position and head, v̂ the head's own normalized value vector.

    y [B, T, H, D], v [B, T, Hkv, D]; the [Hkv, group] view pairs each query head with its kv
    head (the GQA mapping of `causal_attention`) without materializing the repeated v.
    """
    bsz, seq, h, hd = y.shape
    yg = y.reshape(bsz, seq, v.size(2), h // v.size(2), hd)
    vn = F.normalize(v, dim=-1).unsqueeze(3).to(yg.dtype)
    return (yg - (yg * vn).sum(-1, keepdim=True) * vn).view(bsz, seq, h, hd)


class GPTAttention(nn.Module):
    """GQA self-attention: qk RMS-norm → partial RoPE → per-head q gain, XSA, output gate."""

    def __init__(self, cfg: ModelConfig, backend: str):
        super().__init__()
        d, self.num_heads, self.num_kv_heads = cfg.model_dim, cfg.num_heads, cfg.num_kv_heads
        self.head_dim = d // cfg.num_heads
        kv_dim = self.num_kv_heads * self.head_dim
        self.backend, self.qk_norm, self.xsa = backend, cfg.qk_norm, cfg.xsa
        self.fused_qk_rope, self.fused_xsa = cfg.fused_qk_rope, cfg.fused_xsa
        self.c_q = CastedLinear(d, d)
        self.c_k = CastedLinear(d, kv_dim)
        self.c_v = CastedLinear(d, kv_dim)
        self.proj = CastedLinear(d, d, zero_init=True)
        # The gain restores the logit scale that qk normalization removes, so it exists only with it.
        self.q_gain = nn.Parameter(torch.full((self.num_heads,), cfg.qk_gain_init)) if cfg.qk_norm else None
        # Output gate 2·σ(W·x[:12]) with W = 0: exactly the identity at init.
        self.out_gate = (nn.Parameter(torch.zeros(self.num_heads, min(GATE_INPUT_DIMS, d)))
                         if cfg.attn_out_gate else None)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, out_scale: Tensor | None = None) -> Tensor:
        bsz, seq, dim = x.shape
        hd, h, hkv = self.head_dim, self.num_heads, self.num_kv_heads
        q = self.c_q(x).view(bsz, seq, h, hd)
        k = self.c_k(x).view(bsz, seq, hkv, hd)
        v = self.c_v(x).view(bsz, seq, hkv, hd)
        if self.fused_qk_rope:
            q, k = qk_norm_rope(q, cos, sin, self.q_gain), qk_norm_rope(k, cos, sin)
        else:
            q, k = qk_prologue(q, k, cos, sin, self.q_gain, self.qk_norm)
        y = causal_attention(q, k, v, self.backend)
        if self.xsa:
            y = xsa(y, v) if self.fused_xsa else xsa_project(y, v)
        if self.out_gate is not None:
            gate = 2.0 * torch.sigmoid(F.linear(x[..., : self.out_gate.size(1)], self.out_gate.to(x.dtype)))
            y = y * gate.unsqueeze(-1).to(y.dtype)
        return self.proj(y.reshape(bsz, seq, dim), out_scale)


class GPTMLP(nn.Module):
    """fc → relu² or LeakyReLU(0.5)² → proj (zero-init)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = int(cfg.mlp_mult * cfg.model_dim)
        self.leaky = cfg.mlp_act == "leaky_relu2"
        self.fc = CastedLinear(cfg.model_dim, hidden)
        self.proj = CastedLinear(hidden, cfg.model_dim, zero_init=True)

    def forward(self, x: Tensor, out_scale: Tensor | None = None) -> Tensor:
        h = self.fc(x)
        h = F.leaky_relu(h, 0.5) if self.leaky else F.relu(h)
        return self.proj(h.square(), out_scale)


class GPTBlock(nn.Module):
    """Pre-norm block: resid mix with x0, attention, MLP; sequential, parallel or two-lane."""

    def __init__(self, cfg: ModelConfig, layer: int, backend: str):
        super().__init__()
        d = cfg.model_dim
        self.dim = d
        self.attn = GPTAttention(cfg, backend)
        self.mlp = GPTMLP(cfg)
        self.attn_scale = nn.Parameter(torch.ones(d))
        self.mlp_scale = nn.Parameter(torch.ones(d))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(d), torch.zeros(d)))) if cfg.resid_mix else None
        # A tensor, not a python float: compiled blocks would otherwise each get their own graph.
        self.register_buffer("ln_factor", torch.tensor(1.0 / math.sqrt(layer + 1)) if cfg.ln_scale else None,
                             persistent=False)
        self.parallel = 0 <= cfg.parallel_from <= layer
        self.two_lane = self.parallel and cfg.parallel_lanes == 2
        # lane_route[lane, (attn, mlp)]: how much of each sublayer's output each lane receives.
        # All ones makes two equal lanes evolve exactly like the single-lane parallel block.
        self.lane_route = nn.Parameter(torch.ones(2, 2)) if self.two_lane else None
        self.scales_in_weights = cfg.scales_in_weights

    def _mix(self, x: Tensor, x0: Tensor) -> Tensor:
        if self.resid_mix is None:
            return x
        mix = self.resid_mix.to(x.dtype)
        return mix[0] * x + mix[1] * x0

    def _norm(self, x: Tensor) -> Tensor:
        n = F.rms_norm(x, (self.dim,))
        return n if self.ln_factor is None else n * self.ln_factor.to(n.dtype)

    def _attn_out(self, n: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        if self.scales_in_weights:
            return self.attn(n, cos, sin, self.attn_scale)
        return self.attn_scale.to(n.dtype) * self.attn(n, cos, sin)

    def _mlp_out(self, n: Tensor) -> Tensor:
        if self.scales_in_weights:
            return self.mlp(n, self.mlp_scale)
        return self.mlp_scale.to(n.dtype) * self.mlp(n)

    @staticmethod
    def _skip(x: Tensor, skip: tuple[Tensor, Tensor, Tensor] | None) -> Tensor:
        """U-Net skip x + σ(gate)·weight·encoder_output, inside the block so a compiled block fuses it."""
        if skip is None:
            return x
        encoder_out, gate, weight = skip
        return x + (torch.sigmoid(gate) * weight).to(x.dtype) * encoder_out

    def forward(self, x: Tensor, x0: Tensor, cos: Tensor, sin: Tensor,
                skip: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
        x = self._mix(self._skip(x, skip), x0)
        if self.parallel:  # GPT-J: attention and MLP read the same normed input
            n = self._norm(x)
            return x + self._attn_out(n, cos, sin) + self._mlp_out(n)
        x = x + self._attn_out(self._norm(x), cos, sin)
        return x + self._mlp_out(self._norm(x))

    def forward_lanes(self, a: Tensor, b: Tensor, x0: Tensor, cos: Tensor, sin: Tensor,
                      skip: tuple[Tensor, Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """Two-lane parallel block (modded-nanogpt #230, parameter-golf #1518/#1529):
        A = attn_scale·attn(n(a)), M = mlp_scale·mlp(n(b)),
        a' = a + r00·A + r01·M,  b' = b + r10·A + r11·M, with r = lane_route (init all ones).
        A U-Net skip reaches both lanes."""
        a, b = self._mix(self._skip(a, skip), x0), self._mix(self._skip(b, skip), x0)
        out_attn, out_mlp = self._attn_out(self._norm(a), cos, sin), self._mlp_out(self._norm(b))
        r = self.lane_route.to(a.dtype)
        return a + r[0, 0] * out_attn + r[0, 1] * out_mlp, b + r[1, 0] * out_attn + r[1, 1] * out_mlp


class BigramHash(nn.Module):
    """Hashed (previous, current) token-pair embedding, projected to model_dim (PR #135)."""

    def __init__(self, buckets: int, bigram_dim: int, model_dim: int):
        super().__init__()
        self.buckets = buckets
        self.embed = nn.Embedding(buckets, bigram_dim)
        # Small random table with a zero projection: the sum starts at 0 but both still get
        # gradients (a zero table with a zero projection is a fixed point that never trains).
        nn.init.normal_(self.embed.weight, std=0.02)
        self.proj = CastedLinear(bigram_dim, model_dim, zero_init=True)
        self.scale = nn.Parameter(torch.tensor(0.05))

    def bucket_ids(self, ids: Tensor) -> Tensor:
        """(36313·t_i XOR 27191·t_{i-1}) mod (B-1); position 0 and BOS positions → B-1."""
        last = self.buckets - 1
        cur = ids[:, 1:]
        h = torch.bitwise_xor(36313 * cur, 27191 * ids[:, :-1]) % last
        h = torch.where(cur == BOS_ID, last, h)
        return F.pad(h, (1, 0), value=last)

    def forward(self, ids: Tensor) -> Tensor:
        return self.scale * self.proj(self.embed(self.bucket_ids(ids)))


def virtual_layer_order(cfg: ModelConfig, looping: bool) -> list[int]:
    """0..L-1, with loop_start..loop_end repeated to num_loops passes in total when looping."""
    if not looping or cfg.num_loops <= 1:
        return list(range(cfg.num_layers))
    loop = list(range(cfg.loop_start, cfg.loop_end + 1))
    return list(range(cfg.loop_start)) + loop * cfg.num_loops + list(range(cfg.loop_end + 1, cfg.num_layers))


class GPT(nn.Module):
    """Decoder-only LM built from a `ModelConfig`; see the module docstring for the techniques."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d, vocab = cfg.model_dim, cfg.vocab_size
        self.attn_backend_name = resolve_attn_backend(cfg.attn_backend)
        self.tok_emb = nn.Embedding(vocab, d)
        self.bigram = BigramHash(cfg.bigram_buckets, cfg.bigram_dim, d) if cfg.bigram_buckets > 0 else None
        if cfg.smear_gate:  # x_t += λ·σ(W·x_t[:12])·x_{t-1}; W = 0 and λ = 0: off at init
            self.smear_gate = nn.Parameter(torch.zeros(1, min(GATE_INPUT_DIMS, d)))
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.blocks = nn.ModuleList(GPTBlock(cfg, i, self.attn_backend_name) for i in range(cfg.num_layers))
        self.rotary = RotaryCache(cfg.rope_dims or d // cfg.num_heads, cfg.rope_base)
        self.looping = cfg.num_loops > 1
        self._order = virtual_layer_order(cfg, self.looping)
        longest = len(virtual_layer_order(cfg, True))
        if cfg.unet_skips:  # encoder half pushes, decoder half pops: longest // 2 skips at most
            self.skip_weights = nn.Parameter(torch.ones(longest // 2, d))
            self.skip_gates = nn.Parameter(torch.zeros(longest // 2, d))
        self.lm_head = CastedLinear(d, vocab)
        if cfg.tie_embeddings:
            nn.init.normal_(self.tok_emb.weight, std=cfg.tied_embed_init_std)
            self.lm_head.weight = self.tok_emb.weight
        else:  # the official baseline: untied head starts at zero, embedding keeps N(0, 1)
            nn.init.zeros_(self.lm_head.weight)
        self.compile_blocks(False)

    # ------------------------------------------------------------------ regional compilation

    def compile_blocks(self, enable: bool = True, dynamic: bool | None = False,
                       options: dict | None = None) -> None:
        """Compile each block, and the head with its loss, as separate regions (or go back to eager).

        Identical blocks share a graph (their weights are graph inputs), so the record model
        compiles a few small graphs (embedding; sequential and parallel blocks, each with and
        without a U-Net skip; head) instead of one unrolled graph per layer order, and switching
        depth recurrence on costs no compile.
        Compiled regions bypass module hooks: switch it off before hooking modules (GPTQ).
        `options` go to inductor (training may tune its kernels; evaluation keeps the defaults)."""
        if not enable:
            self._compiled = None
            return
        # Training, scoring and each TTT mode add graphs to the same functions' caches.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
        # Functions, not per-module wrappers: one dynamo cache per code object, shared by all blocks,
        # and a deepcopy of the model (TTT) keeps calling them with its own blocks.
        self._compiled = {
            "block": torch.compile(GPTBlock.forward, dynamic=dynamic, options=options),
            "lanes": torch.compile(GPTBlock.forward_lanes, dynamic=dynamic, options=options),
            "embed": torch.compile(GPT.embed, dynamic=dynamic, options=options),
            "head_loss": torch.compile(GPT.head_loss, dynamic=dynamic, options=options),
        }

    @contextlib.contextmanager
    def blocks_compiled(self, enable: bool = True, dynamic: bool | None = None) -> Iterator["GPT"]:
        """`compile_blocks` for the duration of a with-block; the previous state comes back after."""
        previous = self._compiled
        self.compile_blocks(enable, dynamic)
        try:
            yield self
        finally:
            self._compiled = previous

    # ------------------------------------------------------------------ recurrence

    def set_looping(self, flag: bool) -> None:
        """Run loop_start..loop_end num_loops times (no-op order change when num_loops == 1)."""
        self.looping = bool(flag) and self.cfg.num_loops > 1
        self._order = virtual_layer_order(self.cfg, self.looping)

    def layer_order(self) -> list[int]:
        return list(self._order)

    # ------------------------------------------------------------------ forward

    def embed(self, ids: Tensor) -> Tensor:
        """x0: (token + bigram) embedding, RMS-normed, then SmearGate (masked at BOS)."""
        x = self.tok_emb(ids)
        if self.bigram is not None:
            x = x + self.bigram(ids)
        x = F.rms_norm(x, (x.size(-1),))
        if self.cfg.smear_gate:
            prev = F.pad(x[:, :-1], (0, 0, 1, 0))
            gate = torch.sigmoid(F.linear(x[..., : self.smear_gate.size(1)], self.smear_gate))
            keep = (ids != BOS_ID).unsqueeze(-1).to(x.dtype)  # no leak into a new document
            x = x + self.smear_lambda * gate * keep * prev
        if self.cfg.stream_dtype == "bfloat16" and torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.bfloat16)  # the whole residual stream follows x0's dtype
        return x

    def hidden(self, ids: Tensor) -> Tensor:
        """Final RMS-normed hidden states [B, T, D]: exactly what `lm_head` sees."""
        compiled = self._compiled
        x0 = self.embed(ids) if compiled is None else compiled["embed"](self, ids)
        cos, sin = self.rotary(ids.size(1))
        order, n_enc = self._order, len(self._order) // 2
        # Compiled blocks guard on argument identity (x is x0, or a skip that is x, would each add
        # a graph): views of the same data are distinct objects and cost no copy.
        x, lane_b, skips = x0.view_as(x0), None, []
        for pos, i in enumerate(order):
            block, skip = self.blocks[i], None
            if self.cfg.unet_skips and n_enc <= pos < 2 * n_enc:
                j = pos - n_enc
                skip = (skips.pop(), self.skip_gates[j], self.skip_weights[j])
            if block.two_lane:
                lanes = block.forward_lanes if compiled is None else partial(compiled["lanes"], block)
                x, lane_b = lanes(x, x if lane_b is None else lane_b, x0, cos, sin, skip)
            else:
                if lane_b is not None:  # a single-lane block after two-lane ones: merge the lanes
                    x, lane_b = 0.5 * (x + lane_b), None
                run = block if compiled is None else partial(compiled["block"], block)
                x = run(x, x0, cos, sin, skip)
            if self.cfg.unet_skips and pos < n_enc:
                skips.append(x.view_as(x) if lane_b is None else 0.5 * (x + lane_b))
        if lane_b is not None:
            x = 0.5 * (x + lane_b)
        return F.rms_norm(x, (x.size(-1),))

    def logits(self, h: Tensor) -> Tensor:
        """Head on hidden states: float32 logits, softcapped as cap·tanh(z/cap) when logit_softcap > 0."""
        logits = self.lm_head(h).float()
        cap = self.cfg.logit_softcap
        return cap * torch.tanh(logits / cap) if cap > 0 else logits

    def forward(self, ids: Tensor) -> Tensor:
        """Logits [B, T, V] in float32."""
        return self.logits(self.hidden(ids))

    def head_loss(self, h: Tensor, targets: Tensor) -> Tensor:
        """Mean token cross entropy in nats (float32) of the head on hidden states `h`."""
        logits = self.logits(h)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))

    def loss(self, ids: Tensor, targets: Tensor) -> Tensor:
        """Mean token cross entropy in nats (float32)."""
        h = self.hidden(ids)
        if self.cfg.fused_ce:  # the Triton kernel on CUDA: no fp32 [N, V] logits in memory
            return softcap_cross_entropy(self.lm_head(h), targets, self.cfg.logit_softcap)
        head_loss = GPT.head_loss if self._compiled is None else self._compiled["head_loss"]
        return head_loss(self, h, targets)

    # ------------------------------------------------------------------ accounting

    def num_params(self) -> int:
        """Distinct parameters (the tied head counted once)."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token for the current layer order (PaLM / nanoGPT convention).

        6 · (matmul weights touched per token: q/k/v/o + MLP per *virtual* layer, the head, the
        bigram projection) + 6 · 2 · seq_len · d per virtual layer for QKᵀ and AV (forward 4·T·d,
        ×3 for fwd+bwd, not halved for causality). Embedding lookups, norms and gates are ignored.
        """
        per_block = [sum(m.weight.numel() for m in (b.attn.c_q, b.attn.c_k, b.attn.c_v, b.attn.proj,
                                                    b.mlp.fc, b.mlp.proj)) for b in self.blocks]
        matmul = sum(per_block[i] for i in self._order) + self.lm_head.weight.numel()
        if self.bigram is not None:
            matmul += self.bigram.proj.weight.numel()
        return 6.0 * matmul + 12.0 * seq_len * self.cfg.model_dim * len(self._order)
