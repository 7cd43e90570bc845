"""The log readers in tools/ that turn device logs into the numbers of docs/benchmarks.md."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def step_line(step: int, loss: float, ms: float, avg: float, mem: float = 1.0) -> str:
    return (f"step:{step}/100 train_loss:{loss:.4f} train_time:{ms:.0f}ms step_avg:{avg:.2f}ms tok/s:1 "
            f"mfu:0.000 peak_mem:{mem:.1f}GiB\n")


def run_tool(name: str, *args: str) -> str:
    out = subprocess.run([sys.executable, str(TOOLS / name), *args], capture_output=True, text=True, check=True)
    return out.stdout


def test_train_rates_splits_the_log_at_the_recurrence_switch(tmp_path):
    log = tmp_path / "train.log"
    # 1,000 tokens per step; before looping one step per 100 ms, after it one per 200 ms.
    lines = [step_line(s, 5.0, 100 * s, 100) for s in (1, 5, 10, 15)]
    lines.append("step:15 depth recurrence on: layer order [0, 1, 1, 2]\n")
    lines += [step_line(s, 4.0, 1500 + 200 * (s - 15), 120, mem=2.0) for s in (20, 25, 30)]
    lines.append("stopped (wallclock) at step 30, train_time:4500ms, startup to first timed step 12.5s\n")
    log.write_text("".join(lines))
    out = run_tool("train_rates.py", str(log), "--tokens-per-step", "1000").splitlines()[-1].split()
    assert out[1:] == ["12.5", "10,000", "5,000", "2.0"]


def test_loss_parity_reports_the_largest_difference(tmp_path):
    a, b = tmp_path / "a.log", tmp_path / "b.log"
    a.write_text("".join(step_line(s, 9.0 - s, 100 * s, 100.0) for s in range(1, 4)))
    b.write_text("".join(step_line(s, 9.0 - s + (0.01 if s == 2 else 0.0), 50 * s, 50.0) for s in range(1, 4)))
    out = run_tool("loss_parity.py", str(a), str(b))
    assert out.startswith("3 common steps: max |dloss| 0.0100 (step 2: 7.0000 vs 7.0100)")
    assert "(2.000x)" in out


def test_replicate_val_repeats_every_document_in_a_seeded_order(tmp_path):
    from golf.data import load_val_tokens, write_shard

    docs = [[1, 5, 6], [1, 7], [1, 8, 9, 10]]
    write_shard(tmp_path / "src" / "fineweb_val_000000.bin", [t for d in docs for t in d])
    out = run_tool("replicate_val.py", str(tmp_path / "src"), str(tmp_path / "rep"), "--times", "3")
    assert "3 documents × 3 = 9, 27 tokens" in out
    stream = load_val_tokens([tmp_path / "rep" / "fineweb_val_000000.bin"]).tolist()
    starts = [i for i, t in enumerate(stream) if t == 1] + [len(stream)]
    got = sorted(tuple(stream[a:b]) for a, b in zip(starts, starts[1:]))
    assert got == sorted(tuple(d) for d in docs * 3)
    again = subprocess.run([sys.executable, str(TOOLS / "replicate_val.py"), str(tmp_path / "src"),
                            str(tmp_path / "rep")], capture_output=True, text=True)
    assert again.returncode != 0 and "already exists" in again.stderr  # never overwrites


def test_nll_compare_buckets_by_position_in_the_document(tmp_path):
    import numpy as np

    from golf.data import write_shard

    write_shard(tmp_path / "fineweb_val_000000.bin", [1, 5, 6, 7, 1, 8, 9])  # targets: 4 + 2
    np.save(tmp_path / "base.npy", np.full(6, 2.0, dtype=np.float32))
    np.save(tmp_path / "other.npy", np.array([2.0, 2.0, 1.0, 1.0, 2.0, 2.0], dtype=np.float32))
    out = run_tool("nll_compare.py", str(tmp_path / "base.npy"), str(tmp_path / "other.npy"),
                   "--data", str(tmp_path), "--edges", "0", "2").splitlines()
    by_position = out[:out.index("document length")] + out[-1:]
    rows = {line.split()[0]: line.split()[-4:] for line in by_position if line.startswith(("[0,", ">=", "all"))}
    assert rows["[0,"] == ["4", "2.0000", "2.0000", "+0.0000"]  # positions 0-1 of both documents
    assert rows[">="] == ["2", "2.0000", "1.0000", "-1.0000"]  # positions 2-3 of the first
    assert rows["all"] == ["6", "2.0000", "1.6667", "-0.3333"]


def test_quant_study_runs_the_default_variants_on_a_tiny_run(tmp_path, tiny_data, tiny_tokenizer):
    """tools/quant_study.py end to end on the tiny preset (per-row Fisher k, as the record preset):
    every default variant fits, is scored, and has its gap split by class."""
    sets = [f"data_path={tiny_data}", f"tokenizer_path={tiny_tokenizer}", f"out_dir={tmp_path / 'run'}",
            "iterations=3", "gptq_calib_batches=2"]
    subprocess.run([sys.executable, "-m", "golf", "train", "--preset", "tiny",
                    *[a for kv in sets for a in ("--set", kv)]], capture_output=True, text=True, check=True)
    out = run_tool("quant_study.py", str(tmp_path / "run"))
    sys.path.insert(0, str(TOOLS))
    try:
        from quant_study import DEFAULT_VARIANTS
    finally:
        sys.path.remove(str(TOOLS))
    names = [spec.split("=", 1)[0] for spec in DEFAULT_VARIANTS]
    assert "Fisher clip k (row geometric mean)" in out
    assert out.count("gap by class alone") == len(names)
    table = out.split("fitter\n", 1)[1].splitlines()
    assert [row.split()[0] for row in table] == names and all(row.split()[2] == "yes" for row in table)


def test_bench_codecs_entropy_is_the_ideal_order0_size():
    sys.path.insert(0, str(TOOLS))
    try:
        from bench_codecs import order0_entropy_bytes, row_class_entropy_bytes
    finally:
        sys.path.remove(str(TOOLS))
    import torch

    assert order0_entropy_bytes(torch.tensor([0, 1, 2, 3] * 256, dtype=torch.int8)) == 256.0  # 2 bits each
    assert order0_entropy_bytes(torch.full((64,), 5, dtype=torch.int8)) == 0.0
    skewed = torch.tensor([0] * 3 + [1], dtype=torch.int8).repeat(100)  # p = 3/4, 1/4
    expected = 400 * -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25)) / 8
    assert abs(order0_entropy_bytes(skewed) - expected) < 1e-9
    # Half the rows constant, half spread over 4 values: mixed in one histogram they cost more
    # than with one histogram per class (plus 1 bit per row for the class).
    rows = torch.cat((torch.zeros(8, 256, dtype=torch.int8), torch.tensor([0, 1, 2, 3] * 64).repeat(8, 1)))
    per_class = row_class_entropy_bytes(rows[torch.randperm(16)], classes=2)
    assert per_class == 8 * 256 * 2 / 8 + 16 / 8
    assert per_class < order0_entropy_bytes(rows)
