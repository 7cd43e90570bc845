#!/usr/bin/env bash
# Benchmarks on a lent GPU machine, as recorded in docs/benchmarks.md.
#   bash tools/device_session.sh STAGE...   (stages: setup data8192 data1024 kernels speed evalsmoke profile
#                                            record quantstudy baseline evals lora lorap lorasweep
#                                            loratime lorabench loradump profileeval parity loraparity submit2 evalparity
#                                            submit1)
# Expects (made by tools/prepare_carry.sh), carried with the working tree: .whl/ (brotli, zstandard wheels)
# and .carry/ (proxy/*.jsonl.{gz,xz}, tok/*.model, val1024/ and val8192/ FineWeb eval shards).
# Every log goes to $OUT (or ./device_out); each stage has its own time limit. Filters are
# line-buffered, so a stage killed by its limit (or the call's) still leaves its log so far.
set -uo pipefail
OUT=${OUT:-device_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
DATA=/tmp/golfdata
TOK8=.carry/tok/fineweb_8192_bpe.model
TOK1=.carry/tok/fineweb_1024_bpe.model
WALL=${WALL:-300}

stage_setup() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
  # golf.kernels lives in the top-level kernels/ folder; map it without an install.
  [ -e golf/kernels ] || ln -s ../kernels golf/kernels
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  python3 -c "import flash_attn_interface" 2>/dev/null && echo "fa3: yes" || echo "fa3: no"
  python3 -c "import flash_attn" 2>/dev/null && echo "fa2: yes" || echo "fa2: no"
}

