"""Random ragged KV layouts for the kernel tests, plus a brute-force attention.

`make_ragged_batch` builds a whole cache of L layers and the per-row metadata
the way the block manager would: each row's ragged pages (per (layer, head)
pair, random pair order, with occasional unused pages between pairs) fill the
L layer shares of its first logical blocks, the dense region starts
page-aligned after them, and logical blocks map to a random permutation of
physical blocks.  Every cache slot that is *not* part
of some head's sequence holds NaN, so a kernel that reads a wrong slot, or
lets a masked slot leak into the sum, produces NaN and fails the test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class RowSpec:
    """One request row: ragged tokens kept per KV head, and dense tokens.

    `kept_len` is `[H]` for a one-layer cache or `[L][H]` (one list per layer).
    """

    kept_len: list[int] | list[list[int]]
    dense_len: int

    def per_layer(self, num_layers: int, num_kv_heads: int) -> list[list[int]]:
        kept = self.kept_len if self.kept_len and isinstance(self.kept_len[0], list) else [self.kept_len]
        if len(kept) != num_layers or any(len(layer) != num_kv_heads for layer in kept):
            raise ValueError(f"kept_len needs {num_layers} layer(s) of {num_kv_heads} KV heads")
        return kept


@dataclass
class RaggedBatch:
    query: torch.Tensor  # [num_rows, num_q_heads, head_size]
    kv_cache: torch.Tensor  # [L * NB, H, block_size, 2 * head_size]: every layer, one after another
    block_table: torch.Tensor  # int32 [num_rows, max_blocks]
    seq_lens: torch.Tensor  # int32 [num_rows]
    dense_start: torch.Tensor  # int32 [num_rows]
    kept_len: torch.Tensor  # int32 [num_rows, L, H]
    page_start: torch.Tensor  # int32 [num_rows, L, H], pages numbered over all (layer, head) pairs
    scale: float
    num_layers: int = 1

    def args(self, layer: int = 0) -> tuple:
        """Positional arguments of the kernels for `layer` (the layer's kept_len / page_start columns)."""
        return (
            self.query, self.kv_cache, self.block_table, self.seq_lens, self.dense_start,
            self.kept_len[:, layer], self.page_start[:, layer], self.scale,
        )

    def layout(self, layer: int = 0) -> dict:
        """Keyword arguments naming the layer the kernels attend for."""
        return {"layer": layer, "num_layers": self.num_layers}

    @property
    def num_blocks_per_layer(self) -> int:
        return self.kv_cache.shape[0] // self.num_layers


def make_ragged_batch(
    rows: list[RowSpec],
    num_kv_heads: int,
    group: int,
    head_size: int,
    block_size: int = 16,
    dtype: torch.dtype = torch.float16,
    device: str | torch.device = "cpu",
    seed: int = 0,
    spare_blocks: int = 3,
    num_layers: int = 1,
    packed: bool = False,
) -> RaggedBatch:
    """A whole cache of `num_layers` layers with each row's pages packed across layers.

    Pages are numbered over a row's (layer, head) pairs in a random order, with
    occasional unused pages between pairs; container c of a row is layer
    (c % L)'s share of its logical block c // L, as the block manager lays them
    out, so a pair's pages may continue in another layer's share or block.
    `packed`: the planner's exact layout instead (pairs in order, no unused
    pages, the dense region right after the containers).
    """
    generator = torch.Generator().manual_seed(seed)

    def randint(high: int) -> int:
        return int(torch.randint(0, high, (1,), generator=generator))

    layouts = []  # per row: (page_start [L][H], dense_start, seq_len, num_logical_blocks)
    for spec in rows:
        kept = spec.per_layer(num_layers, num_kv_heads)
        page_start = [[0] * num_kv_heads for _ in range(num_layers)]
        next_page = 0
        pairs = range(num_layers * num_kv_heads) if packed else torch.randperm(num_layers * num_kv_heads, generator=generator).tolist()
        for pair in pairs:
            layer, head = divmod(pair, num_kv_heads)
            pages = math.ceil(kept[layer][head] / block_size)
            next_page += 0 if packed else randint(2)  # sometimes leave a page unused between pairs
            page_start[layer][head] = next_page
            next_page += pages
        compressed = any(any(layer) for layer in kept)
        ragged_blocks = math.ceil(next_page / (num_layers * num_kv_heads)) if compressed else 0
        dense_start = (ragged_blocks + (randint(2) if compressed and not packed else 0)) * block_size
        seq_len = dense_start + spec.dense_len
        layouts.append((page_start, dense_start, seq_len, max(math.ceil(seq_len / block_size), ragged_blocks, 1)))

    total_blocks = sum(layout[3] for layout in layouts)
    blocks_per_layer = total_blocks + spare_blocks
    physical = torch.randperm(blocks_per_layer, generator=generator).tolist()
    max_blocks = max(layout[3] for layout in layouts) + 1
    # Padding entries point at random real blocks: reading one gives NaN or another row's data.
    block_table = torch.randint(0, blocks_per_layer, (len(rows), max_blocks), generator=generator, dtype=torch.int32)

    kv_cache = torch.full(
        (num_layers * blocks_per_layer, num_kv_heads, block_size, 2 * head_size), float("nan"), dtype=torch.float32
    )
    flat = kv_cache.view(-1, 2 * head_size)
    cursor = 0
    for row, (spec, (page_start, dense_start, seq_len, logical_blocks)) in enumerate(zip(rows, layouts)):
        block_table[row, :logical_blocks] = torch.tensor(physical[cursor:cursor + logical_blocks], dtype=torch.int32)
        cursor += logical_blocks
        table = block_table[row].tolist()
        kept = spec.per_layer(num_layers, num_kv_heads)
        for layer in range(num_layers):
            for head in range(num_kv_heads):
                for j in range(kept[layer][head]):
                    page = page_start[layer][head] + j // block_size
                    container = page // num_kv_heads
                    flat_block = (container % num_layers) * blocks_per_layer + table[container // num_layers]
                    slot = (flat_block * num_kv_heads + page % num_kv_heads) * block_size + j % block_size
                    assert torch.isnan(flat[slot]).all(), "two pages share a slot"
                    flat[slot] = torch.randn(2 * head_size, generator=generator)
                for pos in range(dense_start, seq_len):
                    flat_block = layer * blocks_per_layer + table[pos // block_size]
                    slot = (flat_block * num_kv_heads + head) * block_size + pos % block_size
                    flat[slot] = torch.randn(2 * head_size, generator=generator)

    query = torch.randn(len(rows), num_kv_heads * group, head_size, generator=generator)
    return RaggedBatch(
        query=query.to(dtype=dtype, device=device),
        kv_cache=kv_cache.to(dtype=dtype, device=device),
        block_table=block_table.to(device),
        seq_lens=torch.tensor([layout[2] for layout in layouts], dtype=torch.int32, device=device),
        dense_start=torch.tensor([layout[1] for layout in layouts], dtype=torch.int32, device=device),
        kept_len=torch.tensor([spec.per_layer(num_layers, num_kv_heads) for spec in rows], dtype=torch.int32, device=device),
        page_start=torch.tensor([layout[0] for layout in layouts], dtype=torch.int32, device=device),
        scale=1.0 / math.sqrt(head_size),
        num_layers=num_layers,
    )


def brute_force_head_kv(batch: RaggedBatch, row: int, head: int, layer: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys/values of one head of `layer` in virtual order, by walking the layout token by token."""
    num_kv_heads, block_size, width = batch.kv_cache.shape[1], batch.kv_cache.shape[2], batch.kv_cache.shape[3]
    head_size = width // 2
    num_layers, blocks_per_layer = batch.num_layers, batch.num_blocks_per_layer
    table = batch.block_table[row].tolist()
    kept = int(batch.kept_len[row, layer, head])
    first_page = int(batch.page_start[row, layer, head])
    rows = []
    for j in range(kept):
        page = first_page + j // block_size
        container = page // num_kv_heads
        flat_block = (container % num_layers) * blocks_per_layer + table[container // num_layers]
        rows.append(batch.kv_cache[flat_block, page % num_kv_heads, j % block_size])
    for pos in range(int(batch.dense_start[row]), int(batch.seq_lens[row])):
        rows.append(batch.kv_cache[layer * blocks_per_layer + table[pos // block_size], head, pos % block_size])
    if not rows:
        empty = batch.kv_cache.new_zeros((0, head_size))
        return empty, empty
    stacked = torch.stack(rows)
    return stacked[:, :head_size], stacked[:, head_size:]


def brute_force_decode_attention(batch: RaggedBatch, layer: int = 0) -> torch.Tensor:
    """float64 softmax attention of `layer` per (row, query head) over the brute-force gathered keys."""
    num_rows, num_q_heads, head_size = batch.query.shape
    num_kv_heads = batch.kv_cache.shape[1]
    group = num_q_heads // num_kv_heads
    out = torch.zeros(num_rows, num_q_heads, head_size, dtype=torch.float64)
    for row in range(num_rows):
        for head in range(num_kv_heads):
            keys, values = brute_force_head_kv(batch, row, head, layer)
            if keys.shape[0] == 0:
                continue
            for q_head in range(head * group, (head + 1) * group):
                q = batch.query[row, q_head].double().cpu()
                weights = torch.softmax((keys.double().cpu() @ q) * batch.scale, dim=0)
                out[row, q_head] = weights @ values.double().cpu()
    return out


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """Absolute/relative tolerance for outputs of magnitude ~1 computed in dtype."""
    return {
        torch.float32: dict(atol=2e-5, rtol=2e-5),
        torch.float16: dict(atol=3e-3, rtol=3e-3),
        torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    }[dtype]
