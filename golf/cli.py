"""`golf` command line: a thin typer layer over the library, one section per pipeline stage.

Every `GolfError` (bad shard, corrupt artifact, wrong tokenizer, bad config value) becomes one
line on stderr and a non-zero exit; nothing here holds logic the library does not.
"""

from __future__ import annotations

import sys
from typing import Callable, List, Optional

import typer

from golf.config import GolfError, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Parameter Golf toolkit: data → train → quantize → pack → eval → submit.")
data_app = typer.Typer(no_args_is_help=True, help="Shards: inspect, build, download.")
tokenizer_app = typer.Typer(no_args_is_help=True, help="SentencePiece tokenizers with the official settings.")
app.add_typer(data_app, name="data")
app.add_typer(tokenizer_app, name="tokenizer")

PresetOpt = typer.Option("tiny", "--preset", "-p", help="tiny | baseline | record")
SetOpt = typer.Option(None, "--set", "-s", help="Override a config field: key=value (repeatable).")
ConfigFileOpt = typer.Option(None, "--config", help="A saved config.json instead of a preset.")


def config_from_cli(preset: str, overrides: Optional[List[str]], config_file: Optional[str] = None):
    return load_config(preset, overrides or [], config_file=config_file)


@app.command("config")
def config_cmd(preset: str = PresetOpt, overrides: Optional[List[str]] = SetOpt,
               config_file: Optional[str] = ConfigFileOpt) -> None:
    """Print the resolved config (preset → env vars → --set) as JSON."""
    typer.echo(config_from_cli(preset, overrides, config_file).to_json())


# ---- data commands ----


@data_app.command("inspect")
def data_inspect_cmd(
    paths: List[str] = typer.Argument(..., help="Shard files or folders of *.bin shards."),
    vocab_size: Optional[int] = typer.Option(None, "--vocab-size", help="Flag ids >= this size."),
) -> None:
    """Validate shards and print tokens, documents (BOS count) and the id range of each."""
    from pathlib import Path

    from golf.data import DataError, list_shards, shard_info

    files = [f for p in paths for f in (list_shards(p, "*.bin") if Path(p).is_dir() else [Path(p)])]
    total_tokens = total_docs = 0
    flagged = []
    for f in files:
        info = shard_info(f, vocab_size)
        total_tokens, total_docs = total_tokens + info.tokens, total_docs + info.documents
        line = (f"{f}  tokens={info.tokens:,}  documents={info.documents:,}  "
                f"ids=[{info.min_id}, {info.max_id}]")
        if info.over_vocab:
            flagged.append(f)
            line += f"  !! {info.over_vocab:,} ids >= {vocab_size}"
        typer.echo(line)
    if len(files) > 1:
        typer.echo(f"total  files={len(files)}  tokens={total_tokens:,}  documents={total_docs:,}")
    if flagged:
        raise DataError(f"{len(flagged)} of {len(files)} shards hold ids >= vocab size {vocab_size} "
                        f"(first: {flagged[0]})")


