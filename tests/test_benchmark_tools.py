"""benchmarks/throughput.py's bookkeeping: what a timed-out run still reports, and --merge."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from vllm_kvzip.backend.state import compression_log_line

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def throughput():
    spec = importlib.util.spec_from_file_location("throughput_bench", ROOT / "benchmarks" / "throughput.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _log_line(request_id: str, freed: int, seconds: float, scoring_ms: float | None) -> str:
    """A worker log line exactly as `WorkerCompressionState.record_compression` writes it."""
    entry = SimpleNamespace(request_id=request_id, kept_tokens=2019 * 256, evictable_tokens=8064)
    geometry = SimpleNamespace(num_tokens=8192, evictable_tokens=8064, freed_blocks=freed, block_size=16)
    line = compression_log_line(entry, geometry, 256, "kvzip", seconds)
    if scoring_ms is not None:
        line += f" (scoring_ms {scoring_ms:.1f})"
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
