"""golf.pack: bit-exact container, hostile-input rejection, size-check exit codes, predictor, fitter, CLI."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import brotli
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import golf.pack as pack_mod
from golf.cli import app
from golf.config import tiny
from golf.model import GPT
from golf.pack import (
    PACK_HEADER_MAX,
    PACK_PREFIX,
    PACK_RATIO_K,
    PACK_RATIO_TABLE,
    PACK_VERSION,
    ArtifactError,
    artifact_pack_stats,
    measure_ratio,
    measured_ratios,
    pack_bytes,
    pack_with_stats,
    predict_size,
    read_artifact,
    size_check,
    unpack_bytes,
    write_artifact,
)
from golf.quant import (
    BudgetError,
    QuantError,
    collect_fisher,
    collect_hessians,
    dequantize_state,
    fisher_clip_k,
    fit_to_budget,
    quantize_state,
)

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_META = {"sha256": "ab" * 32, "vocab_size": 512}


def _trained_like(model: GPT) -> None:
    # No two tensors equal, no zero projections: what a trained model looks like to the packer.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)


@pytest.fixture(scope="module")
def quantized():
    """A tiny GPT with trained-like weights, GPTQ-quantized in every class, with LQER."""
    cfg = tiny()
    cfg.quant = dataclasses.replace(cfg.quant, passthrough_max_numel=1024, lqer_rank=2, lqer_tensors=2,
                                    mlp_bits=5)
    torch.manual_seed(0)
    model = GPT(cfg.model)
    _trained_like(model)
    g = torch.Generator().manual_seed(1)
    hessians = collect_hessians(model, [torch.randint(0, 512, (2, 32), generator=g) for _ in range(2)])
    # A copy per key, as `.cpu()` of CUDA tensors makes: the tie survives only by value.
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    qs = quantize_state(state, cfg.quant, hessians)
    blob, stats = pack_with_stats(qs, cfg.model, TOKENIZER_META, cfg.quant)
    return cfg, state, hessians, qs, blob, stats


@pytest.fixture(scope="module")
def col_stepped(quantized):
    """The same model quantized with a step factor per column (`gptq_col_alpha`, opt-in)."""
    cfg, state, hessians = quantized[:3]
    qcfg = dataclasses.replace(cfg.quant, gptq_col_alpha=0.5, lqer_rank=0)
    qs = quantize_state(state, qcfg, hessians)
    return cfg, qcfg, qs, pack_bytes(qs, cfg.model, TOKENIZER_META, qcfg)


def _reframe(header: dict, payload: bytes, version: int = PACK_VERSION) -> bytes:
    """An artifact with this header: brotli-compressed JSON from version 2 on, plain JSON in 1."""
    h = json.dumps(header).encode()
    h = brotli.compress(h) if version >= 2 else h
    return PACK_PREFIX.pack(b"GOLFART1", version, len(h)) + h + payload


def _split(blob: bytes) -> tuple[dict, bytes]:
    _, version, n = PACK_PREFIX.unpack_from(blob)
    stored = blob[PACK_PREFIX.size:PACK_PREFIX.size + n]
    return json.loads(brotli.decompress(stored) if version >= 2 else stored), blob[PACK_PREFIX.size + n:]


def test_pack_unpack_is_bit_exact(quantized):
    cfg, _, _, qs, blob, stats = quantized
    back, header = unpack_bytes(blob)
    assert list(back.records) == list(qs.records)
    kinds = set()
    for name, rec in qs.records.items():
        got = back.records[name]
        kinds.add((rec.kind, rec.klass))
        assert (got.kind, got.klass, got.bits, got.shape, got.aliases) == (rec.kind, rec.klass, rec.bits,
                                                                           rec.shape, rec.aliases)
        for part in ("q", "scale", "col_exp", "data"):
            a, b = getattr(rec, part), getattr(got, part)
            assert (a is None) == (b is None)
            if a is not None:
                assert a.dtype == b.dtype and torch.equal(a, b), (name, part)
        assert (rec.lqer is None) == (got.lqer is None)
        if rec.lqer is not None:
            for part in ("a_q", "a_scale", "b_q", "b_scale"):
                assert torch.equal(getattr(rec.lqer, part), getattr(got.lqer, part))
    assert {("quant", c) for c in ("embedding", "attention", "mlp")} <= kinds
    assert ("passthrough", "other") in kinds
    assert len(qs.stats.lqer) == 2
    assert qs.records["tok_emb.weight"].aliases == ["lm_head.weight"]  # stored once despite the copies
    assert header["model_config"] == dataclasses.asdict(cfg.model)
    assert header["quant_config"] == dataclasses.asdict(cfg.quant)
    assert header["tokenizer"] == TOKENIZER_META
    streams = {"embedding", "attention", "mlp", "lqer", "scales", "passthrough"}
    assert {s.name for s in stats.streams} == streams
    assert all(set(s.sizes) == {"brotli", "lzma", "zstd"} and s.length == min(s.sizes.values())
               for s in stats.streams)
    assert pack_bytes(qs, cfg.model, TOKENIZER_META, cfg.quant) == blob  # deterministic


def test_loss_from_artifact_file_equals_in_process_dequantized(quantized, tmp_path):
    cfg, _, _, qs, blob, _ = quantized
    path = write_artifact(tmp_path / "model.golf", blob)
    back, header = read_artifact(path)
    ids = torch.randint(0, 512, (2, 33), generator=torch.Generator().manual_seed(7))
    in_process, from_file = GPT(cfg.model), GPT(type(cfg.model)(**header["model_config"]))
    in_process.load_state_dict(dequantize_state(qs), strict=True)
    from_file.load_state_dict(dequantize_state(back), strict=True)
    with torch.no_grad():
        a = in_process.loss(ids[:, :-1], ids[:, 1:])
        b = from_file.loss(ids[:, :-1], ids[:, 1:])
    assert a.item() == b.item()
    assert from_file.lm_head.weight is from_file.tok_emb.weight


def test_column_steps_round_trip_and_are_checked(col_stepped):
    cfg, qcfg, qs, blob = col_stepped
    back, header = unpack_bytes(blob)
    stepped = [n for n, rec in qs.records.items() if rec.col_exp is not None]
    assert stepped and all(qs.stats.method[n] == "gptq" for n in stepped)
    for name in stepped:
        assert torch.equal(back.records[name].col_exp, qs.records[name].col_exp)
    assert all(torch.equal(a, b) for a, b in zip(dequantize_state(qs).values(), dequantize_state(back).values()))
    entry = next(e for e in header["tensors"] if e["name"] == stepped[0])
    assert [p["stream"] for p in entry["parts"] if p["part"] == "col_exp"] == ["raw"]
    # Before any artifact, the predictor prices the exponents uncompressed: one byte per column.
    raw = [r for r in predict_size(cfg.model, qcfg).rows if r.group == "raw"]
    assert raw and raw[0].bytes == sum(qs.records[n].shape[1] for n in stepped)
    _, payload = _split(blob)
    with pytest.raises(ArtifactError, match="unexpected part"):  # version 2 had no column steps
        unpack_bytes(_reframe(dict(header, format_version=2), payload, version=2))
    rec = qs.records[stepped[0]]
    bad = rec.col_exp.clone()
    bad[0] = -128
    bad_qs = dataclasses.replace(qs, records={**qs.records, stepped[0]: dataclasses.replace(rec, col_exp=bad)})
    with pytest.raises(ArtifactError, match="col_exp: values outside"):
        unpack_bytes(pack_bytes(bad_qs, cfg.model, TOKENIZER_META, qcfg))


@pytest.mark.parametrize("codec", ["brotli", "lzma", "zstd"])
def test_each_codec_round_trips(quantized, codec):
    cfg, _, _, qs, _, _ = quantized
    qcfg = dataclasses.replace(cfg.quant, codec=codec)
    blob = pack_bytes(qs, cfg.model, TOKENIZER_META, qcfg)
    back, header = unpack_bytes(blob)
    assert {s["codec"] for s in header["streams"]} == {codec}
    assert torch.equal(back.records["tok_emb.weight"].q, qs.records["tok_emb.weight"].q)


def test_write_artifact_is_atomic_and_refuses_overwrite(tmp_path):
    path = write_artifact(tmp_path / "a.golf", b"first")
    with pytest.raises(ArtifactError, match="already exists"):
        write_artifact(path, b"second")
    assert path.read_bytes() == b"first"
    write_artifact(path, b"second", overwrite=True)
    assert path.read_bytes() == b"second" and sorted(os.listdir(tmp_path)) == ["a.golf"]


def test_hostile_or_damaged_artifacts_raise_artifact_error(quantized, tmp_path):
    blob = quantized[4]
    header, payload = _split(blob)
    flipped = bytearray(blob)
    flipped[len(blob) - len(payload) // 2] ^= 0xFF
    bomb = brotli.compress(b" " * (PACK_HEADER_MAX + 1))  # a few bytes that expand past the cap
    cases = [
        ("corrupt", bytes(flipped)),
        ("truncated", blob[:-7]),
        ("truncated", blob[:10]),
        ("bad magic", b"NOTGOLF1" + blob[8:]),
        ("unknown artifact format version 4", _reframe(header, payload, version=4)),
        ("unexpected bytes", blob + b"\0"),
        ("exceeds", PACK_PREFIX.pack(b"GOLFART1", 1, 1 << 40) + b"{}"),
        ("not valid UTF-8 JSON", PACK_PREFIX.pack(b"GOLFART1", 1, 4) + b"\xff{x}" + payload),
        ("brotli cannot decode", PACK_PREFIX.pack(b"GOLFART1", 2, 4) + b"\xff{x}" + payload),
        ("decompresses to more than", PACK_PREFIX.pack(b"GOLFART1", 2, len(bomb)) + bomb + payload),
        ("format_version differs", _reframe(header, payload, version=1)),  # a version-3 header
    ]
    for expected, data in cases:
        with pytest.raises(ArtifactError, match=expected):
            unpack_bytes(data)
    bad = json.loads(json.dumps(header))
    bad["tensors"][0]["parts"][0]["dtype"] = "object"
    with pytest.raises(ArtifactError, match="dtype"):
        unpack_bytes(_reframe(bad, payload))
    with pytest.raises(ArtifactError, match="not found"):
        read_artifact(tmp_path / "missing.golf")
    # Checksums right, values wrong: an int8 −128 is outside ±127 (abs() of it overflows).
    cfg, qs = quantized[0], quantized[3]
    rec = qs.records["tok_emb.weight"]
    q = rec.q.clone()
    q[0, 0] = -128
    bad_qs = dataclasses.replace(qs, records={**qs.records, "tok_emb.weight": dataclasses.replace(rec, q=q)})
    with pytest.raises(ArtifactError, match="outside"):
        unpack_bytes(pack_bytes(bad_qs, cfg.model, TOKENIZER_META, cfg.quant))


def test_huge_claimed_shape_is_rejected_before_decoding(quantized, monkeypatch):
    header, payload = _split(quantized[4])
    entry = next(e for e in header["tensors"] if e["kind"] == "quant")
    q = next(p for p in entry["parts"] if p["part"] == "q")
    stream = next(s for s in header["streams"] if s["name"] == q["stream"])
    rows = cols = 100_000  # 10 GB of int8, consistently described
    stream["raw_length"] += rows * cols - q["length"]
    entry["shape"] = q["shape"] = [rows, cols]
    q["length"] = rows * cols

    def no_decode(*args, **kwargs):
        raise AssertionError("decoded a stream of an artifact that should have been rejected")

    monkeypatch.setattr(pack_mod, "_pack_decompress", no_decode)
    monkeypatch.setattr(np, "frombuffer", no_decode)
    with pytest.raises(ArtifactError, match="cap"):
        unpack_bytes(_reframe(header, payload))


def test_size_check_ledger_adds_up(quantized, tmp_path):
    path = write_artifact(tmp_path / "m.golf", quantized[4])
    code = tmp_path / "train_gpt.py"
    code.write_text("print('hi')\n")
    report = size_check(path, code, cap=16_000_000)
    assert report.total == len(quantized[4]) + code.stat().st_size == sum(report.ledger.values())
    assert report.ledger["code"] == code.stat().st_size and report.ledger["header"] > PACK_PREFIX.size
    assert report.ledger["mlp"] > 0 and report.fits and report.margin == 16_000_000 - report.total
    assert "TOTAL" in report.format_table()


def test_size_check_exit_codes(quantized, tmp_path, monkeypatch, capsys):
    import golf.cli

    blob = quantized[4]
    header, payload = _split(blob)
    flipped = bytearray(blob)
    flipped[-len(payload) // 3] ^= 0x55
    files = {"good": blob, "corrupt": bytes(flipped), "truncated": blob[: len(blob) // 2],
             "magic": b"BADMAGIC" + blob[8:], "version": _reframe(header, payload, version=9)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    # Real processes for one case of each exit status (run side by side: each imports torch) ...
    runs = {"under": ("good", []), "over": ("good", ["--cap", "1000"]), "corrupt": ("corrupt", [])}
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = {k: subprocess.Popen([sys.executable, "-m", "golf", "size-check", str(tmp_path / f), *extra],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
             for k, (f, extra) in runs.items()}
    results = {k: (p.wait(timeout=120), p.stdout.read(), p.stderr.read()) for k, p in procs.items()}
    assert results["under"][0] == 0 and "TOTAL" in results["under"][1]
    assert results["over"][0] == 1 and "OVER" in results["over"][1]
    assert results["corrupt"][0] == 2 and results["corrupt"][2].startswith("error: ")
    # ... and the CLI's own entry point in-process for every unreadable kind.
    for name in ("corrupt", "truncated", "magic", "version", "missing"):
        monkeypatch.setattr(sys, "argv", ["golf", "size-check", str(tmp_path / name)])
        with pytest.raises(SystemExit) as exit_info:
            golf.cli.main()
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, (name, err)
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, (name, err)


def test_ratio_table_reproduces():
    for bits, k in ((6, 12.0), (5, 10.0)):
        cell = PACK_RATIO_TABLE[bits][PACK_RATIO_K.index(k)]
        assert measure_ratio(bits, k, rows=64, cols=1024) == pytest.approx(cell, rel=0.03)


def test_predict_size_tracks_the_real_artifact(quantized):
    cfg, _, _, qs, blob, stats = quantized
    qcfg = dataclasses.replace(cfg.quant, lqer_rank=0, codec="zstd")
    plain_qs = dataclasses.replace(qs, records={n: dataclasses.replace(r, lqer=None)
                                                for n, r in qs.records.items()})
    plain, plain_stats = pack_with_stats(plain_qs, cfg.model, TOKENIZER_META, qcfg)
    table = predict_size(cfg.model, qcfg)
    assert table.source == "table" and abs(table.total - len(plain)) / len(plain) < 0.10
    ratios = measured_ratios(plain_qs, plain_stats)
    assert ratios["mlp"]["bits"] == 5 and ratios["mlp"]["k"] == qcfg.clip_k_mlp
    measured = predict_size(cfg.model, qcfg, ratios=ratios)
    assert measured.source == "measured" and abs(measured.total - len(plain)) / len(plain) < 0.01
    header, _ = _split(plain)
    assert artifact_pack_stats(header, len(plain)).streams[0].length == plain_stats.streams[0].length
    # A different k is priced by shifting the measured ratio along the table.
    wider = predict_size(cfg.model, dataclasses.replace(qcfg, clip_k_mlp=20.0), ratios=ratios)
    assert wider.total < measured.total


def test_fit_to_budget_shrinks_deterministically():
    cfg = tiny()
    cfg.model = dataclasses.replace(cfg.model, num_layers=2, num_loops=1, parallel_from=-1)
    qcfg = dataclasses.replace(cfg.quant, passthrough_max_numel=1024, codec="zstd", clip_alloc="class",
                               fit_mode="ladder")
    torch.manual_seed(0)
    model = GPT(cfg.model)
    _trained_like(model)
    g = torch.Generator().manual_seed(1)
    hessians = collect_hessians(model, [torch.randint(0, 512, (2, 32), generator=g) for _ in range(2)])
    state = model.state_dict()
    as_is = pack_bytes(quantize_state(state, qcfg, hessians), cfg.model, TOKENIZER_META, qcfg)
    target = len(as_is) - 2500
    qs, blob, changes = fit_to_budget(state, hessians, qcfg, cfg.model, TOKENIZER_META, 0, target=target)
    assert len(blob) <= target < len(as_is)
    assert changes and changes[0].startswith("clip k +")
    assert qs.stats.fit_attempts[0] == ("config as is", len(as_is))
    assert all(size > target for _, size in qs.stats.fit_attempts[:-1])
    _, header = unpack_bytes(blob)
    assert header["quant_config"]["clip_k_mlp"] > qcfg.clip_k_mlp
    again = fit_to_budget(state, hessians, qcfg, cfg.model, TOKENIZER_META, 0, target=target)
    assert again[1] == blob and again[2] == changes
    floors = dataclasses.replace(qcfg, mlp_bits=4, attn_bits=4, other_bits=4, embed_bits=6)  # a short ladder
    with pytest.raises(BudgetError, match="no rung"):
        fit_to_budget(state, hessians, floors, cfg.model, TOKENIZER_META, 0, target=1000)


@pytest.mark.parametrize("alloc", ["class", "fisher", "fisher_rows"])
def test_scale_fitter_lands_just_under_the_target_from_either_side(alloc):
    cfg = tiny()
    cfg.model = dataclasses.replace(cfg.model, num_layers=2, num_loops=1, parallel_from=-1)
    qcfg = dataclasses.replace(cfg.quant, passthrough_max_numel=1024, codec="zstd", fit_mode="scale",
                               clip_alloc=alloc)
    torch.manual_seed(0)
    model = GPT(cfg.model)
    _trained_like(model)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 512, (2, 32), generator=g) for _ in range(2)]
    hessians = collect_hessians(model, batches)
    fisher = collect_fisher(model, batches, max_seqs=4) if alloc != "class" else None
    state = model.state_dict()
    ladder_cfg = dataclasses.replace(qcfg, fit_mode="ladder")
    allocated = fisher_clip_k(state, fisher, qcfg) if fisher is not None else None  # the factor-1 k
    as_is = len(pack_bytes(quantize_state(state, ladder_cfg, hessians, clip_k=allocated), cfg.model,
                           TOKENIZER_META, qcfg))
    for target in (as_is - 4000, as_is + 4000):  # over: coarser k; room left: finer k
        qs, blob, changes = fit_to_budget(state, hessians, qcfg, cfg.model, TOKENIZER_META, 0, target=target,
                                          fisher=fisher)
        assert target - 0.01 * target <= len(blob) <= target, (target, qs.stats.fit_attempts)
        tried = qs.stats.fit_attempts
        assert 2 <= len(tried) <= 8 and (changes[0], len(blob)) in tried and changes[0].endswith("for every tensor")
        factor = float(changes[0].split("×")[1].split()[0])
        assert (factor > 1) == (target < as_is)
        assert fit_to_budget(state, hessians, qcfg, cfg.model, TOKENIZER_META, 0, target=target,
                             fisher=fisher)[1] == blob  # deterministic
    if alloc == "class":  # the ladder's +1 steps stop further from the same target (both from class k)
        ladder = fit_to_budget(state, hessians, ladder_cfg, cfg.model, TOKENIZER_META, 0, target=as_is - 4000)
        scaled = fit_to_budget(state, hessians, qcfg, cfg.model, TOKENIZER_META, 0, target=as_is - 4000)
        assert len(ladder[1]) <= len(scaled[1]) <= as_is - 4000
    else:
        with pytest.raises(QuantError, match=f"clip_alloc={alloc} needs"):
            fit_to_budget(state, hessians, qcfg, cfg.model, TOKENIZER_META, 0, target=as_is)


def test_cli_budget_and_quantize(tmp_path, tiny_tokenizer):
    from golf.data import write_shard

    runner = CliRunner()
    res = runner.invoke(app, ["budget", "--preset", "tiny"])
    assert res.exit_code == 0 and "TOTAL" in res.output and "mlp" in res.output
    assert "a run quantizes with its Fisher-allocated k per row, then one factor on every k" in res.output

    cfg = tiny()
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    write_shard(data / "fineweb_train_000000.bin", rng.integers(0, 512, 20_000))
    cfg.data.data_path, cfg.data.tokenizer_path = str(data), str(tiny_tokenizer)
    run = tmp_path / "run"
    run.mkdir()
    cfg.save(run / "config.json")
    torch.manual_seed(0)
    torch.save(GPT(cfg.model).state_dict(), run / "final_model.pt")
    out = tmp_path / "out.golf"
    res = runner.invoke(app, ["quantize", str(run / "final_model.pt"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    qs, header = read_artifact(out)
    assert header["tokenizer"]["sha256"] == hashlib.sha256(Path(tiny_tokenizer).read_bytes()).hexdigest()
    assert set(qs.stats.method.values()) <= {"gptq"} and "wrote" in res.output
    res = runner.invoke(app, ["quantize", str(run / "final_model.pt"), "--out", str(out)])
    assert isinstance(res.exception, ArtifactError)
    res = runner.invoke(app, ["budget", "--preset", "tiny", "--from-artifact", str(out)])
    assert res.exit_code == 0 and "measured" in res.output


def test_version_1_artifacts_with_a_plain_json_header_still_read(quantized):
    qs, blob = quantized[3], quantized[4]
    header, payload = _split(blob)
    old = _reframe(dict(header, format_version=1), payload, version=1)
    back, read = unpack_bytes(old)
    assert read["format_version"] == 1 and len(old) > len(blob)  # the header costs more plain
    for name, rec in qs.records.items():
        for part in ("q", "scale", "data"):
            if getattr(rec, part) is not None:
                assert torch.equal(getattr(back.records[name], part), getattr(rec, part))


def test_header_is_compressed_json_with_the_documented_fields(quantized):
    header, _ = _split(quantized[4])
    assert struct.unpack_from("<8sI", quantized[4]) == (b"GOLFART1", 3) and header["format_version"] == 3
    top_keys = {"format_version", "model_config", "tokenizer", "quant_config", "tensors", "streams"}
    assert top_keys <= set(header)
    part = header["tensors"][0]["parts"][0]
    assert {"part", "dtype", "shape", "stream", "offset", "length"} == set(part)
    stream_keys = {"name", "codec", "transform", "raw_length", "offset", "length", "frames", "frame_bytes",
                   "sha256"}
    assert stream_keys == set(header["streams"][0])
    for s in header["streams"]:  # frames tile the compressed stream
        assert sum(s["frames"]) == s["length"] and len(s["frames"]) == -(-s["raw_length"] // s["frame_bytes"])
