"""GPT: every switch trains, recurrence order, causality, BOS isolation, attention backends."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import golf.model as model_mod
from golf.config import GolfError, ModelConfig, record, tiny
from golf.model import GPT, causal_attention, resolve_attn_backend, virtual_layer_order, xsa_project

CONTROL_WORDS = ("scale", "gain", "mix", "gate", "skip", "lambda", "route")
MATRIX_SUFFIXES = ("attn.c_q.weight", "attn.c_k.weight", "attn.c_v.weight", "attn.proj.weight",
                   "mlp.fc.weight", "mlp.proj.weight")


def is_contract_matrix(name: str) -> bool:
    """The names quant and LoRA look for (architecture.md)."""
    return (name in ("tok_emb.weight", "lm_head.weight") or name.startswith("bigram.")
            or (name.startswith("blocks.") and name.endswith(MATRIX_SUFFIXES)))


def small_cfg(**overrides) -> ModelConfig:
    base = ModelConfig(vocab_size=64, num_layers=4, model_dim=32, num_heads=4, num_kv_heads=2,
                       mlp_mult=2.0, attn_backend="sdpa")
    return dataclasses.replace(base, **overrides)


ALL_ON = dict(mlp_act="leaky_relu2", rope_dims=4, ln_scale=True, xsa=True, num_loops=3, loop_start=1,
              loop_end=2, parallel_from=2, parallel_lanes=2, bigram_buckets=16, bigram_dim=8,
              smear_gate=True, attn_out_gate=True)


def perturbed(cfg: ModelConfig, seed: int = 0) -> GPT:
    """A model whose zero/one inits are broken up, so every path carries signal and gradient."""
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def reference_attention(q, k, v):
    """Plain causal GQA softmax attention on [B, T, H, D] tensors."""
    group = q.size(2) // k.size(2)
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q.float(), k.float()) / math.sqrt(q.size(-1))
    t = q.size(1)
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v.float())


def test_record_recurrence_order_and_toggle():
    cfg = small_cfg(num_layers=11, num_loops=3, loop_start=3, loop_end=5)
    model = GPT(cfg)
    documented = [0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10]
    assert model.looping and model.layer_order() == documented
    model.set_looping(False)
    assert not model.looping and model.layer_order() == list(range(11))
    model.set_looping(True)
    assert model.layer_order() == documented == virtual_layer_order(record().model, True)
    # U-Net skips are sized for the 17-layer sequence: 8 encoder outputs
    assert model.skip_weights.shape == model.skip_gates.shape == (8, 32)
    flat = GPT(small_cfg(num_loops=1))
    flat.set_looping(True)
    assert flat.layer_order() == [0, 1, 2, 3] and not flat.looping


def test_record_builds_with_documented_size_and_names():
    model = GPT(record().model)
    n = model.num_params()
    assert abs(n - 35.9e6) / 35.9e6 < 0.01, n
    assert model.lm_head.weight is model.tok_emb.weight
    names = [name for name, _ in model.named_parameters()]
    assert "lm_head.weight" not in names  # the tie is one parameter
    for name, p in model.named_parameters():  # every big matrix is one quant/LoRA can find
        assert is_contract_matrix(name) == (p.ndim == 2 and p.numel() > 65_536), name
    # 6·(17 virtual layers of matmuls + head) + 12·T·d per virtual layer
    per_layer = 2 * 512 * 512 + 2 * 512 * 256 + 2 * 512 * 2048  # q,o + k,v + fc,proj
    expected = 6 * (17 * per_layer + 8192 * 512) + 12 * 2048 * 512 * 17
    assert model.flops_per_token(2048) == expected
    model.set_looping(False)
    assert model.flops_per_token(2048) == 6 * (11 * per_layer + 8192 * 512) + 12 * 2048 * 512 * 11


def test_tiny_preset_loss_is_uniform_at_init():
    cfg = tiny().model
    torch.manual_seed(0)
    model = GPT(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 64))
    targets = torch.randint(0, cfg.vocab_size, (2, 64))
    loss = model.loss(ids, targets)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.05


SWITCHES = {
    "base": {},
    "leaky_relu2": dict(mlp_act="leaky_relu2"),
    "untied": dict(tie_embeddings=False),
    "no_softcap": dict(logit_softcap=0.0),
    "partial_rope": dict(rope_dims=4),
    "no_qk_norm": dict(qk_norm=False),
    "ln_scale": dict(ln_scale=True),
    "no_resid_mix": dict(resid_mix=False),
    "xsa_gqa": dict(xsa=True),
    "xsa_mha": dict(xsa=True, num_kv_heads=4),
    "recurrence": dict(num_loops=3, loop_start=1, loop_end=2),
    "no_unet": dict(unet_skips=False),
    "parallel": dict(parallel_from=2),
    "two_lanes_looped": dict(parallel_from=1, parallel_lanes=2, num_loops=2, loop_start=0, loop_end=1),
    "bigram": dict(bigram_buckets=16, bigram_dim=8),
    "smear_gate": dict(smear_gate=True),
    "attn_out_gate": dict(attn_out_gate=True),
    "all_on": ALL_ON,
}


@pytest.mark.parametrize("name", list(SWITCHES))
def test_every_switch_trains(name):
    cfg = small_cfg(**SWITCHES[name])
    model = perturbed(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    ids[:, 5] = 1  # a document boundary inside the window
    logits = model(ids)
    assert logits.shape == (2, 16, cfg.vocab_size) and logits.dtype == torch.float32
    if cfg.logit_softcap > 0:
        assert logits.abs().max() <= cfg.logit_softcap
    loss = model.loss(ids, torch.roll(ids, -1, 1))
    loss.backward()
    assert torch.isfinite(loss)
    for pname, p in model.named_parameters():
        assert is_contract_matrix(pname) or any(w in pname for w in CONTROL_WORDS), pname
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname
    assert model.hidden(ids).shape == (2, 16, cfg.model_dim)


def test_bf16_autocast_matches_fp32():
    cfg = small_cfg(**ALL_ON)
    model = perturbed(cfg, seed=9)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids)
        assert model.hidden(ids).dtype == torch.float32  # the residual stream stays fp32
    assert logits.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())
    torch.testing.assert_close(logits, model(ids), rtol=0.1, atol=0.15)


def test_bf16_stream_under_autocast_only():
    cfg = small_cfg(**ALL_ON, stream_dtype="bfloat16")
    model = perturbed(cfg, seed=9)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    assert model.hidden(ids).dtype == torch.float32  # no autocast: nothing changes
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.hidden(ids).dtype == torch.bfloat16
        loss = model.loss(ids, torch.roll(ids, -1, 1))
        logits = model(ids)
    loss.backward()
    assert all(p.dtype == torch.float32 and p.grad is not None and torch.isfinite(p.grad).all()
               for p in model.parameters())
    torch.testing.assert_close(logits, model(ids), rtol=0.1, atol=0.15)


SPEED_SWITCHES = {  # name: (the model both runs share, the switches the second run adds)
    "fused_ce": (dict(logit_softcap=30.0), dict(fused_ce=True)),
    "fused_ce_no_softcap": (dict(logit_softcap=0.0), dict(fused_ce=True)),
    "attention_ops": ({}, dict(fused_qk_rope=True, fused_xsa=True)),
    "scales_in_weights": ({}, dict(scales_in_weights=True)),
}


@pytest.mark.parametrize("name", list(SPEED_SWITCHES))
def test_speed_switches_match_the_plain_model(name):
    """Each speed switch computes the same loss and gradients, with every technique on and LoRA
    adapters on the projections: `fused_ce` takes the loss through golf.kernels.softcap_ce,
    `fused_qk_rope` / `fused_xsa` those steps through golf.kernels.attention_ops (plain torch on
    CPU), and `scales_in_weights` moves attn_scale / mlp_scale onto the projection weights."""
    shared, switches = SPEED_SWITCHES[name]
    results = []
    for on in (False, True):
        model = perturbed(small_cfg(**ALL_ON, **shared, **(switches if on else {})), seed=4)
        g = torch.Generator().manual_seed(5)
        for block in model.blocks:
            for m in (block.attn.proj, block.mlp.proj):
                m.lora = (torch.randn(2, m.in_features, 2, generator=g), torch.randn(2, 2, m.out_features, generator=g))
        ids = torch.randint(0, model.cfg.vocab_size, (2, 16), generator=g)
        loss = model.loss(ids, torch.roll(ids, -1, 1))
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (plain, plain_grads), (fast, fast_grads) = results
    torch.testing.assert_close(fast, plain, rtol=1e-6, atol=1e-6)
    for param, grad in plain_grads.items():
        torch.testing.assert_close(fast_grads[param], grad, rtol=1e-4, atol=1e-6, msg=param)


def test_causal_with_every_switch_on():
    cfg = small_cfg(**ALL_ON)
    model = perturbed(cfg, seed=1)
    ids = torch.randint(2, cfg.vocab_size, (2, 24))
    ids[:, [0, 9]] = 1
    base = model(ids)
    for p in (3, 9, 15):
        changed = ids.clone()
        changed[:, p + 1:] = torch.randint(2, cfg.vocab_size, changed[:, p + 1:].shape)
        changed[0, -1] = 1  # a BOS after p must not matter either
        out = model(changed)
        torch.testing.assert_close(out[:, : p + 1], base[:, : p + 1], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(out[:, p + 1:], base[:, p + 1:])


def test_smear_and_bigram_do_not_leak_across_bos():
    cfg = small_cfg(smear_gate=True, bigram_buckets=16, bigram_dim=8)
    model = perturbed(cfg, seed=2)
    ids = torch.randint(2, cfg.vocab_size, (1, 12))
    k = 6
    with torch.no_grad():
        ids[0, k] = 1
        other = ids.clone()
        other[0, :k] = (other[0, :k] + 7) % (cfg.vocab_size - 2) + 2  # a different previous document
        torch.testing.assert_close(model.embed(other)[:, k:], model.embed(ids)[:, k:], rtol=0, atol=0)
        # control: without the BOS, the previous token does reach position k
        ids[0, k] = other[0, k] = 5
        assert not torch.allclose(model.embed(other)[:, k], model.embed(ids)[:, k])


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_sdpa_matches_reference_attention(dtype, tol):
    torch.manual_seed(3)
    q = torch.randn(2, 20, 8, 16).to(dtype)
    k, v = torch.randn(2, 20, 2, 16).to(dtype), torch.randn(2, 20, 2, 16).to(dtype)
    out = causal_attention(q, k, v, "sdpa")
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out.float(), reference_attention(q, k, v), rtol=tol, atol=tol)


def test_xsa_removes_the_component_along_each_heads_value():
    torch.manual_seed(4)
    y, v = torch.randn(2, 5, 6, 8), torch.randn(2, 5, 3, 8)
    out = xsa_project(y, v)
    v_per_head = F.normalize(v.repeat_interleave(2, dim=2), dim=-1)
    assert (out * v_per_head).sum(-1).abs().max() < 1e-5
    expected = y - (y * v_per_head).sum(-1, keepdim=True) * v_per_head
    torch.testing.assert_close(out, expected)


def test_two_lanes_start_as_the_single_lane_parallel_block():
    one = perturbed(small_cfg(parallel_from=1, num_loops=2, loop_start=0, loop_end=1), seed=5)
    two = GPT(small_cfg(parallel_from=1, parallel_lanes=2, num_loops=2, loop_start=0, loop_end=1))
    missing, unexpected = two.load_state_dict(one.state_dict(), strict=False)
    assert not unexpected and missing and all(name.endswith("lane_route") for name in missing)
    ids = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(two(ids), one(ids), rtol=1e-5, atol=1e-5)


def test_rotary_tables_grow_on_demand(monkeypatch):
    monkeypatch.setattr(model_mod, "ROPE_INITIAL_LEN", 8)
    model = perturbed(small_cfg(rope_dims=4), seed=6)
    assert model.rotary.cos_cached.shape == (8, 2)
    ids = torch.randint(0, 64, (1, 40))
    long_logits = model(ids)
    assert model.rotary.cos_cached.size(0) >= 40
    # positions beyond the first table see the same rotation a fresh, large table gives
    monkeypatch.setattr(model_mod, "ROPE_INITIAL_LEN", 64)
    fresh = GPT(small_cfg(rope_dims=4))
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(ids), long_logits, rtol=1e-5, atol=1e-5)


def test_forced_backend_that_cannot_run_is_a_golf_error():
    for name in ("fa3", "fa2"):
        try:
            resolve_attn_backend(name)
        except GolfError as exc:
            assert name in str(exc) and "\n" not in str(exc)
        else:
            assert torch.cuda.is_available()
    assert resolve_attn_backend("sdpa") == "sdpa"
    assert GPT(small_cfg(attn_backend="auto")).attn_backend_name in ("fa3", "fa2", "sdpa")


FLASH = [b for b in ("fa3", "fa2") if torch.cuda.is_available()
         and (model_mod._fa3_attn_func if b == "fa3" else model_mod._fa2_attn_func) is not None]


@pytest.mark.skipif(not FLASH, reason="needs CUDA and flash-attn")
@pytest.mark.parametrize("backend", FLASH)
def test_flash_backends_match_sdpa_on_gpu(backend):
    torch.manual_seed(7)
    q = torch.randn(2, 256, 8, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 256, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    torch.testing.assert_close(causal_attention(q, k, v, backend), causal_attention(q, k, v, "sdpa"),
                               rtol=2e-2, atol=2e-2)
    ref = perturbed(small_cfg(**ALL_ON, model_dim=128, num_heads=2, num_kv_heads=1), seed=8).cuda()
    flash = GPT(dataclasses.replace(ref.cfg, attn_backend=backend)).cuda()
    flash.load_state_dict(ref.state_dict())
    assert flash.attn_backend_name == backend
    ids = torch.randint(0, 64, (2, 128), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        torch.testing.assert_close(flash(ids), ref(ids), rtol=5e-2, atol=1e-1)


@pytest.mark.parametrize("fused", [False, True])
def test_regional_compile_matches_eager_and_looping_needs_no_new_graph(fused):
    """compile_blocks: identical blocks share graphs (no per-layer compiles), switching depth
    recurrence on compiles nothing new, and the loss and grads equal the eager model's; the speed
    switches (`fused`: golf.kernels' CE, qk prologue and XSA, scales in weights) add no graph."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    speed = dict(fused_ce=fused, fused_qk_rope=fused, fused_xsa=fused, scales_in_weights=fused)
    model = perturbed(dataclasses.replace(tiny().model, **speed), seed=3)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 32))
    losses, grads = {}, {}
    for compiled in (False, True):
        model.compile_blocks(compiled)
        for looping in (False, True):
            model.set_looping(looping)
            model.zero_grad()
            loss = model.loss(ids, ids.roll(-1, 1))
            loss.backward()
            losses[compiled, looping] = loss.detach()
            grads[compiled, looping] = model.blocks[0].attn.c_q.weight.grad.clone()
            if compiled and not looping:
                graphs_unlooped = counters["stats"]["unique_graphs"]
    model.compile_blocks(False)
    # embedding, sequential block without/with a U-Net skip, parallel block with a skip, and the
    # head with its loss unless the fused CE kernel (not compiled) takes the loss
    assert graphs_unlooped == counters["stats"]["unique_graphs"] == (4 if fused else 5)
    for looping in (False, True):
        torch.testing.assert_close(losses[True, looping], losses[False, looping], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grads[True, looping], grads[False, looping], rtol=1e-4, atol=1e-6)
