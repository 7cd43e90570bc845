"""The data stage: shards, tokenizers, the BPB byte table, corpus builds and the training loader.

Notable:
- Shards are the official format (256 little-endian int32 header: magic 20240520, version 1,
  token count; then uint16 ids; file size exactly 1024 + 2·count). `read_shard` memory-maps and
  validates; every mismatch is a one-line `DataError` naming the file.
- `train_tokenizer` uses the official SentencePiece settings (BPE, byte fallback, split digits,
  nmt_nfkc, no dummy prefix, pad/bos/eos/unk = 0/1/2/3, character coverage 0.999) and makes sure
  the "▁" piece exists, without which BPB byte counting breaks.
- `ByteTable` is the only byte accounting in the package: per-id base bytes, a leading-space flag
  and a control flag; a target's bytes are its base bytes plus 1 for a leading "▁" unless the
  previous token is a control token. The sum over a document equals the UTF-8 length of its
  decoded text.
- `build_shards` reproduces the official export recipe: documents concatenated in input order,
  shuffled with `random.Random(seed)`, each written as [BOS] + encode(text); the first `val_docs`
  go to the val split. Encoding runs in a worker pool, in order, through a temporary token file,
  so memory stays flat whatever the corpus size.
- `TokenLoader` draws random windows from memory-mapped shards with one seeded generator for the
  global batch; rank r takes its slice, so N ranks see exactly what one process would.
- torch is imported only where tensors are made, so `golf data ...` / `golf tokenizer ...` and
  the build workers start in well under a second.
"""

from __future__ import annotations

import collections
import gzip
import hashlib
import itertools
import json
import lzma
import multiprocessing
import os
import random
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm

from golf.config import GolfError

if TYPE_CHECKING:
    import torch

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
SHARD_HEADER_INTS = 256
SHARD_HEADER_BYTES = SHARD_HEADER_INTS * 4
BOS_ID = 1
SPACE_PIECE = "\u2581"  # "▁", SentencePiece's whitespace marker
DOC_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.xz")

# The settings of the official fineweb_1024_bpe.model (its trainer_spec / normalizer_spec).
OFFICIAL_SP_SETTINGS = dict(
    model_type="bpe", character_coverage=0.999, byte_fallback=True, split_digits=True,
    normalization_rule_name="nmt_nfkc", add_dummy_prefix=False, pad_id=0, bos_id=1, eos_id=2,
    unk_id=3, hard_vocab_limit=False,
)
SP_DEFAULT_MAX_SENTENCE_BYTES = 4192  # SentencePiece skips (not truncates) longer training sentences


class DataError(GolfError):
    """A shard, tokenizer or corpus file that is missing, malformed or inconsistent."""


# ----------------------------------------------------------------------------- shards


def _read_shard_header(path: Path) -> int:
    """Validate a shard's header and size; return its token count."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(SHARD_HEADER_BYTES)
    except FileNotFoundError:
        raise DataError(f"{path}: no such shard file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, not a shard file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read shard ({exc.strerror or exc})") from None
    if len(head) < SHARD_HEADER_BYTES:
        raise DataError(f"{path}: {size} bytes, shorter than the {SHARD_HEADER_BYTES}-byte shard header")
    header = np.frombuffer(head, dtype="<i4")
    magic, version, count = int(header[0]), int(header[1]), int(header[2])
    if magic != SHARD_MAGIC:
        raise DataError(f"{path}: bad magic {magic} (expected {SHARD_MAGIC}); not a shard file")
    if version != SHARD_VERSION:
        raise DataError(f"{path}: unsupported shard version {version} (expected {SHARD_VERSION})")
    if count <= 0:
        raise DataError(f"{path}: header token count is {count}; a shard holds at least one token")
    expected = SHARD_HEADER_BYTES + 2 * count
    if size < expected:
        raise DataError(f"{path}: truncated body: header says {count} tokens ({expected} bytes) "
                        f"but the file has {size} bytes")
    if size != expected:
        raise DataError(f"{path}: size {size} bytes disagrees with the header's {count} tokens "
                        f"(expected {expected} bytes, {size - expected} extra)")
    return count


def read_shard(path: str | Path) -> np.memmap:
    """Memory-map a validated shard's token ids (read-only uint16)."""
    path = Path(path)
    count = _read_shard_header(path)
    return np.memmap(path, dtype="<u2", mode="r", offset=SHARD_HEADER_BYTES, shape=(count,))