@data_app.command("build")
def data_build_cmd(
    inputs: List[str] = typer.Argument(
        ..., help=".txt (one document each) or .jsonl[.gz|.xz] (one {\"text\": ...} per line), in order."),
    tokenizer: str = typer.Option(..., "--tokenizer", help="SentencePiece .model to encode with."),
    out: str = typer.Option(..., "--out", help="Output folder (must hold no shards)."),
    val_docs: int = typer.Option(0, "--val-docs", help="First N shuffled documents form the val split."),
    seed: int = typer.Option(1337, "--seed", help="random.Random(seed).shuffle of the document order."),
    shard_tokens: int = typer.Option(100_000_000, "--shard-tokens", help="Tokens per shard."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Encoding processes (default: all cores)."),
    prefix: str = typer.Option("fineweb", "--prefix", help="Shard names: <prefix>_{train,val}_NNNNNN.bin."),
    no_shuffle: bool = typer.Option(False, "--no-shuffle", help="Keep the input document order."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing <prefix> shards in --out."),
) -> None:
    """Tokenize documents into train/val shards ([BOS] + ids per document) + build_summary.json."""
    from golf.data import build_shards

    s = build_shards(inputs, tokenizer, out, val_docs=val_docs, seed=seed, shard_tokens=shard_tokens,
                     workers=workers, prefix=prefix, overwrite=overwrite, shuffle=not no_shuffle)
    typer.echo(f"{out}: {s['docs_total']:,} documents, train {s['tokens_train']:,} tokens in "
               f"{s['files_train']} shard(s), val {s['tokens_val']:,} tokens in {s['files_val']} shard(s)")


@data_app.command("download")
def data_download_cmd(
    variant: str = typer.Option("sp1024", "--variant", help="sp1024 | sp4096 | sp8192 (fineweb10B_VARIANT)."),
    train_shards: int = typer.Option(1, "--train-shards", help="First N train shards (100M tokens each)."),
    out: str = typer.Option("data", "--out",
                            help="Writes OUT/datasets/fineweb10B_VARIANT/ + OUT/tokenizers/."),
    repo_id: str = typer.Option("willdepueoai/parameter-golf", "--repo-id", envvar="MATCHED_FINEWEB_REPO_ID",
                                help="Hugging Face dataset repo (most sp8192 records used "
                                     "kevclark/parameter-golf)."),
    remote_root: str = typer.Option("datasets", "--remote-root", envvar="MATCHED_FINEWEB_REMOTE_ROOT_PREFIX",
                                    help="Folder of the export inside the repo."),
    mirror: Optional[str] = typer.Option(None, "--mirror",
                                         help="Local copy of the repo root, used instead of the hub."),
) -> None:
    """Fetch the official cached export: val shards, the first N train shards, the tokenizer."""
    from golf.download import download_variant

    s = download_variant(variant, train_shards, out, repo_id=repo_id, remote_root=remote_root, mirror=mirror)
    typer.echo(f"{s['dataset_dir']}: {s['val_shards']} val + {s['train_shards']} train shards ready "
               f"({len(s['fetched'])} fetched, {len(s['kept'])} already present)")


@tokenizer_app.command("train")
def tokenizer_train_cmd(
    inputs: List[str] = typer.Argument(..., help=".txt (a sentence per line) or .jsonl[.gz|.xz] documents."),
    vocab_size: int = typer.Option(..., "--vocab-size", help="Number of pieces (>= 260 + characters)."),
    out: str = typer.Option(..., "--out", help="Output prefix: writes PREFIX.model and PREFIX.vocab."),
    max_docs: Optional[int] = typer.Option(None, "--max-docs", help="Train on the first N sentences only."),
    max_sentence_length: Optional[int] = typer.Option(
        None, "--max-sentence-length", help="Longest sentence in bytes; SentencePiece skips longer ones "
                                             "(default 4192)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing PREFIX.model."),
    verbose: bool = typer.Option(False, "--verbose", help="Show SentencePiece's training log."),
) -> None:
    """Train a SentencePiece BPE with the official settings (byte fallback, split digits, nmt_nfkc)."""
    from golf.data import train_tokenizer

    model = train_tokenizer(inputs, out, vocab_size, max_docs=max_docs,
                            max_sentence_length=max_sentence_length, overwrite=overwrite, verbose=verbose)
    typer.echo(f"wrote {model} and {model.with_suffix('.vocab')}")

# ---- train commands ----


@app.command("train")
def train_cmd(preset: str = PresetOpt, overrides: Optional[List[str]] = SetOpt,
              config_file: Optional[str] = ConfigFileOpt,
              resume: bool = typer.Option(False, "--resume", help="Continue from out_dir's checkpoint.")) -> None:
    """Train within the wallclock cap; writes final_model.pt and config.json to out_dir.

    Several GPUs: torchrun --standalone --nproc_per_node=N -m golf train --preset record
    """
    from golf.dist import init_distributed
    from golf.train import train

    cfg = config_from_cli(preset, overrides, config_file)
    cfg.train.resume = cfg.train.resume or resume
    info = init_distributed()
    say = typer.echo if info.is_main else (lambda _msg: None)  # one log under torchrun, from rank 0
    say(cfg.to_json())
    train(cfg, info, log=say)


@app.command("run")
def run_cmd(preset: str = PresetOpt, overrides: Optional[List[str]] = SetOpt,
            config_file: Optional[str] = ConfigFileOpt,
            out: str = typer.Option(".", "--out", help="Folder for the artifact."),
            code: Optional[str] = typer.Option(None, "--code", help="Counted code file (train_gpt.py).")) -> None:
    """The whole job: train → GPTQ → pack → size check → eval (+TTT), official log lines."""
    from golf.run import run_pipeline

    run_pipeline(config_from_cli(preset, overrides, config_file), code_path=code, out_dir=out)


# ---- quant and pack commands ----


@app.command("size-check")
def size_check_cmd(
    artifact: str = typer.Argument(..., help="Artifact file to verify and account."),
    code: Optional[str] = typer.Option(None, "--code", help="Counted code file (train_gpt.py)."),
    cap: int = typer.Option(16_000_000, "--cap", help="Cap on code + artifact bytes (decimal)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Verify an artifact (every checksum) and print its size ledger; exit 1 over the cap, 2 if unreadable."""
    import json

    from golf.pack import size_check

    report = size_check(artifact, code, cap)
    typer.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.format_table())
    if not report.fits:
        raise typer.Exit(1)


@app.command("budget")
def budget_cmd(
    preset: str = PresetOpt, overrides: Optional[List[str]] = SetOpt,
    config_file: Optional[str] = ConfigFileOpt,
    code: Optional[str] = typer.Option(None, "--code", help="Counted code file, added to the total."),
    from_artifact: Optional[str] = typer.Option(
        None, "--from-artifact", help="Price with the compression ratios measured on this artifact."),
    as_json: bool = typer.Option(False, "--json", help="Print the prediction as JSON."),
) -> None:
    """Predict the artifact size of a config before training: bytes per class, total, margin vs cap."""
    import json
    from pathlib import Path

    from golf.pack import artifact_pack_stats, measured_ratios, predict_size, read_artifact

    cfg = config_from_cli(preset, overrides, config_file)
    ratios = None
    if from_artifact:
        qs, header = read_artifact(from_artifact)
        ratios = measured_ratios(qs, artifact_pack_stats(header, Path(from_artifact).stat().st_size))
    code_bytes = Path(code).stat().st_size if code and Path(code).is_file() else 0
    if code and not code_bytes:
        raise GolfError(f"code file {code} not found or empty")
    pred = predict_size(cfg.model, cfg.quant, ratios=ratios, code_bytes=code_bytes, run_config=cfg.to_dict())
    typer.echo(json.dumps(pred.to_dict(), indent=2) if as_json else pred.format_table())
    q = cfg.quant
    if not as_json and (q.fit_mode == "scale" or q.clip_alloc != "class"):
        alloc = {"class": "its class k", "fisher": "its Fisher-allocated k per tensor",
                 "fisher_rows": "its Fisher-allocated k per row"}[q.clip_alloc]
        fit = ("then one factor on every k, searched to land within 0.2% under the cap less margin and code"
               if q.fit_mode == "scale" else "then the fitter's ladder")
        typer.echo(f"the k above are the config's class values: a run quantizes with {alloc}, {fit}")


@app.command("quantize")
def quantize_cmd(
    checkpoint: str = typer.Argument(..., help="Trained weights: the trainer's final_model.pt state dict."),
    out: str = typer.Option(..., "--out", help="Artifact file to write (never overwritten)."),
    preset: Optional[str] = typer.Option(None, "--preset", "-p",
                                         help="tiny | baseline | record (default: config.json next to "
                                              "CHECKPOINT)."),
    overrides: Optional[List[str]] = SetOpt, config_file: Optional[str] = ConfigFileOpt,
    fit: bool = typer.Option(False, "--fit", help="Walk the fitter's ladder until code + artifact fit."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer",
                                            help="Tokenizer .model (default: the config's)."),
    code: Optional[str] = typer.Option(None, "--code", help="Counted code file, for the fitter's budget."),
) -> None:
    """Quantize a checkpoint with GPTQ calibrated on the config's TRAINING shards, and pack it."""
    from pathlib import Path

    import torch

    from golf.data import file_sha256, load_tokenizer
    from golf.model import GPT
    from golf.pack import ArtifactError, pack_bytes, write_artifact
    from golf.quant import (
        QuantError,
        calibration_batches,
        collect_fisher,
        collect_hessians,
        fisher_clip_k,
        fit_to_budget,
        quantize_state,
    )

    if Path(out).exists():
        raise ArtifactError(f"{out} already exists; refusing to overwrite it")
    if not Path(checkpoint).is_file():
        raise QuantError(f"checkpoint {checkpoint} not found")
    sibling = Path(checkpoint).parent / "config.json"
    if config_file is None and preset is None:
        if not sibling.is_file():
            raise QuantError(f"no config: pass --preset or --config ({sibling} does not exist)")
        config_file = str(sibling)
    cfg = config_from_cli(preset or "baseline", overrides, config_file)
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip/IO errors of any kind: one user-facing line
        raise QuantError(f"cannot load checkpoint {checkpoint}: {str(exc).splitlines()[0]}") from None
    model = GPT(cfg.model)
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise QuantError(f"{checkpoint} does not match the config's model: "
                         f"{str(exc).splitlines()[0][:200]}") from None
    tok_path = tokenizer or cfg.data.tokenizer_path
    load_tokenizer(tok_path, cfg.model.vocab_size)
    tokenizer_meta = {"sha256": file_sha256(tok_path),
                      "vocab_size": cfg.model.vocab_size}
    code_bytes = Path(code).stat().st_size if code else 0
    q, t = cfg.quant, cfg.train
    hessians = fisher = None
    if q.gptq or q.clip_alloc != "class":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model.to(device)
        amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"
                             and t.amp_dtype == "bfloat16")
        with amp:
            if q.gptq:
                hessians = collect_hessians(model, calibration_batches(cfg, device), device)
                typer.echo(f"calibrated {len(hessians)} Hessians on {q.gptq_calib_batches} x "
                           f"{q.gptq_calib_seqs} training windows of {t.train_seq_len}")
            if q.clip_alloc != "class":
                fisher = collect_fisher(model, calibration_batches(cfg, device), q.fisher_seqs, device)
                typer.echo(f"Fisher of {len(fisher)} matrices from {q.fisher_seqs} training windows")
    if fit:
        qs, blob, changes = fit_to_budget(state, hessians, q, cfg.model, tokenizer_meta, code_bytes,
                                          run_config=cfg.to_dict(), fisher=fisher)
        for rung, size in qs.stats.fit_attempts:
            typer.echo(f"fit attempt: {size:,} bytes with {rung}")
        for change in changes:
            typer.echo(f"fit: {change}")
    else:
        clip_k = fisher_clip_k(state, fisher, q) if fisher else None
        qs = quantize_state(state, q, hessians, clip_k=clip_k)
        blob = pack_bytes(qs, cfg.model, tokenizer_meta, q, run_config=cfg.to_dict())
    write_artifact(out, blob)
    typer.echo(qs.stats.summary())
    total = len(blob) + code_bytes
    typer.echo(f"wrote {out}: {len(blob):,} bytes; with code {total:,} of {q.size_cap_bytes:,} "
               f"({'fits' if total <= q.size_cap_bytes else 'OVER the cap'})")

# ---- eval commands ----


@app.command("eval")
def eval_cmd(
    artifact: str = typer.Argument(..., help="The packed artifact to score."),
    data: Optional[str] = typer.Option(None, "--data", help="Val shard, folder or glob."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="SentencePiece model."),
    sliding: Optional[bool] = typer.Option(None, "--sliding/--no-sliding", help="Sliding-window scoring."),
    ttt: Optional[str] = typer.Option(None, "--ttt", help="none | sgd | lora."),
    stride: Optional[int] = typer.Option(None, "--stride", help="Sliding-window stride."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Eval window length."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="First N tokens only (0 = all)."),
    dump_nll: Optional[str] = typer.Option(None, "--dump-nll", help="Write each token's NLL (.npy)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --dump-nll file."),
    overrides: Optional[List[str]] = SetOpt,
    as_json: bool = typer.Option(False, "--json", help="Print exactly one JSON object."),
) -> None:
    """Score an artifact: exact BPB, sliding window, score-first TTT. Data, tokenizer, eval and
    TTT settings default to the run config stored in the artifact.

    Several GPUs: torchrun --standalone --nproc_per_node=N -m golf eval ARTIFACT (rank 0 prints).
    """
    import json

    from golf.dist import world
    from golf.eval import eval_artifact

    def say(msg: str) -> None:
        if world()[0] == 0:
            typer.echo(msg, err=as_json)

    r, _ = eval_artifact(artifact, data=data, tokenizer=tokenizer, sliding=sliding, stride=stride,
                         seq_len=seq_len, ttt=ttt, max_tokens=max_tokens, overrides=overrides or [],
                         dump_nll=dump_nll, overwrite=overwrite, log=say)
    if world()[0] != 0:
        return
    if as_json:
        typer.echo(json.dumps(r.to_dict(), sort_keys=True))
        return
    typer.echo(f"eval {r.mode}: val_loss:{r.val_loss:.8f} val_bpb:{r.val_bpb:.8f} tokens:{r.tokens} "
               f"bytes:{r.bytes} eval_time:{sum(r.times.values()) * 1000:.0f}ms")
    typer.echo("phases: " + " ".join(f"{k}={v:.2f}" for k, v in r.times.items()))
    if r.deadline_hit:
        typer.echo("ttt_deadline_s was reached: the targets after it were scored without adapting")


# ---- submit commands ----


@app.command("bundle")
def bundle_cmd(
    preset: str = typer.Option("record", "--preset", "-p", help="tiny | baseline | record"),
    overrides: Optional[List[str]] = SetOpt,
    out: str = typer.Option("runs/bundle", "--out", help="Folder for train_gpt.py + train_gpt_readable.py."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a different bundle in --out."),
) -> None:
    """Write the records-ready single-file train_gpt.py (config baked in; env vars apply when it runs)."""
    from golf.bundle import bundle

    # The shell's env overrides are deliberately not baked in: they apply when the bundle runs.
    info = bundle(load_config(preset, overrides or [], environ={}), out, overwrite=overwrite)
    typer.echo(f"{info.script}: {info.code_bytes:,} bytes counted ({info.codec}), sha256 {info.code_sha256}")
    typer.echo(f"{info.readable}: {info.readable_bytes:,} bytes, what it decodes to (verified)")
    typer.echo(f"run: SEED=42 torchrun --standalone --nproc_per_node=8 {info.script}")


@app.command("submit")
def submit_cmd(
    seed: int = typer.Option(..., "--seed", help="The seed of this run (env SEED of the bundle)."),
    name: Optional[str] = typer.Option(None, "--name", help="Folder <date>_<NAME> (default golf_<preset>)."),
    nproc: int = typer.Option(1, "--nproc", help="Processes: 1 runs python, more run torchrun."),
    preset: str = typer.Option("record", "--preset", "-p", help="tiny | baseline | record"),
    overrides: Optional[List[str]] = SetOpt,
    github_id: Optional[str] = typer.Option(None, "--github-id", help="For submission.json."),
    author: Optional[str] = typer.Option(None, "--author", help="For submission.json (default: github id)."),
    blurb: Optional[str] = typer.Option(None, "--blurb", help="One-paragraph summary for README/submission."),
    records_dir: str = typer.Option("records/track_10min_16mb", "--records-dir", help="Track folder."),
    work_dir: str = typer.Option("runs/submit", "--work-dir", help="Where each seed runs (keeps artifacts)."),
) -> None:
    """Bundle, run one seed as a reviewer would, and add it to the records folder (README, json, log)."""
    import shlex

    from golf.submit import record_stats, submit_run

    cfg = load_config(preset, overrides or [], environ={})
    out = submit_run(cfg, seed, name=name, nproc=nproc, records_dir=records_dir, work_dir=work_dir,
                     github_id=github_id, author=author, blurb=blurb,
                     command=shlex.join(["golf", *sys.argv[1:]]), echo=typer.echo)
    sub, stats = out["submission"], record_stats(out["folder"])
    typer.echo(f"{out['folder']}: {len(sub['seeds'])} seed(s), val_bpb {sub['val_bpb']:.6f} "
               f"± {sub['val_bpb_std']:.6f}, {sub['bytes_total']:,} bytes; compliance "
               + ("ok" if stats["compliance"]["ok"] else "FAILED (see README.md)"))


@app.command("stats")
def stats_cmd(
    folder: str = typer.Argument(..., help="A records folder with train_seed<N>.log files."),
    sota: Optional[float] = typer.Option(None, "--sota", help="The current record's val_bpb."),
    against: Optional[str] = typer.Option(None, "--against", help="Another records folder (Welch test)."),
    as_json: bool = typer.Option(False, "--json", help="Print the full result as JSON."),
) -> None:
    """Mean/std over seeds, the 0.005-nat significance test and the rule compliance report."""
    import json

    from golf.submit import SubmissionError, format_stats, record_stats

    if sota is not None and against is not None:
        raise SubmissionError("give --sota or --against, not both")
    stats = record_stats(folder, sota=sota, against=against)
    typer.echo(json.dumps(stats, indent=2) if as_json else format_stats(stats))


def run_script(main: Callable[[], int], prog: str) -> None:
    """Entry point of a script in tools/: exit with main()'s code; a bad input (a GolfError, a
    missing or unreadable file, a bad value) exits 1 with one line on stderr, not a traceback."""
    try:
        sys.exit(main())
    except (GolfError, OSError, ValueError) as err:
        sys.exit(f"{prog}: {err}")


def main() -> None:
    try:
        app()
    except GolfError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
