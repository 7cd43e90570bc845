"""The trainer on the tiny preset: loss falls, runs repeat, the cap holds, SIGTERM + resume."""

import os
import signal

import pytest
import torch

from golf.train import micro_batch_plan, qat_targets, sdclip_round, train, weights_rounded
from tests.conftest import tiny_config


def _run(tiny_data, tiny_tokenizer, out, **overrides):
    cfg = tiny_config(tiny_data, tiny_tokenizer, out, **overrides)
    return train(cfg, log=lambda _: None)


def test_tiny_preset_loss_falls(tiny_data, tiny_tokenizer, tmp_path):
    result = _run(tiny_data, tiny_tokenizer, tmp_path, iterations=40, max_wallclock_seconds=0)
    first = sum(loss for _, loss in result.losses[:5]) / 5
    last = sum(loss for _, loss in result.losses[-5:]) / 5
    assert result.steps == 40 and result.stopped == "iterations"
    assert last < first - 0.5, (first, last)
    assert (tmp_path / "final_model.pt").exists() and (tmp_path / "config.json").exists()


def test_same_seed_same_loss_curve(tiny_data, tiny_tokenizer, tmp_path):
    a = _run(tiny_data, tiny_tokenizer, tmp_path / "a", iterations=6, max_wallclock_seconds=0)
    b = _run(tiny_data, tiny_tokenizer, tmp_path / "b", iterations=6, max_wallclock_seconds=0)
    c = _run(tiny_data, tiny_tokenizer, tmp_path / "c", iterations=6, max_wallclock_seconds=0, seed=7)
    assert a.losses == b.losses
    assert a.losses != c.losses


def test_wallclock_cap_is_respected(tiny_data, tiny_tokenizer, tmp_path):
    cap = 3.0
    result = _run(tiny_data, tiny_tokenizer, tmp_path, iterations=100_000, max_wallclock_seconds=cap + 1.0,
                  gptq_reserve_seconds=1.0)
    assert result.stopped == "wallclock"
    assert result.train_time_s <= cap, result.train_time_s
    assert result.steps > 1


def test_recurrence_switches_on_by_wallclock(tiny_data, tiny_tokenizer, tmp_path):
    logs = []
    cfg = tiny_config(tiny_data, tiny_tokenizer, tmp_path, iterations=10, max_wallclock_seconds=0,
                      loop_enable_frac=0.5)
    result = train(cfg, log=logs.append)
    assert result.model.looping
    switch = [line for line in logs if "depth recurrence on" in line]
    assert len(switch) == 1 and switch[0].startswith("step:5 ")


def test_sdclip_round_is_the_grid_golf_quant_stores():
    from golf.quant import rtn_quantize, sdclip_scale

    torch.manual_seed(0)
    w = torch.randn(16, 256)
    w[3, 7] = 40.0  # beyond q_max steps: clamped, as golf.quant clamps it
    rounded = sdclip_round(w, 6, 12.0)
    step = 12.0 * w.std(dim=1, keepdim=True, unbiased=False) / 31
    q = rounded / step
    torch.testing.assert_close(q, q.round(), rtol=0, atol=1e-4)
    assert q.abs().max() <= 31 + 1e-4 and q[3, 7].item() == pytest.approx(31, abs=1e-4)
    inside = (w / step).abs() <= 31
    assert ((rounded - w).abs() <= step / 2 + 1e-6)[inside].all()
    stored = rtn_quantize(w, sdclip_scale(w, 6, 12.0), 6)  # its step is rounded to fp16: rare ties flip
    assert (stored == q.round()).float().mean() > 0.99


def test_qat_takes_gradients_at_the_rounded_weights_and_restores_the_float_ones(tiny_data, tiny_tokenizer,
                                                                                tmp_path):
    """Straight-through QAT: the gradient is the rounded model's, applied to float weights that
    come back bit for bit; exactly the tensors golf.quant quantizes take part, the tied one once."""
    import copy
    import dataclasses

    from golf.model import GPT

    cfg = tiny_config(tiny_data, tiny_tokenizer, tmp_path)
    qcfg = dataclasses.replace(cfg.quant, passthrough_max_numel=2048)
    torch.manual_seed(0)
    model = GPT(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    targets = qat_targets(model, qcfg, 1.25)
    names = {id(p): n for n, p in model.named_parameters()}
    specs = {names[id(p)]: (bits, k) for p, bits, k in targets}
    assert specs["tok_emb.weight"] == (8, 16.0 * 1.25) and "lm_head.weight" not in specs  # tied: once
    assert specs["blocks.0.attn.c_q.weight"] == (6, 12.5 * 1.25)
    assert specs["blocks.0.mlp.fc.weight"] == (6, 11.5 * 1.25)
    assert "blocks.0.attn.c_k.weight" not in specs  # 64 × 32 values: stored as fp16, never rounded
    float_state = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, cfg.model.vocab_size, (2, 32))

    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, (bits, k) in specs.items():
            reference.get_parameter(name).copy_(sdclip_round(float_state[name], bits, k))
    reference.loss(ids, ids.roll(-1, 1)).backward()
    with weights_rounded(targets):
        model.loss(ids, ids.roll(-1, 1)).backward()
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), float_state[name]), name
        torch.testing.assert_close(p.grad, reference.get_parameter(name).grad, rtol=1e-5, atol=1e-7)
    assert not torch.equal(reference.tok_emb.weight, model.tok_emb.weight)  # the rounding is real


