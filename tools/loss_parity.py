"""Compare the per-step train losses of two `golf train` logs (e.g. one GPU vs torchrun on two).

    python tools/loss_parity.py LOG_A LOG_B [--first 10]

Prints max and mean |Δloss| over the steps both logs have, over the first N of them, and the
step with the largest difference.
"""

from __future__ import annotations

import argparse
import re
import sys

STEP = re.compile(r"^step:(\d+)/\d+ train_loss:(\S+) .*step_avg:([\d.]+)ms")


def losses(path: str) -> tuple[dict[int, float], float]:
    out, step_avg = {}, float("nan")
    for line in open(path, errors="replace"):
        if m := STEP.match(line):
            out[int(m.group(1))] = float(m.group(2))
            step_avg = float(m.group(3))
    return out, step_avg


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log_a")
    ap.add_argument("log_b")
    ap.add_argument("--first", type=int, default=10)
    args = ap.parse_args()
    (a, avg_a), (b, avg_b) = losses(args.log_a), losses(args.log_b)
    steps = sorted(set(a) & set(b))
    if not steps:
        print("loss_parity: the logs share no logged step", file=sys.stderr)
        return 2
    diff = {s: abs(a[s] - b[s]) for s in steps}
    first = steps[: args.first]
    worst = max(steps, key=diff.get)
    print(f"{len(steps)} common steps: max |dloss| {max(diff.values()):.4f} (step {worst}: {a[worst]:.4f} vs "
          f"{b[worst]:.4f}), mean {sum(diff.values()) / len(steps):.4f}; first {len(first)}: max "
          f"{max(diff[s] for s in first):.4f}; final loss {a[steps[-1]]:.4f} vs {b[steps[-1]]:.4f}; "
          f"step_avg {avg_a:.2f} vs {avg_b:.2f} ms ({avg_a / avg_b:.3f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
