"""One config tree for the whole pipeline: data → model → train → quant → eval → ttt.

Notable:
- Every field name is unique across the tree, so each field has exactly one UPPER_SNAKE
  environment override (`NUM_LAYERS=9`, `MATRIX_LR=0.02`), using the official baseline's
  names where they exist.
- Presets are plain functions (`tiny`, `baseline`, `record`) that derive from one another.
- `validate()` turns every out-of-range value into a one-line `ConfigError`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ATTN_BACKENDS = ("auto", "fa3", "fa2", "sdpa")
COMPILE_MODES = ("default", "coordinate-descent")


class GolfError(Exception):
    """Base of every user-facing error: the CLI prints it as one line and exits with `exit_code`."""

    exit_code = 2


class ConfigError(GolfError, ValueError):
    """A config value that does not parse or is out of range."""


@dataclass
class DataConfig:
    data_path: str = "data/datasets/fineweb10B_sp1024"  # folder of fineweb_{train,val}_*.bin
    train_files: str = "fineweb_train_*.bin"  # glob inside data_path (or absolute)
    val_files: str = "fineweb_val_*.bin"
    tokenizer_path: str = "data/tokenizers/fineweb_1024_bpe.model"
    val_max_tokens: int = 0  # 0 = the whole validation split
    doc_packed: bool = False  # training windows start at a BOS (document-aligned)


@dataclass
class ModelConfig:
    vocab_size: int = 1024
    num_layers: int = 9
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: float = 2.0
    mlp_act: str = "relu2"  # relu2 | leaky_relu2 (LeakyReLU(0.5)^2)
    tie_embeddings: bool = True
    tied_embed_init_std: float = 0.005
    logit_softcap: float = 30.0
    rope_base: float = 10000.0
    rope_dims: int = 0  # rotate the first rope_dims of each head; 0 = all head dims
    qk_norm: bool = True
    qk_gain_init: float = 1.5
    ln_scale: bool = False  # scale a sublayer's normed input by 1/sqrt(layer+1)
    resid_mix: bool = True  # learned mix of the stream with the embedding x0
    xsa: bool = False  # remove each head's component along its own value vector
    num_loops: int = 1  # passes through layers [loop_start, loop_end]; 1 = no recurrence
    loop_start: int = 3
    loop_end: int = 5
    loop_enable_frac: float = 0.35  # fraction of the wallclock after which looping starts
    unet_skips: bool = True
    parallel_from: int = -1  # GPT-J parallel residual from this layer on; -1 = off
    parallel_lanes: int = 1  # 1 = single lane, 2 = two lanes with learned 2x2 routing
    bigram_buckets: int = 0  # BigramHash table rows; 0 = off
    bigram_dim: int = 128
    smear_gate: bool = False
    attn_out_gate: bool = False
    attn_backend: str = "auto"  # auto | fa3 | fa2 | sdpa
    # float32 | bfloat16: the residual stream's dtype under autocast; bf16 halves the memory
    # traffic of the elementwise work between matmuls (the April-2026 records' bf16 model)
    stream_dtype: str = "float32"
    # training loss through golf.kernels.softcap_ce (Triton on CUDA, the torch reference elsewhere)
    fused_ce: bool = False
    # q/k RMS norm, partial RoPE and q gain as one op (golf.kernels.attention_ops; needs qk_norm)
    fused_qk_rope: bool = False
    fused_xsa: bool = False  # XSA as one op (golf.kernels.attention_ops; needs xsa)
    # attn_scale / mlp_scale applied to the output projections' weights instead of their outputs
    scales_in_weights: bool = False


@dataclass
class TrainConfig:
    seed: int = 1337
    iterations: int = 20000
    max_wallclock_seconds: float = 600.0  # 0 = no cap
    gptq_reserve_seconds: float = 0.0  # taken off the cap for GPTQ calibration
    train_seq_len: int = 1024
    train_batch_tokens: int = 524_288  # global tokens per optimizer step
    grad_accum_steps: int = 0  # 0 = choose so one micro-batch is <= micro_batch_tokens
    micro_batch_tokens: int = 131_072  # per rank per micro-step
    warmup_steps: int = 20  # compile warmup before the timer; state is reset after
    warmdown_frac: float = 0.5  # final fraction of progress with linear LR decay
    lr_floor: float = 0.0  # LR multiplier at the end of warmdown
    matrix_lr: float = 0.04
    tied_embed_lr: float = 0.05
    embed_lr: float = 0.6  # untied input embedding
    head_lr: float = 0.008  # untied output head
    scalar_lr: float = 0.04
    muon_momentum: float = 0.95
    muon_momentum_warmup_start: float = 0.85
    muon_momentum_warmup_steps: int = 500
    muon_backend_steps: int = 5
    muon_coeffs: str = "classic"  # classic | polar
    muon_row_norm: bool = False  # MuonEq-R: row-normalize before orthogonalizing
    muon_wd: float = 0.0
    adam_wd: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip_norm: float = 0.0  # 0 = off
    ema_decay: float = 0.0  # 0 = off; export uses the EMA weights when on
    # > 0: from this fraction of progress on, the forward sees every weight GPTQ will quantize
    # rounded to its class's SDClip grid, with a straight-through gradient (late QAT)
    qat_start_frac: float = 0.0
    qat_k_scale: float = 1.115  # × the class clip k: where the scale fitter lands with class k on 300 s record models
    train_log_every: int = 50
    compile: bool = True
    profile_step: int = 0  # > 0: profile this timed step on rank 0: top CUDA kernels logged, trace in out_dir
    compile_scope: str = "blocks"  # blocks: each block and the head on their own (fast start) | model
    # default | coordinate-descent (inductor tunes each generated kernel's block sizes: slower start).
    # max-autotune was measured: cuBLAS beat every Triton matmul template, after > 4 min of tuning
    compile_mode: str = "default"
    amp_dtype: str = "bfloat16"  # bfloat16 | float32
    out_dir: str = "runs/latest"
    checkpoint_every_seconds: float = 0.0  # 0 = only on SIGTERM
    resume: bool = False  # continue from out_dir/checkpoint_rank*.pt


@dataclass
class QuantConfig:
    gptq: bool = True
    gptq_calib_batches: int = 32
    gptq_calib_seqs: int = 8  # sequences per calibration batch
    gptq_block_size: int = 128
    gptq_damp: float = 0.01
    gptq_act_order: bool = True
    # > 0: a step factor per column, (c_j / geometric mean)^(−alpha/2) with c_j GPTQ's weight of
    # column j's error, stored as one int8 exponent per column; 0 = one step per row
    gptq_col_alpha: float = 0.0
    attn_bits: int = 6
    mlp_bits: int = 6
    embed_bits: int = 8
    other_bits: int = 6  # matrices outside attention/MLP/embedding (bigram tables, ...)
    clip_k_attn: float = 12.5
    clip_k_mlp: float = 11.5
    clip_k_embed: float = 16.0
    clip_k_other: float = 12.5
    passthrough_max_numel: int = 65_536  # smaller tensors are stored as fp16
    lqer_rank: int = 0  # 0 = off
    lqer_tensors: int = 3
    lqer_bits: int = 4
    codec: str = "auto"  # auto | brotli | lzma | zstd
    # class: each class's clip k | fisher: a k per tensor from the calibration Fisher | fisher_rows:
    # a k per row (free: row scales are stored anyway)
    clip_alloc: str = "class"
    fisher_seqs: int = 32  # training windows (one backward each) behind the Fisher
    # a Fisher-allocated k stays within ×/÷ this of its class k. Per tensor, 1.5 beat 2 by 0.0011
    # BPB and 1.25 by 0.0009 on 300 s record models; per row, 2.5 beat 1.5 by 0.0008 on a 240 s
    # one (the record preset's; docs/benchmarks.md)
    fisher_k_range: float = 1.5
    fit_mode: str = "ladder"  # ladder: clip k +1 steps, then bits | scale: one k factor searched to the target
    size_cap_bytes: int = 16_000_000
    size_margin_bytes: int = 2_000

    def quantizes(self, t) -> bool:
        """Whether golf.quant rounds tensor t (a float matrix of more than passthrough_max_numel
        values); everything else is stored as it is."""
        return t.is_floating_point() and t.dim() == 2 and t.numel() > self.passthrough_max_numel

    def class_bits_k(self, klass: str) -> tuple[int, float]:
        """(bits, clip k) of a tensor class: embedding | attention | mlp | other."""
        return {"embedding": (self.embed_bits, self.clip_k_embed),
                "attention": (self.attn_bits, self.clip_k_attn),
                "mlp": (self.mlp_bits, self.clip_k_mlp),
                "other": (self.other_bits, self.clip_k_other)}[klass]


@dataclass
class EvalConfig:
    eval_seq_len: int = 1024
    eval_stride: int = 0  # 0 = non-overlapping windows; >0 = sliding window
    # with TTT on, `golf run` also scores sliding windows without it first: a diagnostic that
    # costs ~200 s on 8 GPUs for the record model, which LoRA TTT (~480 s) cannot spare
    sliding_with_ttt: bool = True
    eval_batch_seqs: int = 32
    eval_compile: bool = True  # on CUDA, score and run TTT with compiled blocks (dynamic shapes)


@dataclass
class TTTConfig:
    ttt_mode: str = "none"  # none | sgd | lora
    ttt_chunk_tokens: int = 32_768
    ttt_lr: float = 0.005
    ttt_momentum: float = 0.9
    ttt_epochs: int = 3
    ttt_grad_clip: float = 1.0
    lora_rank: int = 96
    lora_slots: int = 32  # documents adapted side by side (one batch row each)
    lora_lr: float = 3e-4  # best of 1e-4, 3e-4, 1e-3 on the proxy (docs/benchmarks.md); 3e-3 hurts
    lora_chunk_tokens: int = 48
    # window of a LoRA step (context + chunk), at most eval_seq_len; 0 = eval_seq_len. A step's
    # cost grows with it, and a long document's steps run at the full window
    lora_context: int = 0
    lora_phases: int = 0  # phased global SGD pauses over already-scored docs; 0 = off
    lora_phase_docs: int = 2500
    # Seconds after evaluation starts (compiling included; in `golf run`, its first evaluation
    # stage) when TTT stops adapting: every target not yet scored is then scored by the model as
    # it stands, so an evaluation that runs slower than planned still ends in its budget. 0 = never.
    ttt_deadline_s: float = 0.0


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ttt: TTTConfig = field(default_factory=TTTConfig)
    preset: str = "baseline"

    def sections(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "preset"}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        cfg = cls()
        cfg.preset = d.get("preset", cfg.preset)
        for name, section in cfg.sections().items():
            for key, value in d.get(name, {}).items():
                if not hasattr(section, key):
                    raise ConfigError(f"unknown config field {name}.{key}")
                setattr(section, key, value)
        return cfg

    def set(self, key: str, raw: Any) -> None:
        """Set a field by its bare name (`num_layers`) or dotted name (`model.num_layers`)."""
        section, fld = _locate(self, key)
        setattr(section, fld.name, _parse(fld, raw, key))

    def apply_env(self, environ: dict[str, str] | None = None) -> list[str]:
        """Apply UPPER_SNAKE env overrides; returns the names applied."""
        environ = os.environ if environ is None else environ
        applied = []
        for section in self.sections().values():
            for fld in dataclasses.fields(section):
                env_name = fld.name.upper()
                if env_name in environ:
                    setattr(section, fld.name, _parse(fld, environ[env_name], env_name))
                    applied.append(env_name)
        return applied

    def validate(self) -> "Config":
        m, t, q, e, ttt = self.model, self.train, self.quant, self.eval, self.ttt
        _check(m.vocab_size >= 8, "vocab_size must be >= 8")
        _check(m.num_layers >= 1, "num_layers must be >= 1")
        _check(m.model_dim % m.num_heads == 0, "model_dim must be divisible by num_heads")
        head_dim = m.model_dim // m.num_heads
        _check(head_dim % 2 == 0, "head dim (model_dim/num_heads) must be even for RoPE")
        _check(m.num_kv_heads >= 1 and m.num_heads % m.num_kv_heads == 0,
               "num_heads must be a multiple of num_kv_heads")
        _check(0 <= m.rope_dims <= head_dim and m.rope_dims % 2 == 0,
               f"rope_dims must be even and in [0, {head_dim}]")
        _check(m.mlp_mult > 0, "mlp_mult must be > 0")
        _check(m.mlp_act in ("relu2", "leaky_relu2"), "mlp_act must be relu2 or leaky_relu2")
        _check(m.logit_softcap >= 0, "logit_softcap must be >= 0")
        _check(m.num_loops >= 1, "num_loops must be >= 1")
        if m.num_loops > 1:
            _check(0 <= m.loop_start <= m.loop_end < m.num_layers,
                   "loop_start <= loop_end < num_layers is required when num_loops > 1")
        _check(0.0 <= m.loop_enable_frac <= 1.0, "loop_enable_frac must be in [0, 1]")
        _check(m.parallel_from == -1 or 0 <= m.parallel_from < m.num_layers,
               "parallel_from must be -1 or a layer index")
        _check(m.parallel_lanes in (1, 2), "parallel_lanes must be 1 or 2")
        _check(m.bigram_buckets == 0 or m.bigram_buckets >= 2, "bigram_buckets must be 0 or >= 2")
        _check(m.attn_backend in ATTN_BACKENDS, f"attn_backend must be {'|'.join(ATTN_BACKENDS)}")
        _check(m.stream_dtype in ("float32", "bfloat16"), "stream_dtype must be float32|bfloat16")
        _check(m.qk_norm or not m.fused_qk_rope, "fused_qk_rope needs qk_norm")
        _check(m.xsa or not m.fused_xsa, "fused_xsa needs xsa")
        _check(t.train_seq_len >= 2, "train_seq_len must be >= 2")
        _check(t.train_batch_tokens >= t.train_seq_len and t.train_batch_tokens % t.train_seq_len == 0,
               "train_batch_tokens must be a positive multiple of train_seq_len")
        _check(t.iterations >= 0, "iterations must be >= 0")
        _check(t.max_wallclock_seconds >= 0, "max_wallclock_seconds must be >= 0")
        _check(t.gptq_reserve_seconds >= 0 and (t.max_wallclock_seconds == 0
               or t.gptq_reserve_seconds < t.max_wallclock_seconds),
               "gptq_reserve_seconds must be >= 0 and smaller than max_wallclock_seconds")
        _check(0.0 <= t.warmdown_frac <= 1.0, "warmdown_frac must be in [0, 1]")
        _check(0.0 <= t.lr_floor <= 1.0, "lr_floor must be in [0, 1]")
        _check(0.0 <= t.ema_decay < 1.0, "ema_decay must be in [0, 1)")
        _check(0.0 <= t.qat_start_frac <= 1.0 and t.qat_k_scale > 0,
               "qat_start_frac must be in [0, 1] and qat_k_scale > 0")
        _check(t.muon_coeffs in ("classic", "polar"), "muon_coeffs must be classic or polar")
        _check(t.compile_scope in ("blocks", "model"), "compile_scope must be blocks or model")
        _check(t.compile_mode in COMPILE_MODES, f"compile_mode must be {'|'.join(COMPILE_MODES)}")
        _check(t.amp_dtype in ("bfloat16", "float32"), "amp_dtype must be bfloat16 or float32")
        for name in ("attn_bits", "mlp_bits", "embed_bits", "other_bits"):
            _check(2 <= getattr(q, name) <= 8, f"{name} must be in [2, 8]")
        for name in ("clip_k_attn", "clip_k_mlp", "clip_k_embed", "clip_k_other"):
            _check(getattr(q, name) > 0, f"{name} must be > 0")
        _check(q.gptq_block_size >= 1, "gptq_block_size must be >= 1")
        _check(0.0 <= q.gptq_col_alpha <= 2.0, "gptq_col_alpha must be in [0, 2]")
        _check(q.codec in ("auto", "brotli", "lzma", "zstd"), "codec must be auto|brotli|lzma|zstd")
        _check(q.clip_alloc in ("class", "fisher", "fisher_rows"), "clip_alloc must be class|fisher|fisher_rows")
        _check(q.fisher_seqs >= 1 and q.fisher_k_range >= 1.0, "fisher_seqs must be >= 1, fisher_k_range >= 1")
        _check(q.fit_mode in ("ladder", "scale"), "fit_mode must be ladder|scale")
        _check(q.lqer_rank >= 0 and 2 <= q.lqer_bits <= 8, "lqer_rank must be >= 0, lqer_bits in [2, 8]")
        _check(q.size_cap_bytes > 0 and 0 <= q.size_margin_bytes < q.size_cap_bytes,
               "size_cap_bytes must be > 0 and size_margin_bytes smaller than it")
        _check(e.eval_seq_len >= 2, "eval_seq_len must be >= 2")
        _check(0 <= e.eval_stride <= e.eval_seq_len, "eval_stride must be in [0, eval_seq_len]")
        _check(ttt.ttt_mode in ("none", "sgd", "lora"), "ttt_mode must be none|sgd|lora")
        _check(ttt.ttt_deadline_s >= 0, "ttt_deadline_s must be >= 0 (0 = no deadline)")
        _check(ttt.ttt_chunk_tokens >= 1 and ttt.lora_chunk_tokens >= 1, "TTT chunk sizes must be >= 1")
        _check(ttt.lora_rank >= 1 and ttt.lora_slots >= 1, "lora_rank and lora_slots must be >= 1")
        _check(ttt.lora_context >= 0, "lora_context must be >= 0 (0 = eval_seq_len)")
        return self


def lora_window(ttt: TTTConfig, ecfg: EvalConfig) -> int:
    """Tokens a LoRA TTT step sees (context + chunk): lora_context, 0 meaning eval_seq_len, at most that."""
    return min(ttt.lora_context or ecfg.eval_seq_len, ecfg.eval_seq_len)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _locate(cfg: Config, key: str) -> tuple[Any, dataclasses.Field]:
    if "." in key:
        section_name, name = key.split(".", 1)
        section = cfg.sections().get(section_name)
        candidates = [section] if section is not None else []
    else:
        name, candidates = key, list(cfg.sections().values())
    for section in candidates:
        for fld in dataclasses.fields(section):
            if fld.name == name.lower():
                return section, fld
    raise ConfigError(f"unknown config field {key!r}")


def _parse(fld: dataclasses.Field, raw: Any, source: str) -> Any:
    kind = type(fld.default)
    if not isinstance(raw, str):
        if kind is float and isinstance(raw, int) and not isinstance(raw, bool):
            return float(raw)
        if isinstance(raw, kind):
            return raw
        raise ConfigError(f"{source}: expected {kind.__name__}, got {raw!r}")
    text = raw.strip()
    try:
        if kind is bool:
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind is int:
            return int(text.replace("_", ""))
        if kind is float:
            return float(text.replace("_", ""))
        return text
    except ValueError:
        raise ConfigError(f"{source}={raw!r} is not a valid {kind.__name__}") from None


# ----------------------------------------------------------------------------- presets


def baseline() -> Config:
    """The official 9x512 sp1024 baseline (MLP 2x, seq 1024, 524,288 tokens/step)."""
    return Config(preset="baseline")


def record() -> Config:
    """The April-2026 record stack: 11x512, sp8192, recurrence, parallel residuals, GPTQ+SDClip."""
    cfg = baseline()
    cfg.preset = "record"
    cfg.data = DataConfig(data_path="data/datasets/fineweb10B_sp8192",
                          tokenizer_path="data/tokenizers/fineweb_8192_bpe.model")
    cfg.model = ModelConfig(
        vocab_size=8192, num_layers=11, model_dim=512, num_heads=8, num_kv_heads=4, mlp_mult=4.0,
        mlp_act="leaky_relu2", qk_gain_init=5.0, rope_dims=16, ln_scale=True, xsa=True,
        num_loops=3, loop_start=3, loop_end=5, loop_enable_frac=0.35, parallel_from=7,
        stream_dtype="bfloat16",  # +9.5% tokens/s on an H100 (docs/benchmarks.md)
        fused_ce=True,  # +0.7% (docs/benchmarks.md)
        # qk prologue and XSA as Triton ops, attn/mlp scales on the weights: +5.4% looped (docs/benchmarks.md)
        fused_qk_rope=True, fused_xsa=True, scales_in_weights=True,
    )
    cfg.train = TrainConfig(
        # 6 micro-batches of 131,072 tokens: +1.0% over 8 of 98,304, peak 50 GiB instead of 38 on an H100
        train_seq_len=2048, train_batch_tokens=786_432, micro_batch_tokens=131_072,
        gptq_reserve_seconds=12.0, warmup_steps=4, warmdown_frac=0.75, lr_floor=0.0,
        matrix_lr=0.022, tied_embed_lr=0.03, scalar_lr=0.02,
        muon_momentum=0.97, muon_momentum_warmup_start=0.92, muon_momentum_warmup_steps=1500,
        muon_coeffs="polar", muon_row_norm=True, muon_wd=0.095, adam_wd=0.085,
        grad_clip_norm=0.3, ema_decay=0.9965,
        # Late QAT from 30% of the budget: on 300 s record models the quantized BPB fell by 0.016–0.022
        # (from 50%: 0.014–0.017, from 70%: 0.006–0.009), the float model's nearly as much, and the
        # quantization gap was +0.0046 to +0.0059 on three models (docs/benchmarks.md)
        qat_start_frac=0.3,
    )
    # Fisher-allocated clip k per row within ×/÷2.5 of the class k, scaled to land just under the
    # cap. At the same size on a 300 s record model, per row (×/÷1.5) paid +0.0077 BPB, against
    # +0.0089 for a k per tensor and +0.0116 for class k; ×/÷2.5 paid +0.0051 on a 240 s model and
    # +0.0063 to +0.0077 on two 300 s ones, where ×/÷4 paid +0.0102. A step factor per column
    # (gptq_col_alpha 0.5) moved it by −0.0005, −0.0005 and +0.0005 on three more 300 s models:
    # no more than a variant's rounding moves it on one model, so it stays off (docs/benchmarks.md)
    cfg.quant = QuantConfig(attn_bits=6, mlp_bits=6, embed_bits=8, clip_k_attn=12.5, clip_k_mlp=11.5,
                            clip_k_embed=16.0, clip_alloc="fisher_rows", fisher_k_range=2.5, fit_mode="scale")
    # Per-document LoRA TTT with 3 phases of global SGD (the records from #1530 on): -0.144 BPB
    # against sliding windows on the proxy, where chunked SGD gained -0.057; ≈ 476 s on 8 GPUs
    # extrapolated for the full validation set, so the sliding diagnostic (≈ 200 s) is skipped and
    # adapting stops 540 s into the evaluation. Steps see at most 1,024 tokens: 25% less time for
    # +0.004 BPB (docs/benchmarks.md)
    cfg.eval = EvalConfig(eval_seq_len=2048, eval_stride=64, eval_batch_seqs=32, sliding_with_ttt=False)
    cfg.ttt = TTTConfig(ttt_mode="lora", lora_context=1024, lora_phases=3, ttt_deadline_s=540.0)
    return cfg


def tiny() -> Config:
    """The record stack shrunk to run on a CPU in seconds (tests, `make demo`)."""
    cfg = record()
    cfg.preset = "tiny"
    cfg.data = DataConfig(data_path="runs/demo/data", tokenizer_path="runs/demo/tokenizer.model")
    m = cfg.model
    m.vocab_size, m.num_layers, m.model_dim, m.num_heads, m.num_kv_heads = 512, 6, 64, 4, 2
    m.mlp_mult, m.rope_dims = 2.0, 8
    m.loop_start, m.loop_end, m.num_loops, m.parallel_from = 2, 3, 2, 4
    t = cfg.train
    t.train_seq_len, t.train_batch_tokens, t.micro_batch_tokens = 128, 4096, 4096
    t.iterations, t.max_wallclock_seconds, t.gptq_reserve_seconds = 60, 120.0, 0.0
    t.warmup_steps, t.muon_momentum_warmup_steps, t.train_log_every = 2, 20, 10
    t.matrix_lr, t.tied_embed_lr, t.scalar_lr = 0.03, 0.05, 0.03
    t.compile, t.amp_dtype, t.out_dir, t.ema_decay = False, "float32", "runs/demo/train", 0.9
    q = cfg.quant
    q.gptq_calib_batches, q.gptq_calib_seqs, q.passthrough_max_numel = 4, 4, 4096
    cfg.eval = EvalConfig(eval_seq_len=128, eval_stride=32, eval_batch_seqs=16)
    cfg.ttt = TTTConfig(ttt_mode="sgd", ttt_chunk_tokens=1024, ttt_epochs=1, lora_rank=4,
                        lora_chunk_tokens=32)
    return cfg


PRESETS: dict[str, Callable[[], Config]] = {"tiny": tiny, "baseline": baseline, "record": record}


def load_config(preset: str = "baseline", overrides: list[str] | None = None,
                environ: dict[str, str] | None = None, config_file: str | None = None) -> Config:
    """Preset (or saved config JSON) → env overrides → `key=value` overrides → validate."""
    if config_file:
        try:
            cfg = Config.from_dict(json.loads(Path(config_file).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read config {config_file}: {exc}") from None
    elif preset in PRESETS:
        cfg = PRESETS[preset]()
    else:
        raise ConfigError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    cfg.apply_env(environ)
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} must look like key=value")
        cfg.set(key.strip(), value)
    return cfg.validate()
