"""golf.data: shard format and validation, tokenizers, the BPB byte table, corpus builds, loader."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import lzma
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm
import torch
from conftest import REPO, small_corpus_texts
from typer.testing import CliRunner

from golf.cli import app
from golf.data import (
    BOS_ID,
    SHARD_MAGIC,
    ByteTable,
    DataError,
    TokenLoader,
    build_shards,
    byte_table,
    iter_documents,
    list_shards,
    load_tokenizer,
    load_val_tokens,
    read_shard,
    shard_info,
    train_tokenizer,
    write_shard,
)

PROXY_SOURCES = ["sotu", "kjv_bible", "web_bible", "shakespeare", "milton", "moby_dick", "python311_docs"]


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def raw_shard(path, magic=SHARD_MAGIC, version=1, count=None, body=(1, 5, 7), extra=b""):
    """A shard written by hand, so the header can lie."""
    header = np.zeros(256, dtype="<i4")
    header[:3] = (magic, version, len(body) if count is None else count)
    path.write_bytes(header.tobytes() + np.asarray(body, dtype="<u2").tobytes() + extra)
    return path


# ----------------------------------------------------------------------------- shards


def test_shard_roundtrip_is_memmapped_and_exact(tmp_path):
    tokens = np.array([BOS_ID, 10, 65535, BOS_ID, 0, 7], dtype=np.int64)
    path = write_shard(tmp_path / "a.bin", tokens)
    assert path.stat().st_size == 1024 + 2 * tokens.size
    header = np.frombuffer(path.read_bytes()[:1024], dtype="<i4")
    assert list(header[:3]) == [SHARD_MAGIC, 1, 6] and not header[3:].any()
    got = read_shard(path)
    assert isinstance(got, np.memmap) and got.dtype == np.uint16
    np.testing.assert_array_equal(got, tokens)
    info = shard_info(path, vocab_size=100)
    assert (info.tokens, info.documents, info.min_id, info.max_id, info.over_vocab) == (6, 2, 0, 65535, 1)
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]  # no temporary file left behind


def test_write_shard_refuses_existing_bad_ids_and_empty(tmp_path):
    path = write_shard(tmp_path / "a.bin", [1, 2, 3])
    with pytest.raises(DataError, match="already exists"):
        write_shard(path, [4, 5])
    write_shard(path, torch.tensor([4, 5]), overwrite=True)
    assert list(read_shard(path)) == [4, 5]
    with pytest.raises(DataError, match="token id 70000"):
        write_shard(tmp_path / "b.bin", [1, 70000])
    with pytest.raises(DataError, match="no tokens"):
        write_shard(tmp_path / "c.bin", [])
    assert not (tmp_path / "b.bin").exists() and not (tmp_path / "c.bin").exists()


@pytest.mark.parametrize("kind, expected", [
    ("magic", "bad magic 1234"),
    ("version", "unsupported shard version 2"),
    ("truncated", "truncated body: header says 10 tokens"),
    ("extra", "disagrees with the header's 3 tokens"),
    ("short", "shorter than the 1024-byte shard header"),
    ("missing", "no such shard file"),
])
def test_read_shard_rejects_malformed_files_in_one_line(tmp_path, kind, expected):
    path = tmp_path / f"{kind}.bin"
    if kind == "magic":
        raw_shard(path, magic=1234)
    elif kind == "version":
        raw_shard(path, version=2)
    elif kind == "truncated":
        raw_shard(path, count=10)
    elif kind == "extra":
        raw_shard(path, extra=b"\0\0")
    elif kind == "short":
        path.write_bytes(b"\0" * 100)
    with pytest.raises(DataError) as err:
        read_shard(path)
    msg = str(err.value)
    assert expected in msg and str(path) in msg and "\n" not in msg


def test_list_shards_relative_absolute_and_errors(tmp_path):
    for name in ("fineweb_train_000001.bin", "fineweb_train_000000.bin", "fineweb_val_000000.bin"):
        write_shard(tmp_path / name, [1, 2])
    assert [p.name for p in list_shards(tmp_path, "fineweb_train_*.bin")] == [
        "fineweb_train_000000.bin", "fineweb_train_000001.bin"]
    assert [p.name for p in list_shards("ignored", str(tmp_path / "fineweb_val_*.bin"))] == [
        "fineweb_val_000000.bin"]
    with pytest.raises(DataError, match="no such data folder"):
        list_shards(tmp_path / "nope", "fineweb_train_*.bin")
    with pytest.raises(DataError, match="no shard matches"):
        list_shards(tmp_path, "other_*.bin")


# ----------------------------------------------------------------------------- documents


def test_iter_documents_formats(tmp_path):
    docs = ["first doc\nline two", "second — “quoted”", ""]
    lines = "".join(json.dumps({"text": d}) + "\n" for d in docs)
    (tmp_path / "a.jsonl").write_text(lines + "\n")
    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(lines)
    with lzma.open(tmp_path / "a.jsonl.xz", "wt", encoding="utf-8") as f:
        f.write(lines)
    for name in ("a.jsonl", "a.jsonl.gz", "a.jsonl.xz"):
        assert list(iter_documents(tmp_path / name)) == docs
    (tmp_path / "b.txt").write_bytes("one\r\ndocument\n".encode())
    assert list(iter_documents(tmp_path / "b.txt")) == ["one\r\ndocument\n"]  # bytes as stored
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not a JSON object"):
        list(iter_documents(tmp_path / "bad.jsonl"))
    with pytest.raises(DataError, match="unsupported input"):
        list(iter_documents(tmp_path / "a.csv"))


# ----------------------------------------------------------------------------- tokenizers


def test_tiny_tokenizer_has_the_official_settings(tiny_tokenizer):
    sp = load_tokenizer(tiny_tokenizer, 512)
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert all(sp.is_byte(i) for i in range(4, 260)) and sp.id_to_piece(4) == "<0x00>"  # byte fallback
    assert sp.id_to_piece(sp.piece_to_id("\u2581")) == "\u2581"
    digits = [sp.id_to_piece(i) for i in sp.encode("2026")]
    assert digits == ["2", "0", "2", "6"]  # split_digits
    assert not sp.id_to_piece(sp.encode("the world")[0]).startswith("\u2581")  # no dummy prefix
    assert sp.decode(sp.encode("\ufb01ne  and   well")) == "fine and well"  # nmt_nfkc, whitespace folded
    ids = sp.encode("漢")
    assert ids and all(sp.is_byte(i) for i in ids) and sp.decode(ids) == "漢"


def test_train_tokenizer_inputs_guarantees_and_refusals(tmp_path, tiny_tokenizer):
    docs = small_corpus_texts(40)
    (tmp_path / "x.txt").write_text("\n".join(docs))
    with pytest.raises(DataError, match="already exists"):
        train_tokenizer([tmp_path / "x.txt"], tiny_tokenizer.with_suffix(""), 512)
    with gzip.open(tmp_path / "docs.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    model = train_tokenizer([tmp_path / "docs.jsonl.gz"], tmp_path / "out" / "tok", 400)
    assert model == tmp_path / "out" / "tok.model" and model.with_suffix(".vocab").is_file()
    assert load_tokenizer(model, 400).vocab_size() == 400
    assert sorted(p.name for p in model.parent.iterdir()) == ["tok.model", "tok.vocab"]
    # A corpus without any whitespace still gets a "▁" piece.
    (tmp_path / "nospace.txt").write_text("\n".join("".join(d.split()) for d in docs))
    sp = load_tokenizer(train_tokenizer([tmp_path / "nospace.txt"], tmp_path / "ns", 400), 400)
    assert sp.id_to_piece(sp.piece_to_id("\u2581")) == "\u2581"
    with pytest.raises(DataError, match="corpus too small for vocab_size 5000"):
        train_tokenizer([tmp_path / "docs.jsonl.gz"], tmp_path / "big", 5000)
    (tmp_path / "bad.jsonl").write_text('{"text": "fine words here"}\n{"txt": 1}\n')
    with pytest.raises(DataError, match="bad.jsonl:2"):
        train_tokenizer([tmp_path / "bad.jsonl"], tmp_path / "bad", 300)
    assert not list(tmp_path.glob("big.*")) and not list(tmp_path.glob("bad.model"))


def test_load_tokenizer_refusals(tmp_path, tiny_tokenizer):
    with pytest.raises(DataError, match="no such tokenizer file"):
        load_tokenizer(tmp_path / "missing.model", 512)
    (tmp_path / "corrupt.model").write_bytes(b"not a protobuf at all" * 10)
    with pytest.raises(DataError, match="not a valid SentencePiece model"):
        load_tokenizer(tmp_path / "corrupt.model", 512)
    with pytest.raises(DataError, match="has 512 pieces but vocab_size is 1024"):
        load_tokenizer(tiny_tokenizer, 1024)
    # A model trained without whitespace (and without our fallback) lacks "▁": refused.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["".join(d.split()) for d in small_corpus_texts(30)]),
        model_prefix=str(tmp_path / "nows"), model_type="bpe", vocab_size=400, byte_fallback=True,
        add_dummy_prefix=False, hard_vocab_limit=False, minloglevel=2)
    with pytest.raises(DataError, match="no \"\u2581\" piece"):
        load_tokenizer(tmp_path / "nows.model", None)


# ----------------------------------------------------------------------------- BPB byte table


def doc_byte_totals(table: ByteTable, encoded: list[list[int]]) -> np.ndarray:
    """Per-document byte totals of [BOS] + ids, computed in one batched count."""
    stream = torch.tensor([t for ids in encoded for t in [BOS_ID, *ids]])
    counts = table.count(stream[:-1], stream[1:]).numpy()
    counts = np.concatenate([[0], counts])  # the first BOS is no target
    starts = np.cumsum([0] + [len(ids) + 1 for ids in encoded[:-1]])
    return np.add.reduceat(counts, starts)  # each doc's BOS counts 0 bytes as a target


def utf8_totals(sp, encoded) -> np.ndarray:
    return np.array([len(sp.decode(ids).encode("utf-8")) for ids in encoded])


def buggy_tables(sp, table: ByteTable) -> dict[str, ByteTable]:
    pieces = [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    double_space = table.base_bytes + table.has_leading_space.long()  # "▁" counted in the base too
    byte3 = table.base_bytes.clone()
    byte3[[sp.is_byte(i) for i in range(len(pieces))]] = 3
    no_control = torch.zeros_like(table.is_control)
    return {
        "space counted twice": ByteTable(double_space, table.has_leading_space, table.is_control),
        "byte fallback as 3": ByteTable(byte3, table.has_leading_space, table.is_control),
        "space after control": ByteTable(table.base_bytes, table.has_leading_space, no_control),
    }


def test_byte_table_matches_utf8_on_real_fineweb_docs(shared_data):
    docs_path = shared_data / "fineweb" / "pg_docs_sample200.jsonl"
    sp = load_tokenizer(shared_data / "tokenizers" / "fineweb_1024_bpe.model", 1024)
    table = byte_table(sp)
    assert table.vocab_size == 1024 and int(table.base_bytes[sp.piece_to_id("\u2581the")]) == 3
    assert bool(table.is_control[BOS_ID]) and int(table.base_bytes[BOS_ID]) == 0
    docs = list(iter_documents(docs_path))
    assert len(docs) == 200
    encoded = sp.encode(docs)
    np.testing.assert_array_equal(doc_byte_totals(table, encoded), utf8_totals(sp, encoded))
    assert sum(map(len, encoded)) == 628_257  # shared/data/SOURCES.md
    # The historic bugs would not match.
    for name, bad in buggy_tables(sp, table).items():
        if name == "space after control":
            continue  # FineWeb docs never start with a "▁" piece; checked on a crafted case below
        assert not np.array_equal(doc_byte_totals(bad, encoded), utf8_totals(sp, encoded)), name
    crafted = [[sp.piece_to_id("\u2581the"), sp.piece_to_id("\u2581and")]]  # a doc opening with "▁"
    assert doc_byte_totals(table, crafted)[0] == utf8_totals(sp, crafted)[0] == len("the and")
    assert doc_byte_totals(buggy_tables(sp, table)["space after control"], crafted)[0] == len("the and") + 1


def test_byte_table_with_byte_fallback_pieces(tiny_tokenizer):
    sp = load_tokenizer(tiny_tokenizer, 512)
    table = byte_table(sp)
    texts = small_corpus_texts(8) + ["Naïve café: 漢字 🙂 ǅ — “x” 42 ℌ𝔢𝔩𝔩𝔬 ١٢٣ done.", " 漢 leading space"]
    encoded = sp.encode(texts)
    assert any(sp.is_byte(i) for ids in encoded for i in ids)
    np.testing.assert_array_equal(doc_byte_totals(table, encoded), utf8_totals(sp, encoded))
    for name, bad in buggy_tables(sp, table).items():
        if name != "space after control":
            assert not np.array_equal(doc_byte_totals(bad, encoded), utf8_totals(sp, encoded)), name
    # count() is elementwise over any shape and follows the ids' device.
    stream = torch.tensor([BOS_ID, *encoded[-2]])
    flat = table.count(stream[:-1], stream[1:])
    n = (flat.numel() // 4) * 4
    batched = table.count(stream[:n].view(4, -1), stream[1:n + 1].view(4, -1))
    assert batched.dtype == torch.int64 and batched.shape == (4, n // 4)
    assert torch.equal(batched.flatten(), flat[:n])
    assert table.to("cpu").count(stream[:1], stream[1:2]).item() == flat[0].item()


# ----------------------------------------------------------------------------- corpus build


def write_jsonl(path, docs):
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def expected_stream(sp, docs, seed, val_docs):
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    enc = [[BOS_ID, *sp.encode(docs[i])] for i in order]
    flat = lambda part: np.array([t for ids in part for t in ids], dtype=np.uint16)
    return flat(enc[:val_docs]), flat(enc[val_docs:])


def test_build_shards_split_shuffle_and_shard_size(tmp_path, tiny_tokenizer):
    docs = small_corpus_texts(30)
    a = write_jsonl(tmp_path / "a.jsonl", docs[:20])
    b = tmp_path / "b.txt"
    b.write_text(docs[20])
    c = write_jsonl(tmp_path / "c.jsonl", docs[21:])
    sp = load_tokenizer(tiny_tokenizer, 512)
    summary = build_shards([a, b, c], tiny_tokenizer, tmp_path / "out", val_docs=5, seed=7,
                           shard_tokens=1000, workers=2, progress=False)
    val, train = expected_stream(sp, docs, 7, 5)
    out = tmp_path / "out"
    val_files = list_shards(out, "fineweb_val_*.bin")
    train_files = list_shards(out, "fineweb_train_*.bin")
    assert len(train_files) == -(-train.size // 1000) >= 3
    assert all(read_shard(f).size == 1000 for f in train_files[:-1])  # filled exactly, docs straddle
    np.testing.assert_array_equal(np.concatenate([read_shard(f) for f in train_files]), train)
    np.testing.assert_array_equal(np.concatenate([read_shard(f) for f in val_files]), val)
    assert summary == json.loads((out / "build_summary.json").read_text())
    assert (summary["docs_total"], summary["docs_val"], summary["docs_train"]) == (30, 5, 25)
    assert summary["tokens_train"] == train.size and summary["tokens_val"] == val.size
    assert summary["shards"] == [f.name for f in val_files + train_files]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # temporary files are gone

    # One worker gives the same bytes; the folder is refused unless overwrite, which drops stale shards.
    with pytest.raises(DataError, match="already holds"):
        build_shards([a, b, c], tiny_tokenizer, out, progress=False)
    build_shards([a, b, c], tiny_tokenizer, tmp_path / "one", val_docs=5, seed=7, shard_tokens=1000,
                 workers=1, progress=False)
    assert [sha256(f) for f in sorted((tmp_path / "one").glob("*.bin"))] == \
        [sha256(f) for f in sorted(out.glob("*.bin"))]
    build_shards([a], tiny_tokenizer, out, shard_tokens=10**6, overwrite=True, shuffle=False, progress=False)
    assert sorted(p.name for p in out.glob("*.bin")) == ["fineweb_train_000000.bin"]
    np.testing.assert_array_equal(read_shard(out / "fineweb_train_000000.bin"),
                                  [t for d in docs[:20] for t in [BOS_ID, *sp.encode(d)]])  # input order
    with pytest.raises(DataError, match="val_docs=99 but the inputs hold only 20"):
        build_shards([a], tiny_tokenizer, tmp_path / "v", val_docs=99, progress=False)


def test_build_reproduces_proxy_eval_shards(shared_data, tmp_path):
    tok = shared_data / "tokenizers" / "fineweb_1024_bpe.model"
    build_shards([shared_data / "fineweb" / "pg_docs_sample200.jsonl"], tok, tmp_path / "a",
                 val_docs=200, shuffle=False, progress=False)
    assert sha256(tmp_path / "a" / "fineweb_val_000000.bin") == \
        "5d5ac9b83e9b116d32176c6d9889d3d7649e7128bbf88c2fe04b51a4110b318f"
    s = build_shards([shared_data / "fineweb" / "fineweb_edu_sample_1M.txt"], tok, tmp_path / "b",
                     val_docs=1, prefix="fineweb_edu", progress=False)
    assert s["tokens_val"] == 410_644 and s["files_train"] == 0
    assert sha256(tmp_path / "b" / "fineweb_edu_val_000000.bin") == \
        "fcb03938a3a2d70ee225e5465f78995177cbf1f22013c1bbb3d371ed9c33d33d"


@pytest.mark.slow
def test_build_reproduces_the_proxy_train_shard(shared_data, tmp_path):
    docs = shared_data / "proxy" / "docs"
    inputs = [docs / f"{name}.jsonl.gz" for name in PROXY_SOURCES]
    summary = build_shards(inputs, shared_data / "tokenizers" / "fineweb_1024_bpe.model", tmp_path,
                           val_docs=0, seed=1337, shard_tokens=50_000_000, workers=2, prefix="proxy",
                           progress=False)
    assert summary["docs_total"] == 4132 and summary["tokens_train"] == 15_874_461
    assert summary["shards"] == ["proxy_train_000000.bin"]
    assert sha256(tmp_path / "proxy_train_000000.bin") == \
        "5cf001da15dc361d1d7124b54b8f62a05c7c5c0ded52814708f42ead721ad6e4"


# ----------------------------------------------------------------------------- loader


@pytest.fixture()
def loader_shards(tmp_path):
    rng = np.random.default_rng(0)
    files = []
    for i, n in enumerate((9000, 1000)):
        toks = rng.integers(2, 500, size=n)
        toks[rng.choice(n, size=n // 50, replace=False)] = BOS_ID
        toks[0] = BOS_ID
        files.append(write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", toks))
    return files


def find_window(shards, row: np.ndarray) -> tuple[int, int]:
    for s, toks in enumerate(shards):
        view = np.lib.stride_tricks.sliding_window_view(np.asarray(toks, dtype=np.int64), row.size)
        hits = np.flatnonzero((view == row).all(axis=1))
        if hits.size:
            return s, int(hits[0])
    raise AssertionError("window not found in any shard")


def test_loader_windows_are_shifted_shard_slices(loader_shards):
    loader = TokenLoader(loader_shards, seq_len=32, seed=3)
    x, y = loader.next_batch(64, "cpu")
    assert x.shape == y.shape == (64, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    shards = [read_shard(f) for f in loader_shards]
    for row in range(0, 64, 8):
        window = torch.cat([x[row], y[row, -1:]]).numpy()
        find_window(shards, window)  # a contiguous slice of one shard (never across shards)
    # Shards are weighted by length (9000 vs 1000 tokens).
    x, _ = TokenLoader(loader_shards, seq_len=8, seed=1).next_batch(400)
    from_small = sum(find_window(shards, r.numpy())[0] == 1 for r in x)
    assert 15 <= from_small <= 70  # ~10% of 400


def test_loader_is_seeded_rank_disjoint_and_resumable(loader_shards, tmp_path):
    one = TokenLoader(loader_shards, seq_len=16, seed=5)
    ranks = [TokenLoader(loader_shards, seq_len=16, rank=r, world_size=2, seed=5) for r in range(2)]
    for _ in range(3):
        xg, yg = one.next_batch(8)
        parts = [rk.next_batch(4) for rk in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), xg)  # gathered ranks == one process
        assert torch.equal(torch.cat([p[1] for p in parts]), yg)
        assert not torch.equal(parts[0][0], parts[1][0])
    assert not torch.equal(TokenLoader(loader_shards, 16, seed=6).next_batch(8)[0],
                           TokenLoader(loader_shards, 16, seed=5).next_batch(8)[0])
    # Resuming from a saved state continues the same stream (also through torch.save/weights_only).
    buf = io.BytesIO()
    torch.save(one.state_dict(), buf)
    expected = [one.next_batch(8)[0] for _ in range(2)]
    fresh = TokenLoader(loader_shards, seq_len=16, seed=999)
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert all(torch.equal(fresh.next_batch(8)[0], e) for e in expected)
    assert fresh.batches == one.batches == 5
    with pytest.raises(DataError, match="seq_len"):
        TokenLoader(loader_shards, seq_len=8).load_state_dict(one.state_dict())


def test_loader_doc_packed_and_errors(loader_shards):
    loader = TokenLoader(loader_shards, seq_len=64, seed=2, doc_packed=True)
    x, y = loader.next_batch(32)
    assert (x[:, 0] == BOS_ID).all() and torch.equal(x[:, 1:], y[:, :-1])
    with pytest.raises(DataError, match="holds a window"):
        TokenLoader(loader_shards, seq_len=20_000)
    with pytest.raises(DataError, match="rank 2 is outside world_size 2"):
        TokenLoader(loader_shards, seq_len=8, rank=2, world_size=2)


def test_load_val_tokens(loader_shards):
    full = load_val_tokens(loader_shards)
    assert full.dtype == torch.int64 and full.numel() == 10_000
    np.testing.assert_array_equal(full[9000:].numpy(), read_shard(loader_shards[1]))
    part = load_val_tokens(loader_shards, max_tokens=9500)
    assert torch.equal(part, full[:9500])


# ----------------------------------------------------------------------------- CLI


def test_cli_inspect_rejects_bad_shards_without_traceback(tmp_path):
    bad = {
        "magic": raw_shard(tmp_path / "magic.bin", magic=7),
        "version": raw_shard(tmp_path / "version.bin", version=3),
        "truncated": raw_shard(tmp_path / "truncated.bin", count=50),
        "size": raw_shard(tmp_path / "size.bin", extra=b"\0\0\0\0"),
    }
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = {k: subprocess.Popen([sys.executable, "-m", "golf", "data", "inspect", str(p)], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k, p in bad.items()}
    for kind, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        lines = err.strip().splitlines()
        assert proc.returncode != 0, kind
        assert len(lines) == 1 and lines[0].startswith("error: "), (kind, err)
        assert str(bad[kind]) in lines[0] and "Traceback" not in err + out


def test_cli_inspect_build_and_tokenizer_train(tmp_path, tiny_tokenizer):
    runner = CliRunner()
    docs = write_jsonl(tmp_path / "docs.jsonl", small_corpus_texts(12))
    res = runner.invoke(app, ["data", "build", str(docs), "--tokenizer", str(tiny_tokenizer), "--out",
                              str(tmp_path / "out"), "--val-docs", "2", "--workers", "1"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out" / "fineweb_val_000000.bin").is_file()
    res = runner.invoke(app, ["data", "inspect", str(tmp_path / "out"), "--vocab-size", "512"])
    assert res.exit_code == 0 and "documents=10" in res.output and "documents=2" in res.output
    res = runner.invoke(app, ["data", "inspect", str(tmp_path / "out"), "--vocab-size", "100"])
    assert isinstance(res.exception, DataError) and "ids >= 100" in res.output
    res = runner.invoke(app, ["tokenizer", "train", str(docs), "--vocab-size", "400", "--out",
                              str(tmp_path / "t")])
    assert res.exit_code == 0, res.output
    assert load_tokenizer(tmp_path / "t.model", 400).vocab_size() == 400
    res = runner.invoke(app, ["tokenizer", "train", str(docs), "--vocab-size", "400", "--out",
                              str(tmp_path / "t")])
    assert isinstance(res.exception, DataError) and "already exists" in str(res.exception)
