"""Benchmark bookkeeping: what a timed-out throughput run still reports, --merge, and how the soak tells
a scoring difference from a decoding one (keep-set digests in the worker log)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vllm_kvzip.backend.state import compression_log_line

ROOT = Path(__file__).resolve().parents[1]


def _load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_bench", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def soak():
    return _load_benchmark("soak")


@pytest.fixture(scope="module")
def throughput():
    return _load_benchmark("throughput")


def _log_line(
    request_id: str, freed: int, seconds: float, scoring_ms: float | None, keep_digest: str | None = None
) -> str:
    """A worker log line exactly as `WorkerCompressionState.record_compression` writes it."""
    entry = SimpleNamespace(
        request_id=request_id, kept_tokens=2019 * 256, evictable_tokens=8064, keep_digest=keep_digest
    )
    geometry = SimpleNamespace(num_tokens=8192, evictable_tokens=8064, freed_blocks=freed, block_size=16)
    line = compression_log_line(entry, geometry, 256, "kvzip", seconds, (scoring_ms or 0.0) / 1e3)
    return f"(EngineCore pid=1) INFO 12-06 23:58:52 [state.py:186] vllm-kvzip: {line}"


def test_compressions_in_log_reads_the_worker_lines(throughput):
    log = "\n".join([
        "INFO loggers.py: Running: 54 reqs",
        _log_line("1-a", 376, 1.0179, 1014.4),
        _log_line("2-b", 370, 0.9675, 965.0),
        "INFO loggers.py: Running: 53 reqs",
    ])
    stats = throughput.compressions_in_log(log)
    assert stats["compressed_requests"] == 2
    assert stats["freed_blocks"] == 746
    assert stats["compression_ms_per_request"] == pytest.approx((1017.9 + 967.5) / 2)
    assert stats["scoring_ms_per_request"] == pytest.approx((1014.4 + 965.0) / 2)
    # The keep-set digest after the times changes none of it.
    with_digest = throughput.compressions_in_log(_log_line("1-a", 376, 1.0179, 1014.4, "0badcafe"))
    assert with_digest["scoring_ms_per_request"] == pytest.approx(1014.4)
    # Without a scoring pass (KVzap) the line has no scoring_ms.
    assert throughput.compressions_in_log(_log_line("3-c", 10, 0.003, None))["scoring_ms_per_request"] == 0.0
    assert throughput.compressions_in_log("no compression here") is None


def test_merge_keeps_the_finished_run_of_a_method_that_timed_out_once(throughput, tmp_path):
    def result(method, tok_s=None, error=None):
        base = {"workload": "long", "method": method, "device": "GPU X"}
        if error:
            return dict(base, error=error)
        return dict(base, requests=4, prefill_requests=2, prefill_s=0.1, wall_s=100.0,
                    output_tok_per_s=tok_s, peak_running_requests=4.0)

    first = {"command": "run 1", "model": "m", "device": "GPU X",
             "results": [result("FLASH_ATTN", error="timed out"), result("kvzap-dms", 6000.0)]}
    second = {"command": "run 2", "model": "m", "device": "GPU X", "results": [result("FLASH_ATTN", 3000.0)]}
    paths = []
    for name, payload in (("a.json", first), ("b.json", second)):
        (tmp_path / name).write_text(json.dumps(payload))
        paths.append(str(tmp_path / name))
    args = SimpleNamespace(merge=paths, tag="merged", out_dir=str(tmp_path))
    assert throughput._merge(args) == 0
    merged = json.loads((tmp_path / "long_generation_merged.json").read_text())
    assert merged["commands"] == ["run 1", "run 2"]
    assert sorted(r["method"] for r in merged["results"]) == ["FLASH_ATTN", "kvzap-dms"]  # the timeout is gone
    by_method = {r["method"]: r for r in merged["results"]}
    assert "error" not in by_method["FLASH_ATTN"]
    assert by_method["kvzap-dms"]["speedup"] == pytest.approx(2.0)


def test_keep_set_digest_names_the_mask():
    from vllm_kvzip.backend.compressor import keep_set_digest

    generator = torch.Generator().manual_seed(0)
    keep = torch.rand(3, 2, 500, generator=generator) < 0.3
    digest = keep_set_digest(keep)
    assert len(digest) == 8 and digest == keep_set_digest(keep.clone())
    flipped = keep.clone()
    flipped[2, 1, 499] = ~flipped[2, 1, 499]
    moved = keep.clone()  # the same count, one kept token moved to another position
    first_kept = int(keep[0, 0].nonzero()[0])
    first_evicted = int((~keep[0, 0]).nonzero()[0])
    moved[0, 0, first_kept], moved[0, 0, first_evicted] = False, True
    swapped_heads = keep.flip(1)
    assert len({digest, keep_set_digest(flipped), keep_set_digest(moved), keep_set_digest(swapped_heads)}) == 4


def test_soak_classifies_a_mismatch_by_its_keep_sets(soak):
    log = "\n".join([
        _log_line("cmpl-soak-c-00003-0-aa", 10, 0.01, None, "11111111"),
        _log_line("cmpl-soak-c-00017-0-bb", 10, 0.01, None, "22222222"),
        _log_line("cmpl-soak-s-00003-cc", 10, 0.01, None, "11111111"),
        _log_line("cmpl-soak-s-00017-dd", 10, 0.01, None, "33333333"),
    ])
    mismatches = [{"index": 3}, {"index": 17}, {"index": 40}]  # 40: never compressed
    assert soak.classify_mismatches(mismatches, log) == 1
    assert mismatches[0]["same_keep_sets"] and mismatches[0]["keep_sets"]["sequential"] == ["11111111"]
    assert not mismatches[1]["same_keep_sets"]
    assert mismatches[1]["keep_sets"] == {"concurrent": ["22222222"], "sequential": ["33333333"]}
    assert not mismatches[2]["same_keep_sets"]
    # The token counts of the same lines, as the sequential phase's chains need them.
    assert soak.compressions_by_index(log, "c") == {3: [8192], 17: [8192]}


def test_prefill_cost_dry_run_writes_every_share(tmp_path):
    """`benchmarks/prefill_cost.py --cpu-dry-run`: the GPU breakdown's plumbing, end to end on the CPU."""
    import subprocess

    completed = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "prefill_cost.py"), "--cpu-dry-run", "--tokens", "512",
         "--out-dir", str(tmp_path), "--tag", "dry"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    payload = json.loads((tmp_path / "prefill_cost_dry.json").read_text())
    assert payload["device"] == "cpu (dry run)" and payload["command"].endswith("--tag dry")
    assert set(payload["share_of_dense_prefill"]) == {"surrogate_mlp", "record_torch", "record_triton", "compression"}
    assert payload["dense_layer_ms"] > 0 and payload["selection_topk_ms"] > 0


