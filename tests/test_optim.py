"""Muon, Newton–Schulz, the sharded distributed step, parameter routing and schedules."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from golf.config import TrainConfig, tiny
from golf.optim import (
    Muon,
    OptimError,
    all_reduce_grads,
    build_optimizers,
    is_muon_param,
    lr_multiplier,
    muon_momentum_at,
    zeropower,
)

# Well-conditioned shapes (aspect ratio != 1, so no near-zero singular values), batched or not.
SHAPES = [(96, 64), (64, 128), (32, 256), (3, 256, 64)]


def _svals(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(x.float())


# ----------------------------------------------------------------------------- zeropower


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zeropower_singular_value_bands(shape, dtype):
    # Classic quintic: singular values land in ~[0.68, 1.20]; Polar Express: ~[0.85, 1.14].
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    classic = _svals(zeropower(G, 5, "classic", dtype))
    polar = _svals(zeropower(G, 5, "polar", dtype))
    assert 0.64 < classic.min() and classic.max() < 1.22
    assert 0.84 < polar.min() and polar.max() < 1.16
    assert polar.min() > classic.min() + 0.1  # Polar Express converges tighter from below
    assert zeropower(G, 5, "polar", dtype).dtype == dtype


def test_zeropower_is_orthogonally_equivariant_and_meets_its_guarantee():
    # zeropower(U·S·Vᵀ) = U·zeropower(S)·Vᵀ, and on the singular values σ/‖G‖_F the classic map
    # guarantees [0.68, 1.20] from 3e-3 up, Polar Express [0.85, 1.14] from 1e-3 (·1.02) up.
    gen = torch.Generator().manual_seed(1)
    U, _ = torch.linalg.qr(torch.randn(80, 48, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(48, 48, generator=gen))
    s = 7.0 * torch.logspace(0, -4, 48)
    rel = s / s.norm()
    for coeffs, floor, lo, hi in (("classic", 3e-3, 0.67, 1.21), ("polar", 1.02e-3, 0.84, 1.15)):
        X = zeropower(U @ torch.diag(s) @ V.T, 5, coeffs, torch.float32)
        f = torch.diagonal(zeropower(torch.diag(s), 5, coeffs, torch.float32))
        torch.testing.assert_close(U.T @ X @ V, torch.diag(f), rtol=0, atol=1e-4)
        assert lo < f[rel >= floor].min() and f.max() < hi
        assert f[rel < floor].min() < lo  # below the floor nothing is promised (and not met here)


def test_zeropower_polar_tail_converges_and_transpose_symmetry():
    G = torch.randn(40, 100, generator=torch.Generator().manual_seed(2))
    s = _svals(zeropower(G, 8, "polar", torch.float32))  # 5 Polar Express steps + 3 NS tail steps
    assert (s - 1).abs().max() < 1e-3
    fewer = _svals(zeropower(G, 3, "polar", torch.float32))
    assert (fewer - 1).abs().max() > (s - 1).abs().max()
    # tall and wide inputs take the same path up to transposition
    polar = zeropower(G, 5, "polar", torch.float32)
    torch.testing.assert_close(zeropower(G.T, 5, "polar", torch.float32), polar.T)
    # batched equals one by one
    B = torch.randn(4, 24, 16, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(zeropower(B, dtype=torch.float32),
                               torch.stack([zeropower(b, dtype=torch.float32) for b in B]))


def test_zeropower_rejects_bad_input():
    with pytest.raises(OptimError, match="coeffs"):
        zeropower(torch.randn(4, 4), coeffs="cubic")
    with pytest.raises(OptimError, match="steps"):
        zeropower(torch.randn(4, 4), steps=0)
    with pytest.raises(OptimError, match="matrix"):
        zeropower(torch.randn(4))
    with pytest.raises(OptimError, match="matrices only"):
        Muon([nn.Parameter(torch.zeros(4))])


# ----------------------------------------------------------------------------- Muon, one process


def _one_step(p0: torch.Tensor, g: torch.Tensor, **kw) -> torch.Tensor:
    p = nn.Parameter(p0.clone())
    opt = Muon([p], ns_dtype=torch.float32, **kw)
    p.grad = g.clone()
    opt.step()
    return p.detach()


def test_muon_aspect_ratio_scaling_and_decoupled_weight_decay():
    gen = torch.Generator().manual_seed(4)
    for rows, cols, scale in ((128, 32, 2.0), (32, 128, 1.0), (48, 48, 1.0)):
        p0, g = torch.randn(rows, cols, generator=gen), torch.randn(rows, cols, generator=gen)
        plain = dict(lr=0.1, momentum=0.0, nesterov=False)
        new = _one_step(p0, g, **plain)
        torch.testing.assert_close(new, p0 - 0.1 * scale * zeropower(g, dtype=torch.float32))
        # decay shrinks the old weights by (1 − lr·wd), independent of the update
        decayed = _one_step(p0, g, weight_decay=0.5, **plain)
        torch.testing.assert_close(decayed, 0.95 * p0 - 0.1 * scale * zeropower(g, dtype=torch.float32))
        torch.testing.assert_close(_one_step(p0, torch.zeros_like(g), weight_decay=0.5, **plain), 0.95 * p0)


def test_muon_nesterov_momentum_matches_reference():
    gen = torch.Generator().manual_seed(5)
    p = nn.Parameter(torch.randn(16, 24, generator=gen))
    ref_p, buf = p.detach().clone(), torch.zeros(16, 24)
    opt = Muon([p], lr=0.05, momentum=0.9, ns_dtype=torch.float32)
    for _ in range(3):
        g = torch.randn(16, 24, generator=gen)
        p.grad = g.clone()
        opt.step()
        buf = 0.9 * buf + g
        ref_p -= 0.05 * zeropower(g + 0.9 * buf, dtype=torch.float32)
    torch.testing.assert_close(p.detach(), ref_p)


def test_muon_row_norm_balances_rows_before_orthogonalizing():
    gen = torch.Generator().manual_seed(6)
    p0, g = torch.randn(32, 64, generator=gen), torch.randn(32, 64, generator=gen)
    row_scales = torch.logspace(-3, 3, 32).unsqueeze(1)
    kw = dict(lr=0.1, momentum=0.0, nesterov=False)
    balanced = _one_step(p0, g, row_norm=True, **kw)
    # MuonEq-R: the update only depends on each row's direction ...
    torch.testing.assert_close(_one_step(p0, g * row_scales, row_norm=True, **kw), balanced)
    # ... and equals plain Muon on the row-normalized gradient
    torch.testing.assert_close(balanced, _one_step(p0, g / g.norm(dim=1, keepdim=True), **kw))
    # without it, the large rows dominate the orthogonalized update
    skewed = _one_step(p0, g * row_scales, **kw) - p0
    assert skewed[-1].norm() > 10 * skewed[0].norm()


def test_muon_decreases_least_squares_loss():
    gen = torch.Generator().manual_seed(7)
    X, W_true = torch.randn(64, 256, generator=gen), torch.randn(32, 64, generator=gen) / 8
    Y = W_true @ X
    W = nn.Parameter(torch.zeros(32, 64))
    opt = Muon([W], lr=0.05, momentum=0.9)  # bf16 Newton–Schulz, as in training
    losses = []
    for _ in range(30):
        loss = ((W @ X - Y) ** 2).mean()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.1 * losses[0]
    assert all(b < a for a, b in zip(losses[:10], losses[1:11], strict=True))


# ----------------------------------------------------------------------------- Muon, two processes

# 3 + 1 (not divisible by world 2: rank 1 owns padding only) + 2 params in two groups.
_DIST_SHAPES = [(32, 16), (32, 16), (32, 16), (24, 24), (16, 48), (16, 48)]
_DIST_STEPS = 3


def _dist_params() -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(10)
    return [nn.Parameter(torch.randn(*s, generator=gen)) for s in _DIST_SHAPES]


def _dist_groups(params):
    kw = dict(momentum=0.9, weight_decay=0.1, row_norm=True, coeffs="polar")
    return [dict(params=params[:4], lr=0.05, **kw), dict(params=params[4:], lr=0.02, **kw)]


def _dist_grads(rank: int, step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return [torch.randn(*s, generator=gen) for s in _DIST_SHAPES]


def _dist_schedule(opt: Muon, step: int) -> None:
    if step == 1:  # a state reload replaces the group dicts (the trainer does so after warmup) ...
        opt.load_state_dict(opt.state_dict())
    if step >= 1:  # ... and later schedule changes must still reach the sharded update
        opt.param_groups[0]["lr"], opt.param_groups[1]["momentum"] = 0.03, 0.95


def _dist_worker(rank: int, init_file: str, out_file: str) -> None:
    torch.set_num_threads(1)  # two ranks share the test machine's cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        params = _dist_params()
        opt = Muon(_dist_groups(params), ns_dtype=torch.float32)
        vec = nn.Parameter(torch.zeros(5))
        for step in range(_DIST_STEPS):
            for p, g in zip(params, _dist_grads(rank, step), strict=True):
                p.grad = g
            _dist_schedule(opt, step)
            if step == 1:
                opt.launch_reduce_scatters()  # the early-launch path gives the same result
            opt.step()
        vec.grad = torch.full((5,), float(rank + 1))
        all_reduce_grads([vec])
        owned = sorted(i for i, p in enumerate(params) if "momentum_buffer" in opt.state[p])
        result = {"params": [p.detach() for p in params], "owned": owned, "vec_grad": vec.grad}
        torch.save(result, f"{out_file}.{rank}")
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    os._exit(0)  # results are on disk: skip gloo's thread teardown, which can abort (tests/test_eval.py)


def test_sharded_muon_matches_single_process(tmp_path):
    out = tmp_path / "result.pt"
    mp.spawn(_dist_worker, args=(str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    r0, r1 = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    params = _dist_params()
    opt = Muon(_dist_groups(params), ns_dtype=torch.float32)
    for step in range(_DIST_STEPS):
        for p, g0, g1 in zip(params, _dist_grads(0, step), _dist_grads(1, step), strict=True):
            p.grad = (g0 + g1) / 2
        _dist_schedule(opt, step)
        opt.step()
    for ref, a, b in zip(params, r0["params"], r1["params"], strict=True):
        torch.testing.assert_close(a, ref.detach(), rtol=0, atol=1e-6)
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the ranks hold identical weights
    assert not torch.equal(params[0].detach(), _dist_params()[0])
    # rank 0 owns 2 of the 3 (32,16), the (24,24) and one (16,48); rank 1 the rest; none twice
    assert r0["owned"] == [0, 1, 3, 4] and r1["owned"] == [2, 5]
    for r in (r0, r1):
        torch.testing.assert_close(r["vec_grad"], torch.full((5,), 1.5))


# ----------------------------------------------------------------------------- routing


class _ToyBlock(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.attn = nn.Module()
        for name in ("c_q", "c_k", "c_v", "proj"):
            setattr(self.attn, name, nn.Linear(d, d, bias=False))
        self.attn.q_gain = nn.Parameter(torch.ones(2))
        self.attn.gate = nn.Linear(4, 2, bias=False)  # control matrix: AdamW, not Muon
        self.mlp = nn.Module()
        self.mlp.fc, self.mlp.proj = nn.Linear(d, 2 * d, bias=False), nn.Linear(2 * d, d, bias=False)
        self.attn_scale, self.mlp_scale = nn.Parameter(torch.ones(d)), nn.Parameter(torch.ones(d))
        self.resid_mix = nn.Parameter(torch.stack([torch.ones(d), torch.zeros(d)]))


class _ToyGPT(nn.Module):
    def __init__(self, tie: bool, d: int = 8, vocab: int = 32):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, d)
        self.bigram = nn.Module()
        self.bigram.embed, self.bigram.proj = nn.Embedding(16, 4), nn.Linear(4, d, bias=False)
        self.bigram.scale = nn.Parameter(torch.tensor(0.05))
        self.blocks = nn.ModuleList([_ToyBlock(d) for _ in range(2)])
        self.skip_weights = nn.Parameter(torch.ones(1, d))
        self.frozen = nn.Parameter(torch.ones(3), requires_grad=False)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.tok_emb.weight


def _groups_by_param(opts):
    out = {}
    for opt in opts:
        for g in opt.param_groups:
            for p in g["params"]:
                assert id(p) not in out, "a parameter is in two groups"
                out[id(p)] = (opt, g)
    return out


@pytest.mark.parametrize("tie", [True, False])
def test_build_optimizers_routes_every_param_once(tie):
    t = TrainConfig(matrix_lr=0.022, tied_embed_lr=0.03, embed_lr=0.6, head_lr=0.008, scalar_lr=0.02,
                    adam_wd=0.085, muon_wd=0.095, muon_coeffs="polar", muon_row_norm=True)
    model = _ToyGPT(tie)
    opts = build_optimizers(model, t)
    adam, muon = opts
    assert isinstance(adam, torch.optim.AdamW) and isinstance(muon, Muon)
    where = _groups_by_param(opts)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(where) == {id(p) for p in trainable.values()}
    expected_muon = {f"blocks.{i}.{m}.weight" for i in range(2)
                     for m in ("attn.c_q", "attn.c_k", "attn.c_v", "attn.proj", "mlp.fc", "mlp.proj")}
    assert {n for n, p in trainable.items() if where[id(p)][0] is muon} == expected_muon
    assert {n for n, p in trainable.items() if is_muon_param(n, p)} == expected_muon
    expect = {"tok_emb.weight": (0.03 if tie else 0.6, 0.085), "bigram.embed.weight": (0.03, 0.085),
              "bigram.proj.weight": (0.03, 0.085), "bigram.scale": (0.02, 0.0),
              "skip_weights": (0.02, 0.0), "blocks.0.resid_mix": (0.02, 0.0),
              "blocks.1.attn.gate.weight": (0.02, 0.0), "blocks.0.attn_scale": (0.02, 0.0),
              "blocks.1.attn.q_gain": (0.02, 0.0), "blocks.0.attn.c_q.weight": (0.022, 0.095)}
    if not tie:
        expect["lm_head.weight"] = (0.008, 0.085)
    assert ("lm_head.weight" in trainable) is not tie
    for name, (lr, wd) in expect.items():
        _, g = where[id(trainable[name])]
        assert (g["lr"], g["base_lr"], g["weight_decay"]) == (lr, lr, wd), name
    for opt in opts:
        assert all(g["base_lr"] == g["lr"] for g in opt.param_groups)
    mg = muon.param_groups[0]
    assert (mg["coeffs"], mg["row_norm"], mg["momentum"], mg["backend_steps"]) == ("polar", True, 0.95, 5)
    assert adam.defaults["betas"] == (0.9, 0.95) and adam.defaults["eps"] == 1e-8


def test_build_optimizers_covers_gpt_tiny():
    model_mod = pytest.importorskip("golf.model", reason="golf.model not importable yet")
    cfg = tiny()
    model = model_mod.GPT(cfg.model)
    opts = build_optimizers(model, cfg.train)
    where = _groups_by_param(opts)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert set(where) == {id(p) for _, p in named}
    muon_names = {n for n, p in named if isinstance(where[id(p)][0], Muon)}
    assert muon_names and all(".attn." in n or ".mlp." in n for n in muon_names)


# ----------------------------------------------------------------------------- schedules


def test_lr_multiplier_schedule():
    assert lr_multiplier(0.0, 0.75, 0.1) == 1.0
    assert lr_multiplier(0.25, 0.75, 0.1) == 1.0
    assert math.isclose(lr_multiplier(0.625, 0.75, 0.1), 0.55)
    assert math.isclose(lr_multiplier(1.0, 0.75, 0.1), 0.1)
    assert math.isclose(lr_multiplier(1.3, 0.75, 0.1), 0.1)  # clamped past the end
    assert math.isclose(lr_multiplier(0.75, 0.5, 0.0), 0.5)
    assert lr_multiplier(0.99, 0.0, 0.0) == 1.0  # no warmdown
    values = [lr_multiplier(i / 100, 0.5, 0.0) for i in range(101)]
    assert all(b <= a for a, b in zip(values, values[1:], strict=False))


def test_muon_momentum_warmup():
    t = TrainConfig(muon_momentum=0.97, muon_momentum_warmup_start=0.92, muon_momentum_warmup_steps=1500)
    assert muon_momentum_at(0, t) == pytest.approx(0.92)
    assert muon_momentum_at(750, t) == pytest.approx(0.945)
    assert muon_momentum_at(1500, t) == pytest.approx(0.97)
    assert muon_momentum_at(10_000, t) == pytest.approx(0.97)
    t.muon_momentum_warmup_steps = 0
    assert muon_momentum_at(0, t) == 0.97
