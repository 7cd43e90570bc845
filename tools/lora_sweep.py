"""LoRA TTT settings side by side on the first tokens of the validation stream, warm.

    python tools/lora_sweep.py ARTIFACT --data DIR --tokenizer MODEL [--max-tokens 100000]
                               [--lr 0 1e-4 3e-4 1e-3 3e-3] [--set key=value]...

Scores the same stream with sliding windows and with per-document LoRA at each learning rate
(lr 0 = the base model with document-only context, the fair reference for LoRA's gain). The
first LoRA run is repeated after the others, so compile time shows up as the difference between
its cold and warm times and every other time is warm.
"""

from __future__ import annotations

import argparse
import sys

from golf.eval import eval_artifact


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--data", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--max-tokens", type=int, default=100_000)
    ap.add_argument("--lr", type=float, nargs="+", default=[0.0, 1e-4, 3e-4, 1e-3, 3e-3])
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()
    quiet = lambda _msg: None  # noqa: E731

    def run(ttt: str, extra: list[str]) -> tuple[float, float]:
        """(BPB, seconds of evaluation proper: the artifact's loading is not counted)."""
        r, _ = eval_artifact(args.artifact, data=args.data, tokenizer=args.tokenizer, ttt=ttt,
                             sliding=ttt == "none", max_tokens=args.max_tokens, overrides=args.set + extra, log=quiet)
        return r.val_bpb, sum(r.times.values())

    rows = []
    bpb, secs = run("none", [])
    rows.append(("sliding (cold)", bpb, secs))
    bpb, secs = run("none", [])
    rows.append(("sliding (warm)", bpb, secs))
    for i, lr in enumerate(args.lr):
        bpb, secs = run("lora", [f"lora_lr={lr}"])
        rows.append((f"lora lr {lr:g}" + (" (cold)" if i == 0 else ""), bpb, secs))
        print(f"{rows[-1][0]}: {bpb:.6f} in {secs:.1f}s", flush=True)
    bpb, secs = run("lora", [f"lora_lr={args.lr[0]}"])
    rows.append((f"lora lr {args.lr[0]:g} (warm)", bpb, secs))
    print(f"\nfirst {args.max_tokens:,} validation tokens")
    print(f"{'run':<24}{'val_bpb':>11}{'seconds':>10}")
    for name, bpb, secs in rows:
        print(f"{name:<24}{bpb:>11.6f}{secs:>10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