def test_late_qat_switches_on_at_its_fraction_and_lowers_the_rounded_models_loss(tiny_data, tiny_tokenizer,
                                                                                 tmp_path):
    import copy
    import dataclasses

    from golf.data import byte_table, list_shards, load_tokenizer, load_val_tokens
    from golf.eval import evaluate
    from golf.quant import dequantize_state, quantize_state

    rounded = {}
    for frac in (0.0, 0.5):
        logs = []
        # int4, where rounding the float model costs over a nat on these models
        cfg = tiny_config(tiny_data, tiny_tokenizer, tmp_path / str(frac), iterations=40, max_wallclock_seconds=0,
                          qat_start_frac=frac, qat_k_scale=1.0, attn_bits=4, mlp_bits=4, embed_bits=4)
        result = train(cfg, log=logs.append)
        switch = [line for line in logs if "QAT on" in line]
        assert len(switch) == (1 if frac else 0) and (not frac or switch[0].startswith("step:20 "))
        # round to nearest on the class grid QAT trained with
        qcfg = dataclasses.replace(cfg.quant, gptq=False, clip_alloc="class")
        model = copy.deepcopy(result.model)
        model.load_state_dict(dequantize_state(quantize_state(result.model, qcfg)))
        val = load_val_tokens(list_shards(cfg.data.data_path, cfg.data.val_files))
        table = byte_table(load_tokenizer(cfg.data.tokenizer_path, cfg.model.vocab_size))
        rounded[frac] = evaluate(model, val, table, dataclasses.replace(cfg.eval, eval_stride=0),
                                 dataclasses.replace(cfg.ttt, ttt_mode="none"), log=lambda _: None).val_loss
    assert rounded[0.5] < rounded[0.0] - 0.5, rounded


def test_sigterm_checkpoint_then_resume_matches_uninterrupted(tiny_data, tiny_tokenizer, tmp_path):
    full = _run(tiny_data, tiny_tokenizer, tmp_path / "full", iterations=8, max_wallclock_seconds=0)

    def stop_at_3(step, loss):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    cfg = tiny_config(tiny_data, tiny_tokenizer, tmp_path / "cut", iterations=8, max_wallclock_seconds=0)
    cut = train(cfg, log=lambda _: None, on_step=stop_at_3)
    assert cut.stopped == "sigterm" and cut.steps == 3  # the flag is seen before step 4 starts
    assert (tmp_path / "cut" / "checkpoint_rank0.pt").exists()
    cfg.train.resume = True
    resumed = train(cfg, log=lambda _: None)
    assert resumed.steps == 8 and resumed.stopped == "iterations"
    assert resumed.losses == full.losses
    for a, b in zip(resumed.model.state_dict().values(), full.model.state_dict().values()):
        assert torch.equal(a, b)


def test_nan_loss_stops_with_clear_error(tiny_data, tiny_tokenizer, tmp_path):
    from golf.train import TrainingDiverged

    with pytest.raises(TrainingDiverged, match="loss became nan at step 2"):
        _run(tiny_data, tiny_tokenizer, tmp_path, iterations=3, max_wallclock_seconds=0, matrix_lr="nan")


def test_micro_batch_plan_keeps_global_batch(tiny_data, tiny_tokenizer, tmp_path):
    cfg = tiny_config(tiny_data, tiny_tokenizer, tmp_path, train_batch_tokens=8192, micro_batch_tokens=1024)
    for world in (1, 2, 4):
        accum, seqs = micro_batch_plan(cfg, world)
        assert accum * seqs * world * cfg.train.train_seq_len == 8192


def test_ema_export_forgets_the_initialization(tiny_data, tiny_tokenizer, tmp_path):
    """A short run's EMA export sits near the live weights, not near the random init.

    EMA never feeds back into training, so a twin run with ema_decay=0 has the same live weights.
    With a constant decay of 0.9965, 30 steps would leave 0.9965^30 = 90% of the init in the export.
    """
    from golf.model import GPT

    common = dict(iterations=30, max_wallclock_seconds=0, warmup_steps=0)
    cfg = tiny_config(tiny_data, tiny_tokenizer, tmp_path / "ema", ema_decay=0.9965, **common)
    torch.manual_seed(cfg.train.seed)
    init = GPT(cfg.model).state_dict()
    ema = train(cfg, log=lambda _: None).model.state_dict()
    live = _run(tiny_data, tiny_tokenizer, tmp_path / "live", ema_decay=0, **common).model.state_dict()
    name = "blocks.0.attn.c_q.weight"
    assert (ema[name] - live[name]).norm() < 0.5 * (live[name] - init[name]).norm()


def _parity_worker(rank: int, port: int, cfg_json: str, out: str) -> None:
    import json

    from golf.config import Config

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    cfg = Config.from_dict(json.loads(cfg_json))
    result = train(cfg, log=lambda _: None, export=False)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result.losses, f)
    torch.distributed.barrier()
    os._exit(0)  # skip gloo's thread teardown (see tests/test_eval.py)


def test_two_ranks_match_one_rank_with_accumulation(tiny_data, tiny_tokenizer, tmp_path):
    """The multi-GPU path on CPU: 2 gloo ranks vs 1 rank accumulating the same global batch."""
    import json
    import socket

    import torch.multiprocessing as mp

    # no late QAT: its rounding would turn the ranks' different summation order (~1e-7) into
    # flipped rounding decisions
    cfg = tiny_config(tiny_data, tiny_tokenizer, tmp_path, iterations=6, max_wallclock_seconds=0,
                      train_batch_tokens=8192, micro_batch_tokens=2048, qat_start_frac=0.0)
    single = train(cfg, log=lambda _: None, export=False).losses
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "losses.json"
    mp.spawn(_parity_worker, args=(port, cfg.to_json(), str(out)), nprocs=2)
    double = [tuple(x) for x in json.loads(out.read_text())]
    assert [s for s, _ in double] == [s for s, _ in single]
    for (_, a), (_, b) in zip(single, double):
        assert abs(a - b) < 1e-4, (single, double)
