"""golf.quant: SDClip ranges, GPTQ vs round-to-nearest, degenerate Hessians, Hessian hooks, LQER, ladder."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from golf.config import QuantConfig, tiny
from golf.model import GPT
from golf.quant import (
    COL_EXP_MAX,
    GPTQ_RETRIES,
    col_step_factors,
    collect_fisher,
    collect_hessians,
    dequantize_state,
    fisher_clip_k,
    fit_ladder,
    gptq_quantize,
    quantize_state,
    rtn_quantize,
    sdclip_scale,
)


def _correlated_inputs(n: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    low_rank = torch.randn(n, 8, generator=g) @ torch.randn(8, cols, generator=g)
    return low_rank + 0.3 * torch.randn(n, cols, generator=g) @ mix


def _tiny_qcfg(**kw) -> QuantConfig:
    # A low passthrough threshold so the tiny GPT has matrices in every class.
    return dataclasses.replace(tiny().quant, passthrough_max_numel=1024, **kw)


def test_sdclip_q_within_qmax_for_every_width():
    w = torch.randn(32, 200, generator=torch.Generator().manual_seed(0)) * 0.02
    for bits in range(2, 9):
        qmax = 2 ** (bits - 1) - 1
        scale = sdclip_scale(w, bits, k=3.0)  # small k: the clamp is reached
        q = rtn_quantize(w, scale, bits)
        assert q.dtype == torch.int8
        assert int(q.abs().max()) == qmax
        assert torch.equal(scale, scale.half().float())  # exactly what is stored as fp16
    q5 = rtn_quantize(w, sdclip_scale(w, 5, 3.0), 5)
    assert int(q5.max()) == 15 and int(q5.min()) == -15


def test_sdclip_zero_row_gets_a_usable_scale():
    w = torch.randn(4, 64)
    w[1] = 0.0
    scale = sdclip_scale(w, 6, 12.5)
    assert bool((scale > 0).all())
    assert torch.equal(rtn_quantize(w, scale, 6)[1], torch.zeros(64, dtype=torch.int8))


def test_gptq_beats_round_to_nearest_on_correlated_inputs():
    g = torch.Generator().manual_seed(1)
    x = _correlated_inputs(2048, 96, seed=2)
    w = torch.randn(48, 96, generator=g) * 0.05
    h = x.T @ x / x.shape[0]
    for bits, k in ((4, 6.0), (6, 12.5)):
        res = gptq_quantize(w, h, bits, k, block_size=32)
        assert res.method == "gptq" and res.retries == 0
        rtn = rtn_quantize(w, res.scale, bits)
        err_gptq = (x @ w.T - x @ (res.q.float() * res.scale[:, None]).T).norm()
        err_rtn = (x @ w.T - x @ (rtn.float() * res.scale[:, None]).T).norm()
        assert err_gptq < 0.8 * err_rtn, (bits, float(err_gptq), float(err_rtn))
        assert int(res.q.abs().max()) <= 2 ** (bits - 1) - 1


def _order0_bits(q: torch.Tensor) -> float:
    counts = torch.unique(q, return_counts=True)[1].double()
    return float(-(counts * torch.log2(counts / counts.sum())).sum())


def test_gptq_column_steps_cut_the_loss_where_column_weights_differ():
    # Inputs whose scales spread over 30×: GPTQ's column weights c_j spread with them.
    g = torch.Generator().manual_seed(5)
    cols = 128
    spread = torch.exp(torch.linspace(0, 3.4, cols))[torch.randperm(cols, generator=g)]
    x = torch.randn(4096, cols, generator=g) * spread
    h = x.T @ x / x.shape[0]
    w = torch.randn(64, cols, generator=g) * 0.05
    results = {}
    for alpha in (0.0, 0.5):
        res = gptq_quantize(w, h, 6, 12.5, block_size=32, col_alpha=alpha)
        factors = col_step_factors(res.col_exp) if res.col_exp is not None else torch.ones(cols)
        e = w - res.q.float() * res.scale[:, None] * factors[None, :]
        results[alpha] = (float(((e @ h) * e).sum()), _order0_bits(res.q), res.col_exp)
    (loss0, bits0, none), (loss5, bits5, col_exp) = results[0.0], results[0.5]
    assert none is None and col_exp.dtype == torch.int8 and col_exp.shape == (cols,)
    assert int(col_exp.abs().max()) <= COL_EXP_MAX
    # Busier inputs get finer steps, and the steps' geometric mean stays near the row scale's.
    order = torch.argsort(h.diagonal())
    assert float(col_exp[order[:16]].float().mean()) > 0 > float(col_exp[order[-16:]].float().mean())
    assert abs(float(col_exp.float().mean())) <= 1.0
    assert loss5 < 0.75 * loss0 and bits5 <= 1.01 * bits0, (loss0, loss5, bits0, bits5)


def test_gptq_rank_deficient_hessian_with_dead_column():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(512, 4, generator=g) @ torch.randn(4, 32, generator=g)  # rank 4
    x[:, 7] = 0.0  # a dead input
    h = x.T @ x / x.shape[0]
    w = torch.randn(16, 32, generator=g)
    res = gptq_quantize(w, h, 6, 12.5, block_size=8)
    assert res.method == "gptq" and torch.isfinite(res.scale).all()
    # The dead column is decoupled: rounded to nearest on its own, with its weights kept.
    assert torch.equal(res.q[:, 7], rtn_quantize(w, res.scale, 6)[:, 7])
    assert int(res.q[:, 7].abs().sum()) > 0


def test_gptq_indefinite_hessian_retries_with_more_damping():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(256, 3, generator=g) @ torch.randn(3, 24, generator=g)
    x[:, 5] = 0.0
    h = x.T @ x / x.shape[0]
    # Round-off can leave H slightly indefinite; 0.01·mean(diag) damping cannot cover −0.05·mean.
    h -= 0.05 * h.diagonal().mean() * torch.eye(24)
    w = torch.randn(8, 24, generator=g)
    res = gptq_quantize(w, h, 6, 12.5, damp=0.01)
    assert res.method == "gptq" and res.retries == 1 and res.damp == pytest.approx(0.1)
    assert int(res.q.abs().max()) <= 31
    # Through quantize_state the retry is recorded in the stats.
    qcfg = dataclasses.replace(QuantConfig(), passthrough_max_numel=10)
    qs = quantize_state({"blocks.0.mlp.fc.weight": w}, qcfg, {"blocks.0.mlp.fc.weight": h})
    assert qs.stats.retries["blocks.0.mlp.fc.weight"] == 1
    assert qs.stats.method["blocks.0.mlp.fc.weight"] == "gptq"


def test_gptq_unusable_hessian_falls_back_to_rtn():
    w = torch.randn(8, 16)
    h = torch.full((16, 16), float("nan"))
    res = gptq_quantize(w, h, 6, 12.5)
    assert res.method == "rtn-fallback" and res.retries == GPTQ_RETRIES + 1
    assert torch.equal(res.q, rtn_quantize(w, res.scale, 6))


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.lin = nn.Linear(16, 16, bias=False)

    def forward(self, ids):
        return self.lin(self.lin(self.emb(ids)))  # one module run twice, like a looped layer


def test_collect_hessians_accumulates_every_pass_and_removes_hooks():
    torch.manual_seed(0)
    m = _Twice()
    batches = [torch.randint(0, 50, (2, 5)) for _ in range(3)]
    hs = collect_hessians(m, batches)
    xs = []
    with torch.no_grad():
        for ids in batches:
            a = m.emb(ids).reshape(-1, 16)
            xs += [a, m.lin(a)]
    x = torch.cat(xs)
    assert set(hs) == {"lin.weight"}
    assert torch.allclose(hs["lin.weight"], x.T @ x / x.shape[0], atol=1e-6)
    assert not m.lin._forward_hooks


def _tiny_gpt_and_batches(seed: int, width: int) -> tuple:
    """The tiny preset's GPT (seed 0) and two [2, width] batches of random ids."""
    cfg = tiny().model
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(seed)
    return cfg, GPT(cfg), [torch.randint(0, cfg.vocab_size, (2, width), generator=g) for _ in range(2)]


