"""Faults on vLLM's real engine (CPU): aborts at precise steps, preemption, disconnects, over-long requests.

In-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0, see conftest), stepped by
hand: KVzap-MLP with the shipped surrogate, keep 0.25, window 64, block size
16, chunked prefill of 128 tokens per step (a 276-token prompt takes 3 steps)
and a pool of 50 blocks (800 tokens), small enough that five requests of about 120
prompt + 64 output tokens cannot all stay resident (admission only checks that a prompt
fits; decoding grows every request until the pool runs out).

The `vllm serve` tests share the session's server (conftest `server`).

After every fault: nothing crashed, nothing leaked (vLLM's free blocks are back
to their start, the plugin's scheduler-side and worker-side state is empty, and
a served engine holds 0 blocks by its own /metrics) and the other requests'
outputs equal a clean run of the same requests, each alone in the engine.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass

import pytest

from vllm_kvzip.eval.synthetic import make_example

from tests.conftest import SCHEDULING_MODES, close_engine, start_engine
from tests.engine_helpers import model_runner, question_prompt, runs_async_scheduling

BLOCK_SIZE = 16
CHUNK_TOKENS = 128
POOL_BLOCKS = 50
MAX_MODEL_LEN = 768
SETTINGS = {"method": "kvzap-mlp", "keep_ratio": 0.25, "window": 64}
OPT_OUT = {"kv_compression": "none"}

pytestmark = pytest.mark.engine


# -- the in-process engine and what watches it -------------------------------------------
@pytest.fixture(scope="module", params=SCHEDULING_MODES)
def engine(embedded_model, request):
    llm = start_engine(
        request.param,
        model=embedded_model,
        dtype="float32",
        enforce_eager=True,
        max_model_len=MAX_MODEL_LEN,
        block_size=BLOCK_SIZE,
        seed=0,
        enable_chunked_prefill=True,
        max_num_batched_tokens=CHUNK_TOKENS,
        max_num_seqs=8,
        num_gpu_blocks_override=POOL_BLOCKS,
        additional_config={"kv_compression": SETTINGS},
    )
    yield llm
    close_engine(llm)


def _scheduler(engine):
    return engine.llm_engine.engine_core.engine_core.scheduler


def _pool(engine):
    return _scheduler(engine).kv_cache_manager.block_pool


def _manager(engine):
    from vllm_kvzip.block_manager.vllm_manager import KVzipManager

    [manager] = [
        m for m in _scheduler(engine).kv_cache_manager.coordinator.single_type_managers if isinstance(m, KVzipManager)
    ]
    return manager


class Watch:
    """Spies on vLLM's scheduler: preemptions, and the token count of every (re)admission."""

    def __init__(self, engine) -> None:
        scheduler, manager = _scheduler(engine), _manager(engine)
        self.preempted: list[tuple[str, int]] = []  # (engine request id, its tokens then)
        self.admissions: dict[str, list[int]] = {}
        preempt, note_admission = scheduler._preempt_request, manager.note_admission

        def spy_preempt(request, timestamp):
            self.preempted.append((request.request_id, request.num_tokens))
            preempt(request, timestamp)

        def spy_admission(request_id, num_tokens, keep_ratio, **kwargs):
            self.admissions.setdefault(request_id, []).append(num_tokens)
            note_admission(request_id, num_tokens, keep_ratio, **kwargs)

        scheduler._preempt_request = spy_preempt
        manager.note_admission = spy_admission

    def engine_id(self, name: str) -> str:
        [found] = [key for key in self.admissions if key.rsplit("-", 1)[0] == name]
        return found


@pytest.fixture(scope="module")
def watch(engine):
    return Watch(engine)


@dataclass(frozen=True)
class Job:
    name: str
    prompt: tuple[int, ...]
    extra: dict | None = None
    max_tokens: int = 16
    ignore_eos: bool = True

    def params(self, max_tokens: int | None = None):
        from vllm import SamplingParams

        return SamplingParams(
            temperature=0,
            max_tokens=self.max_tokens if max_tokens is None else max_tokens,
            ignore_eos=self.ignore_eos,
            extra_args=self.extra,
        )

    @property
    def compressed(self) -> bool:
        return self.extra != OPT_OUT


