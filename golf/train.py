"""The wallclock trainer: one readable loop, honest timing, never over the cap.

Notable:
- Progress is measured by wallclock: elapsed / (cap - GPTQ reserve). The LR schedule, the
  switch to depth recurrence and the stop all read it, so a run adapts to the hardware.
- Compile warmup runs real steps (the looped graph too) before the timer starts, then restores
  the initial weights, optimizer state and data stream: compile time stays out of the budget
  and the timed run is the same run it would have been.
- A step is only started when it is predicted to end before the cap; ranks agree on every
  wallclock decision through one small all-reduce per step.
- NaN/inf loss stops the run (the last checkpoint is kept); SIGTERM writes a checkpoint that
  `resume=True` continues bit-for-bit on CPU.
- EMA of the weights (decay `ema_decay`, warmed up as (1+t)/(10+t)) is what gets exported.
- Late QAT (`qat_start_frac` > 0): from that progress on, each step's forward and backward run on
  the weights GPTQ will quantize rounded to their class's SDClip grid (class k × `qat_k_scale`),
  and the optimizer applies those gradients to the float weights (straight-through). Swapping
  the values in once per step changes no compiled graph. The export is the float EMA.
"""

from __future__ import annotations

import copy
import math
import os
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile, record_function

from golf.config import Config, ConfigError, GolfError, QuantConfig
from golf.data import TokenLoader, list_shards
from golf.dist import DistInfo, init_distributed
from golf.model import GPT, quant_class
from golf.optim import all_reduce_grads, build_optimizers, lr_multiplier, muon_momentum_at

PROCESS_START = time.perf_counter()
H100_BF16_PEAK_FLOPS = 798e12  # dense bf16 matmul measured on one H100 of the lent machines


class TrainingDiverged(GolfError):
    """The loss became NaN or infinite."""


@dataclass
class TrainResult:
    model: GPT  # holds the export weights (EMA when enabled)
    steps: int
    train_time_s: float  # timed training only (compile warmup excluded)
    tokens_seen: int
    stopped: str  # iterations | wallclock | sigterm
    startup_s: float  # process start → first timed step
    phases: dict[str, float] = field(default_factory=dict)
    losses: list[tuple[int, float]] = field(default_factory=list)
    attn_backend: str = ""


def micro_batch_plan(cfg: Config, world_size: int) -> tuple[int, int]:
    """(grad accumulation steps, sequences per micro-batch per rank) for the global batch."""
    t = cfg.train
    seqs_global = t.train_batch_tokens // t.train_seq_len
    if seqs_global % world_size:
        raise ConfigError(f"train_batch_tokens/train_seq_len = {seqs_global} sequences "
                          f"do not split over {world_size} ranks")
    seqs_rank = seqs_global // world_size
    accum = t.grad_accum_steps or max(1, math.ceil(seqs_rank * t.train_seq_len / t.micro_batch_tokens))
    while seqs_rank % accum:  # the smallest accumulation >= the wanted one that divides evenly
        accum += 1
    return accum, seqs_rank // accum


def sdclip_round(w: torch.Tensor, bits: int, k: float) -> torch.Tensor:
    """w rounded per row to the grid golf.quant stores: step k·std(row)/q_max, at most q_max steps
    from 0 (golf.quant also rounds the step to fp16)."""
    qmax = 2 ** (bits - 1) - 1
    step = (k / qmax) * w.float().std(dim=1, keepdim=True, unbiased=False).clamp_min(1e-12)
    return (torch.clamp(torch.round(w / step), -qmax, qmax) * step).to(w.dtype)


def qat_targets(model: GPT, qcfg: QuantConfig, k_scale: float) -> list[tuple[torch.Tensor, int, float]]:
    """(weight, bits, clip k × k_scale) of every parameter golf.quant rounds; a tied weight once."""
    targets = []
    for name, p in model.named_parameters():
        if qcfg.quantizes(p):
            bits, k = qcfg.class_bits_k(quant_class(name))
            targets.append((p, bits, k * k_scale))
    return targets