def test_collect_hessians_on_tiny_gpt_keys_and_tied_head():
    cfg, model, ids = _tiny_gpt_and_batches(seed=0, width=16)
    hs = collect_hessians(model, ids)
    linear = {f"{n}.weight" for n, mod in model.named_modules()
              if isinstance(mod, nn.Linear) and n != "lm_head"}
    assert set(hs) == linear | {"tok_emb.weight"}
    with torch.no_grad():
        states = torch.cat([model.hidden(i).reshape(-1, cfg.model_dim) for i in ids])
    assert torch.allclose(hs["tok_emb.weight"], states.T @ states / states.shape[0], atol=1e-5)
    assert all(h.dtype == torch.float32 for h in hs.values())
    assert not any(mod._forward_hooks for mod in model.modules())


def test_collect_fisher_is_the_mean_of_per_sequence_squared_gradients():
    _, model, batches = _tiny_gpt_and_batches(seed=3, width=17)
    fisher = collect_fisher(model, batches, max_seqs=3)  # the first three windows, one backward each
    matrices = {n: p for n, p in model.named_parameters() if p.dim() == 2}
    assert set(fisher) == set(matrices) and "tok_emb.weight" in fisher  # the tied head counts once
    expected = {n: torch.zeros(p.shape[0]) for n, p in matrices.items()}
    for row in [*batches[0], batches[1][0]]:
        model.zero_grad()
        model.loss(row[None, :-1], row[None, 1:]).backward()
        for n, p in matrices.items():
            expected[n] += p.grad.square().sum(1) / 3
    for n in matrices:
        torch.testing.assert_close(fisher[n], expected[n], rtol=1e-4, atol=1e-12, msg=n)
    model.zero_grad(set_to_none=True)
    collect_fisher(model, batches, max_seqs=1)
    assert all(p.grad is None for p in model.parameters()) and model.training