def _chat_prompt(tokenizer, task: str, seed: int, budget: int) -> tuple[int, ...]:
    return tuple(question_prompt(tokenizer, task, seed, budget))


@pytest.fixture(scope="module")
def prompts(engine):
    tokenizer = engine.get_tokenizer()
    found = {
        "other_compressed": _chat_prompt(tokenizer, "profile", 1, 280),
        "other_dense": _chat_prompt(tokenizer, "needle", 2, 100),
        "victim": _chat_prompt(tokenizer, "needle", 3, 200),
        "long": _chat_prompt(tokenizer, "multikey", 4, 900),
    }
    for index in range(5):
        found[f"pressure_{index}"] = _chat_prompt(tokenizer, ("profile", "needle")[index % 2], 10 + index, 60)
    return found


@pytest.fixture(scope="module")
def clean(engine, watch):
    """clean(job, prompt=None, max_tokens=None): the job's output tokens with the job alone in the engine."""
    from vllm import TokensPrompt

    cache: dict[tuple, list[int]] = {}

    def run_alone(job: Job, prompt: tuple[int, ...] | None = None, max_tokens: int | None = None) -> list[int]:
        prompt = job.prompt if prompt is None else tuple(prompt)
        key = (prompt, json.dumps(job.extra, sort_keys=True), job.max_tokens if max_tokens is None else max_tokens,
               job.ignore_eos)
        if key not in cache:
            assert not engine.llm_engine.has_unfinished_requests()
            preempted = len(watch.preempted)
            [output] = engine.generate([TokensPrompt(prompt_token_ids=list(prompt))], job.params(max_tokens),
                                       use_tqdm=False)
            assert len(watch.preempted) == preempted, "a request alone was preempted: the pool is too small"
            cache[key] = list(output.outputs[0].token_ids)
        return cache[key]

    return run_alone


class Driver:
    """Adds jobs to the engine and steps it by hand, collecting the finished outputs."""

    def __init__(self, engine, watch) -> None:
        self.engine = engine
        self.watch = watch
        self.llm_engine = engine.llm_engine
        self.outputs: dict[str, list[int]] = {}

    def add(self, job: Job) -> None:
        self.llm_engine.add_request(job.name, {"prompt_token_ids": list(job.prompt)}, job.params())

    def step(self) -> None:
        for output in self.llm_engine.step():
            if output.finished:
                self.outputs[output.request_id] = list(output.outputs[0].token_ids)

    def step_until(self, condition, limit: int = 100) -> None:
        for _ in range(limit):
            if condition():
                return
            self.step()
        raise AssertionError(f"condition not reached in {limit} steps")

    def drain(self, limit: int = 3000) -> None:
        self.step_until(lambda: not self.llm_engine.has_unfinished_requests(), limit)

    def request(self, name: str):
        """vLLM's Request of a job while the scheduler holds it."""
        found = [r for key, r in _scheduler(self.engine).requests.items() if key.rsplit("-", 1)[0] == name]
        return found[0] if found else None


def _assert_nothing_leaked(engine, start_free_blocks: int) -> None:
    """vLLM's pool is back to its start; the plugin holds no state for any request."""
    from vllm import SamplingParams

    from vllm_kvzip.backend.state import get_state

    assert not engine.llm_engine.has_unfinished_requests()
    pool, manager, state = _pool(engine), _manager(engine), get_state()
    assert pool.get_num_free_blocks() == start_free_blocks
    assert not manager._pending and not manager._compressed
    # The worker hears of finished requests with the next step: one short (dense) probe.
    engine.generate(["Hi"], SamplingParams(max_tokens=1), use_tqdm=False)
    assert pool.get_num_free_blocks() == start_free_blocks
    probe = set(model_runner(engine).requests)
    assert len(probe) <= 1 and set(state.requests) <= probe
    assert not state.pending
    assert state.table.free_slots == state.table.num_slots - 1  # every compressed request's slot is back


# -- aborts at each stage of a compressed request ----------------------------------------
ABORT_POINTS = ("waiting", "between_prefill_chunks", "at_compression_step", "decoding")