def test_decode_kernel_ragged_layout_is_the_plugins_layout_of_the_same_context():
    """The ragged rows model a `context`-token request: the dense tail is inside the context and the
    keep ratio applies to the evictable tokens, so keep 1.0 reads exactly FA3's bytes."""
    decode_kernel = _load_benchmark("decode_kernel")
    batch, context, tail, heads = 3, 1000, decode_kernel.DENSE_TAIL, decode_kernel.NUM_KV_HEADS
    block_ids = torch.arange(batch * 200)
    dense = decode_kernel.dense_layout(batch, context, block_ids, torch.device("cpu"))
    full = decode_kernel.ragged_layout(batch, context, 1.0, block_ids, torch.device("cpu"), seed=1)
    assert full.kv_bytes == dense.kv_bytes
    assert torch.all(full.kept_len == context - tail)
    assert torch.all(full.seq_lens - full.dense_start == tail)
    for keep in (0.5, 0.1):
        layout = decode_kernel.ragged_layout(batch, context, keep, block_ids, torch.device("cpu"), seed=2)
        per_row = layout.kept_len.sum(dim=1).to(torch.float64)
        # +-40% between heads, the row's total kept (rounding per head: within one token per head)
        assert torch.all((per_row - keep * (context - tail) * heads).abs() <= heads)
        assert layout.kept_len.max() > layout.kept_len.min()
        assert layout.kv_bytes == (int(layout.kept_len.sum()) + batch * heads * tail) * 2 * decode_kernel.HEAD_SIZE * 2


def test_decode_kernel_variants_are_workspace_options_and_compared_point_by_point(capsys):
    decode_kernel = _load_benchmark("decode_kernel")
    from vllm_kvzip.backend.ops import RaggedDecodeWorkspace

    for name, options in decode_kernel.VARIANTS.items():  # a typo in an option fails here, not on the GPU
        if options.get("dependent_launch"):  # Hopper only: on the CPU, the error naming the option
            with pytest.raises(ValueError, match="dependent_launch=True needs a CUDA device"):
                RaggedDecodeWorkspace(4, 32, 128, device="cpu", num_kv_heads=8, **options)
            options = {key: value for key, value in options.items() if key != "dependent_launch"}
        RaggedDecodeWorkspace(4, 32, 128, device="cpu", num_kv_heads=8, **options)

    def point(backend, keep, time_us, batch=1):
        return dict(backend=backend, batch=batch, context=4096, keep_ratio=keep, time_us=time_us,
                    bandwidth_fraction=0.5, time_ratio_vs_fa3=time_us / 10.0)

    results = [
        point("fa3", 1.0, 10.0),
        point("ragged_uncompressed", 1.0, 12.0), point("ragged_uncompressed_pdl", 1.0, 15.0),
        point("ragged", 1.0, 11.0), point("ragged_pdl", 1.0, 9.9),
        point("ragged", 0.5, 8.0), point("ragged_min_tiles_2", 0.5, 6.0),
        point("ragged_pdl", 0.3, 5.0),  # no default point to compare with: left without a ratio
    ]
    decode_kernel.summarize(results, ["pdl", "min_tiles_2"])
    ratios = {(p["backend"], p["keep_ratio"]): p.get("time_ratio_vs_default") for p in results}
    assert ratios[("ragged_uncompressed_pdl", 1.0)] == 1.25
    assert ratios[("ragged_pdl", 1.0)] == 0.9
    assert ratios[("ragged_min_tiles_2", 0.5)] == 0.75
    assert ratios[("ragged_pdl", 0.3)] is None and ratios[("ragged", 1.0)] is None
    printed = capsys.readouterr().out
    assert "pdl / default time: min 0.900, median 1.075, max 1.250 over 2 points" in printed
    # Against FA3, the compressed layout at keep 1.0 (the plugin's layout), not the uncompressed one.
    assert "keep 1.0 vs FA3: worst time ratio 1.100 at batch 1 context 4096" in printed
    assert "keep 1.0 vs FA3 (pdl): worst time ratio 0.990 at batch 1 context 4096" in printed
