"""The whole job: train → calibrate (inside the training budget) → quantize → pack → size → eval.

This is what `golf run` and the bundled `train_gpt.py` execute. Notable:
- GPTQ calibration reads training shards only and is timed as part of training (the 600 s
  rule); quantization, packing and evaluation happen after.
- Evaluation always runs on the model read back from the artifact bytes, never on the
  in-process weights, so the reported score is the score of what is submitted.
- Prints the official log lines and ends with one `golf_result {json}` line that
  `golf submit` and `golf stats` parse.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from golf.config import Config, ConfigError, load_config
from golf.data import byte_table, file_sha256, list_shards, load_tokenizer, load_val_tokens
from golf.dist import all_reduce_sum, barrier, init_distributed, world
from golf.eval import evaluate, load_artifact_model
from golf.pack import write_artifact
from golf.quant import calibration_batches, collect_fisher, collect_hessians, fit_to_budget
from golf.train import train

ARTIFACT_NAME = "final_model.golf"


def eval_stages(cfg: Config) -> list[str]:
    """What `golf run` scores, in order; the last one is the result. The pre-quant and plain
    quantized scores are cheap diagnostics; sliding windows without TTT run unless TTT follows
    and `sliding_with_ttt` is off."""
    stages = ["prequant", "quant"]
    ttt = cfg.ttt.ttt_mode != "none"
    if cfg.eval.eval_stride > 0 and (not ttt or cfg.eval.sliding_with_ttt):
        stages.append("sliding")
    return stages + (["ttt"] if ttt else [])


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    for name in ("triton", "sentencepiece", "brotli", "zstandard", "flash_attn", "flash_attn_interface"):
        try:
            versions[name] = getattr(__import__(name), "__version__", "installed")
        except ImportError:
            continue
    if torch.cuda.is_available():
        versions["cuda"] = torch.version.cuda or ""
        versions["gpu"] = torch.cuda.get_device_name()
    return versions


def _nvidia_smi() -> str:
    try:
        return subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


def run_pipeline(cfg: Config, code_path: str | None = None, out_dir: str = ".",
                 log: Callable[[str], None] = print) -> dict:
    """Run the full job for `cfg`; returns the result dict printed as `golf_result`."""
    info = init_distributed()
    say = log if info.is_main else (lambda msg: None)
    out = Path(out_dir)
    artifact_path = out / ARTIFACT_NAME
    if info.is_main:
        if artifact_path.exists():
            raise ConfigError(f"{artifact_path} already exists; refusing to overwrite a previous run")
        out.mkdir(parents=True, exist_ok=True)
    code_sha = file_sha256(code_path) if code_path else ""
    config_json = json.dumps(cfg.to_dict(), sort_keys=True)
    versions = package_versions()
    say(f"golf run: preset {cfg.preset} seed {cfg.train.seed} code_sha256 {code_sha or '-'}")
    say(f"config {config_json}")
    say(f"versions {json.dumps(versions)}")
    smi = _nvidia_smi() if info.is_main else ""
    if smi:
        say(smi.rstrip())

    # Fail on a bad tokenizer or validation split before spending the training budget.
    sp = load_tokenizer(cfg.data.tokenizer_path, cfg.model.vocab_size)
    table = byte_table(sp).to(info.device)
    val_tokens = load_val_tokens(list_shards(cfg.data.data_path, cfg.data.val_files), cfg.data.val_max_tokens)

    result = train(cfg, info, log=say, export=False)
    model = result.model

    # GPTQ calibration counts against the training budget.
    t_cal = time.perf_counter()
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if info.device.type == "cuda"
           else torch.autocast("cpu", enabled=False))
    with amp:
        hessians = collect_hessians(model, calibration_batches(cfg, info.device, info.rank, info.world_size))
        fisher = None
        if cfg.quant.clip_alloc != "class":
            share = -(-cfg.quant.fisher_seqs // info.world_size)
            fisher = collect_fisher(model, calibration_batches(cfg, info.device, info.rank, info.world_size), share)
    if info.world_size > 1:
        for h in [*hessians.values(), *(fisher or {}).values()]:
            all_reduce_sum(h).div_(info.world_size)
    gptq_time = time.perf_counter() - t_cal
    train_time = result.train_time_s + gptq_time
    say(f"gptq_calibration: {len(hessians)} hessians in {gptq_time * 1000:.0f}ms; "
        f"train+calibration {train_time:.1f}s (cap {cfg.train.max_wallclock_seconds:.0f}s)")

    # Quantize and pack on rank 0; every rank then evaluates the artifact it wrote.
    code_bytes = Path(code_path).stat().st_size if code_path else 0
    tokenizer_meta = {"sha256": file_sha256(cfg.data.tokenizer_path), "vocab_size": cfg.model.vocab_size}
    t_q = time.perf_counter()
    fit_changes: list[str] = []
    if info.is_main:
        # GPTQ runs where the Hessians live: on the GPU when there is one.
        state = {k: v.detach().float() for k, v in model.state_dict().items()}
        qs, blob, fit_changes = fit_to_budget(state, hessians, cfg.quant, cfg.model, tokenizer_meta,
                                              code_bytes, run_config=cfg.to_dict(), fisher=fisher)
        write_artifact(artifact_path, blob)
        say(qs.stats.summary())
    barrier()
    quant_time = time.perf_counter() - t_q
    model_bytes = artifact_path.stat().st_size
    total_bytes = model_bytes + code_bytes
    for change in fit_changes:
        say(f"fit: {change}")
    say(f"Serialized model {ARTIFACT_NAME}: {model_bytes} bytes")
    say(f"Code size: {code_bytes} bytes")
    say(f"Total submission size {ARTIFACT_NAME}: {total_bytes} bytes")
    if total_bytes > cfg.quant.size_cap_bytes:
        say(f"WARNING: total {total_bytes} bytes is over the cap of {cfg.quant.size_cap_bytes}")

    # Evaluation: pre-quant (diagnostic), then everything on the artifact read back from disk.
    scores: dict[str, dict | None] = {"prequant": None, "quant": None, "sliding": None, "ttt": None}
    phases = dict(result.phases, gptq_calibration=gptq_time, quantize_pack=quant_time)
    plain = dataclasses.replace(cfg.eval, eval_stride=0)
    no_ttt = dataclasses.replace(cfg.ttt, ttt_mode="none")
    t_eval = time.perf_counter()

    def score(tag: str, m, ecfg, tcfg) -> None:
        if tcfg.ttt_deadline_s > 0:  # the TTT deadline counts from the first evaluation stage
            left = tcfg.ttt_deadline_s - (time.perf_counter() - t_eval)
            tcfg = dataclasses.replace(tcfg, ttt_deadline_s=max(left, 1e-3))
        r = evaluate(m, val_tokens, table, ecfg, tcfg, log=say)
        scores[tag] = {"val_loss": r.val_loss, "val_bpb": r.val_bpb, "tokens": r.tokens, "bytes": r.bytes}
        if tcfg.ttt_mode != "none":
            scores[tag]["ttt_deadline_hit"] = r.deadline_hit
        phases[f"eval_{tag}"] = sum(r.times.values())
        name = {"prequant": "prequant", "quant": "quant", "sliding": "quant_sliding", "ttt": "quant_ttt"}[tag]
        say(f"final_{name} val_loss:{r.val_loss:.8f} val_bpb:{r.val_bpb:.8f} "
            f"eval_time:{phases[f'eval_{tag}'] * 1000:.0f}ms")

    stages = eval_stages(cfg)
    score("prequant", model, plain, no_ttt)
    qmodel, _ = load_artifact_model(artifact_path, info.device)
    score("quant", qmodel, plain, no_ttt)
    if "sliding" in stages:
        score("sliding", qmodel, cfg.eval, no_ttt)
    if "ttt" in stages:
        score("ttt", qmodel, cfg.eval, cfg.ttt)
    eval_time = time.perf_counter() - t_eval
    final = scores[stages[-1]]

    golf_result = {
        "seed": cfg.train.seed, "preset": cfg.preset, "code_sha256": code_sha,
        "config_sha256": hashlib.sha256(config_json.encode()).hexdigest(), "config": cfg.to_dict(),
        "world_size": info.world_size, "device": versions.get("gpu", str(info.device)),
        "steps": result.steps, "stopped": result.stopped, "train_time_s": train_time,
        "gptq_time_s": gptq_time, "eval_time_s": eval_time, "startup_s": result.startup_s,
        "attn_backend": result.attn_backend,
        **{k: ({"val_loss": v["val_loss"], "val_bpb": v["val_bpb"]} if v else None) for k, v in scores.items()},
        "final": final, "bytes_total": total_bytes, "bytes_code": code_bytes, "bytes_model": model_bytes,
        "bytes_per_token": final["bytes"] / max(final["tokens"], 1), "calibration_source": "train",
        "ttt_mode": cfg.ttt.ttt_mode, "fit_changes": fit_changes, "phases": phases, "versions": versions,
    }
    say("golf_result " + json.dumps(golf_result, sort_keys=True))
    return golf_result


def run_from_env(embedded_config: dict | None = None) -> dict:
    """Entry point of the bundled train_gpt.py: embedded config (or GOLF_PRESET) + env overrides."""
    if embedded_config is not None:
        cfg = Config.from_dict(embedded_config)
        cfg.apply_env()
        cfg.validate()
    else:
        cfg = load_config(os.environ.get("GOLF_PRESET", "record"))
    main = sys.modules.get("__main__")
    code_path = getattr(main, "__file__", None)
    out_dir = os.environ.get("GOLF_OUT_DIR", ".")
    try:
        return run_pipeline(cfg, code_path=code_path, out_dir=out_dir)
    finally:
        if world()[1] > 1:
            torch.distributed.destroy_process_group()