@pytest.mark.parametrize("when", ABORT_POINTS)
def test_abort_at_each_stage_of_a_compressed_request(engine, watch, prompts, clean, when):
    from vllm_kvzip.backend.state import get_state

    state, manager = get_state(), _manager(engine)
    driver = Driver(engine, watch)
    start = _pool(engine).get_num_free_blocks()
    preempted = len(watch.preempted)
    others = [
        Job(f"other-compressed-{when}", prompts["other_compressed"]),
        Job(f"other-dense-{when}", prompts["other_dense"], OPT_OUT),
    ]
    victim = Job(f"victim-{when}", prompts["victim"], max_tokens=48)
    assert len(victim.prompt) > 2 * CHUNK_TOKENS  # its prefill spans three steps
    for job in others:
        driver.add(job)
    # Both others decode, the compressed one past its compaction and its freed gap.
    driver.step_until(
        lambda: (r := driver.request(others[0].name)) is not None and manager.compression_record(r.request_id)
    )
    driver.add(victim)
    vid = driver.request(victim.name).request_id

    if when == "between_prefill_chunks":
        driver.step_until(lambda: driver.request(victim.name).num_computed_tokens > 0)
        request = driver.request(victim.name)
        assert 0 < request.num_computed_tokens < len(victim.prompt)
        assert vid in manager._pending and not state.requests[vid].compressed
    elif when == "at_compression_step":
        # The step whose forward completes the prefill scores and compacts on the
        # worker; the scheduler frees the gap only when it schedules the next step.
        driver.step_until(lambda: vid in state.requests and state.requests[vid].compressed)
        assert driver.request(victim.name).num_computed_tokens == len(victim.prompt)
        assert vid in manager._pending and manager.compression_record(vid) is None
        assert vid in state.recorded_keep_sets
        if runs_async_scheduling(engine):
            # The engine may already have prepared the next step, which launches the moves.
            assert vid in state.planned or state.requests[vid].slot != 0
        else:
            # Planned on the device; the moves wait for the next step's inputs, so the abort lands
            # between the two halves.
            assert vid in state.planned and state.requests[vid].slot == 0
    elif when == "decoding":
        driver.step_until(
            lambda: manager.compression_record(vid) is not None and driver.request(victim.name).num_output_tokens >= 2
        )
        assert manager.compression_record(vid).freed_blocks > 0
    engine.llm_engine.abort_request([victim.name])
    driver.drain()

    for job in others:
        assert driver.outputs[job.name] == clean(job), f"{job.name} changed by the abort ({when})"
    if when in ("waiting", "between_prefill_chunks"):
        assert vid not in (state.recorded_keep_sets or {})  # never compressed
    assert len(watch.preempted) == preempted  # the fault under test is the abort only
    _assert_nothing_leaked(engine, start)


# -- preemption ----------------------------------------------------------------------------
def _reference_with_recompression(clean, job: Job, admissions: list[int]) -> list[int]:
    """The clean output of a request that vLLM preempted and recomputed.

    A request preempted after k output tokens is recomputed from prompt + k
    tokens and compressed again at that length (docs/design.md), exactly as a
    fresh request with that prompt.  So its output is the chain of clean runs:
    the prompt alone for k tokens, then prompt + those k tokens for the rest.
    """
    boundaries = sorted(set(admissions))
    assert boundaries[0] == len(job.prompt)
    tokens: list[int] = []
    for index, start in enumerate(boundaries):
        end = boundaries[index + 1] if index + 1 < len(boundaries) else len(job.prompt) + job.max_tokens
        tokens += clean(job, prompt=job.prompt + tuple(tokens[: start - len(job.prompt)]), max_tokens=end - start)
    return tokens


