"""golf.eval: exact BPB, every target scored once, causality of every TTT variant, gloo parity, CLI."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from golf.config import EvalConfig, TTTConfig, tiny
from golf.data import ByteTable, byte_table, list_shards, load_tokenizer, load_val_tokens
from golf.eval import EvalError, assert_causal, evaluate, load_artifact_model, window_plan
from golf.model import GPT

QUIET = dict(log=lambda _msg: None)
SLIDING = EvalConfig(eval_seq_len=128, eval_stride=32, eval_batch_seqs=16)
PLAIN = dataclasses.replace(SLIDING, eval_stride=0)
NO_TTT = TTTConfig(ttt_mode="none")
SGD = TTTConfig(ttt_mode="sgd", ttt_chunk_tokens=700, ttt_epochs=2, ttt_lr=0.05)
LORA = TTTConfig(ttt_mode="lora", lora_rank=4, lora_chunk_tokens=32, lora_lr=0.01, lora_slots=4)
LORA_PHASED = dataclasses.replace(LORA, lora_phases=2, lora_phase_docs=6, ttt_chunk_tokens=700, ttt_lr=0.01)
VARIANTS = {"plain": (PLAIN, NO_TTT), "sliding": (SLIDING, NO_TTT), "sgd": (SLIDING, SGD),
            "lora": (SLIDING, LORA), "lora_phased": (SLIDING, LORA_PHASED),
            # past the deadline from the start: nothing adapts, every rank still joins every collective
            "sgd_deadline": (SLIDING, dataclasses.replace(SGD, ttt_deadline_s=1e-9)),
            "lora_phased_deadline": (SLIDING, dataclasses.replace(LORA_PHASED, ttt_deadline_s=1e-9))}


def random_stream(n: int = 2001, vocab: int = 512, seed: int = 0) -> torch.Tensor:
    """Random ids with BOS=1 starting a document every ~150 tokens."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(2, vocab, (n,), generator=g)
    tokens[torch.randint(1, n, (n // 150,), generator=g)] = 1
    tokens[0] = 1
    return tokens


@pytest.fixture(scope="module")
def tiny_eval(tiny_tokenizer, tiny_data):
    """The tiny preset's GPT, trained briefly on the test corpus so it uses its context."""
    cfg = tiny()
    torch.manual_seed(0)
    model = GPT(cfg.model)
    train = load_val_tokens(list_shards(tiny_data, "fineweb_train_*.bin"))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        starts = torch.randint(0, train.numel() - 65, (8,), generator=g).tolist()
        x = torch.stack([train[s:s + 64] for s in starts])
        y = torch.stack([train[s + 1:s + 65] for s in starts])
        model.loss(x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    table = byte_table(load_tokenizer(tiny_tokenizer, cfg.model.vocab_size))
    val = load_val_tokens(list_shards(tiny_data, "fineweb_val_*.bin"))
    return SimpleNamespace(cfg=cfg, model=model, table=table, val=val, stream=random_stream())


def dumping_eval(model, table, ecfg, tcfg, folder: Path):
    """An eval_fn for assert_causal: evaluate with dump_nll and return the dump."""
    counter = itertools.count()

    def run(tokens: torch.Tensor) -> np.ndarray:
        path = folder / f"nll_{next(counter)}.npy"
        result = evaluate(model, tokens, table, ecfg, tcfg, dump_nll=path, **QUIET)
        nll = np.load(path)
        assert nll.dtype == np.float32 and nll.shape == (tokens.numel() - 1,)
        assert math.isclose(float(nll.astype(np.float64).sum()), result.nll_sum, rel_tol=1e-6)
        return nll

    return run


# ----------------------------------------------------------------------------- window plans


@pytest.mark.parametrize("n,seq_len,stride", [(1, 8, 0), (1, 8, 3), (7, 8, 3), (8, 8, 8), (9, 8, 8),
                                              (1001, 64, 0), (1001, 64, 7), (1001, 64, 64),
                                              (1000, 63, 1), (5, 128, 32)])
def test_window_plan_scores_every_target_once(n, seq_len, stride):
    plan = window_plan(n, seq_len, stride)
    counts = np.zeros(n, dtype=np.int64)
    for i, (ctx, end, score) in enumerate(plan.tolist()):
        assert 0 <= ctx <= score < end <= n and end - ctx <= seq_len
        counts[score:end] += 1
        if stride == 0:
            assert ctx == score
        elif i == 0:
            assert (ctx, score, end) == (0, 0, min(seq_len, n))  # the first window scores everything
        else:
            assert end - score <= stride and end - ctx == seq_len  # later ones: last `stride`, full context
    assert (counts == 1).all()
    if stride:
        assert plan[-1, 1] == n  # the final window is aligned to the end of the stream


def test_evaluate_is_exact_on_odd_lengths(tiny_eval, tmp_path):
    """Odd stream length, stride and batch: every target once, sums consistent with the dump,
    BPB from the byte table, and NLLs equal to a direct forward over the same context."""
    m, table = tiny_eval.model, tiny_eval.table
    tokens = tiny_eval.stream[:1001]
    ecfg = EvalConfig(eval_seq_len=50, eval_stride=7, eval_batch_seqs=5)
    r = evaluate(m, tokens, table, ecfg, NO_TTT, dump_nll=tmp_path / "nll.npy", **QUIET)
    nll = np.load(tmp_path / "nll.npy").astype(np.float64)
    n = tokens.numel() - 1
    assert r.tokens == n and r.mode == "sliding" and set(r.times) == {"score_s", "finalize_s"}
    assert r.bytes == int(table.count(tokens[:-1], tokens[1:]).sum())
    assert math.isclose(nll.sum(), r.nll_sum, rel_tol=1e-9)
    assert math.isclose(r.val_loss, r.nll_sum / n) and math.isclose(r.val_bpb, r.nll_sum / math.log(2) / r.bytes)
    with torch.no_grad():
        first = F.cross_entropy(m(tokens[None, :50])[0], tokens[1:51], reduction="none")
        last = F.cross_entropy(m(tokens[None, n - 50:n])[0, -1:], tokens[n:], reduction="none")
    np.testing.assert_allclose(nll[:50], first.numpy(), atol=1e-5)
    np.testing.assert_allclose(nll[-1:], last.numpy(), atol=1e-5)


def test_internal_check_catches_double_and_missing_scores(tiny_eval, monkeypatch):
    good = window_plan(300, 128, 0)
    monkeypatch.setattr("golf.eval.window_plan", lambda *a: torch.cat((good, good[-1:])))
    with pytest.raises(RuntimeError, match="twice"):
        evaluate(tiny_eval.model, tiny_eval.stream[:301], tiny_eval.table, PLAIN, NO_TTT, **QUIET)
    monkeypatch.setattr("golf.eval.window_plan", lambda *a: good[1:])
    with pytest.raises(RuntimeError, match="never"):
        evaluate(tiny_eval.model, tiny_eval.stream[:301], tiny_eval.table, PLAIN, NO_TTT, **QUIET)


def test_sliding_window_beats_plain_windows(tiny_eval, tiny_tokenizer):
    """On real text: more context per token lowers BPB; bytes are the UTF-8 bytes of the text."""
    ecfg = EvalConfig(eval_seq_len=32, eval_stride=8, eval_batch_seqs=32)
    plain = evaluate(tiny_eval.model, tiny_eval.val, tiny_eval.table, dataclasses.replace(ecfg, eval_stride=0),
                     NO_TTT, **QUIET)
    sliding = evaluate(tiny_eval.model, tiny_eval.val, tiny_eval.table, ecfg, NO_TTT, **QUIET)
    assert (sliding.tokens, sliding.bytes) == (plain.tokens, plain.bytes)
    assert sliding.val_bpb < plain.val_bpb
    sp = load_tokenizer(tiny_tokenizer, 512)
    ids = tiny_eval.val.tolist()
    starts = [i for i, t in enumerate(ids) if t == 1] + [len(ids)]
    assert starts[0] == 0 and sliding.bytes == sum(len(sp.decode(ids[a + 1:b]).encode())
                                                   for a, b in zip(starts, starts[1:], strict=False))


# ----------------------------------------------------------------------------- legality


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_is_causal(tiny_eval, tmp_path, variant):
    ecfg, tcfg = VARIANTS[variant]
    before = {k: v.clone() for k, v in tiny_eval.model.state_dict().items()}
    fn = dumping_eval(tiny_eval.model, tiny_eval.table, ecfg, tcfg, tmp_path)
    assert_causal(fn, tiny_eval.stream, p=1000)
    after = tiny_eval.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # TTT ran on a copy


def test_assert_causal_catches_a_planted_leak(tiny_eval):
    """Training on a chunk before scoring it lets the tokens after p move the NLLs before p."""

    def train_then_score(tokens: torch.Tensor) -> np.ndarray:
        m = copy.deepcopy(tiny_eval.model)
        opt = torch.optim.SGD(m.parameters(), lr=0.05)
        out = []
        for lo in range(0, tokens.numel() - 1, 128):
            x = tokens[None, lo:lo + 128]
            y = tokens[None, lo + 1:lo + 129]
            m.loss(x[:, :y.size(1)], y).backward()
            opt.step()
            opt.zero_grad()
            with torch.no_grad():
                out.append(F.cross_entropy(m(x[:, :y.size(1)])[0], y[0], reduction="none"))
        return torch.cat(out).numpy()

    with pytest.raises(AssertionError, match="looks ahead"):
        assert_causal(train_then_score, tiny_eval.stream, p=1000)


def test_ttt_adapts_and_reduces_to_plain_scoring_at_zero_lr(tiny_eval, tmp_path):
    """sgd at lr 0 scores exactly what sliding scores (chunked windows keep their context);
    at lr > 0 it changes the score. LoRA gives the same NLLs batched or one document at a time."""
    m, table, tokens = tiny_eval.model, tiny_eval.table, tiny_eval.stream

    def nll(ecfg, tcfg, name):
        r = evaluate(m, tokens, table, ecfg, tcfg, dump_nll=tmp_path / name, **QUIET)
        return r, np.load(tmp_path / name)

    base, base_nll = nll(SLIDING, NO_TTT, "sliding.npy")
    _, frozen_nll = nll(SLIDING, dataclasses.replace(SGD, ttt_lr=0.0), "sgd0.npy")
    np.testing.assert_allclose(frozen_nll, base_nll, atol=1e-5)
    sgd, _ = nll(SLIDING, SGD, "sgd.npy")
    assert sgd.mode == "sliding+sgd" and "ttt_train_s" in sgd.times and sgd.nll_sum != pytest.approx(base.nll_sum)
    lora, batched = nll(SLIDING, LORA, "lora4.npy")  # ~13 documents through 4 slots: refills
    _, single = nll(SLIDING, dataclasses.replace(LORA, lora_slots=1), "lora1.npy")
    assert lora.mode == "lora" and "lora_s" in lora.times
    np.testing.assert_allclose(batched, single, atol=1e-4)


@pytest.mark.parametrize("variant", ["sliding", "sgd", "lora_phased"])
def test_compile_warmup_leaves_no_trace(tiny_eval, tmp_path, monkeypatch, variant):
    """The warmup that compiles before scoring (on CUDA) runs here eagerly, forced on: it gets its
    own clock, and every NLL is bitwise the one of an evaluation without it (no base-weight grad,
    no SGD momentum, no LoRA adapter or Adam moment survives it)."""
    import golf.eval as golf_eval

    ecfg, tcfg = VARIANTS[variant]
    m, table, tokens = tiny_eval.model, tiny_eval.table, tiny_eval.stream
    plain = evaluate(m, tokens, table, ecfg, tcfg, dump_nll=tmp_path / "plain.npy", **QUIET)
    monkeypatch.setattr(golf_eval, "_eval_compiles", lambda _ecfg, _device: True)
    monkeypatch.setattr(GPT, "compile_blocks", lambda self, enable=True, dynamic=None: None)
    monkeypatch.setattr(torch, "compile", lambda fn, **_kw: fn)
    warmed = evaluate(m, tokens, table, ecfg, tcfg, dump_nll=tmp_path / "warm.npy", **QUIET)
    assert "compile_s" in warmed.times and "compile_s" not in plain.times
    np.testing.assert_array_equal(np.load(tmp_path / "warm.npy"), np.load(tmp_path / "plain.npy"))
    assert warmed.nll_sum == plain.nll_sum


def test_lora_context_limits_the_window_of_each_step(tiny_eval, tmp_path):
    """At lr 0 the adapters stay zero, so LoRA scores each chunk from its document prefix: with
    lora_context 64 (chunks of 32) the first 64 targets of a document keep the full window's NLL
    and later ones see 32–64 tokens of context instead of up to 128."""
    m, table, tokens = tiny_eval.model, tiny_eval.table, tiny_eval.stream
    frozen = dataclasses.replace(LORA, lora_lr=0.0)

    def nll(tcfg, name):
        evaluate(m, tokens, table, SLIDING, tcfg, dump_nll=tmp_path / name, **QUIET)
        return np.load(tmp_path / name)

    full = nll(frozen, "full.npy")
    np.testing.assert_array_equal(nll(dataclasses.replace(frozen, lora_context=4096), "wide.npy"), full)
    short = nll(dataclasses.replace(frozen, lora_context=64), "short.npy")
    starts = np.flatnonzero(tokens[: full.size].numpy() == 1)
    doc_pos = np.arange(full.size) - starts[np.searchsorted(starts, np.arange(full.size), side="right") - 1]
    near = doc_pos < 64
    assert near.any() and (~near).any()
    np.testing.assert_allclose(short[near], full[near], atol=1e-5)
    assert np.abs(short[~near] - full[~near]).max() > 1e-3


def test_ttt_deadline_stops_adapting_and_scores_every_target_once(tiny_eval, tmp_path, monkeypatch):
    """Past ttt_deadline_s nothing adapts any more and the rest is scored by the model as it
    stands: SGD then scores exactly what sliding windows score; LoRA scores the documents it has
    not started as its frozen adapters would in chunks of half a window, keeps what it scored
    before the deadline, and still runs every phase pause (collectives stay matched across ranks)."""
    import golf.eval as golf_eval

    m, table, tokens = tiny_eval.model, tiny_eval.table, tiny_eval.stream

    def nll(tcfg, name):
        r = evaluate(m, tokens, table, SLIDING, tcfg, dump_nll=tmp_path / name, **QUIET)
        return r, np.load(tmp_path / name)

    now = 1e-9  # past the deadline from the start
    _, sliding = nll(NO_TTT, "sliding.npy")
    sgd, sgd_nll = nll(dataclasses.replace(SGD, ttt_deadline_s=now), "sgd.npy")
    assert sgd.deadline_hit and "ttt_train_s" not in sgd.times
    np.testing.assert_allclose(sgd_nll, sliding, atol=1e-5)
    assert not nll(dataclasses.replace(SGD, ttt_deadline_s=1e6), "sgd_late.npy")[0].deadline_hit

    window = SLIDING.eval_seq_len  # LORA's steps see the whole eval window
    frozen = dataclasses.replace(LORA, lora_lr=0.0, lora_chunk_tokens=window // 2)
    _, frozen_nll = nll(frozen, "frozen.npy")
    late, adapted = nll(LORA, "lora.npy")
    early, early_nll = nll(dataclasses.replace(LORA, ttt_deadline_s=now), "lora_now.npy")
    assert early.deadline_hit and not late.deadline_hit and "after_deadline_s" in early.times
    np.testing.assert_allclose(early_nll, frozen_nll, atol=1e-5)

    # A deadline after two LoRA steps: the 4 slots' longest documents are under way, the rest waits.
    checks = itertools.count()
    monkeypatch.setattr(golf_eval._EvalRun, "past_deadline", lambda self: next(checks) >= 2)
    mid, mid_nll = nll(LORA, "lora_mid.npy")
    assert mid.deadline_hit and mid.tokens == late.tokens
    spans = golf_eval._eval_doc_spans(tokens, tokens.numel() - 1).tolist()
    started = sorted(spans, key=lambda d: d[0] - d[1])[:LORA.lora_slots]
    for d0, d1 in spans:
        if [d0, d1] in started:  # its first two chunks were scored (and trained on) before
            np.testing.assert_allclose(mid_nll[d0:d0 + 2 * LORA.lora_chunk_tokens],
                                       adapted[d0:d0 + 2 * LORA.lora_chunk_tokens], atol=1e-4)
        else:
            np.testing.assert_allclose(mid_nll[d0:d1], frozen_nll[d0:d1], atol=1e-5)

    pauses = []
    monkeypatch.setattr(golf_eval, "_eval_phase_sgd", lambda run, params, opt, end: pauses.append(end))
    monkeypatch.setattr(golf_eval._EvalRun, "past_deadline", lambda self: True)
    assert nll(LORA_PHASED, "phased.npy")[0].deadline_hit
    assert len(pauses) == LORA_PHASED.lora_phases


def test_bad_inputs_are_one_line_errors(tiny_eval, tmp_path):
    (tmp_path / "taken.npy").write_bytes(b"x")
    with pytest.raises(EvalError, match="already exists"):
        evaluate(tiny_eval.model, tiny_eval.stream, tiny_eval.table, PLAIN, NO_TTT,
                 dump_nll=tmp_path / "taken.npy", **QUIET)
    with pytest.raises(EvalError, match="outside the tokenizer"):
        evaluate(tiny_eval.model, torch.tensor([1, 5, 600]), tiny_eval.table, PLAIN, NO_TTT, **QUIET)


# ----------------------------------------------------------------------------- distributed


def _gloo_worker(rank: int, init_file: str, payload_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        payload = torch.load(payload_path)
        model = GPT(tiny().model)
        model.load_state_dict(payload["state"])
        model.eval()
        table = ByteTable(*payload["table"])
        sums = {}
        for name in payload["variants"]:
            ecfg, tcfg = VARIANTS[name]
            r = evaluate(model, payload["tokens"], table, ecfg, tcfg,
                         dump_nll=Path(out_dir) / f"{name}.npy", **QUIET)
            sums[name] = [r.nll_sum, r.tokens, r.bytes]
        gathered = [None, None]
        dist.all_gather_object(gathered, sums)
        if rank == 0:
            (Path(out_dir) / "sums.json").write_text(json.dumps(gathered))
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    # Results are on disk and both ranks passed the barrier: exit without gloo's thread teardown,
    # which can abort ("terminate called without an active exception") on a loaded machine.
    os._exit(0)


def test_phased_lora_trains_only_on_scored_documents_and_never_drains(tiny_eval, monkeypatch):
    """At every pause the global SGD's tokens [0, scored_end) are all scored already, and the
    documents after them have started: the slots keep working through the pause."""
    import golf.eval as golf_eval

    seen = []
    real = golf_eval._eval_phase_sgd

    def spy(run, params, opt, scored_end):
        scored = torch.zeros(run.n_targets, dtype=torch.bool)
        for starts, counts in zip(run.sink.starts, run.sink.counts):
            for a, n in zip(starts.tolist(), counts.tolist()):
                scored[a:a + n] = True
        seen.append((bool(scored[:scored_end].all()), bool(scored[scored_end:].any())))
        real(run, params, opt, scored_end)

    monkeypatch.setattr(golf_eval, "_eval_phase_sgd", spy)
    evaluate(tiny_eval.model, tiny_eval.stream, tiny_eval.table, SLIDING, LORA_PHASED, **QUIET)
    assert seen == [(True, True)] * LORA_PHASED.lora_phases


def test_two_gloo_ranks_match_one_process(tiny_eval, tmp_path):
    names = ["sliding", "sgd", "lora", "lora_phased", "sgd_deadline", "lora_phased_deadline"]
    t = tiny_eval.table
    torch.save({"state": tiny_eval.model.state_dict(), "tokens": tiny_eval.stream, "variants": names,
                "table": (t.base_bytes, t.has_leading_space, t.is_control)}, tmp_path / "payload.pt")
    out = tmp_path / "out"
    out.mkdir()
    mp.spawn(_gloo_worker, args=(str(tmp_path / "init"), str(tmp_path / "payload.pt"), str(out)), nprocs=2)
    per_rank = json.loads((out / "sums.json").read_text())
    for name in names:
        ecfg, tcfg = VARIANTS[name]
        single = evaluate(tiny_eval.model, tiny_eval.stream, t, ecfg, tcfg,
                          dump_nll=tmp_path / f"{name}.npy", **QUIET)
        for nll_sum, tokens, n_bytes in (s[name] for s in per_rank):  # every rank returns the totals
            assert (tokens, n_bytes) == (single.tokens, single.bytes)
            if not tcfg.lora_phases or tcfg.ttt_deadline_s:
                assert nll_sum == pytest.approx(single.nll_sum, rel=1e-6)
        ranks, one = np.load(out / f"{name}.npy"), np.load(tmp_path / f"{name}.npy")
        if tcfg.lora_phases and not tcfg.ttt_deadline_s:
            # Documents keep going through a pause, so which chunks come after a global SGD step
            # depends on the schedule, and so on the world size. Before the first pause both
            # runs are plain LoRA: the first group's documents score the same.
            first = _doc_start(tiny_eval.stream, round(tcfg.lora_phase_docs / tcfg.lora_phases))
            ranks, one = ranks[:first], one[:first]
        np.testing.assert_allclose(ranks, one, atol=1e-4)


def _doc_start(stream: torch.Tensor, doc: int) -> int:
    """Target index where document `doc` (0-based, split at BOS as golf.eval does) starts."""
    starts = [0] + [i for i in torch.nonzero(stream[:-1] == 1).flatten().tolist() if i > 0]
    return starts[doc]


# ----------------------------------------------------------------------------- artifact + CLI


def test_cli_eval_scores_an_artifact(tiny_eval, tiny_tokenizer, tiny_data, tmp_path):
    from typer.testing import CliRunner

    from golf.cli import app
    from golf.pack import pack_bytes, write_artifact
    from golf.quant import quantize_state

    cfg = copy.deepcopy(tiny_eval.cfg)
    cfg.data.data_path, cfg.data.tokenizer_path = str(tiny_data), str(tiny_tokenizer)
    cfg.quant.gptq = False
    sha = hashlib.sha256(Path(tiny_tokenizer).read_bytes()).hexdigest()
    blob = pack_bytes(quantize_state(tiny_eval.model, cfg.quant), cfg.model,
                      {"sha256": sha, "vocab_size": cfg.model.vocab_size}, cfg.quant, run_config=cfg.to_dict())
    artifact = write_artifact(tmp_path / "model.golf", blob)

    runner = CliRunner()
    res = runner.invoke(app, ["eval", str(artifact), "--no-sliding", "--ttt", "none", "--seq-len", "64",
                              "--max-tokens", "700", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)  # exactly one JSON object on stdout
    model, header = load_artifact_model(artifact, "cpu")
    direct = evaluate(model, load_val_tokens(list_shards(tiny_data, "fineweb_val_*.bin"), 700),
                      tiny_eval.table, dataclasses.replace(PLAIN, eval_seq_len=64), NO_TTT, **QUIET)
    assert header["tokenizer"]["sha256"] == sha
    assert out["tokens"] == direct.tokens == 699 and out["bytes"] == direct.bytes
    assert out["val_bpb"] == pytest.approx(direct.val_bpb, rel=1e-9) and "score_s" in out["times"]

    res = runner.invoke(app, ["eval", str(artifact), "--ttt", "none", "--seq-len", "64", "--max-tokens", "700"])
    assert res.exit_code == 0, res.output
    assert "eval sliding: val_loss:" in res.stdout and "val_bpb:" in res.stdout  # the stored stride 32

    wrong = tmp_path / "other.model"
    wrong.write_bytes(b"not the tokenizer")
    res = runner.invoke(app, ["eval", str(artifact), "--tokenizer", str(wrong), "--json"])
    assert isinstance(res.exception, EvalError) and "sha256" in str(res.exception)