class _ShardWriter:
    """Streams uint16 ids into a temporary file next to `path`: `finish()` writes the header,
    `publish()` moves the file into place, `abort()` removes it."""

    def __init__(self, path: Path):
        self.path = path
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        self.tmp = Path(tmp)
        self.file = os.fdopen(fd, "wb")
        self.file.write(bytes(SHARD_HEADER_BYTES))
        self.count = 0

    def write(self, ids: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(ids, dtype="<u2").tobytes())
        self.count += int(ids.size)

    def finish(self) -> None:
        if self.count >= 2**31:
            raise DataError(f"{self.path}: {self.count} tokens do not fit a shard (< 2^31)")
        header = np.zeros(SHARD_HEADER_INTS, dtype="<i4")
        header[:3] = (SHARD_MAGIC, SHARD_VERSION, self.count)
        self.file.seek(0)
        self.file.write(header.tobytes())
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()

    def publish(self) -> None:
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if not self.file.closed:
            self.file.close()
        self.tmp.unlink(missing_ok=True)


def _check_token_range(tokens: np.ndarray, where: str) -> np.ndarray:
    if tokens.dtype == np.uint16:
        return tokens
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        bad = tokens[(tokens < 0) | (tokens >= 2**16)][0]
        raise DataError(f"{where}: token id {int(bad)} does not fit uint16 shard storage")
    return tokens.astype(np.uint16)