def test_preemption_under_memory_pressure(engine, watch, prompts, clean):
    from vllm_kvzip.backend.state import get_state
    from vllm_kvzip.block_manager.geometry import CompressionGeometry

    state = get_state()
    driver = Driver(engine, watch)
    start = _pool(engine).get_num_free_blocks()
    preempted = len(watch.preempted)
    extras = [None, None, {"kv_compression_ratio": 0.5}, OPT_OUT, None]
    jobs = [Job(f"pressure-{i}", prompts[f"pressure_{i}"], extra, max_tokens=64) for i, extra in enumerate(extras)]
    # All five fit when admitted; at their end they need more blocks than the pool has.
    assert sum(-(-len(job.prompt) // BLOCK_SIZE) for job in jobs) < POOL_BLOCKS - 1
    assert sum(-(-(len(job.prompt) + job.max_tokens) // BLOCK_SIZE) for job in jobs) > POOL_BLOCKS, [
        len(job.prompt) for job in jobs
    ]
    for job in jobs:
        driver.add(job)
    driver.drain()

    assert len(watch.preempted) > preempted, "no preemption: the workload does not fill the pool"
    recompressed = 0
    for job in jobs:
        admissions = watch.admissions[watch.engine_id(job.name)]
        assert driver.outputs[job.name] == _reference_with_recompression(clean, job, admissions), job.name
        if not job.compressed:  # a dense request recomputes exactly: its output is the clean one
            assert driver.outputs[job.name] == clean(job)
        elif len(set(admissions)) > 1:
            geometry = CompressionGeometry(
                num_tokens=max(admissions), block_size=BLOCK_SIZE, window=SETTINGS["window"],
                keep_ratio=(job.extra or {}).get("kv_compression_ratio", SETTINGS["keep_ratio"]),
                num_kv_heads=state.num_kv_heads, num_layers=state.num_layers, policy=state.policy,
                sink_tokens=state.config.sink_tokens,
            )
            if geometry.compresses:
                # Its last compression covered prompt + the outputs it had when it resumed.
                recompressed += 1
                keep = state.recorded_keep_sets[watch.engine_id(job.name)]
                assert keep.shape[-1] == geometry.evictable_tokens
    # At least one compressed request was preempted after decoding and compressed again.
    assert recompressed >= 1, watch.preempted[preempted:]
    _assert_nothing_leaked(engine, start)


# -- requests longer than the model allows (in-process) ------------------------------------
def test_requests_longer_than_the_model_allows(engine, watch, prompts, clean):
    from vllm import SamplingParams

    driver = Driver(engine, watch)
    start = _pool(engine).get_num_free_blocks()
    long_prompt = prompts["long"]
    assert len(long_prompt) > MAX_MODEL_LEN
    for prompt in (long_prompt, long_prompt[:MAX_MODEL_LEN]):  # over the limit; no room for one output token
        with pytest.raises(ValueError, match="maximum (model|context) length"):
            engine.llm_engine.add_request("too-long", {"prompt_token_ids": list(prompt)}, SamplingParams(max_tokens=4))
    assert not engine.llm_engine.has_unfinished_requests()
    assert _pool(engine).get_num_free_blocks() == start

    # At the limit: compressed like any other request, next to a request that is not.
    at_limit = Job("at-limit", long_prompt[: MAX_MODEL_LEN - 8], max_tokens=8)
    other = Job("beside-at-limit", prompts["other_dense"])
    driver.add(at_limit)
    driver.add(other)
    driver.drain()
    assert len(driver.outputs[at_limit.name]) == 8
    assert driver.outputs[other.name] == clean(other)
    assert _manager(engine).total_compressed_requests >= 2
    _assert_nothing_leaked(engine, start)


# -- `vllm serve`: client disconnects, over-long requests ----------------------------------
def _served_prompt(budget: int, seed: int) -> str:
    example = make_example("profile", seed, token_budget=budget)
    return example.context + "\n\n" + example.questions[0].text


def _chat(client, content: str, **kwargs):
    extra_body = {"return_token_ids": True, **kwargs.pop("extra_body", {})}
    return client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": content}], temperature=0, extra_body=extra_body,
        **kwargs,
    )


def _assert_server_holds_nothing(base: str) -> None:
    from vllm_kvzip.eval.server import wait_until_drained

    snapshot = wait_until_drained(base, timeout=120)
    assert snapshot.blocks_in_use == 0, snapshot


def test_client_disconnect_mid_stream(server):
    from openai import OpenAI

    from vllm_kvzip.eval.server import EngineSnapshot, compressions_in_log

    base, log_path = server
    client = OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=300)
    other = _served_prompt(600, 21)
    clean = _chat(client, other, max_tokens=24).choices[0].token_ids
    assert clean

    before = EngineSnapshot.read(base)
    # Disconnects while the request decodes (compressed), and before its first token.
    for request_id, chunks_to_read in (("fault-disconnect-decode", 3), ("fault-disconnect-early", 0)):
        stream = _chat(
            client, _served_prompt(900, 22), max_tokens=400, stream=True,
            extra_body={"ignore_eos": True, "request_id": request_id},
        )
        result: dict = {}
        # The clean request runs next to the stream, and after it is gone.
        beside = threading.Thread(target=lambda: result.update(reply=_chat(client, other, max_tokens=24)))
        received = 0
        for chunk in stream if chunks_to_read else ():
            received += bool(chunk.choices and chunk.choices[0].delta.content)
            if received >= chunks_to_read:
                break
        beside.start()
        stream.close()  # the client goes away: vLLM aborts the request
        beside.join(timeout=300)
        assert result["reply"].choices[0].token_ids == clean
    _assert_server_holds_nothing(base)
    after = EngineSnapshot.read(base)
    # Both streams were cut short: far fewer than their 2 x 400 tokens were generated.
    assert after.generation_tokens - before.generation_tokens < 400
    log = log_path.read_text()
    # The stream cut while decoding had been compressed, and vLLM aborted it.  (Where the
    # early one was cut -- queued, mid-prefill, before reaching the engine -- is up to timing;
    # either way the server holds nothing and generated almost nothing for it.)
    assert "Aborted request(s) chatcmpl-fault-disconnect-decode" in log
    assert any(key.startswith("chatcmpl-fault-disconnect-decode") for key in compressions_in_log(log))


def test_served_requests_longer_than_the_model_allows(server):
    import openai
    from openai import OpenAI

    from tests.conftest import SERVER_MAX_MODEL_LEN

    base, _ = server
    client = OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=300)
    other = _served_prompt(600, 23)
    clean = _chat(client, other, max_tokens=16).choices[0].token_ids
    too_long = _served_prompt(3000, 24)
    for content, max_tokens in ((too_long, 16), (other, SERVER_MAX_MODEL_LEN)):
        with pytest.raises(openai.BadRequestError, match="maximum context length"):
            _chat(client, content, max_tokens=max_tokens)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model="smollm2", prompt=[7] * (SERVER_MAX_MODEL_LEN + 1), max_tokens=4)
    # The server keeps serving, unchanged (a request at the limit: test_requests_longer_than_the_model_allows).
    assert _chat(client, other, max_tokens=16).choices[0].token_ids == clean
    _assert_server_holds_nothing(base)


def test_bad_per_request_settings_in_a_stream_get_http_400(server):
    """A stream with bad vllm_xargs is refused with HTTP 400 before it starts, not with an error
    event inside an HTTP 200 stream; the server keeps serving."""
    import httpx

    base, _ = server
    bodies = {
        "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hi"}]},
        "/v1/completions": {"prompt": "Hi"},
    }
    bad_settings = (({"kv_compression_ratio": 1.5}, "0 < ratio <= 1"), ({"kv_compression": "kvzip"}, "per request"))
    for path, body in bodies.items():
        for bad, fragment in bad_settings:
            request = {"model": "smollm2", "max_tokens": 4, "stream": True, "vllm_xargs": bad, **body}
            response = httpx.post(f"{base}{path}", json=request, timeout=120)
            assert response.status_code == 400, response.text
            assert fragment in response.json()["error"]["message"]
        good = {"model": "smollm2", "max_tokens": 4, "stream": True, "vllm_xargs": {"kv_compression_ratio": 0.5}}
        good.update(body)
        with httpx.stream("POST", f"{base}{path}", json=good, timeout=120) as response:
            assert response.status_code == 200
            events = [line for line in response.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and not any('"error"' in event for event in events)
    _assert_server_holds_nothing(base)
