"""A timing stream: the validation documents of DATA repeated TIMES times in a seeded shuffled
order, written as one shard `OUT/fineweb_val_000000.bin`. Evaluation time on it measures the
steady state of batched per-document TTT, which the 200 held-out documents alone are too few to
reach (their longest document's chunks dominate). Its BPB is not a score: documents repeat.

    python tools/replicate_val.py DATA OUT [--times 3] [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from golf.cli import run_script
from golf.data import BOS_ID, list_shards, load_val_tokens, write_shard
from golf.eval import _eval_doc_spans


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data")
    ap.add_argument("out")
    ap.add_argument("--times", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    tokens = load_val_tokens(list_shards(args.data, "fineweb_val_*.bin"))
    if tokens.numel() == 0 or int(tokens[0]) != BOS_ID:
        raise SystemExit(f"{args.data}: the validation stream does not start with BOS")
    docs = [tokens[a:b] for a, b in _eval_doc_spans(tokens, tokens.numel()).tolist()]
    order = torch.randperm(len(docs) * args.times, generator=torch.Generator().manual_seed(args.seed))
    stream = torch.cat([docs[int(i) % len(docs)] for i in order])
    out = Path(args.out) / "fineweb_val_000000.bin"
    write_shard(out, stream.numpy())
    print(f"{out}: {len(docs)} documents × {args.times} = {len(order)}, {stream.numel():,} tokens")
    return 0


if __name__ == "__main__":
    run_script(main, "replicate_val")
