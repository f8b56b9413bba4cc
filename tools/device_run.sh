#!/usr/bin/env bash
# GPU-machine steps of a device session (see ../shared/device/README.md for staging).
#   bash tools/device_run.sh install     # after `.device/p2/stage.sh`: the plugin, editable
#   bash tools/device_run.sh gguf_a      # keep the first half of the embedded model's GGUF in /tmp
#   bash tools/device_run.sh model       # join the halves, convert to an HF folder (~/.cache/vllm_kvzip)
#   (the halves and .device/tokenizer come from `bash tools/split_gguf.sh` with the venv active, run here first)
#   Session 11: model + e2e with E2E_TESTS="tests/test_compressor.py tests/test_e2e_compression.py" (the
#   two-half compression on CUDA: planning never synchronises), then MAIN_METHODS="FLASH_ATTN kvzap-mlp"
#   MAIN_WORKLOADS=8k main (prefill cost), MAIN_TAG=triton32k ... 32k main, KVzip 32k.
#   Session 12: e2e (tests/test_compressor.py), kvzip (32k), prefill, main 8k for llama-3.1-8b and
#   qwen3-8b, gguf_a + model + e2e (tests/test_e2e_kvzap_compiled.py).
#   Session 13: decode (PDL vs no PDL), prefill (graph timings; the dense layer's graph time was NaN,
#   fixed in 58f8a7a), gguf_a + model + E2E_TESTS=tests/test_e2e_threshold.py e2e (6 passed), then on
#   a second machine decode with DECODE_TEST_K="merge_mode or graph_replay or dependent"
#   DECODE_SWEEP="--quick --batches 1,4" DECODE_VARIANTS=no_pdl,pdl_after_loop,min_tiles_2,tile_32
#   DECODE_TAG=merge_b1_4 (9 passed).
#   Session 14: decode with DECODE_TEST_K="split_rounding or merge_mode" DECODE_SWEEP="--quick --batches 1,4"
#   DECODE_VARIANTS=no_pdl,nearest_split,nearest_split_no_pdl DECODE_TAG=rounding_b1_4 (9 passed; the
#   nearest rounding changed nothing), the whole test_decode_attention.py on CUDA (DECODE_TEST_TIMEOUT=420:
#   65 passed in 184 s), prefill (40 passed, both models), gguf_a + model + E2E_TESTS=
#   tests/test_e2e_kvzap_compiled.py e2e (1 passed, 185 s), `python3 benchmarks/decode_kernel.py
#   --variants no_pdl,nearest_split_no_pdl --tag pdl_full` (PDL then the default: it lost 5-10% at batch 1
#   keep 1.0, so it is off by default since), E2E_TESTS=tests/test_e2e_compression.py e2e (8 passed),
#   the full sweep with the new default (decode_kernel.json) and three `--quick --batches 1` repeats.
#   The e2e modules ran with PDL on; PDL off is the launch they ran with through session 12.
#   Then, on a second machine at c0aa4f7 (the benchmark's rows laid out as the plugin does, the tail
#   inside the context): `decode_kernel.py --quick --tag window_quick` and `--quick --batches 1,4 --tag
#   window_b1_4` (keep 1.0 within 10% of FA3 at every point).  Next: the full sweep on that layout,
#   `tools/device_run.sh sweep` (88 s), to replace decode_kernel.json.
# Results go under $OUT (the device tool brings them back).
set -uo pipefail
source /tmp/site/env.sh || exit 3
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
# Result tags name the card (h100 or h200): the device tool may lend either, and ratios are only
# comparable within one card.
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | grep -oE 'H[0-9]+' | tr H h)
GPU=${GPU:-gpu}
case "$1" in
  install)
    # The CUDA kernels are built by the `cuda` step (a minute of nvcc), not on every install.
    VLLM_KVZIP_NO_CUDA=1 PIP_NO_INDEX=1 PIP_NO_BUILD_ISOLATION=0 python3 -m pip install -q --no-deps -e . 2>&1 | tail -3
    python3 -c "import vllm_kvzip, vllm; print('vllm', vllm.__version__)";;
  gguf_a)
    cp .device/gguf_a/part /tmp/gguf.part00 && ls -l /tmp/gguf.part00;;
  model)
    cat /tmp/gguf.part00 .device/gguf_b/part > /tmp/smollm2.gguf && sha256sum /tmp/smollm2.gguf | cut -c1-16
    python3 -m vllm_kvzip.models --gguf /tmp/smollm2.gguf;;
  diag)
    # KVzap engine start (compiled, CUDA graphs), stacks dumped if it is slow; then the kernels.
    timeout 250 python3 benchmarks/throughput.py --workloads smoke --methods kvzap-mlp --timeout 230 \
        --dump-stacks-after 170 --out-dir "$OUT" --tag smoke > "$OUT/kvzap_smoke.txt" 2>&1
    tail -30 "$OUT/kvzap_smoke.txt"
    timeout 130 python3 benchmarks/decode_kernel.py --quick --out-dir "$OUT" > "$OUT/decode_kernel.txt" 2>&1
    tail -25 "$OUT/decode_kernel.txt"
    timeout "${KERNEL_TEST_TIMEOUT:-150}" python3 -m pytest -q -x -p no:cacheprovider tests/kernels > "$OUT/kernel_tests.txt" 2>&1
    tail -8 "$OUT/kernel_tests.txt";;
  decode)  # issue 4: the decode kernel's tests on CUDA (every merge mode, CUDA graphs included), then
    # the quick sweep with the DECODE_VARIANTS merge strategies beside the default (which wins where).
    timeout "${DECODE_TEST_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider tests/kernels/test_decode_attention.py \
        ${DECODE_TEST_K:+-k "$DECODE_TEST_K"} > "$OUT/decode_tests.txt" 2>&1
    tail -4 "$OUT/decode_tests.txt"
    timeout "${DECODE_TIMEOUT:-300}" python3 benchmarks/decode_kernel.py ${DECODE_SWEEP---quick} \
        --variants "${DECODE_VARIANTS-pdl}" --tag "${DECODE_TAG:-merge_quick}" --out-dir "$OUT" > "$OUT/decode_kernel.txt" 2>&1
    grep -E "worst|/ default|points in" "$OUT/decode_kernel.txt";;
  sweep)  # issue 4: the full decode sweep of the default kernel (~90 s), replacing decode_kernel.json
    timeout "${DECODE_TIMEOUT:-300}" python3 benchmarks/decode_kernel.py --out-dir "$OUT" > "$OUT/decode_kernel_full.txt" 2>&1
    grep -E "worst|points in" "$OUT/decode_kernel_full.txt";;
  cuda)  # build csrc/ in place, test the CUDA compaction against the reference, time it against Triton
    timeout 240 python3 setup.py build_ext --inplace > "$OUT/cuda_build.txt" 2>&1; tail -3 "$OUT/cuda_build.txt"
    timeout 120 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_compaction_cuda.py -rs 2>&1 | tail -4
    timeout 150 python3 benchmarks/compaction_kernel.py --out-dir "$OUT" 2>&1 | tail -12;;
  gputests)  # real weights: FLASH_ATTN equality, KVzip on CUDA with graphs, the kernels
    timeout 330 python3 -m pytest -q -s -p no:cacheprovider tests/test_gpu_engine.py tests/test_gpu_kvzip.py \
        > "$OUT/gpu_tests.txt" 2>&1; tail -15 "$OUT/gpu_tests.txt"
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/kernels > "$OUT/kernel_tests.txt" 2>&1
    tail -6 "$OUT/kernel_tests.txt";;
  e2e)  # issues 5 and 6 on CUDA: the DMS oracle test and the compression e2e tests (CPU-written,
    # never run on a GPU yet); needs the `model` step first.
    # Session 9: the oracle test failed on CUDA (keep-sets not equal to the CPU oracle's); it now
    # allows flips within 1e-2 of the threshold in the first differing folding and prints them.
    # Session 10 (IEEE float32 dots): the oracle test and test_e2e_compression pass; the 4,000-token
    # and abort/preemption tests failed on sync-scheduling assumptions, since fixed (CPU-verified).
    # Those two alone: E2E_TESTS=tests/test_e2e_threshold.py E2E_K="long_generation or abort".
    # Every engine test of these modules now runs in sync and async scheduling (two engines per
    # module): the whole step is ~520 s on an H100, so split it over two calls (E2E_TESTS).
    # tests/conftest.py sets TRITON_F32_DEFAULT=ieee; a fresh Triton cache so that no TF32 build of
    # the same float32 kernel from an earlier step is reused.
    TRITON_CACHE_DIR=/tmp/triton_cache_ieee timeout "${E2E_TIMEOUT:-500}" python3 -m pytest -q -s -p no:cacheprovider \
        ${E2E_TESTS:-tests/test_e2e_threshold.py tests/test_e2e_compression.py} ${E2E_K:+-k "$E2E_K"} > "$OUT/e2e_cuda.txt" 2>&1
    grep -E "keep-sets on the GPU|passed|failed|^(FAILED|ERROR)" "$OUT/e2e_cuda.txt" | tail -15;;
  # Session 6 plan: results in /tmp/res (kept while the machine stays warm: the kvzip step takes
  # FLASH_ATTN from there with --baseline-from), copied to $OUT after every step.
  main)  # issue 5: FLASH_ATTN vs kvzap-mlp (keep 0.25) on 8k and 32k, one engine per method
    # (MAIN_METHODS="FLASH_ATTN TRITON_ATTN kvzap-mlp" MAIN_WORKLOADS=8k: the three-way run, ~350 s)
    # MAIN_TAG names the result files (session 10 ran two models as "main": the second call's
    # files replaced the first's on the machine and a stale log came back with them).
    tag=${MAIN_TAG:-main}
    mkdir -p /tmp/res/logs "$OUT/logs"
    python3 benchmarks/throughput.py --workloads ${MAIN_WORKLOADS:-8k 32k} --methods ${MAIN_METHODS:-FLASH_ATTN kvzap-mlp} --model-config ${MAIN_MODEL:-llama-3.1-8b} --prefill-requests 8 \
        --timeout "${METHOD_TIMEOUT:-270}" --out-dir /tmp/res --tag "$tag" > "/tmp/res/$tag.txt" 2>&1
    cp /tmp/res/"$tag".txt /tmp/res/throughput_"$tag".* "$OUT/"; cp /tmp/res/logs/throughput_"$tag"_* "$OUT/logs/"
    tail -7 "/tmp/res/$tag.txt";;
  long6)  # issue 6: long generations, FLASH_ATTN vs kvzap-dms (threshold, decode-time eviction)
    mkdir -p /tmp/res
    python3 benchmarks/throughput.py --workloads long-4k --methods FLASH_ATTN kvzap-dms --prefill-requests 8 \
        --timeout "${METHOD_TIMEOUT:-270}" --out-dir /tmp/res --tag dms > /tmp/res/dms.txt 2>&1
    cp -r /tmp/res/. "$OUT/"; tail -6 /tmp/res/dms.txt;;
  kvzip)  # issue 5: KVzip (keep 0.25) on 8k and 32k: needs a chat template (.device/tokenizer carried along)
    mkdir -p /tmp/res
    # KVZIP_BASELINE=<JSON with FLASH_ATTN on the workloads>: KVzip alone, its ratio against that run
    # (32k: KVZIP_BASELINE=benchmarks/results/throughput_kvzip32k_h100.json METHOD_TIMEOUT=450).
    if [ -n "${KVZIP_BASELINE:-}" ]; then base="--methods kvzip --baseline-from $KVZIP_BASELINE"
    elif [ -f /tmp/res/throughput_main.json ]; then base="--methods kvzip --baseline-from /tmp/res/throughput_main.json"
    else base="--methods FLASH_ATTN kvzip"; fi  # a fresh machine: the baseline in this call
    python3 benchmarks/throughput.py --workloads ${KVZIP_WORKLOADS:-8k 32k} $base --prefill-requests 8 \
        --tokenizer-from .device/tokenizer --timeout "${METHOD_TIMEOUT:-500}" --out-dir /tmp/res --tag kvzip \
        > /tmp/res/kvzip.txt 2>&1
    cp -r /tmp/res/. "$OUT/"; tail -8 /tmp/res/kvzip.txt;;
  long8k)  # issue 6: 128 x (512 + 8192), where the KV dominates decoding: FLASH_ATTN vs kvzap-dms.
    # Both engines take ~650 s, over one call's 600: LONG8K_METHODS=FLASH_ATTN in one call and
    # LONG8K_METHODS=kvzap-dms in the next on the warm machine (tags differ), joined here with --merge.
    mkdir -p /tmp/res; methods=${LONG8K_METHODS:-kvzap-dms}
    # LONG8K_BASELINE=<an earlier JSON with FLASH_ATTN on `long`>: ratio against it instead (say so).
    python3 benchmarks/throughput.py --workloads long --methods $methods --prefill-requests 8 \
        ${LONG8K_BASELINE:+--baseline-from "$LONG8K_BASELINE"} --timeout "${METHOD_TIMEOUT:-480}" --out-dir /tmp/res --tag "dms8k_${methods// /_}" > "/tmp/res/dms8k_${methods// /_}.txt" 2>&1
    cp -r /tmp/res/. "$OUT/"; grep -v INFO "/tmp/res/dms8k_${methods// /_}.txt" | tail -6;;
  prefill)  # issue 5: KVzap's prefill cost piece by piece (benchmarks/prefill_cost.py), Llama-3.1-8B and
    # Qwen3-8B shapes, after the GPU tests of the pieces it times (score recording, selection, the halves).
    TRITON_CACHE_DIR=/tmp/triton_cache_ieee python3 -m pytest -q -p no:cacheprovider tests/kernels/test_record_scores.py \
        tests/scoring/test_policies.py tests/test_compressor.py > "$OUT/prefill_tests.txt" 2>&1
    tail -2 "$OUT/prefill_tests.txt"
    for model in llama-3.1-8b qwen3-8b; do
      python3 benchmarks/prefill_cost.py --model-config "$model" --out-dir "$OUT" --tag "${model%%-*}_$GPU" \
          > "$OUT/prefill_cost_$model.txt" 2>&1
      grep -vE "INFO|WARNING" "$OUT/prefill_cost_$model.txt" | tail -30
    done;;
  scoring)  # issue 5: KVzip chunk scoring, Triton kernel vs the torch definition (one layer, 8B shapes)
    timeout 120 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_chunk_scores.py 2>&1 | tail -2
    timeout 120 python3 benchmarks/chunk_scores.py --out-dir "$OUT" --tag "$GPU" 2>&1 | tail -4;;
  folding)  # issue 6: decode-time folding cost with and without room, plans and compactions timed
    python3 benchmarks/folding_cost.py --device cuda --apply --out-dir "$OUT" --tag "$GPU" 2>&1 | tail -4;;
  soak)  # issue 7: vllm serve under 32 clients, the embedded model's real weights in float32, a pool
    # they overfill (600 blocks: with 1000, compression kept the pool below full and nothing was
    # preempted); after the drain no page may be held, and every completed request must give the
    # same tokens alone.  Needs the `model` step first.
    timeout "${SOAK_TIMEOUT:-560}" python3 benchmarks/soak.py --method "${SOAK_METHOD:-kvzap-mlp}" --requests "${SOAK_REQUESTS:-128}" --concurrency 32 \
        --max-tokens 128 --ignore-eos --prompt-tokens 64,6000 --max-model-len 8192 --duration "${SOAK_DURATION:-200}" \
        --server-args="--num-gpu-blocks-override ${SOAK_BLOCKS:-600}" --output "$OUT/soak_$GPU.json" > "$OUT/soak_$GPU.txt" 2>&1
    grep -v INFO "$OUT/soak_$GPU.txt" | tail -15;;
  *) echo "unknown step $1"; exit 2;;
esac
