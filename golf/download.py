"""Fetch the official cached FineWeb export (shards + tokenizer) from a Hugging Face dataset repo.

Notable:
- Manifest-driven, like the official `data/cached_challenge_fineweb.py`: `<root>/manifest.json`
  names each dataset (`fineweb10B_<variant>`), its shard counts (`stats.files_train/files_val`)
  and its tokenizer's files; asking for more train shards than exist is refused.
- Resumable: a file already present and valid is skipped; a partial or corrupt one is fetched
  again. Every shard is checked with the shard validator, and against its exact token count when
  the manifest's `shard_size` and `stats.tokens_*` give one.
- Files land in `out_dir/datasets/fineweb10B_<variant>/` and `out_dir/tokenizers/`; each is
  staged and moved into place with `os.replace`, so a destination is either complete or absent.
- `mirror=DIR` reads a local directory with the repo root's layout instead of the hub (offline
  machines, tests). An unreachable hub is a one-line `DownloadError` that says so.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path, PurePosixPath

from golf.config import GolfError
from golf.data import DataError, load_tokenizer, read_shard

DEFAULT_REPO_ID = "willdepueoai/parameter-golf"
DEFAULT_REMOTE_ROOT = "datasets"
KNOWN_VARIANTS = ("sp1024", "sp4096", "sp8192")
STAGING_DIR = ".download"  # inside out_dir: hub downloads land here before os.replace


class DownloadError(GolfError):
    """The dataset could not be fetched: hub unreachable, missing file, bad manifest or shard."""


def _dl_relpath(value: object, what: str) -> str:
    """A manifest path as a safe POSIX path relative to the export root."""
    text = str(value or "")
    rel = PurePosixPath(text)
    if not text or rel.is_absolute() or ".." in rel.parts:
        raise DownloadError(f"manifest {what} path {text!r} is not a relative path inside the export")
    return rel.as_posix()


class _DownloadSource:
    """Where files come from: the hub (via hf_hub_download) or a local mirror directory."""

    def __init__(self, repo_id: str, remote_root: str, mirror: str | Path | None, staging: Path):
        self.repo_id, self.remote_root = repo_id, remote_root.strip("/")
        self.mirror = Path(mirror) if mirror is not None else None
        self.staging = staging
        if self.mirror is not None and not self.mirror.is_dir():
            raise DownloadError(f"--mirror {self.mirror}: no such directory")

    def remote(self, rel: str) -> str:
        return f"{self.remote_root}/{rel}" if self.remote_root else rel

    def describe(self) -> str:
        return f"mirror {self.mirror}" if self.mirror is not None else f"hub dataset {self.repo_id}"

    def fetch(self, rel: str, dest: Path, force: bool = False) -> Path:
        """Bring `rel` next to `dest` as a temporary file and return its path."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        try:
            if self.mirror is not None:
                src = self.mirror / self.remote(rel)
                if not src.is_file():
                    raise DownloadError(f"mirror {self.mirror} has no {self.remote(rel)}")
                shutil.copyfile(src, tmp_path)
            else:
                os.replace(self._hub_download(rel, force), tmp_path)
        except BaseException:
            tmp_path.unlink(missing_ok=True)
            raise
        return tmp_path

    def _hub_download(self, rel: str, force: bool) -> Path:
        import huggingface_hub
        from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

        remote = self.remote(rel)
        try:
            # local_dir keeps one copy on disk (no cache blob) and lets the hub resume partial files.
            path = huggingface_hub.hf_hub_download(repo_id=self.repo_id, filename=remote, repo_type="dataset",
                                                   local_dir=self.staging, force_download=force)
        except RepositoryNotFoundError:
            raise DownloadError(f"dataset repo {self.repo_id} not found on the hub or not accessible "
                                f"(check --repo-id)") from None
        except LocalEntryNotFoundError as exc:
            raise self._unreachable(exc) from None
        except EntryNotFoundError:
            raise DownloadError(f"{remote} is not in dataset repo {self.repo_id} "
                                f"(check --remote-root)") from None
        except Exception as exc:
            if _dl_is_network_error(exc):
                raise self._unreachable(exc) from None
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DownloadError(f"hub download of {remote} from {self.repo_id} failed: {first}") from None
        return Path(path)

    def _unreachable(self, exc: BaseException) -> DownloadError:
        return DownloadError(
            f"could not reach the Hugging Face hub for {self.repo_id} ({type(exc).__name__}); check the "
            f"network, or pass --mirror DIR (a local copy of the repo root holding "
            f"{self.remote('manifest.json')})")


def _dl_is_network_error(exc: BaseException) -> bool:
    # The hub's HTTP stack varies by version (requests, httpx): judge by the exception's origin.
    root = type(exc).__module__.split(".")[0]
    return isinstance(exc, (ConnectionError, TimeoutError)) or root in (
        "requests", "urllib3", "httpx", "httpcore", "httpx2", "aiohttp", "socket", "ssl")


def _dl_expected_counts(manifest: dict, entry: dict, split: str) -> list[int | None]:
    """Token count of each shard of a split, when the manifest pins them (shards are filled to
    exactly `shard_size`, the last one holds the rest)."""
    stats = entry.get("stats") or {}
    files = int(stats[f"files_{split}"])
    shard_size, total = manifest.get("shard_size"), stats.get(f"tokens_{split}")
    if not isinstance(shard_size, int) or not isinstance(total, int) or files == 0:
        return [None] * files
    last = total - (files - 1) * shard_size
    if not 0 < last <= shard_size:
        return [None] * files
    return [shard_size] * (files - 1) + [last]


