"""Triton ragged decode attention equals the torch reference.

Without a GPU these run through TRITON_INTERPRET=1 (see conftest.py) on small
shapes; `tile_tokens=16, min_tiles_per_split=1` workspaces make short
sequences span many tiles and splits.  Large shapes run only on CUDA.
"""

from __future__ import annotations

import pytest
import torch

from tests.kernels.ragged_cases import RowSpec, brute_force_decode_attention, make_ragged_batch, tolerance
from vllm_kvzip.backend.ops import RaggedDecodeWorkspace, ragged_decode_attention, ragged_decode_attention_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = torch.cuda.is_available()

# How the splits of a (row, head) are merged: a second kernel launched normally, the same kernel
# as a programmatic dependent launch (Hopper and newer), or the last split merging (fused_merge).
ON_HOPPER = ON_GPU and torch.cuda.get_device_capability()[0] >= 9
MERGE_MODES = {
    "merge_kernel": dict(dependent_launch=False),
    **({
        "dependent_launch": dict(dependent_launch=True),
        "dependent_launch_after_loop": dict(dependent_launch=True, dependent_launch_trigger="after_loop"),
    } if ON_HOPPER else {}),
    "fused": dict(fused_merge=True),
    "nearest_split": dict(split_rounding="nearest"),  # not a merge mode: the split plan both kernels share
}

# One batch mixing every edge case of the brief.
MIXED_ROWS_4_HEADS = [
    RowSpec(kept_len=[0, 1, 32, 45], dense_len=21),  # a head keeping 0, one keeping 1, full pages, partial page
    RowSpec(kept_len=[0, 0, 0, 0], dense_len=37),  # uncompressed row
    RowSpec(kept_len=[17, 3, 64, 8], dense_len=1),  # dense part is a single token
    RowSpec(kept_len=[150, 90, 5, 131], dense_len=40),  # long heads spanning many tiles / splits
]


def run_triton(batch, workspace: RaggedDecodeWorkspace, num_splits: int | None, layer: int = 0) -> torch.Tensor:
    out = torch.full_like(batch.query, float("nan"))  # poisoned: every element must be written
    result = ragged_decode_attention(
        *batch.args(layer), out=out, workspace=workspace, use_triton=True, num_splits=num_splits, **batch.layout(layer)
    )
    assert result is out
    return out


def small_workspace(
    batch, max_num_splits: int = 8, tile_tokens: int = 16, min_tiles_per_split: int = 1, fused_merge: bool = False,
    split_rounding: str = "up",
) -> RaggedDecodeWorkspace:
    num_rows, num_q_heads, head_size = batch.query.shape
    return RaggedDecodeWorkspace(
        num_rows, num_q_heads, head_size, max_num_splits=max_num_splits, device=DEVICE,
        tile_tokens=tile_tokens, min_tiles_per_split=min_tiles_per_split,
        max_partial_slots=num_rows * max_num_splits, fused_merge=fused_merge, split_rounding=split_rounding,
    )


def assert_matches_reference(batch, out: torch.Tensor, layer: int = 0) -> None:
    expected = ragged_decode_attention_ref(*batch.args(layer), **batch.layout(layer))
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.float(), expected.float(), **tolerance(batch.query.dtype))


@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("head_size", [64, 128])
@pytest.mark.parametrize("num_splits", [1, 5])
def test_mixed_batch_gqa_and_head_sizes(group: int, head_size: int, num_splits: int) -> None:
    batch = make_ragged_batch(MIXED_ROWS_4_HEADS, num_kv_heads=4, group=group, head_size=head_size, dtype=torch.float16, device=DEVICE, seed=10 + group)
    out = run_triton(batch, small_workspace(batch), num_splits)
    assert_matches_reference(batch, out)


@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("num_splits", [1, 5, 8])
def test_fused_merge_last_split_merges(group: int, num_splits: int) -> None:
    """fused_merge: the last split of each (row, head) merges (no second kernel); heads that keep
    0 or 1 token, empty heads and rows, and the counters back at zero for the next launch."""
    rows = MIXED_ROWS_4_HEADS + [RowSpec(kept_len=[0, 0, 0, 0], dense_len=0), RowSpec(kept_len=[0, 7, 0, 0], dense_len=0)]
    batch = make_ragged_batch(rows, num_kv_heads=4, group=group, head_size=64, dtype=torch.float16, device=DEVICE, seed=15 + group)
    workspace = small_workspace(batch, fused_merge=True)
    for _ in range(2):  # the second launch relies on the first one's reset counters
        out = run_triton(batch, workspace, num_splits)
        assert_matches_reference(batch, out)
        assert torch.all(out[4] == 0) and torch.all(out[5, :group] == 0)
        assert int(workspace.arrival_count.abs().sum()) == 0


