#!/usr/bin/env bash
# One GPU check for litllm, <= 9 minutes on one H100/H200. Every part fails soft (its failure is
# written down and the next part runs); the figures go to one file.
#
#   bash benchmarks/gpu_check.sh [RESULTS_FILE]     # default: $OUT/gpu_check.txt, else gpu_check.txt
#
# Parts (time limit each): CUDA-only tests (100 s); bf16 pretraining MFU on TinyLlama-1.1B shapes, FSDP
# on one device, compile off (50 s) and on (100 s); LoRA / QLoRA / pretraining peak memory on
# Llama-3.2-1B shapes vs `litllm estimate` (40 s each); greedy decode tokens/s vs transformers
# and the decode table per precision, compiled with CUDA graphs (benchmarks/generate.py, 120 s); tensor-parallel
# decode on 2 GPUs vs 1 (benchmarks/tensor_parallel.py, 90 s, on >= 2 GPUs only); serve throughput
# (benchmarks/serve.py, 50 s, when it exists): <= 540 s on one GPU (+ 90 s with >= 2 GPUs).
set -u
cd "$(dirname "$0")/.."
RESULTS="${1:-${OUT:-.}/gpu_check.txt}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"
: > "$RESULTS"

note() { echo "$*" | tee -a "$RESULTS"; }

part() {  # part NAME SECONDS COMMAND...: run it, keep its key lines, never stop the script
  local name="$1" limit="$2"; shift 2
  local start=$SECONDS log
  log="$(mktemp)"
  note "== $name"
  if timeout "$limit" "$@" >"$log" 2>&1; then
    grep -E "^(mfu_|peak_|[0-9]+ passed|.*passed|.*failed|tokens/s|.*tok/s|.*req/s|.*throughput|litllm|none@|torchao|transformers|fp32|bf16|int8|measured|device|format)" "$log" | tail -30 | tee -a "$RESULTS"
    note "-- $name: ok ($((SECONDS - start)) s)"
  else
    local rc=$?
    tail -5 "$log" | tee -a "$RESULTS"
    note "-- $name: FAILED (exit $rc$([ $rc = 124 ] && echo ', timed out'), $((SECONDS - start)) s)"
  fi
  rm -f "$log"
}

note "litllm gpu_check $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
"$PY" -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name(0), '|', round(torch.cuda.get_device_properties(0).total_memory / 2**30), 'GiB')" 2>&1 | tee -a "$RESULTS"

# the tests that only run where CUDA is available (they skip on CPU)
CUDA_TESTS=$(grep -l "cuda.is_available()" tests/test_*.py | tr '\n' ' ')
part "CUDA-only tests ($CUDA_TESTS)" 100 "$PY" -m pytest $CUDA_TESTS -q -x -m "not slow" -k "cuda or gpu or Cuda" -p no:cacheprovider

part "MFU, TinyLlama-1.1B bf16-mixed, FSDP 1 device, compile off" 50 "$PY" benchmarks/gpu_check.py mfu
part "MFU, TinyLlama-1.1B bf16-mixed, FSDP 1 device, compile on" 100 "$PY" benchmarks/gpu_check.py mfu --compile

for method in lora qlora pretrain; do
  part "peak memory $method (Llama-3.2-1B, bf16-true, mb 4 x 512) vs estimate" 40 "$PY" benchmarks/gpu_check.py memory "$method"
done

if "$PY" benchmarks/generate.py --help 2>/dev/null | grep -q -- "--device"; then
  # litllm fp32 / bf16 / torchao int8wo / int4wo, each eager and compiled (CUDA graphs: reduce-overhead), and the
  # fraction of the measured bandwidth bound; llama.cpp rows only where llama-cpp-python runs on the CPU
  part "greedy decode table (fp32, bf16, int8wo, int4wo; eager and compiled + CUDA graphs)" 120 \
    "$PY" benchmarks/generate.py --device cuda --repeats 2 --new_tokens 128 \
    --quantize none@bf16-true torchao.int8wo@bf16-true torchao.int4wo@bf16-true
else
  note "== greedy decode: benchmarks/generate.py has no --device flag here (CPU-only version): skipped"
fi

GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "${GPUS:-0}" -ge 2 ]; then
  part "tensor-parallel decode tokens/s, 2 GPUs vs 1 (~1B Llama, bf16)" 90 "$PY" benchmarks/tensor_parallel.py \
    --device cuda --devices 2 --precision bf16-true --n_layer 16 --n_embd 2048 --n_head 16 --intermediate_size 8192
else
  note "== tensor-parallel decode: $GPUS GPU(s) here, needs 2: skipped"
fi

if [ -f benchmarks/serve.py ]; then
  part "serve throughput" 50 "$PY" benchmarks/serve.py --device cuda
else
  note "== serve throughput: benchmarks/serve.py not in this tree: skipped"
fi

note "done in $SECONDS s; figures in $RESULTS"