def _dl_problem(path: Path, rel: str, expected: int | None) -> str | None:
    """Why the file at `path` (fetched or local copy of `rel`) is unusable, or None when it is fine.
    Shards are validated (and their length checked when known), SentencePiece models loaded."""
    try:
        if rel.endswith(".bin"):
            n = read_shard(path).size
            if expected is not None and n != expected:
                return f"{n} tokens where the manifest implies {expected}"
        elif rel.endswith(".model"):
            load_tokenizer(path, None)
        elif path.stat().st_size == 0:
            return "empty file"
    except DataError as exc:
        return str(exc).replace(f"{path}: ", "")
    return None


def download_variant(variant: str, train_shards: int, out_dir: str | Path,
                     repo_id: str = DEFAULT_REPO_ID, remote_root: str = DEFAULT_REMOTE_ROOT,
                     mirror: str | Path | None = None, progress: bool = True) -> dict:
    """Fetch the val shards, the first `train_shards` train shards and the tokenizer of
    `fineweb10B_<variant>` into `out_dir`; returns a summary of what was fetched and kept."""
    out = Path(out_dir)
    if train_shards < 0:
        raise DownloadError(f"train_shards={train_shards} must be >= 0")
    if out.exists() and not out.is_dir():
        raise DownloadError(f"{out}: exists and is not a folder")
    staging = out / STAGING_DIR
    source = _DownloadSource(repo_id, remote_root, mirror, staging)
    dataset = f"fineweb10B_{variant}"
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)

    manifest_path = out / "manifest.json"
    manifest = _dl_read_manifest(manifest_path) if manifest_path.is_file() else None
    if manifest is None or _dl_dataset_entry(manifest, dataset) is None:
        # Absent, unreadable or from another export (e.g. another --repo-id): fetch it again.
        tmp = source.fetch("manifest.json", manifest_path)
        manifest = _dl_read_manifest(tmp)
        if manifest is None:
            tmp.unlink(missing_ok=True)
            raise DownloadError(f"manifest.json from {source.describe()} is not a JSON object")
        os.replace(tmp, manifest_path)
    entry = _dl_dataset_entry(manifest, dataset)
    if entry is None:
        names = [str(d.get("name")) for d in manifest.get("datasets", []) if isinstance(d, dict)]
        raise DownloadError(f"{dataset} is not in {source.remote('manifest.json')} of {source.describe()} "
                            f"(it has: {', '.join(names) or 'no datasets'})")
    stats = entry.get("stats") or {}
    try:
        max_train, n_val = int(stats["files_train"]), int(stats["files_val"])
    except (KeyError, TypeError, ValueError):
        raise DownloadError(f"manifest entry {dataset} has no stats.files_train / stats.files_val") from None
    if train_shards > max_train:
        raise DownloadError(f"{variant} has only {max_train} train shards on {source.describe()}, "
                            f"asked for {train_shards}")
    tok_name = entry.get("tokenizer_name")
    tok_entry = next((t for t in manifest.get("tokenizers", [])
                      if isinstance(t, dict) and t.get("name") == tok_name), None)
    if tok_entry is None:
        raise DownloadError(f"tokenizer {tok_name!r} of {dataset} is not in the manifest")
    tok_files = [_dl_relpath(tok_entry[k], f"tokenizer {k}")
                 for k in ("model_path", "vocab_path", "path") if tok_entry.get(k)]
    if not tok_files:
        raise DownloadError(f"manifest tokenizer {tok_name!r} names no model_path / vocab_path")

    val_counts = _dl_expected_counts(manifest, entry, "val")
    train_counts = _dl_expected_counts(manifest, entry, "train")[:train_shards]
    jobs: list[tuple[str, int | None]] = []  # (relative path, expected tokens)
    for split, counts in (("val", val_counts), ("train", train_counts)):
        jobs += [(f"datasets/{dataset}/fineweb_{split}_{i:06d}.bin", n) for i, n in enumerate(counts)]
    jobs += [(rel, None) for rel in tok_files]

    fetched, kept = [], []
    for rel, expected in jobs:
        dest = out / rel
        if dest.is_file() and _dl_problem(dest, rel, expected) is None:
            kept.append(rel)
            continue
        say(f"fetch {rel}")
        problem = None
        for force in (False, True):  # a bad file from the hub's resume state is fetched afresh once
            tmp = source.fetch(rel, dest, force=force)
            problem = _dl_problem(tmp, rel, expected)
            if problem is None:
                os.replace(tmp, dest)
                break
            tmp.unlink(missing_ok=True)
            if source.mirror is not None:
                break
        if problem is not None:
            raise DownloadError(f"{rel} from {source.describe()} is invalid: {problem}")
        fetched.append(rel)
    shutil.rmtree(staging, ignore_errors=True)
    say(f"{dataset}: {len(fetched)} fetched, {len(kept)} already present")
    return {
        "variant": variant,
        "dataset_dir": str(out / "datasets" / dataset),
        "tokenizer_files": [str(out / rel) for rel in tok_files],
        "val_shards": n_val,
        "train_shards": train_shards,
        "fetched": fetched,
        "kept": kept,
        "source": source.describe(),
    }


def _dl_read_manifest(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _dl_dataset_entry(manifest: dict, dataset: str) -> dict | None:
    return next((d for d in manifest.get("datasets", []) if isinstance(d, dict) and d.get("name") == dataset),
                None)
