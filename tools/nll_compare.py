"""Two `golf eval --dump-nll` files of the same stream, compared by position within a document:
where one scoring (say LoRA TTT) gains or loses against another (say sliding windows).

    python tools/nll_compare.py BASE.npy OTHER.npy --data DIR [--max-tokens N]
                                [--edges 0 256 1024 2048 8192 32768]
"""

from __future__ import annotations

import argparse

import numpy as np

from golf.cli import run_script
from golf.data import list_shards, load_val_tokens
from golf.eval import _eval_doc_spans


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base")
    ap.add_argument("other")
    ap.add_argument("--data", required=True)
    ap.add_argument("--max-tokens", type=int, default=0)
    ap.add_argument("--edges", type=int, nargs="+", default=[0, 256, 1024, 2048, 8192, 32768])
    args = ap.parse_args()
    base, other = np.load(args.base), np.load(args.other)
    tokens = load_val_tokens(list_shards(args.data, "fineweb_val_*.bin"), args.max_tokens)
    n = tokens.numel() - 1
    if base.shape != (n,) or other.shape != (n,):
        raise SystemExit(f"dumps hold {base.shape} and {other.shape} NLLs; the stream has {n} targets")
    docs = _eval_doc_spans(tokens, n).numpy()
    position = np.concatenate([np.arange(b - a) for a, b in docs])  # of each target within its document
    length = np.concatenate([np.full(b - a, b - a) for a, b in docs])
    edges = args.edges + [np.iinfo(np.int64).max]

    def rows(key: np.ndarray) -> None:
        """One line per [lo, hi) bucket of `key` (a per-target value)."""
        for lo, hi in zip(edges[:-1], edges[1:]):
            m = (key >= lo) & (key < hi)
            if m.any():
                label = f"[{lo}, {hi})" if hi < edges[-1] else f">= {lo}"
                print(f"{label:<24}{int(m.sum()):>10,}{base[m].mean():>9.4f}{other[m].mean():>9.4f}"
                      f"{(other[m] - base[m]).mean():>+9.4f}")

    print(f"{n:,} targets in {len(docs)} documents; NLL in nats, other − base")
    print(f"{'position in document':<24}{'targets':>10}{'base':>9}{'other':>9}{'delta':>9}")
    rows(position)
    print("document length")
    rows(length)
    print(f"{'all':<24}{n:>10,}{base.mean():>9.4f}{other.mean():>9.4f}{(other - base).mean():>+9.4f}")
    return 0


if __name__ == "__main__":
    run_script(main, "nll_compare")
