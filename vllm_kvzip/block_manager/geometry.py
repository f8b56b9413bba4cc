"""Where a compressed request's tokens live, as pure arithmetic.

Both sides of vLLM compute the same numbers from the same inputs: the worker
packs kept tokens into the first `container_blocks` blocks, the scheduler frees
the blocks between those and the dense tail.  No message has to travel between
them for a keep-ratio budget (see docs/design.md).

Logical block index of one request after compression (bs = block size):

    [0, container_blocks)                 head pages: the kept tokens of every
                                          (layer, KV head), packed across layers
    [container_blocks, dense_start_block) freed (null blocks in the scheduler)
    [dense_start_block, ...)              dense tail: the newest >= `window`
                                          prompt tokens and every decoded token,
                                          in vLLM's normal layout

Only tokens before `dense_start_block * bs` ("evictable") are scored.  The
first `sink_tokens` of them are always kept; of the others the budget policy
keeps a fraction `keep_ratio` (`vllm_kvzip.scoring.policies.total_keep_count`:
a fixed total for every policy, split between the `L * H` (layer, KV head)
pairs as the scores decide).  All layers share one KV buffer, so a block holds
`L * H` head pages (`H` in each layer's share of it) and the request needs
`cdiv(max_head_pages, L * H)` container blocks, where `max_head_pages` bounds
`sum cdiv(k_i, bs)` over every split of the total (`max_head_pages` below).
"""

from __future__ import annotations

from dataclasses import dataclass


def cdiv(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def max_head_pages(total_kept: int, num_pairs: int, block_size: int) -> int:
    """The most head pages `total_kept` tokens can fill when split between `num_pairs` heads.

    A head keeping k > 0 tokens needs `cdiv(k, bs) = 1 + (k - 1) // bs` pages,
    so m non-empty heads need at most `m + (N - m) // bs` pages (the floors of
    a sum are at most the floor of the sum); that grows with m (one more head:
    +1 page, the floor loses at most 1), so the worst split uses
    `m = min(N, num_pairs)` heads.  The bound is reached: give every head one
    token and the rest in whole pages.
    """
    if total_kept <= num_pairs:
        return total_kept
    return num_pairs + (total_kept - num_pairs) // block_size


@dataclass(frozen=True)
class CompressionGeometry:
    """Block-level layout of one request compressed at `num_tokens` tokens."""

    num_tokens: int
    block_size: int
    window: int
    keep_ratio: float
    num_kv_heads: int
    num_layers: int
    policy: str
    sink_tokens: int = 0

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.num_kv_heads <= 0 or self.num_layers <= 0:
            raise ValueError("block_size, num_kv_heads and num_layers must be positive")
        if not (0.0 < self.keep_ratio <= 1.0):  # also False for NaN
            raise ValueError(f"keep_ratio must be in (0, 1], got {self.keep_ratio}")
        if self.window < 0 or self.num_tokens < 0 or self.sink_tokens < 0:
            raise ValueError("window, num_tokens and sink_tokens must be >= 0")
        from vllm_kvzip.scoring.policies import POLICY_NAMES

        if self.policy not in POLICY_NAMES:
            raise ValueError(f"unknown policy {self.policy!r}; valid policies: {', '.join(POLICY_NAMES)}")

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
    def num_pairs(self) -> int:
        """(layer, KV head) pairs: each owns its own run of head pages."""
        return self.num_layers * self.num_kv_heads

    @property
    def kept_tokens(self) -> int:
        """Evictable tokens kept over all (layer, KV head) pairs (sinks included): fixed by the policy."""
        from vllm_kvzip.scoring.policies import total_keep_count

        return total_keep_count(
            self.keep_ratio, self.policy, self.num_layers, self.num_kv_heads, self.evictable_tokens,
            sink_tokens=self.sink_tokens, window=0,
        )

    @property
    def head_pages(self) -> int:
        """Head pages the kept tokens may need, whatever their split between (layer, head) pairs."""
        return max_head_pages(self.kept_tokens, self.num_pairs, self.block_size)

    @property
    def container_blocks(self) -> int:
        """Blocks that hold the head pages: `L * H` pages per block (H per layer's share)."""
        return cdiv(self.head_pages, self.num_pairs)

    @property
    def compresses(self) -> bool:
        """Compression frees at least one block; otherwise the request stays dense."""
        return self.container_blocks < self.dense_start_block

    @property
    def freed_blocks(self) -> int:
        return self.dense_start_block - self.container_blocks if self.compresses else 0
