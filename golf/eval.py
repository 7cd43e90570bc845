"""Exact bits-per-byte evaluation: plain and sliding windows, and legal score-first test-time training.

Notable:
- BPB = (Σ token NLL in nats / ln 2) / Σ bytes, the bytes of each target coming from golf.data's
  `ByteTable` (the UTF-8 bytes the token decodes to). Per byte rather than per token makes the
  score tokenizer-independent: a bigger vocabulary lowers the loss per token but also covers more
  bytes per token, so only a better model of the *text* lowers BPB.
- Targets are val_tokens[1:]: target t (the token at position t+1) is predicted from
  val_tokens[:t+1]. NLL is the full normalized softmax in float32 (cross entropy on the float32
  logits), under bf16 autocast on CUDA. BOS targets count their NLL and 0 bytes, as officially.
- Every target is scored exactly once in every mode. Each run checks this from the spans that were
  actually scored on every rank (no overlap, no gap), not from the plan.
- Sliding window (`eval_stride` > 0): the first window scores all its positions, later windows only
  their last `stride`; the final window ends at the end of the stream and scores only what is left.
- Score-first TTT keeps the community's four conditions (causal, normalized, score before update,
  single pass); every chunk's NLL is recorded before any update that uses it:
  - `sgd` (#1493): the stream in `ttt_chunk_tokens` chunks; after scoring a chunk (windows may
    reach back into earlier chunks for context) all weights take `ttt_epochs` SGD steps on it,
    cosine LR over chunks, grads summed over ranks as a global token mean.
  - `lora` (#1530/#1626): per document, LoRA on q/k/v/o, MLP fc/proj and the head (carried by
    the `CastedLinear`s themselves, bmm per document); the document is walked in
    `lora_chunk_tokens` chunks, the adapters reset per document; context is the document's own
    prefix, at most eval_seq_len (or `lora_context`). One forward per chunk scores it and, after
    its NLL is recorded, gives the loss of one Adam step: the same numbers a separate no_grad
    pass would give, at three quarters of the cost. Documents are batched with per-document
    adapters.
  - phased global SGD (`lora_phases` > 0): once the first lora_phase_docs·k/lora_phases documents
    (k = 1..lora_phases; fixed counts, so the schedule reads no future token) are all scored, one
    SGD pass of the base weights (ttt_lr, ttt_momentum, one step per ttt_chunk_tokens) runs over
    exactly those. The documents after them keep going through the pause (no slot waits for the
    last ones to finish), so which of their chunks come after an SGD pass depends on the schedule.
  TTT works on a deep copy: the caller's model is never modified.
- Distributed: each rank scores a contiguous range of windows (or documents); float64 sums are
  all-reduced, so N ranks give what one process gives (up to summation order), except phased
  LoRA after its first pause, whose schedule depends on the ranks.
- Speed (CUDA, `eval_compile`): compiled blocks with dynamic shapes and dynamo's duck shaping off;
  widths round up to a multiple of 64 and a lone row runs as two, so an evaluation compiles a
  handful of graphs; batch indices come from the CPU plan and are copied without blocking, so the
  scoring loop never waits on the GPU. The graphs compile before anything is scored, on synthetic
  windows, and that time is reported on its own (`compile_s`).
- no_grad rather than inference_mode: the model caches rotary tables, and tables created in
  inference mode would make the same model untrainable afterwards (mid-training eval, TTT).
- `assert_causal` is the executable legality check: change every token after p, re-evaluate, and
  no NLL of a token at or before p may move.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental import _config as fx_config

from golf.config import Config, EvalConfig, GolfError, ModelConfig, TTTConfig, lora_window
from golf.data import BOS_ID, ByteTable, byte_table, list_shards, load_tokenizer, load_val_tokens
from golf.dist import all_reduce_sum, init_distributed, world
from golf.model import GPT, CastedLinear
from golf.pack import read_artifact
from golf.quant import dequantize_state

# The modules LoRA TTT adapts: attention q/k/v/o, MLP fc/proj, and the (possibly tied) head.
EVAL_LORA_TARGETS = re.compile(r"blocks\.\d+\.(attn\.(c_q|c_k|c_v|proj)|mlp\.(fc|proj))|lm_head")
EVAL_LORA_SEED = 1234
EVAL_WIDTH_MULTIPLE = 64  # window widths round up to this: few attention shapes (cuDNN plans)
EVAL_DEFAULT_STRIDE = 64  # the record's sliding stride, for `golf eval --sliding` on a plain config


class EvalError(GolfError):
    """Evaluation input that cannot be scored: artifact, tokenizer, shards or output path."""


@dataclass
class EvalResult:
    tokens: int  # targets scored (= len(val_tokens) - 1)
    bytes: int
    nll_sum: float  # nats
    val_loss: float  # nats per token
    val_bpb: float
    times: dict[str, float] = field(default_factory=dict)  # seconds per phase; phases do not overlap
    mode: str = "plain"
    deadline_hit: bool = False  # TTT stopped adapting at ttt_deadline_s (this rank's view)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- window plans
# A plan row is (ctx, end, score): the model reads tokens[ctx:end], and targets t in [score, end)
# (the tokens at positions t+1) are scored; ctx <= score < end.


def window_plan(n_targets: int, seq_len: int, stride: int) -> torch.Tensor:
    """Windows scoring targets [0, n_targets) exactly once, as int64 rows (ctx, end, score).

    stride 0: non-overlapping windows of seq_len (the last one shorter). stride > 0: the first
    window scores its seq_len targets, each later one its last `stride`, the final one only up
    to the end of the stream."""
    step = seq_len if stride == 0 else stride
    ends = torch.arange(seq_len, max(seq_len, n_targets), step, dtype=torch.int64)
    ends = torch.cat((ends, torch.tensor([n_targets], dtype=torch.int64)))
    score = torch.cat((torch.zeros(1, dtype=torch.int64), ends[:-1]))
    ctx = score.clone() if stride == 0 else (ends - seq_len).clamp(min=0)
    return torch.stack((ctx, ends, score), dim=1)


def _eval_plan_chunks(plan: torch.Tensor, bounds: list[int]) -> Iterator[tuple[int, int, torch.Tensor]]:
    """For each chunk [lo, hi) of consecutive `bounds`: (lo, hi, the rows of `plan` that score
    targets in it, cut to it). A cut row keeps its context, which may reach into earlier chunks."""
    edges = torch.tensor(bounds, dtype=torch.int64)
    firsts = torch.searchsorted(plan[:, 1].contiguous(), edges[:-1], right=True).tolist()
    lasts = torch.searchsorted(plan[:, 2].contiguous(), edges[1:]).tolist()
    for lo, hi, first, last in zip(bounds[:-1], bounds[1:], firsts, lasts, strict=True):
        rows = plan[first:last].clone()
        rows[:, 2].clamp_(min=lo)
        rows[:, 1].clamp_(max=hi)
        yield lo, hi, rows


def _eval_doc_plan(d0: int, d1: int, chunk: int, seq_len: int, first: int | None = None) -> torch.Tensor:
    """One row per chunk of document targets [first, d1) (first defaults to d0): context from
    the document only, at most seq_len tokens (more only if a chunk alone is longer)."""
    score = torch.arange(d0 if first is None else first, d1, chunk, dtype=torch.int64)
    end = (score + chunk).clamp(max=d1)
    ctx = torch.minimum(score, end - seq_len).clamp(min=d0)
    return torch.stack((ctx, end, score), dim=1)


def _eval_rank_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    return n * rank // world_size, n * (rank + 1) // world_size


# ----------------------------------------------------------------------------- scoring


def _eval_window_batch(tokens: torch.Tensor, rows: torch.Tensor):
    """(x, pos, sel, y) for plan rows: right-padded [B, T] inputs (T rounded up to a multiple of
    EVAL_WIDTH_MULTIPLE, so a handful of shapes recur); each row's scored positions packed left
    as [B, W] positions in x (padded by repeating the last); the flat indices into that [B·W]
    of the real ones, in row order; and their target ids."""
    # Every index is computed from the CPU plan rows and copied without blocking: nothing here
    # waits for the GPU, so the host queues the next forward while the last one still runs.
    ctx, end, score = rows.unbind(1)
    width = -(-int((end - ctx).max()) // EVAL_WIDTH_MULTIPLE) * EVAL_WIDTH_MULTIPLE
    counts = end - score
    cols = torch.arange(width)[None]
    real = cols < (end - ctx)[:, None]  # causal: the padding after a row's end never reaches it
    idx = torch.where(real, ctx[:, None] + cols, tokens.numel() - 1)
    most = int(counts.max())
    scored = torch.arange(most)[None] < counts[:, None]
    pos = torch.minimum((score - ctx)[:, None] + torch.arange(most)[None], (end - ctx - 1)[:, None])
    sel = torch.nonzero(scored.flatten()).flatten()
    target = (ctx[:, None] + pos + 1).flatten()[sel]
    device = tokens.device
    x = tokens[idx.to(device, non_blocking=True)] * real.to(device, non_blocking=True)
    return (x, pos.to(device, non_blocking=True), sel.to(device, non_blocking=True),
            tokens[target.to(device, non_blocking=True)])


def _eval_window_nll(model: GPT, tokens: torch.Tensor, rows: torch.Tensor, amp) -> torch.Tensor:
    """Float32 NLL of the scored targets of `rows`, concatenated in row order. The head runs on
    the scored positions only (a sliding window scores 64 of its 2048). A lone row runs twice
    and one copy is dropped: compiled graphs specialize a batch of 1, and that extra graph cost
    a minute of compiling on an H100 (docs/benchmarks.md)."""
    n_scored = int(rows[:, 1].sub(rows[:, 2]).sum())
    if rows.size(0) == 1:
        rows = rows.expand(2, -1)
    x, pos, sel, y = _eval_window_batch(tokens, rows)
    with amp:
        h = model.hidden(x)
        logits = model.logits(torch.gather(h, 1, pos[..., None].expand(-1, -1, h.size(-1))))
    return F.cross_entropy(logits.reshape(-1, logits.size(-1))[sel[:n_scored]].float(), y[:n_scored],
                           reduction="none")


class _EvalSink:
    """Collects scored spans and NLL sums; `finish` checks every target was scored exactly once."""

    def __init__(self, device: torch.device, keep_values: bool):
        self.nll_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.starts: list[torch.Tensor] = []
        self.counts: list[torch.Tensor] = []
        self.values: list[torch.Tensor] | None = [] if keep_values else None
        self.device = device

    def add(self, rows: torch.Tensor, nll: torch.Tensor) -> None:
        counts = rows[:, 1] - rows[:, 2]
        if nll.numel() != int(counts.sum()):
            raise RuntimeError(f"eval produced {nll.numel()} NLLs for {int(counts.sum())} scored targets")
        nll = nll.detach()
        self.nll_sum += nll.double().sum()
        self.starts.append(rows[:, 2].clone())
        self.counts.append(counts)
        if self.values is not None:
            self.values.append(nll.float().cpu())

    def finish(self, tokens_cpu: torch.Tensor, n_targets: int, table: ByteTable,
               dump_path: Path | None) -> tuple[int, int, float]:
        empty = [torch.zeros(0, dtype=torch.int64)]
        starts, counts = torch.cat(self.starts or empty), torch.cat(self.counts or empty)
        runs = _eval_merge_spans(starts, counts)
        _eval_check_tiling(runs, n_targets)
        n_bytes = sum(int(table.count(tokens_cpu[a:b], tokens_cpu[a + 1:b + 1]).sum()) for a, b in runs)
        extra = torch.tensor([n_bytes, int(counts.sum())], dtype=torch.float64, device=self.device)
        totals = torch.cat((self.nll_sum.reshape(1), extra))
        all_reduce_sum(totals)
        if dump_path is not None:
            self._dump(starts, counts, n_targets, dump_path)
        nll_sum, total_bytes, total_tokens = totals.tolist()
        return int(total_tokens), int(total_bytes), nll_sum

    def _dump(self, starts: torch.Tensor, counts: torch.Tensor, n_targets: int, path: Path) -> None:
        values = torch.cat(self.values or [torch.zeros(0)])
        offsets = torch.cumsum(counts, 0) - counts
        idx = torch.repeat_interleave(starts - offsets, counts) + torch.arange(values.numel())
        full = torch.zeros(n_targets, dtype=torch.float32)
        full[idx] = values
        full = all_reduce_sum(full.to(self.device)).cpu()  # every target is on exactly one rank
        if world()[0] == 0:
            _eval_write_npy(path, full.numpy())


def _eval_merge_spans(starts: torch.Tensor, counts: torch.Tensor) -> list[tuple[int, int]]:
    """Sorted, merged [a, b) runs of this rank's scored spans; a target scored twice is an error."""
    if starts.numel() == 0:
        return []
    order = torch.argsort(starts, stable=True)
    s, e = starts[order], (starts + counts)[order]
    if bool((s[1:] < e[:-1]).any()):
        i = int(torch.nonzero(s[1:] < e[:-1])[0]) + 1
        raise RuntimeError(f"eval scored targets {int(s[i])}..{int(e[i - 1]) - 1} twice")
    breaks = torch.nonzero(s[1:] != e[:-1]).flatten() + 1
    lo = torch.cat((torch.zeros(1, dtype=torch.int64), breaks))
    hi = torch.cat((breaks, torch.tensor([s.numel()])))
    return list(zip(s[lo].tolist(), e[hi - 1].tolist(), strict=True))


