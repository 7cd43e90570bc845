"""Records folders, submission.json, the loss-curve PNG, the Student-t statistics and `submit_run`."""

from __future__ import annotations

import hashlib
import json
import math
import struct
import zlib
from pathlib import Path

import pytest

import golf.submit as submit_mod
from golf.bundle import BundleInfo
from golf.config import load_config
from golf.submit import (
    CURVE_COLORS,
    README_BEGIN,
    README_END,
    SubmissionError,
    build_submission,
    describe_techniques,
    load_record_runs,
    loss_curve_png,
    one_sample_t,
    parse_seed_log,
    record_stats,
    student_t_cdf,
    submit_run,
    validate_submission,
    welch_t,
    write_record,
)

LN2 = math.log(2)
CODE_SHA = "ab" * 32


def _result(seed: int, bpb: float, **changes) -> dict:
    cfg = load_config("tiny", environ={}).to_dict()
    cfg["train"]["seed"] = seed
    bpt = changes.pop("bytes_per_token", 2.5)
    result = {
        "seed": seed, "preset": "tiny", "code_sha256": CODE_SHA, "config_sha256": "0" * 64, "config": cfg,
        "world_size": 8, "device": "NVIDIA H100 80GB HBM3", "steps": 4500, "train_time_s": 590.0,
        "gptq_time_s": 11.0, "eval_time_s": 420.0, "prequant": {"val_loss": 2.0, "val_bpb": bpb - 0.01},
        "quant": {"val_loss": 2.1, "val_bpb": bpb + 0.01},
        "sliding": {"val_loss": 2.05, "val_bpb": bpb + 0.002},
        "ttt": {"val_loss": bpb * LN2 * bpt, "val_bpb": bpb},
        "final": {"val_loss": bpb * LN2 * bpt, "val_bpb": bpb, "tokens": 1000, "bytes": int(1000 * bpt)},
        "bytes_total": 15_900_000 + seed, "bytes_code": 30_000, "bytes_model": 15_870_000 + seed,
        "bytes_per_token": bpt, "calibration_source": "train", "ttt_mode": "sgd",
        "versions": {"torch": "2.9"},
    }
    for key, value in changes.items():
        if key == "num_layers":
            result["config"]["model"]["num_layers"] = value
        else:
            result[key] = value
    return result


