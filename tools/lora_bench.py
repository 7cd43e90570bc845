"""One LoRA-TTT step (forward over B windows of T tokens, head on the last `chunk` of each,
backward, per-slot Adam) timed in isolation, compiled (and eager), then one compiled shape under
the profiler: where a step's time goes, without a whole evaluation around it.

    python tools/lora_bench.py ARTIFACT [--shapes 32x2048 32x256 4x2048] [--chunk 48] [--rank 96]
                               [--steps 10] [--rows 15] [--eager]
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
from torch.fx.experimental import _config as fx_config
from torch.profiler import ProfilerActivity, profile

from golf.cli import run_script
from golf.eval import _eval_window_nll, _EvalLoraBank, load_artifact_model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--shapes", nargs="+", default=["32x2048", "32x256", "4x2048"])
    ap.add_argument("--chunk", type=int, default=48)
    ap.add_argument("--rank", type=int, default=96)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rows", type=int, default=15)
    ap.add_argument("--eager", action="store_true", help="time eager steps too")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = load_artifact_model(args.artifact, device)
    for p in model.parameters():
        p.requires_grad_(False)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
    slots = max(b for b, _ in shapes)
    bank = _EvalLoraBank(model, args.rank, slots, 3e-4, device, compile_step=device.type == "cuda")
    gen = torch.Generator().manual_seed(0)
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step(tokens: torch.Tensor, rows: torch.Tensor, stepping: torch.Tensor) -> None:
        bank.use(list(range(rows.size(0))))
        nll = _eval_window_nll(model, tokens, rows, amp())
        nll.mean().backward()
        bank.step(stepping)

    def batch(b: int, t: int):
        tokens = torch.randint(2, model.cfg.vocab_size, (b * t + 1,), generator=gen).to(device)
        ctx = torch.arange(b, dtype=torch.int64) * t
        rows = torch.stack((ctx, ctx + t, ctx + t - min(args.chunk, t)), dim=1)
        stepping = torch.zeros(slots, dtype=torch.bool, device=device)
        stepping[:b] = True
        return tokens, rows, stepping

    print(f"{'shape':>10}{'mode':>10}{'first s':>9}{'ms/step':>10}{'window tok/s':>14}{'peak GiB':>10}", flush=True)
    for compiled in (False, True) if args.eager else (True,):
        with model.blocks_compiled(compiled, dynamic=True), fx_config.patch(use_duck_shape=False):
            for b, t in shapes:
                tokens, rows, stepping = batch(b, t)
                sync()
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                step(tokens, rows, stepping)
                sync()
                first = time.perf_counter() - t0
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    step(tokens, rows, stepping)
                sync()
                ms = 1e3 * (time.perf_counter() - t0) / args.steps
                peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
                print(f"{b}x{t:>7}{'compiled' if compiled else 'eager':>10}{first:>9.1f}{ms:>10.1f}"
                      f"{b * t / ms * 1e3:>14,.0f}{peak:>10.1f}", flush=True)
    b, t = shapes[0]
    tokens, rows, stepping = batch(b, t)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with model.blocks_compiled(True, dynamic=True), fx_config.patch(use_duck_shape=False):
        step(tokens, rows, stepping)
        sync()
        with profile(activities=activities) as prof:
            for _ in range(3):
                step(tokens, rows, stepping)
            sync()
    events = prof.key_averages()
    if device.type == "cuda":
        print(f"\nprofile, 3 compiled steps of {b}x{t}: top kernels by GPU time")
        print(events.table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=60))
    print(f"\nprofile, 3 compiled steps of {b}x{t}: top operators by CPU time")
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    run_script(main, "lora_bench")