def _eval_check_tiling(runs: list[tuple[int, int]], n_targets: int) -> None:
    """The runs of all ranks together must cover [0, n_targets) exactly once."""
    everyone = [runs]
    if world()[1] > 1:
        everyone = [None] * world()[1]
        dist.all_gather_object(everyone, runs)
    cursor = 0
    for a, b in sorted(r for rank_runs in everyone for r in rank_runs):
        if a != cursor:
            what = "twice" if a < cursor else "never"
            lo, hi = (a, cursor) if a < cursor else (cursor, a)
            raise RuntimeError(f"eval scored targets {lo}..{hi - 1} {what}")
        cursor = b
    if cursor != n_targets:
        raise RuntimeError(f"eval scored targets {cursor}..{n_targets - 1} never")


def _eval_write_npy(path: Path, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class _EvalClock:
    """Wallclock seconds per phase (synchronizing CUDA at phase edges). A phase opened inside
    another stops the outer one's clock while it runs, so phases never overlap."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, {}
        self._open: list[list] = []  # [phase, start of its current stretch]

    def _tick(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _stop(self, entry: list, now: float) -> None:
        self.times[entry[0]] = self.times.get(entry[0], 0.0) + now - entry[1]

    @contextlib.contextmanager
    def __call__(self, phase: str):
        now = self._tick()
        if self._open:
            self._stop(self._open[-1], now)
        self._open.append([phase, now])
        try:
            yield
        finally:
            now = self._tick()
            self._stop(self._open.pop(), now)
            if self._open:
                self._open[-1][1] = now


@dataclass
class _EvalRun:
    """What every scoring routine needs."""

    model: nn.Module
    tokens: torch.Tensor  # the stream on the model's device
    n_targets: int
    ecfg: EvalConfig
    tcfg: TTTConfig
    sink: _EvalSink
    clock: _EvalClock
    amp: Callable[[], contextlib.AbstractContextManager]
    log: Callable[[str], None]
    rank: int
    world_size: int
    compiled: bool = False  # blocks run compiled: _eval_warmup compiles them before anything is scored
    started: float = 0.0  # time.perf_counter() when the evaluation started
    deadline_hit: bool = False

    @property
    def deadline(self) -> float | None:
        """time.perf_counter() when TTT stops adapting (ttt_deadline_s), or None."""
        t = self.tcfg
        return self.started + t.ttt_deadline_s if t.ttt_deadline_s > 0 and t.ttt_mode != "none" else None

    def past_deadline(self) -> bool:
        deadline = self.deadline
        return deadline is not None and time.perf_counter() >= deadline

    def log_deadline(self, what: str) -> None:
        self.deadline_hit = True
        self.log(f"ttt_deadline {self.tcfg.ttt_deadline_s:g}s reached at "
                 f"{time.perf_counter() - self.started:.1f}s: adapting stopped; {what}")


def _eval_warmup(run: _EvalRun, width: int, rows: int, scored: int, train: bool,
                 bank: "_EvalLoraBank | None" = None) -> None:
    """Compile before scoring, on its own clock (`compile_s`): one batch of `rows` synthetic windows
    (token 0, no validation token) of `width` tokens scoring their last `scored`, in grad mode
    with a backward when the mode trains. With dynamic shapes the graphs then serve every later
    width. Nothing it touches survives: base-weight grads are dropped, and every LoRA slot is
    reset to its fresh adapters with no Adam history (slots are reset again before each document)."""
    if not run.compiled:
        return
    tokens = torch.zeros(width + 1, dtype=torch.int64, device=run.tokens.device)
    plan = torch.tensor([[0, width, width - scored]] * max(rows, 2))
    with run.clock("compile_s"):
        if bank is not None:
            bank.use(list(range(bank.slots)))
        with torch.set_grad_enabled(train):
            nll = _eval_window_nll(run.model, tokens, plan, run.amp())
        if train:
            nll.sum().backward()
        if bank is not None:
            bank.step(torch.zeros(bank.slots, dtype=torch.bool, device=tokens.device))  # compiles the update
            bank.use(None)
            for slot in range(bank.slots):
                bank.reset(slot)
        run.model.zero_grad(set_to_none=True)


def _eval_score_rows(run: _EvalRun, rows: torch.Tensor) -> None:
    with torch.no_grad(), run.clock("score_s"):
        for i in range(0, rows.size(0), run.ecfg.eval_batch_seqs):
            batch = rows[i:i + run.ecfg.eval_batch_seqs]
            run.sink.add(batch, _eval_window_nll(run.model, run.tokens, batch, run.amp()))


def _eval_windows(run: _EvalRun) -> None:
    plan = window_plan(run.n_targets, run.ecfg.eval_seq_len, run.ecfg.eval_stride)
    a, b = _eval_rank_range(plan.size(0), run.rank, run.world_size)
    _eval_warmup_scoring(run)
    _eval_score_rows(run, plan[a:b])


def _eval_warmup_scoring(run: _EvalRun) -> None:
    e = run.ecfg
    _eval_warmup(run, e.eval_seq_len, e.eval_batch_seqs, e.eval_stride or e.eval_seq_len, train=False)


def _eval_warmup_sgd_step(run: _EvalRun) -> None:
    """The graphs of `_eval_sgd_step`: full windows, base weights with gradients (set by the caller)."""
    e = run.ecfg
    _eval_warmup(run, e.eval_seq_len, e.eval_batch_seqs, e.eval_seq_len, train=True)


# ----------------------------------------------------------------------------- SGD TTT


def _eval_sgd_step(run: _EvalRun, params: list[nn.Parameter], opt: torch.optim.Optimizer,
                   lo: int, hi: int) -> None:
    """One SGD step on targets [lo, hi) as eval_seq_len sequences: each rank backprops its slice
    of them with the loss summed / (hi - lo), the grads are summed over ranks (= the global token
    mean, whatever the world size), clipped, applied."""
    seq_len = run.ecfg.eval_seq_len
    seqs = window_plan(hi - lo, seq_len, 0) + torch.tensor([lo, lo, lo])
    a, b = _eval_rank_range(seqs.size(0), run.rank, run.world_size)
    for i in range(a, b, run.ecfg.eval_batch_seqs):
        nll = _eval_window_nll(run.model, run.tokens, seqs[i:min(i + run.ecfg.eval_batch_seqs, b)], run.amp())
        (nll.sum() / (hi - lo)).backward()
    # One flat all-reduce; a param without a grad on this rank contributes zeros.
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = all_reduce_sum(torch.cat([g.reshape(-1) for g in grads]))
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
    if run.tcfg.ttt_grad_clip > 0:
        nn.utils.clip_grad_norm_(params, run.tcfg.ttt_grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)


def _eval_ttt_sgd(run: _EvalRun) -> None:
    """#1493: score chunk c (no_grad), then (unless it is the last) train all weights on it."""
    t = run.tcfg
    plan = window_plan(run.n_targets, run.ecfg.eval_seq_len, run.ecfg.eval_stride)
    params = list(run.model.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=t.ttt_lr, momentum=t.ttt_momentum)
    _eval_warmup_scoring(run)
    _eval_warmup_sgd_step(run)
    bounds = list(range(0, run.n_targets, t.ttt_chunk_tokens)) + [run.n_targets]
    n_chunks = len(bounds) - 1
    every = max(1, n_chunks // 20)
    adapting = True
    for c, (lo, hi, rows) in enumerate(_eval_plan_chunks(plan, bounds)):
        a, b = _eval_rank_range(rows.size(0), run.rank, run.world_size)
        _eval_score_rows(run, rows[a:b])
        if c == n_chunks - 1:
            break
        if adapting and _eval_deadline_agreed(run):
            adapting = False
            run.log_deadline(f"chunks {c + 2}..{n_chunks} scored by the model as it stands")
        if not adapting:
            continue
        lr = t.ttt_lr * 0.5 * (1.0 + math.cos(math.pi * c / (n_chunks - 1)))
        for group in opt.param_groups:
            group["lr"] = lr
        with run.clock("ttt_train_s"):
            for _ in range(t.ttt_epochs):
                _eval_sgd_step(run, params, opt, lo, hi)
        if (c + 1) % every == 0:
            run.log(f"ttt_sgd chunk:{c + 1}/{n_chunks} lr:{lr:.3e} "
                    f"elapsed:{sum(run.clock.times.values()):.1f}s")


def _eval_deadline_agreed(run: _EvalRun) -> bool:
    """Whether any rank is past the deadline: the SGD steps all-reduce, so every rank must stop
    at the same chunk. Costs one tiny all-reduce per chunk, and only with a deadline set."""
    if run.deadline is None:
        return False
    passed = torch.tensor([float(run.past_deadline())], device=run.tokens.device)
    return bool(all_reduce_sum(passed).item() > 0)


# ----------------------------------------------------------------------------- LoRA TTT


def _lora_adam_update(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
                      bias1: torch.Tensor, bias2: torch.Tensor, lr: float) -> None:
    """Adam (torch's defaults) in place on [slots, P] tensors; `keep`, `bias1`, `bias2` are
    [slots, 1]. A slot with keep 0 is left exactly as it was. Compiled on CUDA into one pass."""
    (b1, b2), eps = _EvalLoraBank.BETAS, _EvalLoraBank.EPS
    m.lerp_(g, (1 - b1) * keep)
    v.mul_(1 - (1 - b2) * keep).addcmul_(g, g, value=1 - b2)
    p.sub_(lr * keep * (m / bias1) / ((v / bias2).sqrt() + eps))


class _EvalLoraBank:
    """Per-document LoRA on the target linears, in `slots` slots: out += (x @ A[s]) @ B[s] (bmm).

    A slot holds one document's adapters at a time. A starts as one fixed seeded draw,
    U(±1/sqrt(fan_in)) as nn.Linear's init, the same for every document and rank; B starts at
    zero, so a fresh adapter is exactly the base model. No alpha/r scale: Adam's first steps move
    B by ~lr whatever the scale. Adam (torch's defaults) keeps its moments and step count per
    slot, so each document's adapters follow exactly the path they would alone.

    Every adapter of a slot lives in one row of a flat [slots, P] leaf (the moments likewise), so
    an Adam step is a few passes over three tensors, not hundreds of small kernels. `use(slots)`
    hands each target `CastedLinear` views of the next forward's rows (no hooks, so compiled
    blocks trace it)."""

    BETAS, EPS = (0.9, 0.999), 1e-8

    def __init__(self, model: nn.Module, rank: int, slots: int, lr: float, device: torch.device,
                 compile_step: bool = False):
        self.targets = [m for name, m in model.named_modules()
                        if EVAL_LORA_TARGETS.fullmatch(name) and isinstance(m, CastedLinear)]
        if not self.targets:
            raise EvalError("LoRA TTT found no q/k/v/o, MLP or lm_head linear in the model")
        gen = torch.Generator().manual_seed(EVAL_LORA_SEED)
        init, self.shapes = [], []
        for m in self.targets:
            fan_out, fan_in = m.weight.shape
            bound = 1.0 / math.sqrt(fan_in)
            init += [((torch.rand(fan_in, rank, generator=gen) * 2 - 1) * bound).flatten(),
                     torch.zeros(rank * fan_out)]
            self.shapes += [(fan_in, rank), (rank, fan_out)]
        self.init = torch.cat(init).to(device)
        self.flat = self.init.expand(slots, -1).clone().requires_grad_(True)
        self.m = torch.zeros_like(self.flat)
        self.v = torch.zeros_like(self.flat)
        self.steps = torch.zeros(slots, 1, device=device)
        self.lr, self.slots = lr, slots
        self.update = torch.compile(_lora_adam_update, dynamic=False) if compile_step else _lora_adam_update

    @torch.no_grad()
    def reset(self, slot: int) -> None:
        """A fresh document in `slot`: initial adapters, no Adam history."""
        self.flat[slot] = self.init
        self.m[slot] = 0
        self.v[slot] = 0
        self.steps[slot] = 0

    def use(self, slots: list[int] | None) -> None:
        """Batch row i of the next forward belongs to slot slots[i]; None removes the adapters."""
        if slots is None:
            for m in self.targets:
                m.lora = None
            return
        rows = self.flat if slots == list(range(self.slots)) else \
            self.flat[torch.tensor(slots).to(self.flat.device, non_blocking=True)]
        views = iter(torch.split(rows, [a * b for a, b in self.shapes], dim=1))
        shapes = iter(self.shapes)
        for m in self.targets:
            m.lora = tuple(next(views).view(len(slots), *next(shapes)) for _ in range(2))

    @torch.no_grad()
    def step(self, stepping: torch.Tensor) -> None:
        """One Adam step for the slots where `stepping` (bool [slots]) is set; the others keep
        their adapters and moments untouched."""
        keep = stepping.float()[:, None]
        self.steps += keep
        t = self.steps.clamp(min=1)
        (b1, b2) = self.BETAS
        g = self.flat.grad if self.flat.grad is not None else torch.zeros_like(self.flat)
        self.update(self.flat, g, self.m, self.v, keep, 1 - b1 ** t, 1 - b2 ** t, self.lr)
        self.flat.grad = None


def _eval_doc_spans(tokens_cpu: torch.Tensor, n_targets: int) -> torch.Tensor:
    """Document target ranges [d0, d1) as rows: a document starts at each BOS (and at 0); its
    targets run to the next document's BOS inclusive, so each is predicted within its document."""
    bos = torch.nonzero(tokens_cpu[:n_targets] == BOS_ID).flatten()
    starts = torch.unique(torch.cat((torch.zeros(1, dtype=torch.int64), bos)))
    ends = torch.cat((starts[1:], torch.tensor([n_targets])))
    return torch.stack((starts, ends), dim=1)


def _eval_lora_docs(run: _EvalRun, bank: _EvalLoraBank, docs: list[tuple[int, int, int]], n_groups: int,
                    pause: Callable[[int], None] | None = None) -> None:
    """Score documents (d0, d1, group) chunk by chunk, each with its own adapter, `bank.slots`
    documents at a time, in the given order: a slot whose document ends takes the next one, so
    the batch stays full. One forward per step does both jobs for every slot's current chunk k:
    its NLL is recorded as the score of chunk k (made with adapters trained on chunks < k only),
    then every document that has a chunk k+1 takes one Adam step on the mean NLL of chunk k. The
    loss is a sum over documents, so each adapter gets exactly its own document's gradient.

    `pause(g)` runs (once per g < n_groups - 1, in order) as soon as this rank has finished every
    document of groups 0..g; the slots keep their documents and adapters across it, so no slot
    idles while the last documents of a group finish."""
    t = run.tcfg
    context = lora_window(t, run.ecfg)
    plans = [_eval_doc_plan(d0, d1, t.lora_chunk_tokens, context) for d0, d1, _ in docs]
    unfinished = [0] * n_groups
    for *_, g in docs:
        unfinished[g] += 1
    paused = 0
    queue = iter(range(len(plans)))
    doc_of: list[int | None] = [None] * bank.slots
    chunk_of = [0] * bank.slots

    def refill(slot: int) -> None:
        doc_of[slot], chunk_of[slot] = next(queue, None), 0
        if doc_of[slot] is not None:
            bank.reset(slot)

    def pause_when_done() -> None:
        nonlocal paused
        while pause is not None and paused < n_groups - 1 and not any(unfinished[:paused + 1]):
            bank.use(None)
            pause(paused)
            paused += 1

    for slot in range(bank.slots):
        refill(slot)
    try:
        pause_when_done()  # a rank without documents in the first groups
        while any(d is not None for d in doc_of):
            active = [s for s in range(bank.slots) if doc_of[s] is not None]
            if run.past_deadline():  # each rank on its own: the pauses after it keep them in step
                # (document, first unscored target): the slots' next chunks, then the queue's documents
                pending = [(doc_of[s], int(plans[doc_of[s]][chunk_of[s], 2])) for s in active]
                pending += [(i, docs[i][0]) for i in queue]
                _eval_lora_rest(run, bank, [(docs[i][0], first, docs[i][1]) for i, first in pending])
                for i, _ in pending:
                    unfinished[docs[i][2]] -= 1
                break
            rows = torch.stack([plans[doc_of[s]][chunk_of[s]] for s in active])
            trains = torch.tensor([chunk_of[s] + 1 < plans[doc_of[s]].size(0) for s in active])
            bank.use(active if len(active) > 1 else active * 2)  # a lone row runs twice (_eval_window_nll)
            # Always in grad mode, even when no document here has a next chunk to train for: a
            # no_grad forward would compile a second set of graphs for a handful of steps.
            nll = _eval_window_nll(run.model, run.tokens, rows, run.amp())
            run.sink.add(rows, nll.detach())  # the score is fixed before the update below
            if bool(trains.any()):
                counts = rows[:, 1] - rows[:, 2]
                weight = torch.repeat_interleave(trains.float() / counts.float(), counts)
                (nll * weight.to(nll.device, non_blocking=True)).sum().backward()
                stepping = torch.zeros(bank.slots, dtype=torch.bool)
                stepping[torch.tensor(active)[trains]] = True
                bank.step(stepping.to(run.tokens.device, non_blocking=True))
            del nll
            for s in active:
                chunk_of[s] += 1
                if chunk_of[s] == plans[doc_of[s]].size(0):
                    unfinished[docs[doc_of[s]][2]] -= 1
                    refill(s)
            pause_when_done()
        pause_when_done()
    finally:
        bank.use(None)


def _eval_lora_rest(run: _EvalRun, bank: _EvalLoraBank, spans: list[tuple[int, int, int]]) -> None:
    """Past the deadline: score targets [first, d1) of each (d0, first, d1) by the model as it
    stands (fresh adapters are exactly the base model), in LoRA-window rows scoring half a window
    each, `bank.slots` rows per forward, through the graphs the LoRA steps already compiled."""
    window = lora_window(run.tcfg, run.ecfg)
    rows = torch.cat([_eval_doc_plan(d0, d1, max(1, window // 2), window, first) for d0, first, d1 in spans])
    run.log_deadline(f"{int((rows[:, 1] - rows[:, 2]).sum()):,} targets of {len(spans)} documents "
                     f"scored by the model as it stands")
    for slot in range(bank.slots):
        bank.reset(slot)
    with run.clock("after_deadline_s"):
        for i in range(0, rows.size(0), bank.slots):
            batch = rows[i:i + bank.slots]
            bank.use(list(range(max(2, batch.size(0)))))  # a lone row runs twice (_eval_window_nll)
            nll = _eval_window_nll(run.model, run.tokens, batch, run.amp())
            run.sink.add(batch, nll.detach())
            del nll


def _eval_ttt_lora(run: _EvalRun, tokens_cpu: torch.Tensor) -> None:
    t = run.tcfg
    docs = _eval_doc_spans(tokens_cpu, run.n_targets)
    n_docs = docs.size(0)
    params = list(run.model.parameters())
    for p in params:
        p.requires_grad_(False)  # LoRA steps need no base-weight grads
    device = run.tokens.device
    bank = _EvalLoraBank(run.model, t.lora_rank, t.lora_slots, t.lora_lr, device, compile_step=run.compiled)
    _eval_warmup(run, lora_window(t, run.ecfg), t.lora_slots, t.lora_chunk_tokens, train=True, bank=bank)
    # Pauses at fixed document counts (never depending on how many documents follow).
    pauses = sorted({round(k * t.lora_phase_docs / t.lora_phases) for k in range(1, t.lora_phases + 1)}
                    if t.lora_phases > 0 else set())
    bounds = [0] + [p for p in pauses if 0 < p < n_docs] + [n_docs]
    opt = torch.optim.SGD(params, lr=t.ttt_lr, momentum=t.ttt_momentum) if len(bounds) > 2 else None
    if opt is not None:  # the global SGD's graphs (base weights with grads, no adapters) too
        for p in params:
            p.requires_grad_(True)
        _eval_warmup_sgd_step(run)
        for p in params:
            p.requires_grad_(False)
    mine: list[tuple[int, int, int]] = []  # this rank's documents, group after group
    for g in range(len(bounds) - 1):
        group = docs[bounds[g]:bounds[g + 1]]
        # contiguous documents per rank, balanced by tokens; longest first within a rank
        cum = torch.cumsum(group[:, 1] - group[:, 0], 0)
        total = int(cum[-1])
        lo, hi = (int(torch.searchsorted(cum, total * r // run.world_size, right=True))
                  for r in (run.rank, run.rank + 1))
        share = group[lo:hi]
        share = share[torch.argsort(share[:, 0] - share[:, 1], stable=True)]
        mine += [(int(d0), int(d1), g) for d0, d1 in share.tolist()]

    def pause(g: int) -> None:
        """Global SGD over the documents of groups 0..g. On this rank they are all scored; a rank
        may compute its gradient share sooner than others finish theirs, but no weight changes
        before the gradient all-reduce, which waits until every rank has scored them too."""
        scored_end = int(docs[bounds[g + 1] - 1, 1])
        _eval_phase_sgd(run, params, opt, scored_end)
        run.log(f"ttt_lora phase:{g + 1}/{len(bounds) - 2} docs_scored:{bounds[g + 1]} "
                f"global_sgd_tokens:{scored_end} elapsed:{sum(run.clock.times.values()):.1f}s")

    with run.clock("lora_s"):  # a clock edge syncs with the GPU; the pauses run on their own clock
        _eval_lora_docs(run, bank, mine, len(bounds) - 1, pause if opt is not None else None)


def _eval_phase_sgd(run: _EvalRun, params: list[nn.Parameter], opt: torch.optim.Optimizer,
                    scored_end: int) -> None:
    """One SGD pass of the base weights over targets [0, scored_end), all already scored: one
    step per ttt_chunk_tokens."""
    for p in params:
        p.requires_grad_(True)
    with run.clock("global_sgd_s"):
        for lo in range(0, scored_end, run.tcfg.ttt_chunk_tokens):
            _eval_sgd_step(run, params, opt, lo, min(lo + run.tcfg.ttt_chunk_tokens, scored_end))
    for p in params:
        p.requires_grad_(False)


# ----------------------------------------------------------------------------- entry points


def evaluate(model: GPT, val_tokens: torch.Tensor, table: ByteTable, ecfg: EvalConfig,
             tcfg: TTTConfig, dump_nll: str | Path | None = None, log: Callable[[str], None] = print,
             overwrite: bool = False) -> EvalResult:
    """Score the whole validation stream (1-D token ids, documents starting with BOS) and return
    exact BPB. `dump_nll` writes every target's NLL (float32 .npy, token order) on rank 0."""
    tokens_cpu = val_tokens.detach().reshape(-1).to("cpu", torch.int64).contiguous()
    n_targets = tokens_cpu.numel() - 1
    if n_targets < 1:
        raise EvalError(f"validation stream has {tokens_cpu.numel()} tokens; at least 2 are needed")
    if int(tokens_cpu.max()) >= table.vocab_size or int(tokens_cpu.min()) < 0:
        raise EvalError(f"validation ids span {int(tokens_cpu.min())}..{int(tokens_cpu.max())}, "
                        f"outside the tokenizer's {table.vocab_size} ids")
    dump_path = _eval_check_dump(dump_nll, overwrite)
    rank, world_size = world()
    device = next(model.parameters()).device
    mode = ("sliding" if ecfg.eval_stride > 0 else "plain") if tcfg.ttt_mode != "lora" else "lora"
    mode += {"sgd": "+sgd", "lora": "+phased" if tcfg.lora_phases > 0 else "", "none": ""}[tcfg.ttt_mode]

    def amp() -> contextlib.AbstractContextManager:
        if device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    was_training = model.training
    work = copy.deepcopy(model) if tcfg.ttt_mode != "none" else model
    work.eval()
    clock = _EvalClock(device)
    compiled = _eval_compiles(ecfg, device)
    run = _EvalRun(work, tokens_cpu.to(device), n_targets, ecfg, tcfg,
                   _EvalSink(device, keep_values=dump_path is not None), clock, amp,
                   log if rank == 0 else (lambda _msg: None), rank, world_size, compiled, time.perf_counter())
    # Window widths, batch sizes and LoRA chunks vary: one dynamic-shape graph per region and mode.
    # Without duck shaping, a width that happens to equal a LoRA dimension (both symbolic) is not
    # unified with it and then specialized to that value, which recompiled graph after graph.
    try:
        with work.blocks_compiled(compiled, dynamic=True), \
                fx_config.patch(use_duck_shape=False):
            if tcfg.ttt_mode == "sgd":
                _eval_ttt_sgd(run)
            elif tcfg.ttt_mode == "lora":
                _eval_ttt_lora(run, tokens_cpu)
            else:
                _eval_windows(run)
    finally:
        model.train(was_training)
    with clock("finalize_s"):
        n_tokens, n_bytes, nll_sum = run.sink.finish(tokens_cpu, n_targets, table, dump_path)
    return EvalResult(tokens=n_tokens, bytes=n_bytes, nll_sum=nll_sum, val_loss=nll_sum / n_tokens,
                      val_bpb=nll_sum / math.log(2) / max(n_bytes, 1), times=dict(clock.times), mode=mode,
                      deadline_hit=run.deadline_hit)


def _eval_compiles(ecfg: EvalConfig, device: torch.device) -> bool:
    return ecfg.eval_compile and device.type == "cuda"


def _eval_check_dump(dump_nll: str | Path | None, overwrite: bool) -> Path | None:
    """Refuse a bad NLL dump destination before spending the evaluation on it."""
    if dump_nll is None:
        return None
    path = Path(dump_nll)
    if path.exists() and not overwrite:
        raise EvalError(f"{path}: already exists (pass overwrite to replace it)")
    if not path.parent.is_dir():
        raise EvalError(f"{path}: folder {path.parent} does not exist")
    return path


def assert_causal(eval_fn: Callable[[torch.Tensor], np.ndarray], tokens: torch.Tensor, p: int,
                  atol: float = 1e-5, seed: int = 0) -> float:
    """Legality check: `eval_fn(tokens)` returns every target's NLL (entry t = the token at position
    t+1). Every token after position p is changed (to another id in the range already used) and
    the stream re-evaluated: the NLLs of the tokens at positions 1..p must not move by more than
    `atol`. Raises AssertionError on a leak, or when nothing after p moved either (a vacuous
    check); returns the largest change seen at or before p."""
    tokens = tokens.detach().reshape(-1).cpu().long()
    if not 0 < p < tokens.numel() - 1:
        raise ValueError(f"p={p} must leave tokens on both sides (stream of {tokens.numel()})")
    ids = int(tokens.max()) + 1
    if ids < 2:
        raise ValueError("the stream needs at least two distinct ids to change tokens")
    gen = torch.Generator().manual_seed(seed)
    changed = tokens.clone()
    shift = torch.randint(1, ids, (tokens.numel() - p - 1,), generator=gen)
    changed[p + 1:] = (tokens[p + 1:] + shift) % ids
    before = np.asarray(eval_fn(tokens), dtype=np.float64)
    after = np.asarray(eval_fn(changed), dtype=np.float64)
    if before.shape != (tokens.numel() - 1,) or after.shape != before.shape:
        raise AssertionError(f"eval_fn returned {before.shape}/{after.shape} NLLs "
                             f"for {tokens.numel() - 1} targets")
    diff = np.abs(after[:p] - before[:p])
    if diff.size and diff.max() > atol:
        q = int(diff.argmax())
        raise AssertionError(f"NLL of the token at position {q + 1} moved by {diff[q]:.3g} when only tokens "
                             f"after position {p} changed: the evaluation looks ahead")
    if np.allclose(after[p:], before[p:], atol=atol, rtol=0):
        raise AssertionError(f"changing the tokens after position {p} moved no NLL at all: vacuous check")
    return float(diff.max()) if diff.size else 0.0


# ----------------------------------------------------------------------------- artifacts


def load_artifact_model(path: str | Path, device: str | torch.device) -> tuple[GPT, dict]:
    """Rebuild the GPT stored in an artifact: dequantized weights, eval mode, and looping on (a new
    GPT starts with it, as the finished model runs)."""
    path = Path(path)
    qs, header = read_artifact(path)
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    stored = header.get("model_config")
    if not isinstance(stored, dict) or set(stored) - known:
        extra = sorted(set(stored) - known) if isinstance(stored, dict) else "missing"
        raise EvalError(f"{path}: header model_config does not fit this golf version ({extra})")
    mcfg = ModelConfig(**stored)
    model = GPT(mcfg)
    _eval_load_state(model, dequantize_state(qs), path)
    model.to(device).eval()
    return model, header


def _eval_load_state(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Strict load in which a tied alias (lm_head.weight = tok_emb.weight) may be stored once."""
    own = model.state_dict()
    unexpected = sorted(set(state) - set(own))
    if unexpected:
        raise EvalError(f"{path}: artifact holds tensors the model does not have: "
                        f"{', '.join(unexpected[:4])}")
    by_storage: dict[int, list[str]] = {}
    for name, t in own.items():
        by_storage.setdefault(t.data_ptr(), []).append(name)
    for name, t in own.items():
        if name not in state and not any(alias in state for alias in by_storage[t.data_ptr()]):
            raise EvalError(f"{path}: artifact is missing tensor {name}")
        if name in state and tuple(state[name].shape) != tuple(t.shape):
            raise EvalError(f"{path}: tensor {name} has shape {tuple(state[name].shape)}, "
                            f"the model expects {tuple(t.shape)}")
    model.load_state_dict(state, strict=False)


def _eval_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _eval_val_files(data: str | None, cfg: Config) -> list[Path]:
    """--data as a shard file, a folder (searched with val_files) or a glob; else the config's."""
    if data is None:
        return list_shards(cfg.data.data_path, cfg.data.val_files)
    p = Path(data)
    if p.is_file():
        return [p]
    if p.is_dir():
        return list_shards(p, cfg.data.val_files)
    return list_shards(".", data)


def eval_artifact(artifact: str | Path, data: str | None = None, tokenizer: str | None = None,
                  sliding: bool | None = None, stride: int | None = None, seq_len: int | None = None,
                  ttt: str | None = None, max_tokens: int | None = None, overrides: Sequence[str] = (),
                  dump_nll: str | None = None, overwrite: bool = False,
                  log: Callable[[str], None] = print) -> tuple[EvalResult, Config]:
    """`golf eval`: load an artifact, check its tokenizer and the val shards, evaluate.

    Data, tokenizer, eval and TTT settings default to the run config stored in the artifact;
    `overrides` are further `key=value` config fields (lora_rank=64, ...). `sliding` without a
    stride turns a stored stride of 0 into EVAL_DEFAULT_STRIDE."""
    if sliding is False and stride:
        raise EvalError(f"--no-sliding contradicts --stride {stride}")
    info = init_distributed()
    model, header = load_artifact_model(artifact, info.device)
    stored = header.get("run_config") or {}
    # Only the sections evaluation reads: a run config from another golf version still loads.
    cfg = Config.from_dict({k: stored[k] for k in ("preset", "data", "eval", "ttt") if k in stored})
    cfg.model = model.cfg
    items = list(overrides)
    items += [f"tokenizer_path={tokenizer}"] if tokenizer is not None else []
    items += [f"eval_seq_len={seq_len}"] if seq_len is not None else []
    items += [f"ttt_mode={ttt}"] if ttt is not None else []
    if stride is not None or sliding is False:
        items.append(f"eval_stride={stride or 0}")
    elif sliding and cfg.eval.eval_stride == 0:
        items.append(f"eval_stride={min(EVAL_DEFAULT_STRIDE, seq_len or cfg.eval.eval_seq_len)}")
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise EvalError(f"override {item!r} must look like key=value")
        cfg.set(key.strip(), value)
    cfg.validate()

    tok_path = Path(cfg.data.tokenizer_path)
    if not tok_path.is_file():
        raise EvalError(f"{tok_path}: tokenizer not found (pass --tokenizer)")
    meta = header.get("tokenizer") or {}
    if meta.get("sha256") and _eval_sha256(tok_path) != meta["sha256"]:
        raise EvalError(f"{tok_path}: sha256 differs from the tokenizer the artifact was trained with "
                        f"({meta['sha256'][:12]}…)")
    vocab = int(meta.get("vocab_size") or model.cfg.vocab_size)
    if vocab != model.cfg.vocab_size:
        raise EvalError(f"{artifact}: tokenizer vocab_size {vocab} differs from the model's "
                        f"{model.cfg.vocab_size}")
    table = byte_table(load_tokenizer(tok_path, vocab))

    files = _eval_val_files(data, cfg)
    tokens = load_val_tokens(files, cfg.data.val_max_tokens if max_tokens is None else max_tokens)
    if tokens.numel() and int(tokens.max()) >= vocab:
        raise EvalError(f"{files[0]}: validation ids reach {int(tokens.max())}, "
                        f"not below the tokenizer's vocab_size {vocab}")
    log(f"eval: {artifact}, {len(files)} shard(s), {tokens.numel()} tokens, "
        f"seq_len {cfg.eval.eval_seq_len}, stride {cfg.eval.eval_stride}, ttt {cfg.ttt.ttt_mode}, "
        f"world {info.world_size}")
    # The artifact's stored settings win unless overridden: say which ones this run uses.
    t = cfg.ttt
    detail = {"sgd": f"ttt_lr {t.ttt_lr:g}, ttt_chunk_tokens {t.ttt_chunk_tokens}, ttt_epochs {t.ttt_epochs}",
              "lora": f"lora_lr {t.lora_lr:g}, lora_rank {t.lora_rank}, lora_chunk_tokens {t.lora_chunk_tokens}, "
                      f"lora_context {lora_window(t, cfg.eval)}, "
                      f"lora_slots {t.lora_slots}, lora_phases {t.lora_phases}",
              "none": "no TTT"}[t.ttt_mode]
    log(f"eval settings (stored in the artifact unless overridden): eval_compile {cfg.eval.eval_compile}, "
        f"eval_batch_seqs {cfg.eval.eval_batch_seqs}, {detail}")
    result = evaluate(model, tokens, table, cfg.eval, cfg.ttt, dump_nll=dump_nll, log=log,
                      overwrite=overwrite)
    return result, cfg