def _write_log(folder: Path, seed: int, bpb: float, **changes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    losses = [(s, 7.0 - 3.0 * s / 100 + 0.01 * (seed % 7)) for s in range(0, 101, 10)]
    lines = ["# golf submit header (the run's own output follows)", f"# code_sha256: {CODE_SHA}",
             f"golf run: preset tiny seed {seed}"]
    lines += [f"step:{s}/100 train_loss:{v:.4f} train_time:{s * 100}ms step_avg:100.00ms tok/s:1000"
              for s, v in losses]
    lines += ["step:100/100 val_loss:2.0000 val_bpb:1.1000",
              "Total submission size final_model.golf: 1 bytes",
              "golf_result " + json.dumps(_result(seed, bpb, **changes))]
    path = folder / f"train_seed{seed}.log"
    path.write_text("\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------------------- Student t


def _t_pdf(x: float, df: float) -> float:
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    return c * (1 + x * x / df) ** (-(df + 1) / 2)


def test_student_t_cdf_matches_tables_and_integration():
    # Two-sided p of the classic table values for df=4.
    assert 2 * (1 - student_t_cdf(2.776, 4)) == pytest.approx(0.05, abs=2e-4)
    assert 2 * (1 - student_t_cdf(4.604, 4)) == pytest.approx(0.01, abs=2e-5)
    assert student_t_cdf(1.0, 1) == pytest.approx(0.75, abs=1e-12)  # Cauchy: 1/2 + atan(1)/pi
    assert student_t_cdf(0.0, 7) == pytest.approx(0.5, abs=1e-15)
    assert student_t_cdf(-1.3, 3.7) == pytest.approx(1 - student_t_cdf(1.3, 3.7), abs=1e-14)
    assert student_t_cdf(1.959964, 1e7) == pytest.approx(0.975, abs=1e-6)  # → the normal
    assert student_t_cdf(math.inf, 3) == 1.0 and student_t_cdf(-math.inf, 3) == 0.0
    # Fractional df (Welch): against Simpson integration of the density from 0.
    df, t, n = 3.7, 1.3, 2000
    h = t / n
    simpson = h / 3 * sum((1 if i in (0, n) else 4 if i % 2 else 2) * _t_pdf(i * h, df) for i in range(n + 1))
    assert student_t_cdf(t, df) == pytest.approx(0.5 + simpson, abs=1e-10)


def test_one_sample_and_welch_against_hand_formulas():
    values = [0.012, 0.010, 0.015, 0.011]
    mean = sum(values) / 4
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 3)
    test = one_sample_t(values, 0.005)
    assert test["t"] == pytest.approx((mean - 0.005) / (sd / 2))
    assert test["df"] == 3 and test["p"] == pytest.approx(1 - student_t_cdf(test["t"], 3))
    assert test["cohens_d"] == pytest.approx((mean - 0.005) / sd)
    assert one_sample_t([0.02], 0.005)["p"] is None  # one seed cannot be tested

    a, b = [1.0, 1.2, 1.1], [0.5, 0.7, 0.4, 0.6]
    w = welch_t(a, b)
    va, vb = 0.01 / 3, (sum((x - 0.55) ** 2 for x in b) / 3) / 4
    assert w["t"] == pytest.approx(0.55 / math.sqrt(va + vb))
    assert w["df"] == pytest.approx((va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 3))
    assert w["p"] < 0.01 and w["cohens_d"] > 0


# ----------------------------------------------------------------------------- stats and compliance


def test_record_stats_nats_and_sota_significance(tmp_path):
    folder = tmp_path / "2026-05-01_Run"
    bpbs = {1: 1.0800, 2: 1.0810, 3: 1.0790}
    for seed, bpb in bpbs.items():
        _write_log(folder, seed, bpb, bytes_per_token=2.4 + seed / 100)
    stats = record_stats(folder, sota=1.0900)
    assert stats["n"] == 3 and stats["seeds"] == [1, 2, 3]
    assert stats["val_bpb_mean"] == pytest.approx(1.08)
    assert stats["val_bpb_std"] == pytest.approx(0.001)
    nats = [bpbs[s] * LN2 * (2.4 + s / 100) for s in (1, 2, 3)]
    assert [r["nats_per_token"] for r in stats["runs"]] == pytest.approx(nats)
    gains = [(1.0900 - bpbs[s]) * LN2 * (2.4 + s / 100) for s in (1, 2, 3)]
    expected = one_sample_t(gains, 0.005)
    sota = stats["vs_sota"]
    assert sota["t"] == pytest.approx(expected["t"]) and sota["p"] == pytest.approx(expected["p"])
    assert sota["p"] < 0.01 and sota["significant"]
    close = record_stats(folder, sota=1.0840)["vs_sota"]  # ~0.007 nats better: not 0.005 at p < 0.01
    assert close["gain_nats_mean"] > 0.005 and close["p"] > 0.01 and not close["significant"]
    assert stats["compliance"]["ok"], stats["compliance"]


def test_record_stats_welch_against_other_folder(tmp_path):
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    for seed, bpb in ((1, 1.0700), (2, 1.0712), (3, 1.0695)):
        _write_log(ours, seed, bpb)
    for seed, bpb in ((7, 1.0810), (8, 1.0822), (9, 1.0801)):
        _write_log(theirs, seed, bpb)
    vs = record_stats(ours, against=theirs)["vs_other"]
    expected = welch_t([b * LN2 * 2.5 for b in (1.0810, 1.0822, 1.0801)],
                       [b * LN2 * 2.5 for b in (1.0700, 1.0712, 1.0695)], 0.005)
    assert vs["t"] == pytest.approx(expected["t"]) and vs["df"] == pytest.approx(expected["df"])
    assert vs["gain_nats_mean"] == pytest.approx(0.0109 * LN2 * 2.5, rel=0.05)
    assert vs["significant"] and vs["cohens_d"] > 3
    reverse = record_stats(theirs, against=ours)["vs_other"]
    assert reverse["gain_nats_mean"] < 0 and not reverse["significant"]


def test_compliance_flags_each_rule(tmp_path):
    folder = tmp_path / "bad"
    _write_log(folder, 1, 1.08)
    _write_log(folder, 2, 1.08, code_sha256="cd" * 32, train_time_s=601.0, num_layers=9)
    _write_log(folder, 3, 1.08, eval_time_s=650.0, bytes_total=16_000_001, ttt_mode="slot",
               calibration_source="val")
    report = record_stats(folder)["compliance"]
    failed = {c["name"] for c in report["checks"] if not c["ok"]}
    assert not report["ok"]
    assert failed == {"same code", "same config", "training <= 600 s incl. GPTQ calibration",
                      "evaluation <= 600 s incl. TTT", "size <= 16,000,000 bytes", "TTT is score-first",
                      "GPTQ calibrated on training data"}
    (folder / "train_gpt.py").write_bytes(b"print('other code')")
    checks = {c["name"]: c["ok"] for c in record_stats(folder)["compliance"]["checks"]}
    assert checks["runs used this train_gpt.py"] is False


def test_seed_logs_are_parsed_strictly(tmp_path):
    log = _write_log(tmp_path, 5, 1.1)
    run = parse_seed_log(log)
    assert run.seed == 5 and run.header["code_sha256"] == CODE_SHA
    assert run.losses[0] == (0, pytest.approx(7.05)) and len(run.losses) == 11
    unfinished = tmp_path / "train_seed6.log"
    unfinished.write_text("step:1/10 train_loss:5.0\n")
    with pytest.raises(SubmissionError, match="train_seed6.log: no golf_result"):
        parse_seed_log(unfinished)
    renamed = tmp_path / "train_seed7.log"
    renamed.write_text(log.read_text())
    with pytest.raises(SubmissionError, match="seed is 5, not the 7"):
        parse_seed_log(renamed)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SubmissionError, match="no train_seed"):
        load_record_runs(tmp_path / "empty")


