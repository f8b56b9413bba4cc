"""KVzip's reconstruction attention over the paged cache (`vllm_kvzip.backend.reconstruction`).

Checked against brute-force float64 attention and the KVzip definition: the
attention output of the repeat queries over [whole prompt | repeat input
(causal)], the chunk scores of `kvzip_chunk_scores` (softmax over [sink |
chunk | repeat], max over queries and the GQA group, KVzip+ normalisation),
the chunk plan, and that the paged cache is never written.  The CUDA test
(fused SDPA path, bf16) runs only on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from vllm_kvzip.backend.reconstruction import (
    ATTENTION_PATHS,
    ReconstructionMetadata,
    gather_context_kv,
    linear_weight,
    reconstruction_attention,
    repeat_attention,
)
from vllm_kvzip.scoring.functional import output_projection_gram
from vllm_kvzip.scoring.reconstruction import (
    OVERLAP_TOKENS,
    RepeatPrompt,
    prompt_reconstruction_chunks,
    repeat_prompt_overhead,
)

ON_GPU = torch.cuda.is_available()


def _brute_force_output(query, context_keys, context_values, repeat_keys, repeat_values, scale):
    """[q, Hq, d] float64: every query over all context keys and repeat keys 0..i."""
    num_queries, num_heads, _ = query.shape
    num_kv_heads, context_len, _ = context_keys.shape
    group = num_heads // num_kv_heads
    keys = torch.cat([context_keys, repeat_keys.transpose(0, 1)], dim=1).double()
    values = torch.cat([context_values, repeat_values.transpose(0, 1)], dim=1).double()
    out = torch.empty(num_queries, num_heads, query.shape[2], dtype=torch.float64)
    for head in range(num_heads):
        kv = head // group
        logits = query[:, head].double() @ keys[kv].T * scale  # [q, T + q]
        for i in range(num_queries):
            logits[i, context_len + i + 1 :] = float("-inf")
        out[:, head] = logits.softmax(-1) @ values[kv]
    return out


def _paged_cache(keys, values, block_size, num_blocks, generator):
    """A random paged cache holding `keys`/`values` [H, T, d] in shuffled blocks; returns (cache, block ids)."""
    num_kv_heads, length, head_size = keys.shape
    cache = torch.randn(num_blocks, num_kv_heads, block_size, 2 * head_size, generator=generator, dtype=keys.dtype)
    needed = -(-length // block_size)
    block_ids = torch.randperm(num_blocks, generator=generator)[:needed]
    for logical, block in enumerate(block_ids.tolist()):
        part = slice(logical * block_size, min(length, (logical + 1) * block_size))
        rows = part.stop - part.start
        cache[block, :, :rows, :head_size] = keys[:, part]
        cache[block, :, :rows, head_size:] = values[:, part]
    return cache, block_ids


@pytest.mark.parametrize("max_logits", [None, 1, 200])
def test_repeat_attention_matches_brute_force(max_logits):
    generator = torch.Generator().manual_seed(0)
    num_queries, num_heads, num_kv_heads, head_size, context_len = 11, 6, 2, 16, 37
    query = torch.randn(num_queries, num_heads, head_size, generator=generator)
    context_keys = torch.randn(num_kv_heads, context_len, head_size, generator=generator)
    context_values = torch.randn(num_kv_heads, context_len, head_size, generator=generator)
    repeat_keys = torch.randn(num_queries, num_kv_heads, head_size, generator=generator)
    repeat_values = torch.randn(num_queries, num_kv_heads, head_size, generator=generator)
    got = repeat_attention(
        query, context_keys, context_values, repeat_keys, repeat_values, 0.25, max_logits=max_logits
    )
    expected = _brute_force_output(query, context_keys, context_values, repeat_keys, repeat_values, 0.25)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_gather_context_kv_reads_the_request_blocks_in_order():
    generator = torch.Generator().manual_seed(1)
    keys = torch.randn(3, 45, 8, generator=generator)
    values = torch.randn(3, 45, 8, generator=generator)
    cache, block_ids = _paged_cache(keys, values, block_size=16, num_blocks=9, generator=generator)
    got_keys, got_values = gather_context_kv(cache, torch.cat([block_ids, torch.tensor([0, 0])]), 45)
    assert torch.equal(got_keys, keys) and torch.equal(got_values, values)


def _layer_case(generator, *, plus: bool):
    num_heads, num_kv_heads, head_size, context_len, num_queries = 6, 2, 16, 53, 13
    hidden_size = 24
    keys = torch.randn(num_kv_heads, context_len, head_size, generator=generator)
    values = torch.randn(num_kv_heads, context_len, head_size, generator=generator)
    cache, block_ids = _paged_cache(keys, values, block_size=8, num_blocks=12, generator=generator)
    query = torch.randn(num_queries, num_heads, head_size, generator=generator)
    key = torch.randn(num_queries, num_kv_heads, head_size, generator=generator)
    value = torch.randn(num_queries, num_kv_heads, head_size, generator=generator)
    weight = torch.randn(hidden_size, num_heads * head_size, generator=generator)
    norms = torch.rand(num_queries, generator=generator) + 0.5
    scores = torch.full((2, num_kv_heads, 40), float("inf"))
    metadata = ReconstructionMetadata(
        num_tokens=num_queries,
        block_ids=block_ids,
        context_len=context_len,
        span=(20, 40),
        sink=(0, 4),
        scores=scores,
        layer_index={"layer.0": 0, "layer.1": 1},
        plus=plus,
        o_proj_grams={"layer.1": output_projection_gram(weight, num_kv_heads, num_heads // num_kv_heads)} if plus else None,
        hidden_norms={"layer.1": norms} if plus else {},
    )
    return cache, keys, values, query, key, value, weight, norms, metadata


@pytest.mark.parametrize("plus", [False, True])
def test_reconstruction_attention_output_scores_and_no_cache_write(plus):
    from vllm_kvzip.scoring.functional import KVzipPlusTerms, kvzip_chunk_scores

    generator = torch.Generator().manual_seed(2)
    cache, keys, values, query, key, value, weight, norms, metadata = _layer_case(generator, plus=plus)
    before = cache.clone()
    output = torch.zeros_like(query)
    reconstruction_attention("layer.1", query, key, value, cache, metadata, 0.25, output)

    assert torch.equal(cache, before), "the reconstruction pass wrote into the paged cache"
    expected = _brute_force_output(query, keys, values, key, value, 0.25)
    torch.testing.assert_close(output.double(), expected, rtol=1e-5, atol=1e-6)
    num_kv_heads = keys.shape[0]
    grouped = query.transpose(0, 1).reshape(num_kv_heads, -1, query.shape[0], query.shape[2])
    terms = KVzipPlusTerms(values[:, 20:40], weight, norms) if plus else None
    expected_scores = kvzip_chunk_scores(
        grouped, keys[:, :4], keys[:, 20:40], key.transpose(0, 1), scaling=0.25, plus=terms
    )
    torch.testing.assert_close(metadata.scores[1, :, 20:40], expected_scores, rtol=1e-5, atol=1e-7)
    # Only this layer's chunk columns were written.
    assert torch.isinf(metadata.scores[0]).all() and torch.isinf(metadata.scores[1, :, :20]).all()
    assert metadata.layers_done == {"layer.1"}
    # A KVzip (not plus) score is an attention weight: in (0, 1].
    if not plus:
        assert torch.all((expected_scores > 0) & (expected_scores <= 1))


def test_linear_weight_reads_the_matrix_through_the_layer():
    generator = torch.Generator().manual_seed(6)
    weight = torch.randn(5, 12, generator=generator)
    bias = torch.randn(5, generator=generator)

    class QuantMethod:  # vLLM's linear layers: quant_method.apply(layer, x, bias), forward -> (out, bias)
        def apply(self, layer, x, bias=None):
            return torch.nn.functional.linear(x, layer.packed, bias)

    class VLLMLinear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.packed = torch.nn.Parameter(weight.clone(), requires_grad=False)
            self.bias = torch.nn.Parameter(bias.clone(), requires_grad=False)
            self.quant_method = QuantMethod()

        def forward(self, x):
            return self.quant_method.apply(self, x, self.bias), None

    assert torch.equal(linear_weight(VLLMLinear(), 12), weight)
    plain = torch.nn.Linear(12, 5, bias=False)
    assert torch.equal(linear_weight(plain, 12), plain.weight.detach())
    with_bias = torch.nn.Linear(12, 5)
    torch.testing.assert_close(linear_weight(with_bias, 12), with_bias.weight.detach())


def test_kvzip_plus_without_recorded_norms_fails_loudly():
    generator = torch.Generator().manual_seed(3)
    cache, _, _, query, key, value, _, _, metadata = _layer_case(generator, plus=True)
    metadata.hidden_norms.clear()
    with pytest.raises(RuntimeError, match="norms"):
        reconstruction_attention("layer.1", query, key, value, cache, metadata, 0.25, torch.zeros_like(query))


def test_prompt_reconstruction_chunks_follow_the_reference_layout():
    prompt = RepeatPrompt(first_prompt_ids=(901, 902), later_prompt_ids=(903, 904, 905), postfix_ids=(906,))
    token_ids = list(range(1000, 1100))
    chunks = prompt_reconstruction_chunks(token_ids, 100, 74, sink_tokens=4, chunk_size=30, repeat_prompt=prompt)
    assert [chunk.span for chunk in chunks] == [(4, 34), (34, 64), (64, 74)]
    assert all(chunk.sink == (0, 4) and chunk.start_position == 100 for chunk in chunks)
    assert list(chunks[0].input_ids) == [901, 902, 906] + token_ids[4:34]
    overlap = token_ids[34 - OVERLAP_TOKENS : 34]
    assert list(chunks[1].input_ids) == [903, 904, 905] + overlap + [906] + token_ids[34:64]
    assert max(len(chunk.input_ids) for chunk in chunks) <= 30 + repeat_prompt_overhead(prompt)
    # Beyond the RoPE table the repeat input moves back to end at its last position.
    clipped = prompt_reconstruction_chunks(token_ids, 100, 74, 4, 30, prompt, max_positions=125)
    assert [chunk.start_position + len(chunk.input_ids) for chunk in clipped] == [125, 125, 100 + 3 + 8 + 1 + 10]
    # No sinks: the context starts at position 0.
    assert prompt_reconstruction_chunks(token_ids, 100, 74, 0, 100, prompt)[0].span == (0, 74)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="the fused SDPA path runs on a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_reconstruction_attention_on_cuda_matches_the_cpu_path(dtype):
    generator = torch.Generator().manual_seed(4)
    num_queries, num_heads, num_kv_heads, head_size, context_len = 300, 32, 8, 128, 5000
    query = torch.randn(num_queries, num_heads, head_size, generator=generator)
    context_keys = torch.randn(num_kv_heads, context_len, head_size, generator=generator)
    context_values = torch.randn(num_kv_heads, context_len, head_size, generator=generator)
    repeat_keys = torch.randn(num_queries, num_kv_heads, head_size, generator=generator)
    repeat_values = torch.randn(num_queries, num_kv_heads, head_size, generator=generator)
    inputs = [t.to(dtype) for t in (query, context_keys, context_values, repeat_keys, repeat_values)]
    expected = repeat_attention(*[t.float() for t in inputs], head_size**-0.5)
    cuda_inputs = [t.cuda() for t in inputs]
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    ATTENTION_PATHS.clear()
    got = repeat_attention(*cuda_inputs, head_size**-0.5)
    tolerance = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.float().cpu(), expected, **tolerance)
    if dtype == torch.bfloat16:
        # One fused kernel: no [Hq, q, T + q] logits in memory (they alone would take ~100 MiB here).
        assert ATTENTION_PATHS == {"fused": 1}
        logits_bytes = num_heads * num_queries * (context_len + num_queries) * 2
        assert torch.cuda.max_memory_allocated() - baseline < logits_bytes / 2
    else:
        assert ATTENTION_PATHS == {"blocks": 1}

    # The whole layer (paged gather, output, KVzip+ scores) on CUDA equals the CPU computation.
    for plus in (False, True):
        cache, _, _, q, k, v, _, _, metadata = _layer_case(torch.Generator().manual_seed(5), plus=plus)
        cpu_out = torch.zeros_like(q)
        reconstruction_attention("layer.1", q, k, v, cache, metadata, 0.25, cpu_out)
        cuda_case = _layer_case(torch.Generator().manual_seed(5), plus=plus)
        cache, _, _, q, k, v, _, _, cuda_metadata = cuda_case
        cuda_metadata.block_ids = cuda_metadata.block_ids.cuda()
        cuda_metadata.scores = cuda_metadata.scores.cuda()
        if plus:
            cuda_metadata.o_proj_grams = {name: g.cuda() for name, g in cuda_metadata.o_proj_grams.items()}
            cuda_metadata.hidden_norms = {name: n.cuda() for name, n in cuda_metadata.hidden_norms.items()}
        cuda_out = torch.zeros_like(q).cuda()
        reconstruction_attention("layer.1", q.cuda(), k.cuda(), v.cuda(), cache.cuda(), cuda_metadata, 0.25, cuda_out)
        torch.testing.assert_close(cuda_out.cpu(), cpu_out, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(cuda_metadata.scores.cpu(), metadata.scores, rtol=1e-4, atol=1e-6)