build() {  # build VOCAB TOKENIZER VAL_DIR
  local out=$DATA/sp$1
  [ -e "$out/fineweb_train_000000.bin" ] && return
  rm -f "$out/fineweb_val_000000.bin"  # a copy val8192 put there; the build refuses to overwrite it
  python3 -m golf data build .carry/proxy/*.jsonl.gz .carry/proxy/*.jsonl.xz --tokenizer "$2" \
    --out "$out" --val-docs 0 --workers 16 2>&1 | tail -1
  cp "$3/fineweb_val_000000.bin" "$out/"
  python3 -m golf data inspect "$out"
}
stage_data8192() { build 8192 $TOK8 .carry/val8192; }
stage_data1024() { build 1024 $TOK1 .carry/val1024; }

stage_kernels() {  # BENCH_PARTS: which benchmarks of tools/bench_kernels.py (default all)
  timeout 150 python3 tools/bench_kernels.py --parts ${BENCH_PARTS:-ce,mlp,attn} 2>&1 | tee "$OUT/kernels.log"
  timeout 150 python3 -m pytest -q -p no:cacheprovider -p no:warnings tests/test_model.py tests/test_kernels.py \
    -k "flash or backend or gpu" 2>&1 | tail -5
}

# Trainer variants side by side: `golf train --preset record`, SPEED_WALL seconds each, recurrence on
# halfway. SPEED_VARIANTS holds name:key=value,key=value entries (config overrides; none = the preset).
stage_speed() {
  local logs=()
  for v in ${SPEED_VARIANTS:-preset: cdtune:compile_mode=coordinate-descent}; do
    local name=${v%%:*} sets=() kv
    IFS=, read -ra kvs <<< "${v#*:}"
    for kv in "${kvs[@]}"; do sets+=(--set "$kv"); done
    timeout 300 python3 -m golf train --preset record --set data_path=$DATA/sp8192 --set tokenizer_path=$TOK8 \
      --set max_wallclock_seconds=${SPEED_WALL:-60} --set gptq_reserve_seconds=0 --set loop_enable_frac=0.5 \
      --set train_log_every=5 --set out_dir=/tmp/speed_$name "${sets[@]}" > "$OUT/speed_$name.log" 2>&1
    tail -2 "$OUT/speed_$name.log"
    logs+=("$OUT/speed_$name.log")
    python3 tools/train_rates.py "${logs[@]}" > "$OUT/speed.txt"  # after each variant: a killed call keeps it
  done
  cat "$OUT/speed.txt"
  # Same seed and data: how far each variant's losses drift from the first one's, step by step.
  for log in "${logs[@]:1}"; do python3 tools/loss_parity.py "${logs[0]}" "$log" | tail -n 1 | tee -a "$OUT/speed.txt"; done
}

add_extra_sets() {  # append EXTRA_SETS (space-separated key=value) to the caller's `sets` array
  local s
  for s in ${EXTRA_SETS:-}; do sets+=(--set "$s"); done
}

run_preset() {  # run_preset PRESET VOCAB TOKENIZER EXTRA_SET...
  local preset=$1 vocab=$2 tok=$3; shift 3
  local sets=(--set data_path=$DATA/sp$vocab --set tokenizer_path=$tok --set max_wallclock_seconds=$WALL
              --set out_dir=/tmp/train_$preset)
  for s in "$@"; do sets+=(--set "$s"); done
  add_extra_sets
  mkdir -p "$OUT/$preset"
  timeout 560 python3 -m golf run --preset "$preset" "${sets[@]}" --out "$OUT/$preset" 2>&1 \
    | grep --line-buffered -v "^config \|^versions " | tee "$OUT/$preset.log" | grep --line-buffered -v "ttt_sgd chunk"
}
# Compiled evaluation smoke test on the carried artifact; if it fails, the runs evaluate eagerly.
stage_evalsmoke() {
  val8192
  if ! timeout 120 python3 -m golf eval .carry/record/final_model.golf --sliding --ttt none --json \
      --data $DATA/sp8192 --tokenizer $TOK8 2>"$OUT/evalsmoke.err" | tee "$OUT/evalsmoke.json"; then
    tail -5 "$OUT/evalsmoke.err"; EXTRA_SETS="${EXTRA_SETS:-} eval_compile=0"; echo "eval_compile=0 from here on"
  fi
}
# One record step under the profiler: the top CUDA kernels and the gzipped trace (PROFILE_LOOPED=1: the
# looped order; PROFILE_SETS "key=value ...": overrides; PROFILE_CODE=1: inductor's generated code too).
stage_profile() {
  local frac=1.0 sets=() kv; [ "${PROFILE_LOOPED:-0}" = 1 ] && frac=0.0
  for kv in ${PROFILE_SETS:-}; do sets+=(--set "$kv"); done
  local logs=""; [ "${PROFILE_CODE:-0}" = 1 ] && logs=output_code
  env ${logs:+TORCH_LOGS=$logs} timeout 200 python3 -m golf train --preset record --set data_path=$DATA/sp8192 \
    --set tokenizer_path=$TOK8 --set max_wallclock_seconds=20 --set gptq_reserve_seconds=0 \
    --set loop_enable_frac=$frac --set profile_step=4 --set out_dir=/tmp/profile "${sets[@]}" > /tmp/profile.log 2>&1
  sed -n '/^profile of step/,/^step:5/p' /tmp/profile.log > "$OUT/profile.txt"
  gzip -c /tmp/profile/profile_step4.json > "$OUT/profile_trace.json.gz"
  [ -n "$logs" ] && gzip -c /tmp/profile.log > "$OUT/profile_code.log.gz"
  head -45 "$OUT/profile.txt"
}
stage_record() { run_preset record 8192 $TOK8; }
stage_quantstudy() {  # one record model (QS_WALL s, QS_TRAIN_SETS "key=value ..."), quantized several ways
  local sets=(); for kv in ${QS_TRAIN_SETS:-}; do sets+=(--set "$kv"); done
  timeout 400 python3 -m golf train --preset record --set data_path=$DATA/sp8192 --set tokenizer_path=$TOK8 \
    --set max_wallclock_seconds=${QS_WALL:-240} --set out_dir=/tmp/qs_run "${sets[@]}" > "$OUT/qs_train.log" 2>&1
  grep -E "model:|QAT on" "$OUT/qs_train.log"; grep -E "^step:|stopped" "$OUT/qs_train.log" | tail -3
  local variants=(); for v in ${QS_VARIANTS:-}; do variants+=(--variant "$v"); done  # none = the tool's defaults
  timeout 330 python3 tools/quant_study.py /tmp/qs_run "${variants[@]}" ${QS_ARGS:-} 2>&1 | grep --line-buffered -v Warning | tee "$OUT/quant_study.txt"
}
stage_baseline() { run_preset baseline 1024 $TOK1; }

ART=.carry/record/final_model.golf
val8192() {  # the FineWeb eval shard where the evaluations look for it (data8192 also puts it there)
  mkdir -p $DATA/sp8192
  [ -e $DATA/sp8192/fineweb_val_000000.bin ] || cp .carry/val8192/fineweb_val_000000.bin $DATA/sp8192/
}
# The artifact's stored run config sets the eval defaults; EVAL_SETS ("key=value ...") overrides them.
EVAL_OVERRIDES=(); for kv in ${EVAL_SETS:-}; do EVAL_OVERRIDES+=(--set "$kv"); done
EVAL_ARGS=(eval "$ART" --tokenizer $TOK8 --json "${EVAL_OVERRIDES[@]}")  # after `python3 -m golf` or torchrun
EVAL=(python3 -m golf "${EVAL_ARGS[@]}" --data $DATA/sp8192)
stage_evals() {  # evaluations of the carried record artifact: sliding, SGD-TTT, size, codecs
  val8192
  timeout 120 "${EVAL[@]}" --sliding --ttt none 2> >(tail -n 3 >&2) | tee "$OUT/eval_sliding.json"
  timeout 150 "${EVAL[@]}" --sliding --ttt sgd 2> >(tail -n 3 >&2) | tee "$OUT/eval_sgd.json"
  python3 -m golf size-check "$ART" | tee "$OUT/size_check.txt"
  timeout 60 python3 tools/bench_codecs.py "$ART" | tee "$OUT/codecs.txt"
}
stage_lora() {  # per-document LoRA TTT on the carried record artifact; dynamo's recompiles counted
  val8192
  TORCH_LOGS=recompiles timeout ${LORA_LIMIT:-170} "${EVAL[@]}" --ttt lora 2>"$OUT/eval_lora.err" \
    | tee "$OUT/eval_lora.json"
  tail -n 2 "$OUT/eval_lora.err"; echo "recompiles: $(grep -c 'Recompiling function' "$OUT/eval_lora.err")"
}
stage_loratime() {  # steady-state eval time on the 200 documents ×REP_TIMES, shuffled: sliding (REP_SLIDING=1) and LoRA
  val8192
  local rep=$DATA/rep${REP_TIMES:-3}
  [ -e $rep/fineweb_val_000000.bin ] || python3 tools/replicate_val.py $DATA/sp8192 $rep --times ${REP_TIMES:-3}
  local args=("${EVAL_ARGS[@]}" --data $rep)
  [ "${REP_SLIDING:-1}" = 1 ] && timeout 150 python3 -m golf "${args[@]}" --sliding --ttt none 2> >(tail -n 2 >&2) \
    | tee "$OUT/rep_sliding.json"
  timeout ${LORA_LIMIT:-170} python3 -m golf "${args[@]}" --ttt lora 2> >(tail -n 2 >&2) | tee "$OUT/rep_lora.json"
}
stage_lorasweep() {  # LoRA learning rates and compile overhead on the first SWEEP_TOKENS tokens, warm
  val8192
  timeout 400 python3 tools/lora_sweep.py "$ART" --data $DATA/sp8192 --tokenizer $TOK8 \
    --max-tokens ${SWEEP_TOKENS:-60000} --lr 0 1e-4 3e-4 1e-3 2>&1 | grep --line-buffered -v Warning | tee "$OUT/lora_sweep.txt"
}
stage_loraparity() {  # LoRA TTT, plain and phased, on the first PARITY_TOKENS tokens: one GPU vs two ranks
  val8192
  local args=("${EVAL_ARGS[@]}" --data $DATA/sp8192 --ttt lora --max-tokens ${PARITY_TOKENS:-40000})
  local phased=(--set lora_phases=2 --set lora_phase_docs=${PARITY_PHASE_DOCS:-8})
  CUDA_VISIBLE_DEVICES=0 timeout 150 python3 -m golf "${args[@]}" 2>/dev/null | tee "$OUT/lora_1gpu.json"
  timeout 150 torchrun --standalone --nproc_per_node=2 -m golf "${args[@]}" 2>/dev/null | tee "$OUT/lora_2gpu.json"
  CUDA_VISIBLE_DEVICES=0 timeout 150 python3 -m golf "${args[@]}" "${phased[@]}" 2>/dev/null \
    | tee "$OUT/lorap_1gpu.json"
  timeout 150 torchrun --standalone --nproc_per_node=2 -m golf "${args[@]}" "${phased[@]}" 2>/dev/null \
    | tee "$OUT/lorap_2gpu.json"
}
stage_lorabench() {  # one LoRA-TTT step in isolation, eager vs compiled, and its profile
  timeout 240 python3 tools/lora_bench.py "$ART" --shapes 32x2048 32x512 4x2048 1x2048 2>&1 | grep --line-buffered -v Warning \
    | tee "$OUT/lora_bench.txt"
}
stage_loradump() {  # every token's NLL on the first DUMP_TOKENS tokens: sliding, and LoRA at each of DUMP_LRS
  val8192
  local args=("${EVAL[@]}" --max-tokens ${DUMP_TOKENS:-100000})
  timeout 60 "${args[@]}" --sliding --ttt none --dump-nll "$OUT/nll_sliding.npy" 2>/dev/null | tee "$OUT/dump_sliding.json"
  for lr in ${DUMP_LRS:-3e-4 1e-4}; do
    timeout ${LORA_LIMIT:-150} "${args[@]}" --ttt lora --set lora_lr=$lr --dump-nll "$OUT/nll_lora_$lr.npy" 2>/dev/null \
      | tee "$OUT/dump_lora_$lr.json"
  done
}
stage_profileeval() {  # where LoRA TTT's time goes (warm, profiled)
  val8192
  timeout 300 python3 tools/profile_eval.py "$ART" --data $DATA/sp8192 --tokenizer $TOK8 --ttt lora \
    --max-tokens 5000 "${EVAL_OVERRIDES[@]}" 2>&1 | grep --line-buffered -v Warning | tee "$OUT/profile_eval.txt"
}
stage_lorap() {  # the same with phased global SGD, scaled to the 200 documents: pauses after 33, 67, 100
  val8192
  timeout ${LORA_LIMIT:-170} "${EVAL[@]}" --ttt lora --set lora_phases=3 --set lora_phase_docs=100 \
    2> >(tail -n 3 >&2) | tee "$OUT/eval_lora_phased.json"
}

# Two-GPU checks. PARITY makes the runs comparable: iteration-based progress (no wallclock), 50 steps,
# every loss logged. The 2-GPU side is the bundled train_gpt.py run by `golf submit --nproc 2`.
PARITY=(--set data_path=$DATA/sp8192 --set max_wallclock_seconds=0 --set iterations=50 --set train_log_every=1)

stage_parity() {  # 1 GPU (gradient accumulation) vs 2 GPUs, same seed and global batch, every loss logged
  local sets=("${PARITY[@]}" --set tokenizer_path=$TOK8 --set seed=42 --set compile=${PARITY_COMPILE:-1})
  CUDA_VISIBLE_DEVICES=0 timeout 280 python3 -m golf train --preset record "${sets[@]}" --set out_dir=/tmp/p1 \
    2>&1 | grep "^step\|model:\|stopped" > "$OUT/parity_1gpu.log"
  timeout 200 torchrun --standalone --nproc_per_node=2 -m golf train --preset record "${sets[@]}" \
    --set out_dir=/tmp/p2 2>&1 | grep "^step\|model:\|stopped" > "$OUT/parity_2gpu.log"
  tail -n 2 "$OUT/parity_1gpu.log" "$OUT/parity_2gpu.log"
  python3 tools/loss_parity.py "$OUT/parity_1gpu.log" "$OUT/parity_2gpu.log" | tee "$OUT/parity.txt"
}

stage_submit2() {  # make submit NPROC=2: bundle → torchrun train_gpt.py → records folder → stats
  local sets=("${PARITY[@]}" --set tokenizer_path=$PWD/$TOK8)
  add_extra_sets
  timeout ${SUBMIT2_LIMIT:-330} python3 -m golf submit --preset record --seed 42 --name proxy_2gpu --nproc 2 \
    --records-dir "$OUT/records" --work-dir /tmp/work "${sets[@]}" \
    2>&1 | grep --line-buffered -v "ttt_sgd chunk" | tail -25
  python3 -m golf stats "$OUT"/records/*_proxy_2gpu | tee "$OUT/stats.txt"
}

stage_submit1() {  # make submit on one GPU: the bundled train_gpt.py for WALL s → records folder, artifact
  local sets=(--set data_path=$DATA/sp8192 --set tokenizer_path=$PWD/$TOK8 --set max_wallclock_seconds=$WALL)
  add_extra_sets
  timeout 560 python3 -m golf submit --preset record --seed 42 --name proxy_1gpu --nproc 1 \
    --records-dir "$OUT/records" --work-dir /tmp/work1 "${sets[@]}" 2>&1 | grep --line-buffered -v "ttt_sgd chunk" | tail -30
  cp /tmp/work1/*/seed42/final_model.golf "$OUT/" 2>/dev/null || cp /tmp/work1/*/*/final_model.golf "$OUT/"
}

stage_evalparity() {  # the 2-GPU run's artifact scored again on one GPU (sliding, SGD-TTT)
  local art
  art=$(ls /tmp/work/*/seed42/final_model.golf /tmp/work/*/*/final_model.golf 2>/dev/null | head -1)
  CUDA_VISIBLE_DEVICES=0 timeout 60 python3 -m golf eval "$art" --sliding --ttt none --json 2>/dev/null \
    | tee "$OUT/evalparity_sliding_1gpu.json"
  CUDA_VISIBLE_DEVICES=0 timeout 90 python3 -m golf eval "$art" --sliding --ttt sgd --json 2>/dev/null \
    | tee "$OUT/evalparity_sgd_1gpu.json"
}

for stage in "$@"; do
  echo "=== $stage $(date -u +%H:%M:%S)"
  "stage_$stage"
done
echo "=== done $(date -u +%H:%M:%S)"