def test_fisher_clip_k_equalizes_loss_per_value_at_the_class_size():
    g = torch.Generator().manual_seed(0)
    state = {"blocks.0.mlp.fc.weight": torch.randn(64, 32, generator=g),
             "blocks.0.attn.c_q.weight": 3 * torch.randn(32, 32, generator=g),
             "blocks.0.mlp.proj.weight": torch.randn(32, 64, generator=g)}
    qcfg = QuantConfig(passthrough_max_numel=16, clip_k_mlp=10.0, clip_k_attn=12.0, fisher_k_range=3.0)
    fisher = {"blocks.0.mlp.fc.weight": torch.full((64,), 2.0), "blocks.0.attn.c_q.weight": torch.full((32,), 0.5),
              "blocks.0.mlp.proj.weight": torch.full((32,), 1.5)}
    ks = fisher_clip_k(state, fisher, qcfg)
    # Expected loss per value ∝ k²·Σ_r F_r·std_r² / (q_max²·n): the same for every tensor.
    per_value = [ks[n] ** 2 * float((fisher[n] * w.var(dim=1, unbiased=False)).sum()) / w.numel()
                 for n, w in state.items()]
    assert max(per_value) / min(per_value) == pytest.approx(1.0, rel=1e-6)
    numel = {n: w.numel() for n, w in state.items()}
    ref = {"blocks.0.mlp.fc.weight": 10.0, "blocks.0.attn.c_q.weight": 12.0, "blocks.0.mlp.proj.weight": 10.0}
    log_sum = lambda k: sum(numel[n] * torch.tensor(k[n]).log() for n in state)  # noqa: E731
    assert float(log_sum(ks)) == pytest.approx(float(log_sum(ref)), rel=1e-6)  # the class config's size
    fisher["blocks.0.attn.c_q.weight"] = torch.full((32,), 1e6)  # far more sensitive: clamped
    ks = fisher_clip_k(state, fisher, qcfg)
    assert ks["blocks.0.attn.c_q.weight"] == pytest.approx(12.0 / 3.0)
    narrow = fisher_clip_k(state, fisher, dataclasses.replace(qcfg, fisher_k_range=1.5))
    assert narrow["blocks.0.attn.c_q.weight"] == pytest.approx(8.0)
    del fisher["blocks.0.mlp.proj.weight"]
    assert "blocks.0.mlp.proj.weight" not in fisher_clip_k(state, fisher, qcfg)  # keeps its class k


def test_fisher_rows_equalize_loss_per_value_across_rows_at_no_byte_cost():
    g = torch.Generator().manual_seed(1)
    state = {"blocks.0.mlp.fc.weight": torch.randn(64, 32, generator=g) * torch.linspace(0.5, 2, 64)[:, None],
             "blocks.0.attn.c_q.weight": torch.randn(32, 32, generator=g)}
    qcfg = QuantConfig(passthrough_max_numel=16, clip_k_mlp=10.0, clip_k_attn=12.0, fisher_k_range=4.0,
                       clip_alloc="fisher_rows")
    fisher = {"blocks.0.mlp.fc.weight": torch.linspace(1.0, 3.0, 64),
              "blocks.0.attn.c_q.weight": torch.linspace(0.5, 1.0, 32)}
    ks = fisher_clip_k(state, fisher, qcfg)
    assert all(ks[n].shape == (w.shape[0],) for n, w in state.items())
    per_value = torch.cat([ks[n] ** 2 * fisher[n] * w.var(dim=1, unbiased=False) for n, w in state.items()])
    assert float(per_value.max() / per_value.min()) == pytest.approx(1.0, rel=1e-4)  # every row alike
    log_sum = sum(float((w.shape[1] * ks[n].log()).sum()) for n, w in state.items())
    ref = 64 * 32 * math.log(10.0) + 32 * 32 * math.log(12.0)
    assert log_sum == pytest.approx(ref, rel=1e-5)  # the class config's predicted size
    # A per-row k whose rows are all c quantizes exactly like the single k c.
    uniform = {n: torch.full((w.shape[0],), 9.0) for n, w in state.items()}
    by_row = quantize_state(state, qcfg, clip_k=uniform).records
    single = quantize_state(state, qcfg, clip_k={n: 9.0 for n in state}).records
    for n in state:
        assert torch.equal(by_row[n].q, single[n].q) and by_row[n].clip_k == pytest.approx(9.0)


