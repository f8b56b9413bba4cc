"""The transformers path on tiny random Llama and Qwen3 models, against full-attention brute force.

The brute force never uses the capture machinery: it runs the whole sequence
[prefix | context | repeat input] through the model with output_hidden_states,
recomputes every layer's q/k/v from the hidden states (input_layernorm, the
projections, Qwen3's q_norm/k_norm, RoPE) and builds the attention matrices in
float64 with explicit masks.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from tests.scoring.conftest import tiny_model
from vllm_kvzip.config import KVCompressionConfig
from vllm_kvzip.scoring.functional import snapkv_scores
from vllm_kvzip.scoring.hf import KVzipModel, attention_implementation
from vllm_kvzip.scoring.kvzap_model import KVzapSurrogate, ModelShape
from vllm_kvzip.scoring.reconstruction import FIRST_CHUNK_PROMPT, LATER_CHUNK_PROMPT, chunk_spans

ARCHITECTURES = ["llama", "qwen2", "qwen3"]
CONTEXT = "The quick brown fox jumps over the lazy dog near 42 river banks."  # 64 byte-tokens


@pytest.fixture(scope="module", params=ARCHITECTURES)
def kvzip(request, tokenizer):
    model = tiny_model(request.param, len(tokenizer))
    return KVzipModel(model, tokenizer, model_name=f"tiny-{request.param}")


def layer_qkv(model, token_ids: list[int]):
    """Per layer: post-RoPE q [Hq, N, d], k [H, N, d], v [H, N, d] and attention input h [N, D]."""
    ids = torch.tensor([token_ids])
    positions = torch.arange(len(token_ids))[None]
    with torch.no_grad():
        hidden_states = model(ids, position_ids=positions, output_hidden_states=True).hidden_states
        cos, sin = model.model.rotary_emb(hidden_states[0], positions)
        result = []
        for index, layer in enumerate(model.model.layers):
            attention = layer.self_attn
            h = layer.input_layernorm(hidden_states[index])
            head_dim = attention.head_dim
            q = attention.q_proj(h).view(1, len(token_ids), -1, head_dim)
            k = attention.k_proj(h).view(1, len(token_ids), -1, head_dim)
            v = attention.v_proj(h).view(1, len(token_ids), -1, head_dim)
            if hasattr(attention, "q_norm"):
                q, k = attention.q_norm(q), attention.k_norm(k)
            q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            result.append((q[0].double(), k[0].double(), v[0].transpose(0, 1).double(), h[0].double()))
    return result


def brute_force_kvzip(kvzip: KVzipModel, context_ids: list[int], chunk_size: int, plus: bool) -> torch.Tensor:
    model = kvzip.model
    prefix_ids = kvzip.encode(kvzip.template.prefix)
    num_prefix, num_context = len(prefix_ids), len(context_ids)
    num_layers, num_kv_heads = kvzip.shape.num_layers, kvzip.shape.num_kv_heads
    scores = torch.zeros(num_layers, num_kv_heads, num_context, dtype=torch.float64)
    for start, end in chunk_spans(num_context, chunk_size):
        repeat_ids = kvzip.repeat_prompt.input_ids(context_ids, (start, end))
        sequence = prefix_ids + context_ids + repeat_ids
        first_repeat = num_prefix + num_context
        for layer_idx, (q, k, v, h) in enumerate(layer_qkv(model, sequence)):
            num_heads, _, head_dim = q.shape
            group = num_heads // num_kv_heads
            o_proj = model.model.layers[layer_idx].self_attn.o_proj.weight.double()
            for query_head in range(num_heads):
                kv_head = query_head // group
                for row in range(first_repeat, len(sequence)):
                    columns = list(range(num_prefix)) + list(range(num_prefix + start, num_prefix + end)) + list(range(first_repeat, row + 1))
                    logits = k[kv_head, columns] @ q[query_head, row] / head_dim**0.5
                    weights = torch.softmax(logits, dim=0)[num_prefix : num_prefix + end - start]
                    if plus:
                        w_o = o_proj[:, query_head * head_dim : (query_head + 1) * head_dim]
                        value_norms = (v[kv_head, num_prefix + start : num_prefix + end] @ w_o.T).norm(dim=-1)
                        weights = weights * value_norms / h[row].norm()
                    scores[layer_idx, kv_head, start:end] = torch.maximum(scores[layer_idx, kv_head, start:end], weights)
    return scores


@pytest.mark.parametrize("context_length,chunk_size", [(12, 16), (64, 16), (40, 17)])
def test_kvzip_and_kvzip_plus_scores_match_brute_force(kvzip, context_length, chunk_size):
    context_ids = kvzip.encode(CONTEXT * 2)[:context_length]
    kv = kvzip.prefill(context_ids, {"method": "kvzip", "chunk_size": chunk_size}, methods=["kvzip", "kvzip-plus"])
    for method, plus in (("kvzip", False), ("kvzip-plus", True)):
        expected = brute_force_kvzip(kvzip, context_ids, chunk_size, plus)
        torch.testing.assert_close(kv.scores[method].double(), expected, rtol=1e-6, atol=1e-9)


def test_repeat_inputs_follow_the_reference_wording(kvzip):
    context_ids = kvzip.encode(CONTEXT)
    decode = kvzip.tokenizer.decode
    postfix = kvzip.template.postfix
    first = decode(kvzip.repeat_prompt.input_ids(context_ids, (0, 20)))
    assert first == FIRST_CHUNK_PROMPT + postfix + decode(context_ids[:20])
    later = decode(kvzip.repeat_prompt.input_ids(context_ids, (20, 40)))
    assert later == LATER_CHUNK_PROMPT + decode(context_ids[12:20]) + postfix + decode(context_ids[20:40])
    if kvzip.model.config.model_type == "qwen3":
        assert postfix.endswith("<think>\n\n</think>\n\n")


def test_prefill_scorers_see_the_right_tensors(kvzip, tmp_path):
    """SnapKV (last prefill step) and KVzap (every step) against recomputed tensors."""
    context_ids = kvzip.encode(CONTEXT * 2)[:100]
    shape = ModelShape.from_config(kvzip.model.config)
    torch.manual_seed(0)
    surrogate = KVzapSurrogate.for_model(shape, "mlp").double()
    surrogate.save(tmp_path)
    config = KVCompressionConfig(method="kvzap-mlp", chunk_size=32, surrogate=str(tmp_path))
    kv = kvzip.prefill(context_ids, config, methods=["kvzap-mlp", "snapkv"])
    num_prefix = kv.prefix_length
    for layer_idx, (q, k, _, h) in enumerate(layer_qkv(kvzip.model, kv.token_ids)):
        expected_kvzap = surrogate.layers[layer_idx](h[num_prefix:]).T
        torch.testing.assert_close(kv.scores["kvzap-mlp"][layer_idx].double(), expected_kvzap.double(), rtol=1e-5, atol=1e-6)
        grouped = q.reshape(shape.num_kv_heads, -1, q.shape[1], q.shape[2])
        expected_snapkv = snapkv_scores(grouped[:, :, -64:], k, scaling=q.shape[-1] ** -0.5)[:, num_prefix:]
        torch.testing.assert_close(kv.scores["snapkv"][layer_idx].double(), expected_snapkv.double(), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("window, kernel", [(16, 3), (80, 7)])
def test_snapkv_settings_reach_the_scorer(kvzip, window, kernel):
    """snapkv_window / snapkv_kernel; a window longer than a prefill step makes the last step longer."""
    context_ids = kvzip.encode(CONTEXT * 2)[:100]
    kv = kvzip.prefill(context_ids, {"method": "snapkv", "chunk_size": 32, "snapkv_window": window, "snapkv_kernel": kernel})
    num_prefix = kv.prefix_length
    for layer_idx, (q, k, _, _) in enumerate(layer_qkv(kvzip.model, kv.token_ids)):
        grouped = q.reshape(kvzip.shape.num_kv_heads, -1, q.shape[1], q.shape[2])
        expected = snapkv_scores(grouped[:, :, -window:], k, scaling=q.shape[-1] ** -0.5, kernel_size=kernel)[:, num_prefix:]
        torch.testing.assert_close(kv.scores["snapkv"][layer_idx].double(), expected.double(), rtol=1e-5, atol=1e-8)


def test_greedy_output_with_full_ragged_cache_matches_transformers(kvzip):
    kv = kvzip.prefill(CONTEXT * 3, {"method": "kvzip", "chunk_size": 64})
    kv.prune(1.0)
    assert kv.keep_set.mask.all()
    query_ids = kvzip.encode(kvzip.template.query_text("Who jumps?"))
    ours = kvzip.generate_ids(query_ids, kv, max_new_tokens=12)
    full = torch.tensor([kv.token_ids + query_ids])
    reference = kvzip.model.generate(full, attention_mask=torch.ones_like(full), max_new_tokens=12, do_sample=False, eos_token_id=-1, pad_token_id=0)
    expected = reference[0, full.shape[1] :].tolist()
    assert ours == expected[: len(ours)] and len(ours) == 12


def per_head_masked_logits(model, token_ids: list[int], keep: list[torch.Tensor]) -> torch.Tensor:
    """Eager forward where, after the first keep[l].shape[1] (prefilled) tokens, query heads of layer l
    attend only to the prefilled keys that keep[l][kv_head] marks."""
    length = len(token_ids)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    handles = []
    for layer_idx, layer in enumerate(model.model.layers):
        num_kv_heads, prefilled = keep[layer_idx].shape
        group = model.config.num_attention_heads // num_kv_heads
        allowed = causal.expand(model.config.num_attention_heads, length, length).clone()
        # Eviction happens after prefill: only the rows after the prefilled tokens lose keys.
        allowed[:, prefilled:, :prefilled] &= keep[layer_idx].repeat_interleave(group, dim=0)[:, None, :]
        mask = torch.zeros(1, *allowed.shape, dtype=torch.float64).masked_fill(~allowed, float("-inf"))

        def replace_mask(module, args, kwargs, mask=mask):
            kwargs["attention_mask"] = mask
            return args, kwargs

        handles.append(layer.self_attn.register_forward_pre_hook(replace_mask, with_kwargs=True))
    try:
        with attention_implementation(model, "eager"), torch.no_grad():
            return model(torch.tensor([token_ids]), position_ids=torch.arange(length)[None]).logits[0]
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("policy", ["global", "head"])
def test_pruned_cache_really_drops_kv_and_matches_per_head_masking(kvzip, policy):
    config = {"method": "kvzip", "chunk_size": 32, "window": 8, "sink_tokens": 0}
    kv = kvzip.prefill(CONTEXT * 2, config)
    full_bytes = kv.kv_bytes()
    original = [(layer.keys.clone(), layer.positions.clone()) for layer in kv.cache.layers]
    keep_set = kv.prune(0.3, policy=policy)
    # Smaller tensors: each head holds the prefix + its kept context tokens, nothing else.
    assert kv.kv_bytes() < 0.75 * full_bytes
    for layer_idx, layer in enumerate(kv.cache.layers):
        expected_lengths = keep_set.kept_counts[layer_idx] + kv.prefix_length
        assert layer.lengths.tolist() == expected_lengths.tolist()
        assert layer.keys.shape[0] == int(expected_lengths.sum())
        keys_before, positions_before = original[layer_idx]
        total = len(kv.token_ids)
        for head in range(layer.num_kv_heads):
            kept_positions = layer.positions[layer.offsets[head] : layer.offsets[head + 1]]
            full_mask = torch.cat([torch.ones(kv.prefix_length, dtype=torch.bool), keep_set.mask[layer_idx, head]])
            assert kept_positions.tolist() == torch.nonzero(full_mask).flatten().tolist()
            assert torch.equal(layer.head_rows(head)[0], keys_before[head * total : (head + 1) * total][full_mask])
    # Attention over the ragged cache = attention with the evicted keys masked per head.
    query_ids = kvzip.encode(kvzip.template.query_text("Who jumps?"))
    start = len(kv.token_ids)
    with attention_implementation(kvzip.model, "vllm_kvzip_ragged"), torch.no_grad():
        ours = kvzip.model(
            torch.tensor([query_ids]), position_ids=torch.arange(start, start + len(query_ids))[None], past_key_values=kv.cache
        ).logits[0]
    keep = [torch.cat([torch.ones(kvzip.shape.num_kv_heads, kv.prefix_length, dtype=torch.bool), keep_set.mask[layer]], dim=1) for layer in range(kvzip.shape.num_layers)]
    expected = per_head_masked_logits(kvzip.model, kv.token_ids + query_ids, keep)[start:]
    # eager takes its softmax in float32, hence the tolerance.
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    # And pruning is not a no-op: the full cache gives different logits.
    unpruned = per_head_masked_logits(kvzip.model, kv.token_ids + query_ids, [torch.ones_like(mask) for mask in keep])[start:]
    assert not torch.allclose(ours, unpruned, atol=1e-3)


def test_update_cache_semantics(kvzip):
    kv = kvzip.prefill(CONTEXT, {"method": "kvzip", "chunk_size": 32})
    kv.prune(0.5)
    bytes_pruned = kv.kv_bytes()
    first = kvzip.generate("Who?", kv, max_new_tokens=5)
    assert kv.kv_bytes() == bytes_pruned and kv.cache.tail_length == 0
    assert kvzip.generate("Who?", kv, max_new_tokens=5) == first  # stateless reuse
    kvzip.generate("Who?", kv, update_cache=True, max_new_tokens=5)
    assert kv.cache.tail_length > 0 and kv.kv_bytes() > bytes_pruned
    assert len(kv.token_ids) == kv.cache.layers[0].get_seq_length()


def test_pruned_copy_leaves_the_original_untouched(kvzip):
    kv = kvzip.prefill(CONTEXT, {"method": "kvzip", "chunk_size": 32, "window": 4})
    before = kv.kv_bytes()
    smaller = kv.pruned(0.2)
    assert smaller.kv_bytes() < before == kv.kv_bytes()
    assert kv.keep_set is None and smaller.keep_set is not None
