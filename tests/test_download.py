"""golf.download: manifest-driven, resumable, validated fetches from a mirror or a (mocked) hub."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
from huggingface_hub.utils import LocalEntryNotFoundError
from typer.testing import CliRunner

from golf.cli import app
from golf.data import BOS_ID, read_shard, write_shard
from golf.download import DownloadError, download_variant

SHARD = 600  # tokens per train shard in the fake export
DATASET = "fineweb10B_sp1024"


def make_export(root: Path, tokenizer: Path, remote_root: str = "datasets") -> Path:
    """A repo root laid out like the official export: manifest, shards, tokenizer files."""
    base = root / remote_root
    rng = np.random.default_rng(0)
    train_sizes, val_size = [SHARD, SHARD, 250], 400
    for i, n in enumerate(train_sizes):
        toks = rng.integers(2, 512, size=n)
        toks[::50] = BOS_ID
        write_shard(base / "datasets" / DATASET / f"fineweb_train_{i:06d}.bin", toks)
    write_shard(base / "datasets" / DATASET / "fineweb_val_000000.bin", np.full(val_size, 7))
    (base / "tokenizers").mkdir(parents=True)
    shutil.copy(tokenizer, base / "tokenizers" / "fineweb_1024_bpe.model")
    shutil.copy(tokenizer.with_suffix(".vocab"), base / "tokenizers" / "fineweb_1024_bpe.vocab")
    manifest = {
        "version": "10B", "shard_size": SHARD,
        "datasets": [{"name": DATASET, "tokenizer_name": "sp_bpe_1024",
                      "stats": {"files_train": 3, "files_val": 1, "tokens_train": sum(train_sizes),
                                "tokens_val": val_size}}],
        "tokenizers": [{"name": "sp_bpe_1024", "model_path": "tokenizers/fineweb_1024_bpe.model",
                        "vocab_path": "tokenizers/fineweb_1024_bpe.vocab"}],
    }
    (base / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture()
def mirror(tmp_path, tiny_tokenizer) -> Path:
    return make_export(tmp_path / "mirror", tiny_tokenizer)


def local_files(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


def test_mirror_download_resume_and_refetch(tmp_path, mirror):
    out = tmp_path / "data"
    s = download_variant("sp1024", 2, out, mirror=mirror, progress=False)
    shards = [f"datasets/{DATASET}/fineweb_{n}.bin" for n in ("train_000000", "train_000001", "val_000000")]
    assert local_files(out) == sorted(shards + ["manifest.json", "tokenizers/fineweb_1024_bpe.model",
                                                "tokenizers/fineweb_1024_bpe.vocab"])
    assert len(s["fetched"]) == 5 and s["kept"] == [] and s["dataset_dir"] == str(out / "datasets" / DATASET)
    for rel in shards:
        assert (out / rel).read_bytes() == (mirror / "datasets" / rel).read_bytes()

    mtimes = {rel: (out / rel).stat().st_mtime_ns for rel in shards}
    again = download_variant("sp1024", 2, out, mirror=mirror, progress=False)
    assert again["fetched"] == [] and len(again["kept"]) == 5
    assert mtimes == {rel: (out / rel).stat().st_mtime_ns for rel in shards}  # a no-op

    # A truncated local shard (an interrupted copy) is fetched again; so is a wrong-length one.
    bad = out / shards[1]
    bad.write_bytes(bad.read_bytes()[:-10])
    write_shard(out / shards[0], [1, 2, 3], overwrite=True)  # valid format, wrong token count
    third = download_variant("sp1024", 2, out, mirror=mirror, progress=False)
    assert sorted(third["fetched"]) == sorted(shards[:2])
    assert read_shard(bad).size == SHARD and read_shard(out / shards[0]).size == SHARD

    # One more shard extends the prefix; more than exist is refused.
    assert download_variant("sp1024", 3, out, mirror=mirror, progress=False)["fetched"] == [
        f"datasets/{DATASET}/fineweb_train_000002.bin"]
    with pytest.raises(DownloadError, match="only 3 train shards"):
        download_variant("sp1024", 4, out, mirror=mirror, progress=False)
    with pytest.raises(DownloadError, match="fineweb10B_sp4096 is not in"):
        download_variant("sp4096", 1, tmp_path / "other", mirror=mirror, progress=False)


def test_invalid_file_in_the_export_is_an_error(tmp_path, mirror):
    shard = mirror / "datasets" / "datasets" / DATASET / "fineweb_train_000000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DownloadError, match="train_000000.bin from mirror .* is invalid: .*truncated body"):
        download_variant("sp1024", 1, tmp_path / "data", mirror=mirror, progress=False)
    assert not (tmp_path / "data" / "datasets" / DATASET / "fineweb_train_000000.bin").exists()
    assert not list((tmp_path / "data").rglob("*.part"))
    (mirror / "datasets" / "tokenizers" / "fineweb_1024_bpe.model").write_bytes(b"\0garbage")
    with pytest.raises(DownloadError, match="bpe.model from mirror .* not a valid SentencePiece"):
        download_variant("sp1024", 0, tmp_path / "data", mirror=mirror, progress=False)


def fake_hub(mirror: Path, calls: list):
    def hf_hub_download(repo_id, filename, *, repo_type=None, local_dir=None, force_download=False, **kw):
        calls.append((repo_id, filename, repo_type, force_download))
        dest = Path(local_dir) / filename
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(mirror / filename, dest)
        return str(dest)

    return hf_hub_download


def test_hub_path_with_mocked_hf_hub_download(tmp_path, tiny_tokenizer, monkeypatch):
    hub = make_export(tmp_path / "hub", tiny_tokenizer, remote_root="exports/v2")
    calls: list = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hub(hub, calls))
    out = tmp_path / "data"
    s = download_variant("sp1024", 1, out, repo_id="someone/golf-data", remote_root="exports/v2",
                         progress=False)
    assert s["source"] == "hub dataset someone/golf-data" and len(s["fetched"]) == 4
    assert {c[0] for c in calls} == {"someone/golf-data"} and {c[2] for c in calls} == {"dataset"}
    assert calls[0][1] == "exports/v2/manifest.json"
    assert f"exports/v2/datasets/{DATASET}/fineweb_val_000000.bin" in [c[1] for c in calls]
    assert read_shard(out / "datasets" / DATASET / "fineweb_train_000000.bin").size == SHARD
    assert not (out / ".download").exists()  # the staging folder is cleaned up

    # A corrupt download is retried once with force_download before giving up.
    (hub / "exports/v2/datasets" / DATASET / "fineweb_train_000001.bin").write_bytes(b"junk")
    calls.clear()
    with pytest.raises(DownloadError, match="is invalid: .*shorter than the 1024-byte shard header"):
        download_variant("sp1024", 2, out, repo_id="someone/golf-data", remote_root="exports/v2",
                         progress=False)
    assert [c[3] for c in calls] == [False, True]


@pytest.mark.parametrize("exc", [LocalEntryNotFoundError("Cannot find the requested files"),
                                 ConnectionError("Name or service not known")])
def test_offline_hub_is_a_one_line_error(tmp_path, monkeypatch, exc):
    def offline(*args, **kwargs):
        raise exc

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(DownloadError) as err:
        download_variant("sp1024", 1, tmp_path / "data", progress=False)
    msg = str(err.value)
    assert "could not reach the Hugging Face hub for willdepueoai/parameter-golf" in msg
    assert "--mirror DIR" in msg and "datasets/manifest.json" in msg and "\n" not in msg


def test_cli_download_honours_env_overrides(tmp_path, tiny_tokenizer, monkeypatch):
    mirror = make_export(tmp_path / "mirror", tiny_tokenizer, remote_root="custom_root")
    runner = CliRunner()
    res = runner.invoke(app, ["data", "download", "--variant", "sp1024", "--train-shards", "1", "--out",
                              str(tmp_path / "data"), "--mirror", str(mirror)],
                        env={"MATCHED_FINEWEB_REMOTE_ROOT_PREFIX": "custom_root"})
    assert res.exit_code == 0, res.output
    assert "1 val + 1 train shards ready (4 fetched, 0 already present)" in res.output
    res = runner.invoke(app, ["data", "download", "--train-shards", "9", "--out", str(tmp_path / "data"),
                              "--mirror", str(mirror), "--remote-root", "custom_root"])
    assert isinstance(res.exception, DownloadError) and "only 3 train shards" in str(res.exception)
