"""Where an evaluation's time goes: `golf eval` once to warm up (compiling), then again under the
torch profiler. Prints the top kernels by GPU time, the top operators by CPU time, how busy the
GPU was over the warm run's wall time, and how many graphs dynamo compiled.

    python tools/profile_eval.py ARTIFACT --data DIR --tokenizer MODEL [--ttt lora] [--sliding]
                                 [--max-tokens 20000] [--set key=value]... [--rows 30]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from golf.eval import eval_artifact


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--data", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--ttt", default="lora")
    ap.add_argument("--sliding", action="store_true")
    ap.add_argument("--max-tokens", type=int, default=20_000)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--rows", type=int, default=30)
    args = ap.parse_args()
    quiet = lambda _msg: None  # noqa: E731

    def run():
        result, _ = eval_artifact(args.artifact, data=args.data, tokenizer=args.tokenizer, ttt=args.ttt,
                                  sliding=args.sliding or None, max_tokens=args.max_tokens,
                                  overrides=args.set, log=quiet)
        return result

    cold = run()
    graphs = dict(torch._dynamo.utils.counters["stats"])
    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        warm = run()
    wall = time.perf_counter() - t0
    events = prof.key_averages()
    if cuda:
        print(events.table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=70))
        gpu_busy = sum(e.self_device_time_total for e in events) / 1e6
        print(f"GPU kernel time {gpu_busy:.2f}s of {wall:.2f}s wall ({100 * gpu_busy / wall:.0f}% busy)")
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=70))
    print(f"dynamo after the cold run: {graphs}; after the warm run: {dict(torch._dynamo.utils.counters['stats'])}")
    print(f"first {args.max_tokens:,} tokens, ttt {args.ttt}: val_bpb {warm.val_bpb:.6f}; "
          f"cold {sum(cold.times.values()):.1f}s {cold.times}; warm (profiled) {sum(warm.times.values()):.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