@pytest.mark.parametrize("num_splits", [3, 8])
@pytest.mark.parametrize("min_tiles_per_split", [1, 2])
def test_split_rounding_to_nearest(num_splits: int, min_tiles_per_split: int) -> None:
    """split_rounding="nearest": shorter splits where rounding up would lengthen them, on every
    edge case of the mixed batch plus empty heads and rows; both kernels follow the same plan."""
    rows = MIXED_ROWS_4_HEADS + [RowSpec(kept_len=[0, 0, 0, 0], dense_len=0), RowSpec(kept_len=[0, 7, 0, 0], dense_len=0)]
    batch = make_ragged_batch(rows, num_kv_heads=4, group=2, head_size=64, dtype=torch.float16, device=DEVICE, seed=17)
    workspace = small_workspace(batch, min_tiles_per_split=min_tiles_per_split, split_rounding="nearest")
    out = run_triton(batch, workspace, num_splits)
    assert_matches_reference(batch, out)
    assert torch.all(out[4] == 0) and torch.all(out[5, :2] == 0)
    with pytest.raises(ValueError, match=r"split_rounding must be one of \['up', 'nearest'\]"):
        small_workspace(batch, split_rounding="down")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes(dtype: torch.dtype) -> None:
    batch = make_ragged_batch(MIXED_ROWS_4_HEADS, num_kv_heads=4, group=2, head_size=64, dtype=dtype, device=DEVICE, seed=20)
    out = run_triton(batch, small_workspace(batch), 3)
    assert out.dtype == dtype
    assert_matches_reference(batch, out)
    # and the reference itself against float64 brute force, so both are pinned
    if dtype == torch.float32:
        torch.testing.assert_close(out.double().cpu(), brute_force_decode_attention(batch), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("tile_tokens", [64, 128])
@pytest.mark.parametrize("num_splits", [1, 2, 8])
def test_production_tiles_and_split_plan(tile_tokens: int, num_splits: int) -> None:
    """The production tiles (64 / 128 tokens, >= 4 tiles per split) on heads of a few hundred tokens."""
    rows = [
        RowSpec(kept_len=[300, 0], dense_len=70),
        RowSpec(kept_len=[0, 0], dense_len=200),
        RowSpec(kept_len=[64, 1100], dense_len=1),
    ]
    batch = make_ragged_batch(rows, num_kv_heads=2, group=4, head_size=64, dtype=torch.float16, device=DEVICE, seed=30)
    workspace = RaggedDecodeWorkspace(3, 8, 64, max_num_splits=8, device=DEVICE, max_partial_slots=24, tile_tokens=tile_tokens)
    assert_matches_reference(batch, run_triton(batch, workspace, num_splits))


def test_many_splits_long_head() -> None:
    """A head far longer than the others, spread over every split of the grid."""
    rows = [RowSpec(kept_len=[611, 2], dense_len=129)]
    batch = make_ragged_batch(rows, num_kv_heads=2, group=2, head_size=64, dtype=torch.float16, device=DEVICE, seed=40)
    workspace = small_workspace(batch, max_num_splits=16)
    assert_matches_reference(batch, run_triton(batch, workspace, 16))


@pytest.mark.parametrize("num_splits", [1, 4])
def test_empty_heads_and_rows_give_zero(num_splits: int) -> None:
    rows = [
        RowSpec(kept_len=[0, 5], dense_len=0),  # head 0 sees no key at all
        RowSpec(kept_len=[0, 0], dense_len=0),  # fully empty row
        RowSpec(kept_len=[3, 0], dense_len=2),
    ]
    batch = make_ragged_batch(rows, num_kv_heads=2, group=2, head_size=64, dtype=torch.float16, device=DEVICE, seed=50)
    out = run_triton(batch, small_workspace(batch), num_splits)
    assert not torch.isnan(out).any()
    assert torch.all(out[0, :2] == 0) and torch.all(out[1] == 0)
    assert_matches_reference(batch, out)


def test_workspace_reused_across_batches_and_block_size_32() -> None:
    """One workspace (as under CUDA graphs) serves batches of different sizes; block_size 32."""
    workspace = RaggedDecodeWorkspace(
        4, 8, 64, max_num_splits=4, device=DEVICE, tile_tokens=32, min_tiles_per_split=1, max_partial_slots=16
    )
    for seed, rows in enumerate([
        [RowSpec(kept_len=[40, 100], dense_len=33), RowSpec(kept_len=[0, 0], dense_len=65)],
        [RowSpec(kept_len=[1, 64], dense_len=1)],
    ]):
        batch = make_ragged_batch(rows, num_kv_heads=2, group=4, head_size=64, block_size=32, dtype=torch.float16, device=DEVICE, seed=60 + seed)
        assert_matches_reference(batch, run_triton(batch, workspace, 4))


def test_dependent_launch_only_where_supported() -> None:
    """The merge kernel is launched normally unless a dependent launch is asked for (measured slower
    where the kernel is nearest FA3); asking for it where it is unsupported is an error that names
    the option, not a silent normal launch."""
    assert RaggedDecodeWorkspace(2, 4, 64, device="cpu").dependent_launch is False
    with pytest.raises(ValueError, match="dependent_launch=True needs a CUDA device of compute capability >= 9.0"):
        RaggedDecodeWorkspace(2, 4, 64, device="cpu", dependent_launch=True)
    with pytest.raises(ValueError, match=r"dependent_launch_trigger must be one of \['start', 'after_loop'\]"):
        RaggedDecodeWorkspace(2, 4, 64, device="cpu", dependent_launch_trigger="end")
    if ON_GPU:
        assert RaggedDecodeWorkspace(2, 4, 64, device=DEVICE).dependent_launch is False
    if ON_HOPPER:
        assert RaggedDecodeWorkspace(2, 4, 64, device=DEVICE, dependent_launch=True).dependent_launch is True


def test_workspace_rejects_too_many_rows_or_splits() -> None:
    batch = make_ragged_batch([RowSpec([1, 1], 1)] * 3, num_kv_heads=2, group=1, head_size=64, dtype=torch.float16, device=DEVICE, seed=70)
    workspace = RaggedDecodeWorkspace(2, 2, 64, device=DEVICE)
    with pytest.raises(ValueError, match="workspace"):
        run_triton(batch, workspace, 1)
    workspace = RaggedDecodeWorkspace(3, 2, 64, device=DEVICE, max_partial_slots=6)
    with pytest.raises(ValueError, match="partial slots"):
        run_triton(batch, workspace, 3)


def test_split_grid_shrinks_with_batch() -> None:
    """Default split plan: grid from shapes only, one split for large batches, scratch sized for the worst shape."""
    workspace = RaggedDecodeWorkspace(256, 32, 128, device=DEVICE, num_kv_heads=8, target_programs_per_sm=2)
    workspace.num_sms = 132  # as on an H100, whatever runs the test
    assert workspace.split_grid(1, 8) == (33, 66)
    assert workspace.split_grid(16, 8) == (3, 6)
    assert workspace.split_grid(33, 8) == (1, 1)
    workspace.max_num_splits = 16
    assert workspace.split_grid(1, 8) == (16, 16)
    worst = max(rows * workspace.split_grid(rows, 8)[1] for rows in range(1, 257))
    assert worst <= 2 * 2 * 132 + 2 * 256  # a few hundred slots, not rows * max_num_splits
    # The default, regime-dependent plan (see the tuning notes in decode_attention.py).
    workspace = RaggedDecodeWorkspace(256, 32, 128, device=DEVICE, num_kv_heads=8)
    workspace.num_sms = 132
    assert workspace.split_grid(1, 8) == (33, 66) and workspace.launch_config(1, 8) == (64, 4, 3)
    assert workspace.split_grid(16, 8) == (4, 8) and workspace.launch_config(16, 8) == (64, 4, 2)
    assert workspace.split_grid(64, 8) == (2, 4) and workspace.launch_config(64, 8) == (128, 8, 2)
    assert workspace.split_grid(128, 8) == (1, 1)
    # Shorter splits only where few pairs leave the GPU latency-bound (batch <= 8 here).
    assert [workspace.min_tiles(rows, 8) for rows in (1, 8, 9, 16, 64)] == [2, 2, 4, 4, 4]
    assert RaggedDecodeWorkspace(4, 32, 128, device=DEVICE, min_tiles_per_split=3).min_tiles(1, 8) == 3
    with pytest.raises(ValueError, match="min_tiles_per_split must be >= 1"):
        RaggedDecodeWorkspace(4, 32, 128, device=DEVICE, min_tiles_per_split=0)


def large_random_rows(num_kv_heads: int, seed: int) -> list[RowSpec]:
    """12 rows of 0..3000 kept tokens per head (one head of each compressed row keeps none, every
    third row is uncompressed) and one row of long heads: many splits, several regimes."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for row in range(12):
        if row % 3 == 0:
            kept = [0] * num_kv_heads  # uncompressed
        else:
            kept = [int(x) for x in torch.randint(0, 3000, (num_kv_heads,), generator=generator)]
            kept[row % num_kv_heads] = 0
        rows.append(RowSpec(kept_len=kept, dense_len=int(torch.randint(1, 400, (1,), generator=generator))))
    rows.append(RowSpec(kept_len=[5000] * num_kv_heads, dense_len=4000))
    return rows


@pytest.mark.skipif(not ON_GPU, reason="large shapes need a CUDA device (too slow for the Triton interpreter)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("head_size", [64, 128])
def test_large_random_batch_cuda(dtype: torch.dtype, group: int, head_size: int) -> None:
    """The default workspace (the default merge mode of this GPU) on every dtype / group / head size."""
    num_kv_heads = 8
    rows = large_random_rows(num_kv_heads, seed=80 + group)
    batch = make_ragged_batch(rows, num_kv_heads=num_kv_heads, group=group, head_size=head_size, dtype=dtype, device=DEVICE, seed=81)
    for tile_tokens in (None, 128):  # the regime's tile (64 here) and the large-batch tile
        workspace = RaggedDecodeWorkspace(
            len(rows), num_kv_heads * group, head_size, device=DEVICE, num_kv_heads=num_kv_heads,
            max_partial_slots=len(rows) * 32, tile_tokens=tile_tokens,
        )
        for num_splits in (None, 1, 7, 32):
            assert_matches_reference(batch, run_triton(batch, workspace, num_splits))


@pytest.mark.skipif(not ON_GPU, reason="large shapes need a CUDA device (too slow for the Triton interpreter)")
@pytest.mark.parametrize("merge", list(MERGE_MODES))
def test_every_merge_mode_large_batch_cuda(merge: str) -> None:
    """Each way of merging the splits (racing splits included) on the large batch, bf16, GQA 4."""
    num_kv_heads, group, head_size = 8, 4, 128
    rows = large_random_rows(num_kv_heads, seed=84)
    batch = make_ragged_batch(rows, num_kv_heads=num_kv_heads, group=group, head_size=head_size,
                              dtype=torch.bfloat16, device=DEVICE, seed=85)
    workspace = RaggedDecodeWorkspace(
        len(rows), num_kv_heads * group, head_size, device=DEVICE, num_kv_heads=num_kv_heads,
        max_partial_slots=len(rows) * 32, **MERGE_MODES[merge],
    )
    for _ in range(2):  # fused_merge: the second launch relies on the first one's reset counters
        for num_splits in (None, 7, 32):
            assert_matches_reference(batch, run_triton(batch, workspace, num_splits))
    assert int(workspace.arrival_count.abs().sum()) == 0


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("merge", list(MERGE_MODES))
def test_cuda_graph_replay_follows_new_lengths(merge: str) -> None:
    """Captured once, the launch stays correct when the metadata values (not shapes) change."""
    num_kv_heads, group, head_size = 4, 4, 128
    first = [RowSpec(kept_len=[500, 0, 37, 1200], dense_len=300), RowSpec(kept_len=[0] * 4, dense_len=900)]
    second = [RowSpec(kept_len=[3, 2000, 0, 64], dense_len=17), RowSpec(kept_len=[700, 1, 1, 90], dense_len=1)]
    batch = make_ragged_batch(first, num_kv_heads, group, head_size, dtype=torch.bfloat16, device=DEVICE, seed=90, spare_blocks=200)
    workspace = RaggedDecodeWorkspace(
        2, num_kv_heads * group, head_size, device=DEVICE, num_kv_heads=num_kv_heads, **MERGE_MODES[merge]
    )
    out = torch.empty_like(batch.query)
    # Static metadata buffers, wide enough for both batches, as a model runner keeps them.
    block_table = torch.zeros(2, 256, dtype=torch.int32, device=DEVICE)
    static = dict(seq_lens=batch.seq_lens.clone(), dense_start=batch.dense_start.clone(),
                  kept_len=batch.kept_len[:, 0].clone(), page_start=batch.page_start[:, 0].clone())

    def load(source) -> None:
        block_table.zero_()
        block_table[:, : source.block_table.shape[1]] = source.block_table
        for name, tensor in static.items():
            value = getattr(source, name)
            tensor.copy_(value[:, 0] if name in ("kept_len", "page_start") else value)

    def launch() -> None:
        ragged_decode_attention(
            batch.query, batch.kv_cache, block_table, static["seq_lens"], static["dense_start"],
            static["kept_len"], static["page_start"], batch.scale, out=out, workspace=workspace,
            layer=0, num_layers=1,
        )

    load(batch)
    launch()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launch()
    for rows, seed in ((first, 90), (second, 91)):
        # Same cache shape (spare blocks absorb the difference), new lengths and pages.
        spare_blocks = batch.kv_cache.shape[0] - make_num_blocks(rows, num_kv_heads, seed)
        other = make_ragged_batch(
            rows, num_kv_heads, group, head_size, dtype=torch.bfloat16, device=DEVICE, seed=seed, spare_blocks=spare_blocks
        )
        batch.kv_cache.copy_(other.kv_cache)
        batch.query.copy_(other.query)
        load(other)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert_matches_reference(other, out)


def make_num_blocks(rows: list[RowSpec], num_kv_heads: int, seed: int) -> int:
    """Blocks make_ragged_batch(seed=seed) allocates for `rows` before spares (to keep the cache shape fixed)."""
    probe = make_ragged_batch(rows, num_kv_heads, 1, 16, dtype=torch.float32, device="cpu", seed=seed, spare_blocks=0)
    return probe.kv_cache.shape[0]


# ---- the whole cache of several layers, head pages packed across layers ---------------
@pytest.mark.parametrize("num_splits", [1, 4])
def test_cross_layer_pages_match_reference_for_every_layer(num_splits: int) -> None:
    """Pairs with 0 / 1 kept tokens, exactly full pages, and pages that continue across a
    container, a layer share and a block boundary (see CROSS_LAYER_ROWS in test_reference.py)."""
    from tests.kernels.test_reference import CROSS_LAYER_ROWS

    batch = make_ragged_batch(CROSS_LAYER_ROWS, num_kv_heads=2, group=2, head_size=64, dtype=torch.float16,
                              device=DEVICE, seed=100, num_layers=3, packed=True)
    assert batch.page_start[0].tolist() == [[0, 2], [3, 6], [6, 8]]
    workspace = small_workspace(batch)
    for layer in range(3):
        out = run_triton(batch, workspace, num_splits, layer)
        assert_matches_reference(batch, out, layer)
        torch.testing.assert_close(out.double().cpu(), brute_force_decode_attention(batch, layer), atol=3e-3, rtol=3e-3)


@pytest.mark.parametrize("seed", [0, 1])
def test_random_cross_layer_batches(seed: int) -> None:
    """Random pair order and unused pages between pairs, 4 layers: every layer's output equals the reference."""
    generator = torch.Generator().manual_seed(200 + seed)
    num_layers, num_kv_heads = 4, 2
    rows = []
    for dense_len in (9, 1, 30):
        kept = torch.randint(0, 50, (num_layers, num_kv_heads), generator=generator)
        kept[torch.rand(num_layers, num_kv_heads, generator=generator) < 0.25] = 0
        rows.append(RowSpec(kept_len=kept.tolist(), dense_len=dense_len))
    batch = make_ragged_batch(rows, num_kv_heads=num_kv_heads, group=4, head_size=64, dtype=torch.float32,
                              device=DEVICE, seed=300 + seed, num_layers=num_layers)
    workspace = small_workspace(batch)
    for layer in range(num_layers):
        assert_matches_reference(batch, run_triton(batch, workspace, 3, layer), layer)


def test_layer_argument_is_checked() -> None:
    batch = make_ragged_batch([RowSpec([[1, 1], [2, 2]], 1)], num_kv_heads=2, group=1, head_size=64,
                              dtype=torch.float16, device=DEVICE, seed=71, num_layers=2)
    with pytest.raises(ValueError, match="layers"):
        ragged_decode_attention(*batch.args(), workspace=small_workspace(batch), use_triton=True, layer=2, num_layers=2)
