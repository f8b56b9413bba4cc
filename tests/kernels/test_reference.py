"""The torch reference (also the CPU production path) against brute force."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.ragged_cases import (
    RowSpec,
    brute_force_decode_attention,
    brute_force_head_kv,
    make_ragged_batch,
)
from vllm_kvzip.backend.ops import (
    compact_kv,
    compact_kv_ref,
    gather_head_kv,
    ragged_attention_ref,
    ragged_decode_attention,
    ragged_decode_attention_ref,
)

MIXED_ROWS = [
    RowSpec(kept_len=[0, 1, 32, 45], dense_len=21),  # empty, single, full pages, partial page
    RowSpec(kept_len=[0, 0, 0, 0], dense_len=37),  # uncompressed
    RowSpec(kept_len=[17, 3, 64, 8], dense_len=1),  # dense part is just the decode token
    RowSpec(kept_len=[150, 90, 5, 130], dense_len=40),  # longer heads, several chunks
]


@pytest.mark.parametrize("group", [1, 4])
def test_gather_head_kv_matches_token_walk(group: int) -> None:
    batch = make_ragged_batch(MIXED_ROWS, num_kv_heads=4, group=group, head_size=16, dtype=torch.float32, seed=1)
    for row in range(len(MIXED_ROWS)):
        for head in range(4):
            keys, values = gather_head_kv(
                batch.kv_cache, batch.block_table[row], int(batch.seq_lens[row]), int(batch.dense_start[row]),
                batch.kept_len[row, 0], batch.page_start[row, 0], head, layer=0, num_layers=1,
            )
            expected_keys, expected_values = brute_force_head_kv(batch, row, head)
            assert keys.shape == expected_keys.shape
            assert torch.equal(keys, expected_keys) and torch.equal(values, expected_values)
            assert not torch.isnan(keys).any(), "gathered a slot outside the head's sequence"


@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("head_size", [64, 128])
@pytest.mark.parametrize("chunk_tokens", [32, 1024])
def test_decode_reference_matches_brute_force(group: int, head_size: int, chunk_tokens: int) -> None:
    batch = make_ragged_batch(MIXED_ROWS, num_kv_heads=4, group=group, head_size=head_size, dtype=torch.float32, seed=2)
    query_start_loc = torch.arange(len(MIXED_ROWS) + 1, dtype=torch.int32)
    out = ragged_attention_ref(
        batch.query, query_start_loc, batch.kv_cache, batch.block_table, batch.seq_lens, batch.dense_start,
        batch.kept_len[:, 0], batch.page_start[:, 0], batch.scale, chunk_tokens=chunk_tokens, **batch.layout(),
    )
    expected = brute_force_decode_attention(batch)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    # the batched decode path (all rows at once), with chunks that split pages and heads
    batched = ragged_decode_attention_ref(*batch.args(), chunk_tokens=chunk_tokens - 7, **batch.layout())
    torch.testing.assert_close(batched.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_reference_low_precision(dtype: torch.dtype) -> None:
    batch = make_ragged_batch(MIXED_ROWS, num_kv_heads=4, group=2, head_size=64, dtype=dtype, seed=3)
    out = ragged_decode_attention_ref(*batch.args(), **batch.layout())
    assert out.dtype == dtype
    expected = brute_force_decode_attention(batch)  # float64 on the same rounded inputs
    tol = 2e-3 if dtype == torch.float16 else 1.6e-2
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)


def test_empty_head_gives_zero_not_nan() -> None:
    rows = [RowSpec(kept_len=[0, 5], dense_len=0), RowSpec(kept_len=[0, 0], dense_len=0)]
    batch = make_ragged_batch(rows, num_kv_heads=2, group=2, head_size=16, dtype=torch.float32, seed=4)
    out = ragged_decode_attention_ref(*batch.args(), **batch.layout())
    assert not torch.isnan(out).any()
    assert torch.all(out[0, :2] == 0) and torch.all(out[1] == 0)
    torch.testing.assert_close(out.double(), brute_force_decode_attention(batch))
    assert out[0, 2:].abs().sum() > 0


@pytest.mark.parametrize("q_lens", [[3, 4, 2], [1, 3, 1], [1, 1, 1]])
def test_multi_query_reference_is_causal_over_dense_tail(q_lens: list[int]) -> None:
    """Several query tokens per row: token i sees all ragged keys and dense keys up to its position.

    Mixed with one-token rows, which take the batched decode path.
    """
    rows = [RowSpec(kept_len=[7, 0, 33], dense_len=5), RowSpec(kept_len=[0, 0, 0], dense_len=9), RowSpec(kept_len=[40, 2, 16], dense_len=2)]
    num_kv_heads, group, head_size = 3, 2, 32
    batch = make_ragged_batch(rows, num_kv_heads=num_kv_heads, group=group, head_size=head_size, dtype=torch.float32, seed=5)
    starts = [0]
    for q_len in q_lens:
        starts.append(starts[-1] + q_len)
    query_start_loc = torch.tensor(starts, dtype=torch.int32)
    query = torch.randn(starts[-1], num_kv_heads * group, head_size, generator=torch.Generator().manual_seed(6))
    out = ragged_attention_ref(
        query, query_start_loc, batch.kv_cache, batch.block_table, batch.seq_lens, batch.dense_start,
        batch.kept_len[:, 0], batch.page_start[:, 0], batch.scale, **batch.layout(),
    )
    for row, q_len in enumerate(q_lens):
        seq_len = int(batch.seq_lens[row])
        for head in range(num_kv_heads):
            keys, values = brute_force_head_kv(batch, row, head)
            kept = int(batch.kept_len[row, 0, head])
            for i in range(q_len):
                # dense keys up to logical position seq_len - q_len + i are visible
                visible = kept + (seq_len - q_len + i) - int(batch.dense_start[row]) + 1
                for q_head in range(head * group, (head + 1) * group):
                    q = query[starts[row] + i, q_head].double()
                    weights = torch.softmax((keys[:visible].double() @ q) * batch.scale, dim=0)
                    expected = weights @ values[:visible].double()
                    torch.testing.assert_close(out[starts[row] + i, q_head].double(), expected, atol=1e-5, rtol=1e-5)


def test_dispatch_uses_reference_on_cpu() -> None:
    batch = make_ragged_batch(MIXED_ROWS[:2], num_kv_heads=4, group=1, head_size=16, dtype=torch.float32, seed=7)
    out = torch.full_like(batch.query, float("nan"))
    result = ragged_decode_attention(*batch.args(), out=out, **batch.layout())
    assert result is out
    torch.testing.assert_close(out, ragged_decode_attention_ref(*batch.args(), **batch.layout()), atol=0, rtol=0)


def test_compact_reference_overlapping_shift() -> None:
    """Compaction that shifts rows toward the front over themselves (the in-place case)."""
    kv_cache = torch.randn(2, 2, 16, 8)
    before = kv_cache.clone().view(-1, 8)
    src = torch.tensor([3, 4, 5, 6, 7, 20, 21], dtype=torch.int64)
    dst = torch.tensor([0, 1, 2, 3, 4, 5, 6], dtype=torch.int64)
    compact_kv_ref(kv_cache, src, dst)
    after = kv_cache.view(-1, 8)
    expected = before.clone()
    expected[dst] = before[src]
    assert torch.equal(after, expected)
    # and the public entry point dispatches to it on CPU
    kv_cache2 = before.clone().view(2, 2, 16, 8)
    compact_kv(kv_cache2, src, dst)
    assert torch.equal(kv_cache2.view(-1, 8), expected)


# ---- the whole cache of several layers, head pages packed across layers ---------------
# L = 3, H = 2, block size 16: a container holds 2 pages and a block 6 (2 per layer share).
# Packed in pair order, the pages of row 0 land as follows (container c = layer c % 3's share
# of logical block c // 3):
#   (0, 0) 17 tokens: pages 0-1, container 0 (layer 0's share of block 0), the second page holds 1 token
#   (0, 1)  1 token : page 2, container 1: layer 0's head lives in layer 1's share
#   (1, 0) 48 tokens: pages 3-5, exactly full, across containers 1 and 2 (a container boundary)
#   (1, 1)  0 tokens: no page
#   (2, 0) 32 tokens: pages 6-7, container 3 = layer 0's share of block 1 (a block boundary)
#   (2, 1) 33 tokens: pages 8-10, containers 4 and 5 (layer 1's and layer 2's shares of block 1)
CROSS_LAYER_ROWS = [
    RowSpec(kept_len=[[17, 1], [48, 0], [32, 33]], dense_len=21),
    RowSpec(kept_len=[[0, 0], [0, 0], [0, 0]], dense_len=37),  # uncompressed
    RowSpec(kept_len=[[5, 64], [0, 1], [90, 16]], dense_len=1),
]


def test_cross_layer_layout_spans_containers_layers_and_blocks() -> None:
    batch = make_ragged_batch(CROSS_LAYER_ROWS, num_kv_heads=2, group=2, head_size=16, dtype=torch.float32, seed=8,
                              num_layers=3, packed=True)
    assert batch.page_start[0].tolist() == [[0, 2], [3, 6], [6, 8]]
    assert int(batch.dense_start[0]) == 2 * 16  # 11 pages: 2 blocks of 6
    for layer in range(3):
        expected = brute_force_decode_attention(batch, layer)
        out = ragged_decode_attention_ref(*batch.args(layer), **batch.layout(layer))
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
        assert not torch.isnan(out).any()


@pytest.mark.parametrize("num_layers", [2, 3])
@pytest.mark.parametrize("chunk_tokens", [16, 1024])
def test_multi_layer_reference_matches_brute_force(num_layers: int, chunk_tokens: int) -> None:
    generator = torch.Generator().manual_seed(num_layers)
    rows = []
    for dense_len in (21, 37, 1, 40):
        kept = torch.randint(0, 70, (num_layers, 4), generator=generator)
        kept[torch.rand(num_layers, 4, generator=generator) < 0.2] = 0
        kept[torch.rand(num_layers, 4, generator=generator) < 0.1] = 1
        rows.append(RowSpec(kept_len=kept.tolist(), dense_len=dense_len))
    batch = make_ragged_batch(rows, num_kv_heads=4, group=2, head_size=16, dtype=torch.float32, seed=9, num_layers=num_layers)
    query_start_loc = torch.arange(len(rows) + 1, dtype=torch.int32)
    for layer in range(num_layers):
        expected = brute_force_decode_attention(batch, layer)
        out = ragged_attention_ref(
            batch.query, query_start_loc, batch.kv_cache, batch.block_table, batch.seq_lens, batch.dense_start,
            batch.kept_len[:, layer], batch.page_start[:, layer], batch.scale, chunk_tokens=chunk_tokens,
            **batch.layout(layer),
        )
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
        for row in range(len(rows)):
            for head in range(4):
                keys, values = gather_head_kv(
                    batch.kv_cache, batch.block_table[row], int(batch.seq_lens[row]), int(batch.dense_start[row]),
                    batch.kept_len[row, layer], batch.page_start[row, layer], head, **batch.layout(layer),
                )
                expected_keys, expected_values = brute_force_head_kv(batch, row, head, layer)
                assert torch.equal(keys, expected_keys) and torch.equal(values, expected_values)


def test_multi_layer_multi_query_rows_see_their_own_layer_tail() -> None:
    """A prefill-like row (several queries) of layer 1 reads layer 1's dense tail and its pages in other shares."""
    rows = [RowSpec(kept_len=[[7, 0], [33, 2]], dense_len=5), RowSpec(kept_len=[[0, 40], [16, 0]], dense_len=3)]
    batch = make_ragged_batch(rows, num_kv_heads=2, group=1, head_size=16, dtype=torch.float32, seed=10, num_layers=2)
    q_lens = [3, 1]
    query_start_loc = torch.tensor([0, 3, 4], dtype=torch.int32)
    query = torch.randn(4, 2, 16, generator=torch.Generator().manual_seed(11))
    layer = 1
    out = ragged_attention_ref(
        query, query_start_loc, batch.kv_cache, batch.block_table, batch.seq_lens, batch.dense_start,
        batch.kept_len[:, layer], batch.page_start[:, layer], batch.scale, **batch.layout(layer),
    )
    for row, q_len in enumerate(q_lens):
        seq_len = int(batch.seq_lens[row])
        for head in range(2):
            keys, values = brute_force_head_kv(batch, row, head, layer)
            kept = int(batch.kept_len[row, layer, head])
            for i in range(q_len):
                visible = kept + (seq_len - q_len + i) - int(batch.dense_start[row]) + 1
                q = query[int(query_start_loc[row]) + i, head].double()
                weights = torch.softmax((keys[:visible].double() @ q) * batch.scale, dim=0)
                torch.testing.assert_close(out[int(query_start_loc[row]) + i, head].double(), weights @ values[:visible].double(),
                                           atol=1e-5, rtol=1e-5)
