"""Where a compressed request's tokens live, as pure arithmetic.

Both sides of vLLM compute the same numbers from the same inputs: the worker
packs kept tokens into the first `container_blocks` blocks, the scheduler frees
the blocks between those and the dense tail.  No message has to travel between
them for a keep-ratio budget (see docs/design.md).

Logical block index of one request after compression (bs = block size):

    [0, container_blocks)                 head pages: the kept tokens of every
                                          (layer, KV head), packed
    [container_blocks, dense_start_block) freed (null blocks in the scheduler)
    [dense_start_block, ...)              dense tail: the newest >= `window`
                                          prompt tokens and every decoded token,
                                          in vLLM's normal layout

Only tokens before `dense_start_block * bs` ("evictable") are scored.  The
first `sink_tokens` of them are always kept; of the others a fraction
`keep_ratio` (rounded down, as `vllm_kvzip.scoring.policies.budget`) is kept.
Each (layer, KV head) thus keeps `per_head_budget` tokens on average; one layer's heads
together keep `num_kv_heads * per_head_budget`, so a layer needs at most
`num_kv_heads * cdiv(per_head_budget + bs - 1, bs)` head pages whatever the
split between its heads, and a block holds `num_kv_heads` head pages per layer.
"""

from __future__ import annotations

from dataclasses import dataclass


def cdiv(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


@dataclass(frozen=True)
class CompressionGeometry:
    """Block-level layout of one request compressed at `num_tokens` tokens."""

    num_tokens: int
    block_size: int
    window: int
    keep_ratio: float
    num_kv_heads: int
    sink_tokens: int = 0

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.num_kv_heads <= 0:
            raise ValueError("block_size and num_kv_heads must be positive")
        if not (0.0 < self.keep_ratio <= 1.0):  # also False for NaN
            raise ValueError(f"keep_ratio must be in (0, 1], got {self.keep_ratio}")
        if self.window < 0 or self.num_tokens < 0 or self.sink_tokens < 0:
            raise ValueError("window, num_tokens and sink_tokens must be >= 0")

    @property
    def dense_start_block(self) -> int:
        """First logical block of the dense tail (it holds >= `window` tokens)."""
        return max(0, (self.num_tokens - self.window) // self.block_size)

    @property
    def evictable_tokens(self) -> int:
        """Tokens before the dense tail: the ones that are scored and may be evicted."""
        return self.dense_start_block * self.block_size

    @property
    def sinks(self) -> int:
        return min(self.sink_tokens, self.evictable_tokens)

    @property
    def per_head_budget(self) -> int:
        """Evictable tokens one (layer, KV head) keeps on average (sinks included)."""
        scored = self.evictable_tokens - self.sinks
        return self.sinks + int(self.keep_ratio * scored + 1e-9)

    @property
    def layer_budget(self) -> int:
        """Evictable tokens one layer keeps across its KV heads."""
        return self.per_head_budget * self.num_kv_heads

    @property
    def container_blocks(self) -> int:
        """Blocks that hold head pages: enough for any split of the layer budget between heads."""
        if self.per_head_budget == 0:
            return 0
        return cdiv(self.per_head_budget + self.block_size - 1, self.block_size)

    @property
    def compresses(self) -> bool:
        """Compression frees at least one block; otherwise the request stays dense."""
        return self.container_blocks < self.dense_start_block

    @property
    def freed_blocks(self) -> int:
        return self.dense_start_block - self.container_blocks if self.compresses else 0

    @property
    def head_pages_per_layer(self) -> int:
        return self.container_blocks * self.num_kv_heads