# ----------------------------------------------------------------------------- submission.json


def _valid_submission(tmp_path) -> dict:
    for seed, bpb in ((1, 1.08), (2, 1.09)):
        _write_log(tmp_path / "f", seed, bpb)
    meta = {"name": "Run", "author": "A", "github_id": "a", "blurb": "b", "date": "2026-05-01",
            "track": "10min_16mb"}
    return build_submission(load_record_runs(tmp_path / "f"), meta)


def test_build_submission_aggregates_seeds(tmp_path):
    sub = _valid_submission(tmp_path)
    assert sub["val_bpb"] == pytest.approx(1.085) and sub["val_bpb_std"] == pytest.approx(0.01 / math.sqrt(2))
    assert (sub["bytes_total"], sub["bytes_model"], sub["bytes_code"]) == (15_900_002, 15_870_002, 30_000)
    assert [s["seed"] for s in sub["seeds"]] == [1, 2] and sub["hardware"] == "8x NVIDIA H100 80GB HBM3"


@pytest.mark.parametrize("field, value, message", [
    ("val_bpb", "1.08", "'val_bpb' must be a finite number"),
    ("val_bpb", 1.2, "'val_bpb' is 1.2 but the mean over seeds"),
    ("date", "2026-13-01", "'date' must be a YYYY-MM-DD"),
    ("name", "a/b", "'name' must be letters"),
    ("bytes_total", -5, "'bytes_total' must be an integer > 0"),
    ("bytes_total", 15_000_000, "largest seed's is 15900002"),
    ("code_sha256", "xyz", "'code_sha256' must be 64"),
    ("schema", "v0", "'schema' must be"),
    ("seeds", [], "'seeds' must be a non-empty list"),
    ("github_id", None, "'github_id' must be a string"),
])
def test_validate_submission_names_the_bad_field(tmp_path, field, value, message):
    sub = _valid_submission(tmp_path)
    validate_submission(dict(sub))
    sub[field] = value
    with pytest.raises(SubmissionError, match=message.replace("(", r"\(")) as err:
        validate_submission(sub)
    assert str(err.value).startswith("submission.json: ") and "\n" not in str(err.value)


def test_validate_submission_rejects_duplicate_seed(tmp_path):
    sub = _valid_submission(tmp_path)
    sub["seeds"][1]["seed"] = 1
    with pytest.raises(SubmissionError, match="lists a seed twice"):
        validate_submission(sub)


# ----------------------------------------------------------------------------- PNG


def _decode_png(data: bytes) -> tuple[int, int, bytes]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        tag, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(tag + body), tag
        chunks[tag] = chunks.get(tag, b"") + body
        pos += 12 + length
    width, height, depth, color = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, color) == (8, 2) and b"IEND" in chunks
    raw = zlib.decompress(chunks[b"IDAT"])
    rows = [raw[y * (width * 3 + 1):(y + 1) * (width * 3 + 1)] for y in range(height)]
    assert all(r[0] == 0 for r in rows)
    return width, height, b"".join(r[1:] for r in rows)


