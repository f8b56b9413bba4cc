"""What the CUDA and CPU backends share: metadata types and the per-step row gathering.

A step's batch is split like vLLM's own backends do: decode rows first (one
query token; vLLM reorders the batch so because the builder asks for it),
then prefill rows.  Decode rows read the ragged layout through the per-row
metadata gathered here from the worker's `RaggedPageTable`; prefill rows are
never compressed (a request is compressed after its prefill) and go through a
dense path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vllm_kvzip.backend.state import DENSE_SLOT, WorkerCompressionState


@dataclass
class RaggedRowsMetadata:
    """Per-row layout of the decode rows (views of persistent buffers)."""

    num_rows: int
    seq_lens: torch.Tensor  # [num_rows] int32
    block_table: torch.Tensor  # [num_rows, max_blocks] int32
    dense_start: torch.Tensor  # [num_rows] int32
    kept_len: torch.Tensor  # [num_rows, num_layers, num_kv_heads] int32
    page_start: torch.Tensor  # [num_rows, num_layers, num_kv_heads] int32


@dataclass
class KVzipAttentionMetadata:
    num_actual_tokens: int
    slot_mapping: torch.Tensor
    num_decode_rows: int
    num_decode_tokens: int
    decode: RaggedRowsMetadata | None
    # Metadata of the dense path for rows [num_decode_rows:], tokens [num_decode_tokens:].
    prefill: Any | None
    # The whole batch, for paths that handle every row themselves (CPU).
    query_start_loc: torch.Tensor | None = None
    seq_lens: torch.Tensor | None = None
    block_table: torch.Tensor | None = None


class RowGatherBuffers:
    """Persistent per-row buffers the decode kernels read (fixed addresses for CUDA graphs)."""

    def __init__(self, state: WorkerCompressionState, max_rows: int) -> None:
        device = state.device
        self.state = state
        self.max_rows = max_rows
        self.row_slots = torch.zeros(max_rows, dtype=torch.int64, device=device)
        self.dense_start = torch.zeros(max_rows, dtype=torch.int32, device=device)
        self.kept_len = torch.zeros(max_rows, state.num_layers, state.num_kv_heads, dtype=torch.int32, device=device)
        self.page_start = torch.zeros_like(self.kept_len)

    def gather(self, request_ids: list[str] | None, num_rows: int, num_rows_padded: int) -> None:
        """Fill rows [0, num_rows_padded) from the page table; unknown and padding rows are dense."""
        state = self.state
        known = min(num_rows, len(request_ids)) if request_ids else 0
        row_slots = [state.slot_of(request_id) for request_id in request_ids[:known]] if known else []
        row_slots += [DENSE_SLOT] * (num_rows_padded - known)
        slots = self.row_slots[:num_rows_padded]
        # From pageable memory: the copy stages the data before returning, so the
        # list can go away while the GPU is still behind (async scheduling).
        slots.copy_(torch.tensor(row_slots, dtype=torch.int64), non_blocking=True)
        table = state.table
        torch.index_select(table.dense_start, 0, slots, out=self.dense_start[:num_rows_padded])
        torch.index_select(table.kept_len, 0, slots, out=self.kept_len[:num_rows_padded])
        torch.index_select(table.page_start, 0, slots, out=self.page_start[:num_rows_padded])

    def rows(self, num_rows: int, seq_lens: torch.Tensor, block_table: torch.Tensor) -> RaggedRowsMetadata:
        return RaggedRowsMetadata(
            num_rows=num_rows,
            seq_lens=seq_lens[:num_rows],
            block_table=block_table[:num_rows],
            dense_start=self.dense_start[:num_rows],
            kept_len=self.kept_len[:num_rows],
            page_start=self.page_start[:num_rows],
        )


def count_decode_rows(query_start_loc_cpu: torch.Tensor, num_rows: int) -> tuple[int, int]:
    """Leading rows with at most one query token (the batch is reordered decode-first;
    zero-token rows are CUDA-graph padding)."""
    if num_rows == 0:
        return 0, 0
    query_lens = query_start_loc_cpu[1 : num_rows + 1] - query_start_loc_cpu[:num_rows]
    multi = (query_lens > 1).nonzero()
    num_decode_rows = int(multi[0]) if multi.numel() else num_rows
    return num_decode_rows, int(query_start_loc_cpu[num_decode_rows])
