#!/usr/bin/env bash
# Stage what tools/device_session.sh needs on a lent GPU machine, in git-ignored folders:
#   .carry/  proxy documents, tokenizers and FineWeb eval shards copied from ../shared/data
#   .whl/    brotli and zstandard wheels for the device's Python 3.12 (it has neither)
# Then: run(command="bash tools/device_session.sh setup data8192 record", carry=[".carry", ".whl"])
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared/data}
mkdir -p .git/info && for d in /.carry/ /.whl/; do grep -qx "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude; done
mkdir -p .carry/proxy .carry/tok .carry/val1024 .carry/val8192 .carry/record
cp "$SHARED"/proxy/docs/*.jsonl.gz "$SHARED"/proxy/docs2/*.jsonl.xz .carry/proxy/
cp "$SHARED"/tokenizers/fineweb_1024_bpe.model "$SHARED"/tokenizers/unofficial/fineweb_8192_bpe.model .carry/tok/
cp "$SHARED"/proxy/sp1024/fineweb_val_000000.bin .carry/val1024/
cp "$SHARED"/proxy/sp8192/fineweb_val_000000.bin .carry/val8192/
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl brotli==1.2.1 zstandard==0.25.0
du -sh .carry .whl