def test_quantize_state_tiny_gpt_classes_tied_and_loadable():
    cfg = tiny()
    torch.manual_seed(0)
    model = GPT(cfg.model)
    qcfg = _tiny_qcfg(mlp_bits=5, attn_bits=6, embed_bits=8)
    qs = quantize_state(model, qcfg)
    recs = qs.records
    assert "lm_head.weight" not in recs and recs["tok_emb.weight"].aliases == ["lm_head.weight"]
    assert recs["tok_emb.weight"].kind == "quant" and recs["tok_emb.weight"].bits == 8
    fc = recs["blocks.0.mlp.fc.weight"]
    assert fc.klass == "mlp" and fc.bits == 5 and int(fc.q.abs().max()) <= 15
    assert recs["blocks.0.attn.c_q.weight"].klass == "attention"
    scale = recs["blocks.0.attn_scale"]
    assert scale.kind == "passthrough" and scale.data.dtype == torch.float16
    assert set(qs.stats.method.values()) == {"rtn"}  # no Hessians given
    state = dequantize_state(qs)
    assert state["lm_head.weight"] is state["tok_emb.weight"]
    fresh = GPT(cfg.model)
    fresh.load_state_dict(state, strict=True)
    assert fresh.lm_head.weight is fresh.tok_emb.weight
    assert torch.equal(fresh.tok_emb.weight, recs["tok_emb.weight"].dequantize())
    assert 0 < qs.stats.rel_err["blocks.0.mlp.fc.weight"] < 0.5


def test_lqer_corrects_the_worst_tensors():
    cfg = tiny()
    torch.manual_seed(0)
    model = GPT(cfg.model)
    with torch.no_grad():  # trained-like weights: zero-init projections would make LQER trivial
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05)
    base = quantize_state(model, _tiny_qcfg(mlp_bits=3, attn_bits=3, clip_k_mlp=6.0, clip_k_attn=6.0))
    fixed = quantize_state(model, _tiny_qcfg(mlp_bits=3, attn_bits=3, clip_k_mlp=6.0, clip_k_attn=6.0,
                                             lqer_rank=4, lqer_tensors=3, lqer_bits=4))
    assert len(fixed.stats.lqer) == 3
    worst = sorted(base.stats.rel_err, key=lambda n: (-base.stats.rel_err[n], n))[:3]
    assert sorted(fixed.stats.lqer) == sorted(worst)  # no Hessians: relative Frobenius error picks
    for name in fixed.stats.lqer:
        lq = fixed.records[name].lqer
        assert lq.a_q.shape[1] == 4 and int(lq.a_q.abs().max()) <= 7
        assert fixed.stats.rel_err[name] < base.stats.rel_err[name]


def test_fit_ladder_is_ordered_and_ends_at_the_floors():
    q = QuantConfig()
    rungs = fit_ladder(q)
    assert rungs[0] == (q, [])
    assert [r[0].clip_k_mlp for r in rungs[1:5]] == [12.5, 13.5, 14.5, 15.5]
    assert rungs[5][0].mlp_bits == 5 and rungs[5][0].clip_k_mlp == q.clip_k_mlp
    assert "MLP bits 6 → 5" in rungs[5][1][-1]
    last = rungs[-1][0]
    assert (last.mlp_bits, last.attn_bits, last.other_bits, last.embed_bits) == (4, 4, 4, 6)
    assert fit_ladder(q) == rungs  # deterministic


def test_quantize_cli_on_a_trained_checkpoint(tiny_data, tiny_tokenizer, tmp_path):
    """golf train's export → golf quantize --fit → a readable artifact; a second run refuses to overwrite."""
    import subprocess
    import sys

    from golf.pack import read_artifact
    from golf.train import train
    from tests.conftest import tiny_config

    train(tiny_config(tiny_data, tiny_tokenizer, tmp_path / "run", iterations=3, max_wallclock_seconds=0),
          log=lambda _: None)
    cmd = [sys.executable, "-m", "golf", "quantize", str(tmp_path / "run" / "final_model.pt"),
           "--out", str(tmp_path / "m.golf"), "--fit"]
    first = subprocess.run(cmd, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert "calibrated" in first.stdout and "fits" in first.stdout
    qs, header = read_artifact(tmp_path / "m.golf")
    assert header["model_config"]["num_layers"] == 6 and qs.records
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 2 and "refusing to overwrite" in again.stderr
