"""Tokens/s before and after depth recurrence switches on, read from `golf train`/`golf run` logs.

    python tools/train_rates.py LOG... [--tokens-per-step 786432]

Rates come from the `step:N/... train_time:Tms` lines: (steps between two logged points) ×
tokens per step / (time between them), from the second logged point of each phase (the first
step of a phase pays for any lazy work) to its last.
"""

from __future__ import annotations

import argparse
import re
import sys

STEP = re.compile(r"^step:(\d+)/\d+ train_loss:\S+ train_time:(\d+)ms .*peak_mem:([\d.]+)GiB")
LOOP_ON = re.compile(r"^step:(\d+) depth recurrence on")
STARTUP = re.compile(r"startup to first timed step ([\d.]+)s")


def rate(points: list[tuple[int, float]], tokens_per_step: int) -> float:
    if len(points) < 3:
        return float("nan")
    (s0, t0), (s1, t1) = points[1], points[-1]
    return (s1 - s0) * tokens_per_step / (t1 - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("logs", nargs="+")
    ap.add_argument("--tokens-per-step", type=int, default=786_432)
    args = ap.parse_args()
    print(f"{'log':<32}{'startup s':>10}{'tok/s unlooped':>16}{'tok/s looped':>14}{'peak GiB':>10}")
    for path in args.logs:
        before, after, startup, peak, loop_step = [], [], float("nan"), 0.0, None
        for line in open(path, errors="replace"):
            if m := LOOP_ON.match(line):
                loop_step = int(m.group(1))
            elif m := STEP.match(line):
                point = (int(m.group(1)), int(m.group(2)) / 1000)
                (before if loop_step is None else after).append(point)
                peak = max(peak, float(m.group(3)))
            elif m := STARTUP.search(line):
                startup = float(m.group(1))
        print(f"{path[-32:]:<32}{startup:>10.1f}{rate(before, args.tokens_per_step):>16,.0f}"
              f"{rate(after, args.tokens_per_step):>14,.0f}{peak:>10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