@contextmanager
def weights_rounded(targets: list[tuple[torch.Tensor, int, float]]):
    """Inside, each target weight holds its SDClip-rounded values, so gradients are taken there;
    the float values come back on exit, bit for bit (straight-through QAT)."""
    if not targets:
        yield
        return
    with torch.no_grad():
        saved = [p.detach().clone() for p, _, _ in targets]
        for p, bits, k in targets:
            p.copy_(sdclip_round(p, bits, k))
    try:
        yield
    finally:
        with torch.no_grad():
            for (p, _, _), float_values in zip(targets, saved):
                p.copy_(float_values)


class _StopSignal:
    """Turns SIGTERM into a flag the loop polls, so a checkpoint is written between steps."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> "_StopSignal":
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. inside a test runner thread)
            self._previous = None
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _checkpoint_path(out_dir: Path, rank: int) -> Path:
    return out_dir / f"checkpoint_rank{rank}.pt"


def _save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def train(cfg: Config, info: DistInfo | None = None, log: Callable[[str], None] = print,
          on_step: Callable[[int, float], None] | None = None, export: bool = True) -> TrainResult:
    """Train `cfg` within its wallclock cap; returns the model holding the export weights.

    With `export`, rank 0 also writes the export weights (`final_model.pt`) and `config.json`
    to `out_dir` for `golf quantize`; the end-to-end job skips that (its artifact is the export).
    """
    info = info or init_distributed()
    t, device = cfg.train, info.device
    out_dir = Path(t.out_dir)
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    phases: dict[str, float] = {}
    t_setup = time.perf_counter()

    # ------------------------------------------------------------------ model, optimizers, data
    torch.manual_seed(t.seed)  # identical init on every rank
    model = GPT(cfg.model).to(device)
    optimizers = build_optimizers(model, t)
    params = [p for p in model.parameters() if p.requires_grad]
    accum, micro_seqs = micro_batch_plan(cfg, info.world_size)
    files = list_shards(cfg.data.data_path, cfg.data.train_files)
    loader = TokenLoader(files, t.train_seq_len, rank=info.rank, world_size=info.world_size,
                         seed=t.seed, doc_packed=cfg.data.doc_packed)
    use_cuda = device.type == "cuda"
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if use_cuda and t.amp_dtype == "bfloat16"
           else torch.autocast("cpu", enabled=False))
    options = {"coordinate_descent_tuning": True} if t.compile_mode == "coordinate-descent" else None
    if t.compile and t.compile_scope == "blocks":
        model.compile_blocks(True, options=options)
    loss_fn = (torch.compile(model.loss, dynamic=False, options=options) if t.compile and t.compile_scope == "model"
               else model.loss)
    ema = [p.detach().float().clone() for p in params] if t.ema_decay > 0 else None
    qat: list[tuple[torch.Tensor, int, float]] = []  # (weight, bits, clip k) once late QAT is on
    log(f"model: {model.num_params():,} params, attention backend {model.attn_backend_name}, "
        f"world {info.world_size}, grad_accum {accum} x {micro_seqs} seqs of {t.train_seq_len}")

    def train_step(progress: float, step: int) -> torch.Tensor:
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * lr_multiplier(progress, t.warmdown_frac, t.lr_floor)
                if "momentum" in group:
                    group["momentum"] = muon_momentum_at(step, t)
        total = torch.zeros((), device=device)
        with record_function("forward_backward"), weights_rounded(qat):
            for _ in range(accum):
                x, y = loader.next_batch(micro_seqs, device)
                with amp:
                    loss = loss_fn(x, y)
                (loss / accum).backward()
                total += loss.detach()
        with record_function("optimizer"):
            all_reduce_grads(params)
            if t.grad_clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, t.grad_clip_norm)
            for opt in optimizers:
                opt.step()
            model.zero_grad(set_to_none=True)
        if ema is not None:
            # Warmed-up decay: a constant 0.9965 would keep 0.9965^n of the random init after n
            # steps (41% after 255), which poisons the export of any short run.
            decay = min(t.ema_decay, (1.0 + step) / (10.0 + step))
            with record_function("ema"):
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - decay)
        if info.world_size > 1:  # log the global batch's loss, not this rank's share (gloo has no AVG)
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total / (accum * info.world_size)

    phases["setup"] = time.perf_counter() - t_setup

    # ------------------------------------------------------------------ compile warmup (untimed)
    t_warm = time.perf_counter()
    if t.warmup_steps > 0:
        initial = {
            "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "optimizers": [copy.deepcopy(opt.state_dict()) for opt in optimizers],
            "loader": loader.state_dict(),
        }
        looped = cfg.model.num_loops > 1
        for i in range(t.warmup_steps):
            model.set_looping(looped and i >= t.warmup_steps // 2)  # both layer orders
            train_step(0.0, 0)
        if use_cuda:
            torch.cuda.synchronize()
        model.load_state_dict(initial["model"])
        for opt, state in zip(optimizers, initial["optimizers"]):
            opt.load_state_dict(state)
        loader.load_state_dict(initial["loader"])
        if ema is not None:
            ema = [p.detach().float().clone() for p in params]
        model.set_looping(False)
    phases["compile_warmup"] = time.perf_counter() - t_warm

    # ------------------------------------------------------------------ resume
    step, elapsed_before, losses = 0, 0.0, []
    if t.resume:
        path = _checkpoint_path(out_dir, info.rank)
        if not path.exists():
            raise GolfError(f"resume requested but {path} does not exist")
        state = torch.load(path, map_location=device, weights_only=False)  # our own checkpoint
        model.load_state_dict(state["model"])
        for opt, s in zip(optimizers, state["optimizers"]):
            opt.load_state_dict(s)
        loader.load_state_dict(state["loader"])
        if ema is not None:
            ema = [e.to(device) for e in state["ema"]]
        step, elapsed_before, losses = state["step"], state["elapsed"], state["losses"]
        model.set_looping(state["looping"])
        log(f"resumed from {path} at step {step} ({elapsed_before:.1f}s elapsed)")

    # ------------------------------------------------------------------ timed loop
    budget = t.max_wallclock_seconds - t.gptq_reserve_seconds if t.max_wallclock_seconds > 0 else 0.0
    tokens_per_step = t.train_batch_tokens
    flops_per_token = model.flops_per_token(t.train_seq_len)
    peak_flops = H100_BF16_PEAK_FLOPS * info.world_size
    stopped, last_step_s = "iterations", 0.0
    last_checkpoint = time.perf_counter()
    if use_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    startup_s = time.perf_counter() - PROCESS_START
    t0 = time.perf_counter() - elapsed_before
    first_step = step
    with _StopSignal() as stop_signal:
        while step < t.iterations:
            elapsed = time.perf_counter() - t0
            # One all-reduce makes every wallclock decision identical on all ranks.
            flags = torch.tensor([elapsed, float(stop_signal.requested)], device=device, dtype=torch.float64)
            if info.world_size > 1:
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            elapsed, sigterm = flags[0].item(), flags[1].item() > 0
            if sigterm:
                stopped = "sigterm"
                break
            # Looped steps are slower than the average, so the previous step predicts the next.
            if budget > 0 and elapsed + 1.05 * last_step_s > budget:
                stopped = "wallclock"
                break
            progress = min(1.0, elapsed / budget) if budget > 0 else step / max(t.iterations, 1)
            if cfg.model.num_loops > 1 and not model.looping and progress >= cfg.model.loop_enable_frac:
                model.set_looping(True)
                flops_per_token = model.flops_per_token(t.train_seq_len)
                log(f"step:{step} depth recurrence on: layer order {model.layer_order()}")
            if t.qat_start_frac > 0 and not qat and progress >= t.qat_start_frac:
                qat.extend(qat_targets(model, cfg.quant, t.qat_k_scale))
                log(f"step:{step} QAT on: {len(qat)} weights rounded to their SDClip grid at class k x {t.qat_k_scale}")
            profiling = step + 1 == t.profile_step and info.is_main and use_cuda
            activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
            with profile(activities=activities) if profiling else nullcontext() as prof:
                loss = train_step(progress, step).item()  # .item() syncs: the step is really done
            if profiling:
                log(f"profile of step {step + 1}:\n" + prof.key_averages().table(
                    sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=70))
                # The kernel-by-kernel timeline, for reading which ops each fused kernel holds.
                prof.export_chrome_trace(str(out_dir / f"profile_step{step + 1}.json"))
            step += 1
            last_step_s = time.perf_counter() - t0 - elapsed
            if not math.isfinite(loss):
                kept = _checkpoint_path(out_dir, info.rank)
                where = f"last good checkpoint kept at {kept}" if kept.exists() else "no checkpoint was written"
                raise TrainingDiverged(f"loss became {loss} at step {step}; {where}")
            losses.append((step, loss))
            elapsed = time.perf_counter() - t0
            step_avg = (elapsed - elapsed_before) / (step - first_step)
            if on_step is not None:
                on_step(step, loss)
            if step % t.train_log_every == 0 or step == t.iterations or step == 1:
                tok_s = tokens_per_step / step_avg
                mfu = tok_s * flops_per_token / peak_flops if use_cuda else 0.0
                mem = torch.cuda.max_memory_allocated(device) / 2**30 if use_cuda else 0.0
                log(f"step:{step}/{t.iterations} train_loss:{loss:.4f} train_time:{elapsed * 1000:.0f}ms "
                    f"step_avg:{step_avg * 1000:.2f}ms tok/s:{tok_s:.0f} mfu:{mfu:.3f} peak_mem:{mem:.1f}GiB")
            if t.checkpoint_every_seconds > 0 and time.perf_counter() - last_checkpoint > t.checkpoint_every_seconds:
                _save_checkpoint(_checkpoint_path(out_dir, info.rank),
                                 _train_state(model, optimizers, loader, ema, step, elapsed, losses))
                last_checkpoint = time.perf_counter()
    train_time = time.perf_counter() - t0
    phases["train"] = train_time - elapsed_before
    if stopped == "sigterm":
        path = _checkpoint_path(out_dir, info.rank)
        _save_checkpoint(path, _train_state(model, optimizers, loader, ema, step, train_time, losses))
        log(f"SIGTERM: checkpoint written to {path} at step {step}; continue with RESUME=1")
    log(f"stopped ({stopped}) at step {step}, train_time:{train_time * 1000:.0f}ms, "
        f"startup to first timed step {startup_s:.1f}s")

    # ------------------------------------------------------------------ export weights
    model.compile_blocks(False)  # what follows (GPTQ, LoRA) hooks modules
    if ema is not None:
        with torch.no_grad():
            for p, e in zip(params, ema):
                p.copy_(e)
    if export and info.is_main and stopped != "sigterm":
        torch.save(model.state_dict(), out_dir / "final_model.pt")
        cfg.save(out_dir / "config.json")
    return TrainResult(model=model, steps=step, train_time_s=train_time, tokens_seen=step * tokens_per_step,
                       stopped=stopped, startup_s=startup_s, phases=phases, losses=losses,
                       attn_backend=model.attn_backend_name)


def _train_state(model, optimizers, loader, ema, step, elapsed, losses) -> dict:
    return {
        "model": model.state_dict(),
        "optimizers": [opt.state_dict() for opt in optimizers],
        "loader": loader.state_dict(),
        "ema": ema,
        "step": step,
        "elapsed": elapsed,
        "losses": losses,
        "looping": model.looping,
    }
