"""Quantization variants of one trained checkpoint, side by side: bytes and BPB gap.

    python tools/quant_study.py RUN_DIR [--variant NAME=key:value,key:value[,fit]]... [--set key=value]...
                                [--no-class-split]

RUN_DIR holds `golf train`'s export (final_model.pt, config.json). The Hessians are collected once
(training shards, as in a run); each variant then quantizes, packs and scores the dequantized
model on the validation stream (plain windows), next to the unquantized model's score, and
splits the gap by tensor class (each class quantized alone; `--no-class-split` skips that). A
variant with `fit` runs the fitter to the byte budget first, as `golf run` does.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

from golf.config import load_config
from golf.data import byte_table, file_sha256, list_shards, load_tokenizer, load_val_tokens
from golf.eval import evaluate
from golf.model import GPT, quant_class
from golf.pack import pack_bytes
from golf.quant import (
    calibration_batches,
    collect_fisher,
    collect_hessians,
    dequantize_state,
    fisher_clip_k,
    fit_to_budget,
    quant_k_summary,
    quantize_state,
)

# Sessions 4–5 measured, on 300 s record models with the scale fitter: class k +0.0116, Fisher k per
# tensor within ×/÷1.5 +0.0089 (×/÷1.25 and ×/÷2 worse), Fisher k per row within ×/÷1.5 +0.0077; on
# a 240 s model, per row within ×/÷2.5 +0.0051 and with the Fisher of 128 windows +0.0050
# (docs/benchmarks.md). Session 6, on two 300 s models: per row ×/÷2.5 +0.0077 and +0.0063, ×/÷4
# +0.0102 (the embedding's share doubling), and a narrower clamp for the embedding alone lost on the
# second model. Session 8, on three more 300 s models: a step factor per column at alpha 0.5
# −0.0005, −0.0005 and +0.0005, 0.3 +0.0004, 0.7 −0.0004, GPTQ damping 0.003 +0.0004: all within
# the ±0.0005 that a variant's rounding moves the gap of one model. The defaults are the preset
# next to two column-step alphas. Three fitted variants without the class split fit in one 600 s
# device call next to 300 s of training.
DEFAULT_VARIANTS = ["preset=fit", "col0.5=gptq_col_alpha:0.5,fit", "col0.7=gptq_col_alpha:0.7,fit"]


def parse_variant(spec: str) -> tuple[str, dict[str, str], bool]:
    name, _, body = spec.partition("=")
    items = [i for i in body.split(",") if i]
    fit = "fit" in items
    overrides = dict(i.split(":", 1) for i in items if i != "fit")
    return name, overrides, fit


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--variant", action="append", default=None, help="NAME=key:value,...[,fit]")
    ap.add_argument("--set", action="append", default=[], help="config override for every variant")
    ap.add_argument("--no-class-split", action="store_true", help="skip each class's gap alone")
    args = ap.parse_args()
    run = Path(args.run_dir)
    cfg = load_config(config_file=str(run / "config.json"), overrides=args.set)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    state = torch.load(run / "final_model.pt", map_location="cpu", weights_only=True)
    model = GPT(cfg.model)
    model.load_state_dict(state)
    model.to(device).eval()
    table = byte_table(load_tokenizer(cfg.data.tokenizer_path, cfg.model.vocab_size)).to(device)
    val = load_val_tokens(list_shards(cfg.data.data_path, cfg.data.val_files), cfg.data.val_max_tokens)
    plain = dataclasses.replace(cfg.eval, eval_stride=0)
    no_ttt = dataclasses.replace(cfg.ttt, ttt_mode="none")
    quiet = lambda _msg: None  # noqa: E731

    probe = GPT(cfg.model).to(device).eval()  # one model for every score: its compiled graphs are reused

    def score(weights: dict[str, torch.Tensor]) -> float:
        probe.load_state_dict(weights, strict=False)  # a tied head may be stored once
        return evaluate(probe, val, table, plain, no_ttt, log=quiet).val_bpb

    base = score(state)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    t0 = time.perf_counter()
    with amp:
        hessians = collect_hessians(model, calibration_batches(cfg, device))
    print(f"unquantized val_bpb {base:.6f}; {len(hessians)} Hessians in {time.perf_counter() - t0:.1f}s", flush=True)
    fishers: dict[int, dict[str, torch.Tensor]] = {}

    def fisher_of(seqs: int) -> dict[str, torch.Tensor]:
        """The Fisher of `seqs` training windows, collected once per count a variant asks for."""
        if seqs not in fishers:
            t1 = time.perf_counter()
            with amp:
                fishers[seqs] = collect_fisher(model, calibration_batches(cfg, device), seqs)
            print(f"Fisher of {seqs} windows in {time.perf_counter() - t1:.1f}s", flush=True)
        return fishers[seqs]

    allocated = fisher_clip_k(state, fisher_of(cfg.quant.fisher_seqs), cfg.quant)
    per_row = cfg.quant.clip_alloc == "fisher_rows"
    for klass in sorted({quant_class(n) for n in allocated}):
        # per tensor: its k; per row: the geometric mean of its rows' k (what an artifact records)
        ks = sorted((quant_k_summary(k), n) for n, k in allocated.items() if quant_class(n) == klass)
        print(f"Fisher clip k{' (row geometric mean)' if per_row else ''}, {klass}: {ks[0][0]:.2f} ({ks[0][1]}) … "
              f"{ks[-1][0]:.2f} ({ks[-1][1]}) over {len(ks)} tensors", flush=True)
    meta = {"sha256": file_sha256(cfg.data.tokenizer_path), "vocab_size": cfg.model.vocab_size}
    rows = []
    for spec in args.variant or DEFAULT_VARIANTS:
        name, overrides, fit = parse_variant(spec)
        vcfg = load_config(config_file=str(run / "config.json"), overrides=args.set + [f"{k}={v}" for k, v in
                                                                                      overrides.items()])
        fisher = fisher_of(vcfg.quant.fisher_seqs)
        t0 = time.perf_counter()
        if fit:
            qs, blob, changes = fit_to_budget(state, hessians, vcfg.quant, vcfg.model, meta, 0, fisher=fisher)
        else:
            clip_k = fisher_clip_k(state, fisher, vcfg.quant) if vcfg.quant.clip_alloc != "class" else None
            qs = quantize_state(state, vcfg.quant, hessians, clip_k=clip_k)
            blob, changes = pack_bytes(qs, vcfg.model, meta, vcfg.quant), []
        seconds = time.perf_counter() - t0
        deq = dequantize_state(qs)
        bpb = score(deq)
        rows.append((name, len(blob), bpb, bpb - base, seconds, "; ".join(changes) or "-"))
        print(f"{name}: {len(blob):,} bytes, val_bpb {bpb:.6f} (gap {bpb - base:+.6f}), {seconds:.1f}s, "
              f"{'; '.join(changes) or 'no fitter change'}", flush=True)
        if args.no_class_split:
            continue
        # Where the gap comes from: each class quantized alone, everything else unquantized.
        alone = {klass: score({**state, **{n: t for n, t in deq.items() if quant_class(n) == klass}}) - base
                 for klass in sorted({quant_class(n) for n in deq})}
        print(f"  gap by class alone: {', '.join(f'{k} {g:+.6f}' for k, g in alone.items())} "
              f"(sum {sum(alone.values()):+.6f})", flush=True)
    cap = cfg.quant.size_cap_bytes
    print(f"\n{'variant':<18}{'bytes':>12}{'fits cap':>10}{'val_bpb':>11}{'gap':>10}{'quant+pack s':>14}  fitter")
    for name, size, bpb, gap, seconds, changes in rows:
        print(f"{name:<18}{size:>12,}{'yes' if size <= cap else 'no':>10}{bpb:>11.6f}{gap:>+10.6f}{seconds:>14.1f}  "
              f"{changes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
