"""Re-pack an artifact with each codec alone: compressed size, bits/param and wall time.

Usage: python tools/bench_codecs.py ARTIFACT [--workers N]
The artifact's quantized values are packed again unchanged, so the sizes compare the codecs on
exactly the submitted model. Wall time is for all frames on `--workers` threads (default: all CPUs).
Then, per class stream, the auto codec's bytes against the order-0 entropy of its values (each
tensor's own histogram): how much any entropy coder could still save; and against the entropy
with one histogram per row class (each tensor's rows split into ROW_CLASSES classes by the spread
of their values, the class of each row counted as side information): what a coder that switches
tables row by row could save, since a per-row clip k gives rows different spreads.
"""

import argparse
import math
import time

import torch

from golf.pack import PACK_CODECS, pack_with_stats, read_artifact

ROW_CLASSES = 8


def order0_entropy_bytes(q: torch.Tensor) -> float:
    """Bytes of an ideal coder for q's values with q's own histogram (no context)."""
    counts = torch.unique(q, return_counts=True)[1].double()
    p = counts / counts.sum()
    return float(-(counts * p.log2()).sum()) / 8


def row_class_entropy_bytes(q: torch.Tensor, classes: int = ROW_CLASSES) -> float:
    """Bytes of an ideal coder with one histogram per class of rows (rows ranked by the std of
    their values, cut into equal-count classes), plus log2(classes) bits per row for the class."""
    spread = q.float().std(dim=1)
    cls = torch.empty(q.size(0), dtype=torch.int64)
    cls[torch.argsort(spread, stable=True)] = torch.arange(q.size(0)) * classes // q.size(0)
    coded = sum(order0_entropy_bytes(q[cls == c]) for c in range(classes) if bool((cls == c).any()))
    return coded + q.size(0) * math.log2(classes) / 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("artifact")
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()
    qs, header = read_artifact(args.artifact)
    params = sum(rec.q.numel() if rec.kind == "quant" else rec.data.numel() for rec in qs.records.values())
    streams = [s["name"] for s in header["streams"]]
    print(f"{args.artifact}: {params:,} stored values in {len(streams)} streams")
    print(f"{'codec':<8} {'bytes':>12} {'bits/param':>11} {'wall s':>8}")
    for codec in (*PACK_CODECS, "auto"):
        forced = None if codec == "auto" else {name: codec for name in streams}
        t = time.perf_counter()
        blob, stats = pack_with_stats(qs, header["model_config"], header["tokenizer"], header["quant_config"],
                                      codecs=forced, run_config=header.get("run_config"), workers=args.workers)
        wall = time.perf_counter() - t
        print(f"{codec:<8} {len(blob):>12,} {8 * len(blob) / params:>11.3f} {wall:>8.1f}")
    kept = {st.name: st for st in stats.streams}  # the auto pack's streams
    print(f"\n{'stream':<12} {'values':>12} {'auto bytes':>12} {'entropy bytes':>14} {'auto/entropy':>13} "
          f"{'row-class bytes':>16} {'auto/row-class':>15}")
    for klass in sorted({rec.klass for rec in qs.records.values() if rec.kind == "quant"}):
        recs = [rec for rec in qs.records.values() if rec.kind == "quant" and rec.klass == klass]
        entropy = sum(order0_entropy_bytes(rec.q) for rec in recs)
        by_rows = sum(row_class_entropy_bytes(rec.q) for rec in recs)
        values, length = sum(rec.q.numel() for rec in recs), kept[klass].length
        print(f"{klass:<12} {values:>12,} {length:>12,} {entropy:>14,.0f} {length / entropy:>13.4f} "
              f"{by_rows:>16,.0f} {length / by_rows:>15.4f}")
    print(f"header (prefix + compressed JSON, as written now): {stats.header_bytes:,} bytes")


if __name__ == "__main__":
    main()
