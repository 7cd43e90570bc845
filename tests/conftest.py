"""Shared fixtures: the ../shared/data folder (skip when absent) and a tiny tokenizer + corpus."""

from __future__ import annotations

import os
from pathlib import Path

# Tiny CPU models run many times faster single-threaded, above all on a loaded 2-core box;
# subprocesses (CLI and bundle tests) inherit the setting through the environment.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("GOLF_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "tokenizers" / "fineweb_1024_bpe.model").exists():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


def small_corpus_texts(n_docs: int = 60) -> list[str]:
    """Deterministic English-like documents, enough to train a 512-piece tokenizer."""
    import random

    rng = random.Random(0)
    words = ("the of and to in is was that for on with as by at from it this be are his which "
             "or an had not but have were they been their one all we there has more when will "
             "would who so no if out up into than them can only other new some could time these "
             "two may then do first any my now such like our over man me even most made after "
             "also did many before must through back years where much your way well down should "
             "because each just those people how too little state good very make world still own "
             "see men work long get here between both life being under never day same another "
             "know while last might us great old year off come since against go came right used "
             "take three 1790 2026 café naïve — “quoted” 42").split()
    docs = []
    for _ in range(n_docs):
        sentences = []
        for _ in range(rng.randint(3, 12)):
            n = rng.randint(4, 16)
            sentences.append(" ".join(rng.choice(words) for _ in range(n)).capitalize() + ".")
        docs.append(" ".join(sentences))
    return docs


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> Path:
    """A 512-piece SentencePiece BPE with the official settings, trained on the small corpus."""
    from golf.data import train_tokenizer

    out = tmp_path_factory.mktemp("tok")
    text = out / "corpus.txt"
    text.write_text("\n".join(small_corpus_texts()))
    return train_tokenizer([text], out / "tok", vocab_size=512)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, tiny_tokenizer) -> Path:
    """Train/val shards of the small corpus, encoded with `tiny_tokenizer` (val = 8 documents)."""
    import json

    from golf.data import build_shards

    root = tmp_path_factory.mktemp("data")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in small_corpus_texts(120)))
    build_shards([corpus], tiny_tokenizer, root / "shards", val_docs=8, workers=1)
    return root / "shards"


def tiny_config(tiny_data: Path, tiny_tokenizer: Path, out_dir: Path, **overrides):
    """The tiny preset pointed at the test data, with `key=value` overrides."""
    from golf.config import load_config

    items = [f"data_path={tiny_data}", f"tokenizer_path={tiny_tokenizer}", f"out_dir={out_dir}"]
    items += [f"{k}={v}" for k, v in overrides.items()]
    return load_config("tiny", items, environ={})
