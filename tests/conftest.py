"""Shared fixtures: the embedded model and the settings that make vLLM's CPU build usable here."""

from __future__ import annotations

import contextlib
import os

import pytest

# vLLM on a 2-core CPU machine: a small KV-cache pool, both cores for compute
# (otherwise one is reserved), no torch.compile (75-100 s per engine start).
CPU_ENGINE_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "0-1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    # Engine core and worker in the test process: tests can look at vLLM's
    # scheduler and at the plugin's worker state directly.
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_KVZIP_RECORD_KEEP_SETS": "1",
}
for _key, _value in CPU_ENGINE_ENV.items():
    os.environ.setdefault(_key, _value)
# float32 Triton dots in IEEE, not TF32 (Triton's default on NVIDIA GPUs): in float32 the engine's
# prefill runs vLLM's TRITON_ATTN, whose TF32 logits move the hidden states, and so the KVzap
# scores, by ~1e-3 from the CPU oracle's; with IEEE dots the GPU engine tests compare keep-sets to
# float rounding.  (The CPU interpreter computes either exactly.)
os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")


def pytest_configure(config):
    config.addinivalue_line("markers", "engine: starts a real vLLM engine (slow on CPU)")
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped on CPU machines with the reason")


def close_engine(llm) -> None:
    """Shut an in-process engine down: `del llm` alone keeps its ~2 GB (model, KV pool, threads)
    alive for the rest of the session, and CI's 24 GB hold only so many of them."""
    import gc

    import torch

    engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if engine_core is not None and hasattr(engine_core, "shutdown"):
        engine_core.shutdown()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def engine_memory() -> dict:
    """LLM(...) arguments that let the engines of one pytest process start one after another on a
    GPU: at vLLM's default 0.92 a second engine finds too little free memory whenever anything of
    the first (say, one that failed a test) is still alive. (On the CPU, VLLM_CPU_KVCACHE_SPACE
    sizes the pool and this is not passed.)"""
    import torch

    return {"gpu_memory_utilization": 0.3} if torch.cuda.is_available() else {}


@contextlib.contextmanager
def scheduling(mode: str):
    """Engines created inside run vLLM's scheduler in `mode`: "sync", or "async" (one batch in
    flight: the scheduler plans step n + 1 before it has processed step n's output, vLLM's default
    on a GPU). vLLM's CPU platform always turns async scheduling off, though its engine runs it:
    here it is turned back on after the platform's check, so CI covers what a GPU runs. The engine
    must be asked for it as well (`start_engine` does both)."""
    if mode not in ("sync", "async"):
        raise ValueError(f"scheduling mode must be 'sync' or 'async', got {mode!r}")
    import torch

    if mode == "sync" or torch.cuda.is_available():
        yield
        return
    from vllm.platforms.cpu import CpuPlatform

    original = CpuPlatform.__dict__["check_and_update_config"]

    def check_and_update_config(cls, vllm_config) -> None:
        original.__func__(cls, vllm_config)
        vllm_config.scheduler_config.async_scheduling = True

    CpuPlatform.check_and_update_config = classmethod(check_and_update_config)
    try:
        yield
    finally:
        CpuPlatform.check_and_update_config = original


SCHEDULING_MODES = ["sync", "async"]


def start_engine(scheduling_mode: str, **llm_kwargs):
    """An in-process LLM whose scheduler runs in `scheduling_mode` (see `scheduling`), sized to share a
    GPU with the session's other engines (`engine_memory`)."""
    from vllm import LLM

    with scheduling(scheduling_mode):
        llm = LLM(async_scheduling=scheduling_mode == "async", **engine_memory(), **llm_kwargs)
    from tests.engine_helpers import runs_async_scheduling

    running = "async" if runs_async_scheduling(llm) else "sync"
    assert running == scheduling_mode, f"asked for {scheduling_mode} scheduling, vLLM runs {running}"
    return llm


@pytest.fixture(scope="session")
def embedded_model() -> str:
    """Folder of the converted SmolLM2-135M-Instruct (converted once per cache)."""
    from vllm_kvzip.models import ensure_embedded_model

    return ensure_embedded_model()


@pytest.fixture(scope="module")
def oracle_model(embedded_model):
    """The embedded model in transformers, float32: the oracle the engine tests compare against."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(embedded_model, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def surrogate_dir(tmp_path_factory, embedded_model):
    """A KVzap-MLP checkpoint in the published layout, sized for the embedded model (random, seeded)."""
    import torch
    from transformers import AutoConfig

    from vllm_kvzip.scoring.kvzap_model import KVzapSurrogate, ModelShape

    torch.manual_seed(0)
    shape = ModelShape.from_config(AutoConfig.from_pretrained(embedded_model))
    folder = tmp_path_factory.mktemp("kvzap") / "kvzap-mlp"
    KVzapSurrogate.for_model(shape, "mlp").save(folder)
    return str(folder)


# `vllm serve` as the server tests start it: compression on, float32, eager,
# max length 2048, block size 16 (tests/test_server.py, tests/test_faults.py).
SERVER_MAX_MODEL_LEN = 2048
SERVER_ARGS = [
    "--dtype", "float32", "--enforce-eager", "--max-model-len", str(SERVER_MAX_MODEL_LEN),
    "--block-size", "16", "--served-model-name", "smollm2", "--enable-log-requests",
    "--kv-compression", "streaming", "--kv-compression-ratio", "0.3", "--kv-compression-window", "64",
]


@pytest.fixture(scope="session")
def server(embedded_model, tmp_path_factory):
    """One `vllm serve` subprocess for the whole session: (base URL, log path)."""
    from vllm_kvzip.eval.server import VLLMServer

    log_path = tmp_path_factory.mktemp("server") / "server.log"
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    with VLLMServer(embedded_model, SERVER_ARGS, log_path, env=env, startup_timeout=400) as running:
        yield running.base_url, log_path