def write_shard(path: str | Path, tokens: Sequence[int] | np.ndarray | torch.Tensor,
                overwrite: bool = False) -> Path:
    """Write `tokens` (ints, an array or a tensor) as one shard, atomically; refuses an existing
    file unless `overwrite`."""
    path = Path(path)
    if hasattr(tokens, "detach"):  # a torch tensor, possibly on an accelerator
        tokens = tokens.detach().cpu().numpy()
    arr = _check_token_range(np.asarray(tokens).reshape(-1), str(path))
    if arr.size == 0:
        raise DataError(f"{path}: refusing to write a shard with no tokens")
    if path.exists() and not overwrite:
        raise DataError(f"{path} already exists (pass overwrite=True to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(path)
    try:
        writer.write(arr)
        writer.finish()
        writer.publish()
    except BaseException:
        writer.abort()
        raise
    return path


@dataclass(frozen=True)
class ShardInfo:
    """What `golf data inspect` prints for one shard."""

    path: str
    tokens: int
    documents: int  # BOS count
    min_id: int
    max_id: int
    over_vocab: int | None = None  # ids >= vocab_size, when a vocab size was given


def shard_info(path: str | Path, vocab_size: int | None = None) -> ShardInfo:
    """Token, document (BOS) and id-range statistics of a validated shard."""
    tokens = read_shard(path)
    docs, lo, hi, over = 0, 2**16, -1, 0
    step = 1 << 24
    for start in range(0, tokens.size, step):
        chunk = np.asarray(tokens[start:start + step])
        docs += int(np.count_nonzero(chunk == BOS_ID))
        lo, hi = min(lo, int(chunk.min())), max(hi, int(chunk.max()))
        if vocab_size is not None:
            over += int(np.count_nonzero(chunk >= vocab_size))
    return ShardInfo(str(path), int(tokens.size), docs, lo, hi, over if vocab_size is not None else None)


def list_shards(data_path: str | Path, pattern: str) -> list[Path]:
    """Sorted shards matching `pattern` (relative to `data_path`, or an absolute glob)."""
    if Path(pattern).is_absolute():
        root, rel = Path(Path(pattern).anchor), str(Path(pattern).relative_to(Path(pattern).anchor))
        folder = Path(pattern).parent
    else:
        root, rel = Path(data_path), pattern
        folder = (root / pattern).parent
    if not folder.is_dir() and not any(ch in str(folder) for ch in "*?["):
        raise DataError(f"{folder}: no such data folder")
    files = sorted(p for p in root.glob(rel) if p.is_file())
    if not files:
        raise DataError(f"no shard matches {root / rel}")
    return files


# ----------------------------------------------------------------------------- documents


def _doc_kind(path: Path) -> str:
    name = path.name.lower()
    for suffix in (".jsonl.gz", ".jsonl.xz", ".jsonl", ".txt"):
        if name.endswith(suffix):
            return suffix
    raise DataError(f"{path}: unsupported input (expected {', '.join(DOC_SUFFIXES)})")


def _open_jsonl(path: Path, kind: str):
    if kind == ".jsonl.gz":
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    if kind == ".jsonl.xz":
        return lzma.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _input_paths(inputs: Sequence[str | Path], what: str) -> list[Path]:
    """Document files for `what`: at least one, each existing and of a known kind."""
    paths = [Path(p) for p in inputs]
    if not paths:
        raise DataError(f"{what} needs at least one input file")
    for p in paths:
        _doc_kind(p)
        if not p.is_file():
            raise DataError(f"{p}: no such input file")
    return paths


def iter_documents(path: str | Path) -> Iterator[str]:
    """The documents of one input: a .txt file is one document (bytes as stored); a .jsonl /
    .jsonl.gz / .jsonl.xz file holds one {"text": ...} object per line."""
    path = Path(path)
    kind = _doc_kind(path)
    if not path.is_file():
        raise DataError(f"{path}: no such input file")
    try:
        if kind == ".txt":
            yield path.read_bytes().decode("utf-8")
            return
        with _open_jsonl(path, kind) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, TypeError, KeyError):
                    raise DataError(f"{path}:{lineno}: not a JSON object with a \"text\" field") from None
                if not isinstance(text, str):
                    raise DataError(f"{path}:{lineno}: \"text\" is not a string")
                yield text
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    except (OSError, EOFError, lzma.LZMAError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None


def _tokenizer_sentences(paths: Sequence[Path], max_docs: int | None, stats: dict[str, int],
                         max_bytes: int) -> Iterator[str]:
    """Training sentences: each line of a .txt file (SentencePiece's own text format) and each
    document of a JSON-lines file (as the official trainer feeds them)."""
    for path in paths:
        if _doc_kind(path) == ".txt":
            texts: Iterable[str] = next(iter_documents(path)).splitlines()
        else:
            texts = (doc.replace("\x00", " ") for doc in iter_documents(path))
        for text in texts:
            text = text.strip()
            if not text:
                continue
            if max_docs is not None and stats["sentences"] >= max_docs:
                return
            stats["sentences"] += 1
            stats["too_long"] += len(text.encode("utf-8")) > max_bytes
            yield text


# ----------------------------------------------------------------------------- tokenizers


def _sp_train(paths: Sequence[Path], max_docs: int | None, prefix: Path, vocab_size: int,
              extra: dict, max_bytes: int) -> None:
    stats = {"sentences": 0, "too_long": 0}
    input_error: list[GolfError] = []

    def sentences() -> Iterator[str]:
        # SentencePiece turns an exception raised inside its iterator into a traceback dump;
        # stop the stream instead and re-raise our one-line error after training returns.
        try:
            yield from _tokenizer_sentences(paths, max_docs, stats, max_bytes)
        except GolfError as exc:
            input_error.append(exc)

    try:
        spm.SentencePieceTrainer.train(sentence_iterator=sentences(), model_prefix=str(prefix),
                                       vocab_size=vocab_size, **OFFICIAL_SP_SETTINGS, **extra)
        failure = None
    except (RuntimeError, OSError, ValueError) as exc:
        # Keep SentencePiece's last line, without its "INTERNAL: file.cc(line) [check]" prefix.
        failure = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        failure = failure.split("] ", 1)[-1]
    if input_error:
        raise input_error[0]
    where = ", ".join(map(str, paths))
    if stats["sentences"] == 0:
        raise DataError(f"no training text in {where}")
    if stats["sentences"] == stats["too_long"]:
        raise DataError(f"no usable training text in {where}: all {stats['sentences']} sentences exceed "
                        f"max_sentence_length={max_bytes} bytes")
    if failure is not None:
        raise DataError(f"SentencePiece training of {prefix.name} failed: {failure}")


def train_tokenizer(inputs: Sequence[str | Path], out_prefix: str | Path, vocab_size: int, *,
                    max_docs: int | None = None, max_sentence_length: int | None = None,
                    overwrite: bool = False, verbose: bool = False) -> Path:
    """Train a SentencePiece BPE with the official settings; returns the path of the .model.

    Writes `<out_prefix>.model` and `.vocab` atomically and refuses existing ones unless
    `overwrite`. SentencePiece skips sentences longer than `max_sentence_length` bytes (its default
    4192, which the official tokenizer used); raise it for corpora of long documents.
    """
    paths = _input_paths(inputs, "train_tokenizer")
    out_prefix = Path(out_prefix)
    model, vocab = Path(f"{out_prefix}.model"), Path(f"{out_prefix}.vocab")
    for dest in (model, vocab):
        if dest.exists() and not overwrite:
            raise DataError(f"{dest} already exists (pass --overwrite / overwrite=True to replace it)")
    model.parent.mkdir(parents=True, exist_ok=True)
    extra: dict = {"minloglevel": 0 if verbose else 2}
    max_bytes = SP_DEFAULT_MAX_SENTENCE_BYTES
    if max_sentence_length is not None:
        extra["max_sentence_length"] = max_bytes = int(max_sentence_length)

    with tempfile.TemporaryDirectory(prefix=".sp-train-", dir=model.parent) as tmp:
        # Train under the final base name so the model's recorded model_prefix reads naturally.
        tmp_prefix = Path(tmp) / out_prefix.name
        _sp_train(paths, max_docs, tmp_prefix, vocab_size, extra, max_bytes)
        tmp_model = Path(f"{tmp_prefix}.model")
        if not _sp_has_space_piece(_sp_load(tmp_model)):
            # Only a corpus (nearly) without whitespace gets here; force "▁" into the vocab.
            _sp_train(paths, max_docs, tmp_prefix, vocab_size,
                      {**extra, "required_chars": SPACE_PIECE}, max_bytes)
        sp = _sp_load(tmp_model)
        if not _sp_has_space_piece(sp):
            raise DataError(f"{model}: trained tokenizer has no \"{SPACE_PIECE}\" piece")
        if sp.vocab_size() != vocab_size:
            raise DataError(f"corpus too small for vocab_size {vocab_size}: SentencePiece produced "
                            f"{sp.vocab_size()} pieces")
        os.replace(Path(f"{tmp_prefix}.vocab"), vocab)
        os.replace(tmp_model, model)
    return model


def _sp_load(path: Path) -> spm.SentencePieceProcessor:
    if not path.is_file():
        raise DataError(f"{path}: no such tokenizer file")
    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else "load failed"
        raise DataError(f"{path}: not a valid SentencePiece model ({reason})") from None


def _sp_has_space_piece(sp: spm.SentencePieceProcessor) -> bool:
    pid = sp.piece_to_id(SPACE_PIECE)
    return sp.id_to_piece(pid) == SPACE_PIECE and not sp.is_unknown(pid)


def load_tokenizer(path: str | Path, vocab_size: int | None) -> spm.SentencePieceProcessor:
    """Load a SentencePiece model; refuse one without a "▁" piece or whose size is not
    `vocab_size` (None skips the size check)."""
    path = Path(path)
    sp = _sp_load(path)
    if not _sp_has_space_piece(sp):
        raise DataError(f"{path}: tokenizer has no \"{SPACE_PIECE}\" piece; BPB byte counts would be wrong")
    if vocab_size is not None and sp.vocab_size() != vocab_size:
        raise DataError(f"{path}: tokenizer has {sp.vocab_size()} pieces but vocab_size is {vocab_size}")
    return sp


# ----------------------------------------------------------------------------- BPB byte table


@dataclass(frozen=True)
class ByteTable:
    """Per-id byte accounting for BPB (indexed by token id)."""

    base_bytes: torch.Tensor  # int64: UTF-8 bytes of the piece without its leading "▁"
    has_leading_space: torch.Tensor  # bool: the piece starts with "▁"
    is_control: torch.Tensor  # bool: control / unknown / unused ids (BOS among them)

    @property
    def vocab_size(self) -> int:
        return int(self.base_bytes.numel())

    def to(self, device: str | torch.device) -> "ByteTable":
        return ByteTable(self.base_bytes.to(device), self.has_leading_space.to(device),
                         self.is_control.to(device))

    def count(self, prev_ids: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
        """Bytes of each target given its previous token (elementwise, any shape; int64)."""
        table = self if self.base_bytes.device == target_ids.device else self.to(target_ids.device)
        tgt, prev = target_ids.long(), prev_ids.long()
        space = table.has_leading_space[tgt] & ~table.is_control[prev]
        return table.base_bytes[tgt] + space.long()


def byte_table(sp: spm.SentencePieceProcessor) -> ByteTable:
    """The BPB byte table of a tokenizer (TECHNIQUES.md §2)."""
    import torch

    n = sp.vocab_size()
    base = torch.zeros(n, dtype=torch.int64)
    lead = torch.zeros(n, dtype=torch.bool)
    control = torch.zeros(n, dtype=torch.bool)
    for i in range(n):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            control[i] = True
        elif sp.is_byte(i):
            base[i] = 1
        else:
            piece = sp.id_to_piece(i)
            if piece.startswith(SPACE_PIECE):
                lead[i] = True
                piece = piece[1:]
            base[i] = len(piece.encode("utf-8"))
    return ByteTable(base, lead, control)


# ----------------------------------------------------------------------------- corpus build

_BUILD_BATCH_CHARS = 1 << 20  # ~1 MB of text per worker task
_BUILD_BATCH_DOCS = 512
_build_worker_sp: spm.SentencePieceProcessor | None = None


def _build_worker_init(model_path: str) -> None:
    global _build_worker_sp
    _build_worker_sp = spm.SentencePieceProcessor(model_file=model_path)


def _build_encode_batch(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """[BOS] + ids of every document, concatenated as uint16, and each document's length."""
    encoded = _build_worker_sp.encode(texts, out_type=int, num_threads=1)
    lengths = np.fromiter((len(ids) + 1 for ids in encoded), dtype=np.int64, count=len(encoded))
    flat = np.fromiter(itertools.chain.from_iterable([BOS_ID, *ids] for ids in encoded),
                       dtype=np.uint16, count=int(lengths.sum()))
    return flat, lengths


def _build_batches(paths: Sequence[Path]) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for path in paths:
        for text in iter_documents(path):
            batch.append(text)
            chars += len(text)
            if chars >= _BUILD_BATCH_CHARS or len(batch) >= _BUILD_BATCH_DOCS:
                yield batch
                batch, chars = [], 0
    if batch:
        yield batch


def _build_encoded(paths: Sequence[Path], model_path: Path, workers: int
                   ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Encoded batches in input order; a bounded window of tasks keeps memory flat."""
    if workers <= 1:
        _build_worker_init(str(model_path))
        yield from map(_build_encode_batch, _build_batches(paths))
        return
    # fork: workers need only sentencepiece, and spawn would re-run a `python -m golf` entry point.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    with ctx.Pool(workers, initializer=_build_worker_init, initargs=(str(model_path),)) as pool:
        pending: collections.deque = collections.deque()
        for batch in _build_batches(paths):
            pending.append(pool.apply_async(_build_encode_batch, (batch,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, streamed (tokenizers and scripts are identified by it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build_shards(inputs: Sequence[str | Path], tokenizer_path: str | Path, out_dir: str | Path,
                 val_docs: int = 0, seed: int = 1337, shard_tokens: int = 100_000_000,
                 workers: int | None = None, prefix: str = "fineweb", overwrite: bool = False,
                 shuffle: bool = True, progress: bool = True) -> dict:
    """Tokenize documents into `<prefix>_val_*.bin` / `<prefix>_train_*.bin` shards.

    Documents from `inputs` (in argument order) are shuffled with `random.Random(seed)` (unless
    `shuffle=False`); the first `val_docs` form the val split, the rest the train split; each is
    [BOS] + encode(text), and shards are filled to exactly `shard_tokens` (documents may straddle
    two shards, as in the official export). Writes `build_summary.json` and returns it.
    """
    paths = _input_paths(inputs, "build")
    if shard_tokens < 1 or shard_tokens >= 2**31:
        raise DataError(f"shard_tokens={shard_tokens} must be in [1, 2^31)")
    if val_docs < 0:
        raise DataError(f"val_docs={val_docs} must be >= 0")
    if not prefix or "/" in prefix or os.sep in prefix:
        raise DataError(f"prefix {prefix!r} must be a plain file-name prefix")
    tokenizer_path = Path(tokenizer_path)
    sp = load_tokenizer(tokenizer_path, None)
    if sp.vocab_size() > 2**16:
        raise DataError(f"{tokenizer_path}: {sp.vocab_size()} pieces do not fit uint16 shards")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    existing = sorted(out.glob("*.bin"))
    summary_path = out / "build_summary.json"
    if (existing or summary_path.exists()) and not overwrite:
        what = existing[0].name if existing else summary_path.name
        raise DataError(f"{out} already holds {what}{' and more' if len(existing) > 1 else ''}; "
                        f"use another folder or --overwrite")
    workers = max(1, os.cpu_count() or 1) if workers is None else max(1, int(workers))

    tmp_fd, tmp_name = tempfile.mkstemp(prefix=f".{prefix}-tokens-", suffix=".tmp", dir=out)
    tmp_tokens = Path(tmp_name)
    writers: list[_ShardWriter] = []
    try:
        lengths_parts = []
        bar = _build_progress(progress)
        with os.fdopen(tmp_fd, "wb") as f:
            for flat, lengths in _build_encoded(paths, tokenizer_path, workers):
                f.write(flat.tobytes())
                lengths_parts.append(lengths)
                bar.update(len(lengths))
        bar.close()
        lengths = np.concatenate(lengths_parts) if lengths_parts else np.zeros(0, dtype=np.int64)
        n_docs = int(lengths.size)
        if n_docs == 0:
            raise DataError(f"no documents in {', '.join(map(str, paths))}")
        if val_docs > n_docs:
            raise DataError(f"val_docs={val_docs} but the inputs hold only {n_docs} documents")
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        tokens = np.memmap(tmp_tokens, dtype="<u2", mode="r")
        order = list(range(n_docs))
        if shuffle:
            random.Random(seed).shuffle(order)
        stats = {"docs_total": n_docs, "docs_val": val_docs, "docs_train": n_docs - val_docs,
                 "tokens_total": int(offsets[-1]), "tokens_val": 0, "tokens_train": 0,
                 "files_val": 0, "files_train": 0}
        for split, docs in (("val", order[:val_docs]), ("train", order[val_docs:])):
            split_writers = _build_write_split(tokens, offsets, docs, out, f"{prefix}_{split}",
                                               shard_tokens, writers)
            stats[f"files_{split}"] = len(split_writers)
            stats[f"tokens_{split}"] = sum(w.count for w in split_writers)
        del tokens
        if overwrite:
            for stale in itertools.chain(out.glob(f"{prefix}_train_*.bin"), out.glob(f"{prefix}_val_*.bin")):
                stale.unlink()
        for w in writers:
            w.publish()
    except BaseException:
        for w in writers:
            w.abort()
        raise
    finally:
        tmp_tokens.unlink(missing_ok=True)

    summary = {
        "inputs": [str(p) for p in paths],
        "tokenizer": str(tokenizer_path),
        "tokenizer_sha256": file_sha256(tokenizer_path),
        "vocab_size": sp.vocab_size(),
        "seed": seed,
        "shuffle": shuffle,
        "shard_tokens": shard_tokens,
        "prefix": prefix,
        "bos_id": BOS_ID,
        **stats,
        "shards": [w.path.name for w in writers],
    }
    _write_json_atomic(summary_path, summary)
    return summary


def _build_progress(enabled: bool):
    from tqdm import tqdm

    return tqdm(desc="encode", unit=" docs", file=sys.stderr, disable=not enabled, mininterval=0.5)


def _build_write_split(tokens: np.ndarray, offsets: np.ndarray, docs: Sequence[int], out: Path,
                       stem: str, shard_tokens: int, writers: list[_ShardWriter]) -> list[_ShardWriter]:
    """Write the documents `docs` (in order) into shards of exactly `shard_tokens` tokens."""
    made: list[_ShardWriter] = []
    pending: list[np.ndarray] = []
    pending_n = 0

    def flush() -> None:
        nonlocal pending, pending_n
        if pending:
            made[-1].write(np.concatenate(pending))
            pending, pending_n = [], 0

    for doc in docs:
        pos, end = int(offsets[doc]), int(offsets[doc + 1])
        while pos < end:
            if not made or made[-1].count + pending_n == shard_tokens:
                flush()
                if made:
                    made[-1].finish()
                made.append(_ShardWriter(out / f"{stem}_{len(made):06d}.bin"))
                writers.append(made[-1])
            take = min(end - pos, shard_tokens - made[-1].count - pending_n)
            pending.append(tokens[pos:pos + take])
            pending_n += take
            pos += take
            if pending_n >= 1 << 22:
                flush()
    flush()
    if made:
        made[-1].finish()
    return made


def _write_json_atomic(path: Path, payload: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- training loader


class TokenLoader:
    """Random (seq_len + 1)-token windows from memory-mapped shards, identical across world sizes.

    Each call draws the global batch (world_size · num_seqs windows) from one seeded generator,
    uniformly over every valid window start of every shard (so shards weigh by length), and rank r
    takes its contiguous slice. `doc_packed=True` draws only starts at a BOS token.
    """

    def __init__(self, files: Sequence[str | Path], seq_len: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, doc_packed: bool = False):
        if not files:
            raise DataError("TokenLoader needs at least one shard file")
        if seq_len < 1:
            raise DataError(f"seq_len={seq_len} must be >= 1")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world_size {world_size}")
        self.files = [str(f) for f in files]
        self.seq_len, self.rank, self.world_size = seq_len, rank, world_size
        self.seed, self.doc_packed = seed, doc_packed
        self._shards = [read_shard(f) for f in self.files]
        window = seq_len + 1
        self._bos_starts: np.ndarray | None = None
        if doc_packed:
            # Every BOS position whose window fits inside its shard, all shards back to back.
            starts = [np.flatnonzero(np.asarray(t[: max(0, t.size - window + 1)]) == BOS_ID).astype(np.int64)
                      for t in self._shards]
            counts = np.array([s.size for s in starts], dtype=np.int64)
            self._bos_starts = np.concatenate(starts)
        else:
            counts = np.array([max(0, t.size - window + 1) for t in self._shards], dtype=np.int64)
        self._counts = counts
        self._cum = np.cumsum(counts)
        self._total = int(self._cum[-1])
        if self._total == 0:
            what = "a BOS-aligned window" if doc_packed else "a window"
            raise DataError(f"no shard among {self.files[0]}{' ...' if len(files) > 1 else ''} holds "
                            f"{what} of seq_len + 1 = {window} tokens")
        self._rng = np.random.Generator(np.random.PCG64(seed))
        self.batches = 0

    def _draw(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        # One float per window: the stream is the same however the draws are split into calls.
        u = self._rng.random(n)
        g = np.minimum((u * self._total).astype(np.int64), self._total - 1)
        shard = np.searchsorted(self._cum, g, side="right")
        if self._bos_starts is not None:
            return shard, self._bos_starts[g]
        return shard, g - (self._cum[shard] - self._counts[shard])

    def next_batch(self, num_seqs: int, device: str | torch.device = "cpu"
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) int64 [num_seqs, seq_len] for this rank; y is x shifted by one token."""
        import torch

        shard, start = self._draw(self.world_size * num_seqs)
        mine = slice(self.rank * num_seqs, (self.rank + 1) * num_seqs)
        shard, start = shard[mine], start[mine]
        window = self.seq_len + 1
        buf = np.empty((num_seqs, window), dtype=np.int64)
        span = np.arange(window, dtype=np.int64)
        for s in np.unique(shard):
            rows = np.flatnonzero(shard == s)
            buf[rows] = self._shards[s][start[rows, None] + span]
        self.batches += 1
        x = torch.from_numpy(np.ascontiguousarray(buf[:, :-1]))
        y = torch.from_numpy(np.ascontiguousarray(buf[:, 1:]))
        device = torch.device(device)
        if device.type == "cuda":
            return (x.pin_memory().to(device, non_blocking=True),
                    y.pin_memory().to(device, non_blocking=True))
        return x.to(device), y.to(device)

    def state_dict(self) -> dict:
        # The 128-bit generator state travels as strings (safe for JSON and weights_only loads).
        state = self._rng.bit_generator.state
        return {"seed": self.seed, "seq_len": self.seq_len, "doc_packed": self.doc_packed,
                "files": list(self.files), "batches": self.batches,
                "rng_state": str(state["state"]["state"]), "rng_inc": str(state["state"]["inc"]),
                "rng_has_uint32": int(state["has_uint32"]), "rng_uinteger": int(state["uinteger"])}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seq_len", "doc_packed"):
            if state.get(key) != getattr(self, key):
                raise DataError(f"loader state has {key}={state.get(key)!r} but this loader has "
                                f"{getattr(self, key)!r}")
        if [Path(f).name for f in state.get("files", [])] != [Path(f).name for f in self.files]:
            raise DataError("loader state was saved over a different list of shard files")
        self._rng.bit_generator.state = {
            "bit_generator": "PCG64",
            "state": {"state": int(state["rng_state"]), "inc": int(state["rng_inc"])},
            "has_uint32": int(state["rng_has_uint32"]), "uinteger": int(state["rng_uinteger"]),
        }
        self.seed, self.batches = state["seed"], int(state["batches"])


def load_val_tokens(files: Sequence[str | Path], max_tokens: int = 0) -> torch.Tensor:
    """The validation stream: every shard concatenated in order, as int64 (max_tokens > 0 truncates)."""
    import torch

    if not files:
        raise DataError("no validation shard given")
    parts, have = [], 0
    for f in files:
        tokens = read_shard(f)
        if max_tokens > 0:
            tokens = tokens[: max_tokens - have]
        parts.append(np.asarray(tokens, dtype=np.int64))
        have += tokens.size
        if 0 < max_tokens <= have:
            break
    return torch.from_numpy(np.concatenate(parts))