def test_loss_curve_png_draws_one_colored_line_per_seed():
    steps = range(0, 201, 10)
    curves = {42: [(s, 6.0 - s / 50) for s in steps], 7: [(s, 6.2 - s / 45) for s in steps]}
    width, height, pixels = _decode_png(loss_curve_png(curves, width=400, height=300))
    assert (width, height) == (400, 300)
    colors = [tuple(pixels[i:i + 3]) for i in range(0, len(pixels), 3)]
    # Seeds are drawn in sorted order: 7 gets the first color, 42 the second.
    assert colors.count(CURVE_COLORS[0]) > 300 and colors.count(CURVE_COLORS[1]) > 300
    assert colors.count((0, 0, 0)) > 500  # the axes
    assert colors.count((60, 60, 60)) > 50  # tick labels and the legend's seed numbers
    # The first seed's line runs from the top-left region down to the bottom-right.
    first = [i for i, c in enumerate(colors) if c == CURVE_COLORS[0]]
    assert min(i // width for i in first) < height // 3 and max(i % width for i in first) > width * 0.9


# ----------------------------------------------------------------------------- README and folder


def test_techniques_name_the_quantizer_settings():
    record = " ".join(describe_techniques(load_config("record", environ={})))
    assert "per-row k from the Fisher of 32 training windows, within ×/÷2.5 of those" in record
    assert "one factor on every k fitted to the cap" in record and "per-tensor" not in record
    assert "step factor per column" not in record
    stepped = " ".join(describe_techniques(load_config("record", ["gptq_col_alpha=0.5"], environ={})))
    assert "a step factor per column from GPTQ's column weights (alpha 0.5)" in stepped
    assert ("score-first document LoRA TTT: rank 96, lr 0.0003, 48-token chunks, 3 phased global SGD "
            "pauses; adapting stops 540 s into the evaluation") in record
    assert "each document on its own, in 48-token chunks that each see up to 1,024 tokens" in record
    assert "sliding window" not in record
    sgd = " ".join(describe_techniques(load_config("record", ["ttt_mode=sgd"], environ={})))
    assert "eval: sliding window 2048 stride 64" in sgd and "chunked TTT" in sgd
    tensors = " ".join(describe_techniques(load_config("record", ["clip_alloc=fisher"], environ={})))
    assert "per-tensor k from the Fisher of 32 training windows" in tensors and "per-row" not in tensors
    assert ("late QAT from 30% of the wallclock (the quantized weights' SDClip grid at class k × 1.115, "
            "straight-through)") in record
    baseline = " ".join(describe_techniques(load_config("baseline", environ={})))
    assert "Fisher" not in baseline and "fitted to the cap" not in baseline and "QAT" not in baseline


def test_write_record_keeps_hand_edits_and_adds_seeds(tmp_path):
    folder = tmp_path / "records" / "track_10min_16mb" / "2026-05-01_MyRun"
    _write_log(folder, 1, 1.08)
    sub = write_record(folder, github_id="me", blurb="Tiny test run.")
    assert sub["name"] == "MyRun" and sub["date"] == "2026-05-01" and sub["track"] == "10min_16mb"
    readme = (folder / "README.md").read_text()
    assert readme.startswith("# MyRun\n\nTiny test run.\n")
    assert README_BEGIN in readme and README_END in readme
    assert "| 1 | 1.08000000 |" in readme and "## Size ledger" in readme and "loss_curve.png" in readme
    assert "SEED=1 torchrun --standalone --nproc_per_node=8 train_gpt.py" in readme
    (folder / "README.md").write_text(readme + "\n## Notes\n\nHand-written analysis.\n")
    (folder / "submission.json").write_text(json.dumps({**sub, "pr": 1234}))  # a submitter's own key
    _write_log(folder, 2, 1.09)
    sub = write_record(folder)
    readme = (folder / "README.md").read_text()
    assert "Hand-written analysis." in readme and "| 2 | 1.09000000 |" in readme
    assert readme.count(README_BEGIN) == 1
    on_disk = json.loads((folder / "submission.json").read_text())
    assert on_disk == sub and on_disk["github_id"] == "me" and on_disk["blurb"] == "Tiny test run."
    assert on_disk["pr"] == 1234
    assert len(on_disk["seeds"]) == 2 and on_disk["val_bpb"] == pytest.approx(1.085)
    assert _decode_png((folder / "loss_curve.png").read_bytes())[0] == 720
    (folder / "README.md").write_text("# mine\n")
    with pytest.raises(SubmissionError, match="no golf markers"):
        write_record(folder)


# ----------------------------------------------------------------------------- submit_run


FAKE_SCRIPT = '''import hashlib, json, os, sys
seed = int(os.environ["SEED"])
print("stray env NUM_LAYERS=" + str(os.environ.get("NUM_LAYERS")))
if seed == 13:
    sys.exit(3)
cfg = json.loads({config!r})
cfg["train"]["seed"] = seed
for s in range(0, 21, 5):
    print(f"step:{{s}}/20 train_loss:{{6 - s / 10:.4f}} train_time:{{s}}ms step_avg:1.00ms tok/s:1")
open(os.path.join(os.environ["GOLF_OUT_DIR"], "final_model.golf"), "wb").write(b"model")
code = open(__file__, "rb").read()
bpb = 1.5 + seed / 1000
print("golf_result " + json.dumps({{"seed": seed, "preset": "tiny", "config": cfg, "world_size": 1,
    "device": "cpu", "steps": 20, "train_time_s": 1.0, "gptq_time_s": 0.1, "eval_time_s": 2.0,
    "code_sha256": hashlib.sha256(code).hexdigest(), "final": {{"val_loss": bpb * 1.7, "val_bpb": bpb}},
    "bytes_total": len(code) + 5, "bytes_code": len(code), "bytes_model": 5, "bytes_per_token": 2.45,
    "calibration_source": "train", "ttt_mode": "sgd"}}))
'''


def _fake_bundle(cfg, out_dir):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    source = FAKE_SCRIPT.format(config=json.dumps(cfg.to_dict())).encode()
    (out / "train_gpt.py").write_bytes(source)
    (out / "train_gpt_readable.py").write_bytes(source)
    return BundleInfo(out, out / "train_gpt.py", out / "train_gpt_readable.py", len(source), len(source),
                      hashlib.sha256(source).hexdigest(), "none")


def test_submit_run_builds_and_extends_a_records_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(submit_mod, "bundle", _fake_bundle)
    monkeypatch.setenv("NUM_LAYERS", "99")  # must not leak into the run
    cfg = load_config("tiny", environ={})
    kw = dict(name="demo", records_dir=tmp_path / "records", work_dir=tmp_path / "work", echo=lambda _: None)
    out = submit_run(cfg, seed=1, date="2026-05-01", command="golf submit --seed 1", **kw)
    folder = tmp_path / "records" / "2026-05-01_demo"
    assert out["folder"] == folder
    log = (folder / "train_seed1.log").read_text()
    header = log.split("stray env")[0]
    assert "# golf_command: golf submit --seed 1" in header and "# command: SEED=1 " in header
    assert f"# code_sha256: {out['bundle'].code_sha256}" in header
    assert '"seed": 1' in header.split("# config: ")[1] and "# versions: {" in header
    assert "stray env NUM_LAYERS=None" in log
    assert (folder / "train_gpt.py").read_bytes() == out["bundle"].script.read_bytes()
    assert not (folder / "final_model.golf").exists()  # the artifact stays in the work folder

    out2 = submit_run(cfg, seed=2, date="2026-05-02", **kw)  # a later day reuses the folder
    assert out2["folder"] == folder and sorted(p.name for p in folder.glob("train_seed*.log")) == [
        "train_seed1.log", "train_seed2.log"]
    sub = json.loads((folder / "submission.json").read_text())
    assert [s["seed"] for s in sub["seeds"]] == [1, 2] and sub["val_bpb"] == pytest.approx(1.5015)
    assert sub["bytes_code"] == out["bundle"].code_bytes
    assert record_stats(folder)["compliance"]["ok"]

    with pytest.raises(SubmissionError, match="train_seed1.log already exists"):
        submit_run(cfg, seed=1, **kw)
    other = load_config("tiny", ["iterations=61"], environ={})
    with pytest.raises(SubmissionError, match="differs from this bundle"):
        submit_run(other, seed=3, **kw)
    with pytest.raises(SubmissionError, match="exited with status 3"):
        submit_run(cfg, seed=13, **kw)
    assert not (folder / "train_seed13.log").exists() and not (folder / "train_seed3.log").exists()
    assert json.loads((folder / "submission.json").read_text()) == sub


def test_schema_doc_example_validates():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "submission-schema.md").read_text()
    example = json.loads(doc.split("```json\n", 1)[1].split("```", 1)[0])
    assert validate_submission(example)["seeds"][0]["seed"] == 42
