"""Conditioning with a pooled embedding packed in: (N, L + R, D), the L context rows the cross-attention
(or joint attention) reads, then R rows that hold the P-value pooled embedding zero-padded to R * D. The SDXL
and FLUX adapters share it, so a conditioning batches, guides and is perturbed like SD's."""

from __future__ import annotations

import math

import torch


class PooledRows:
    """Mixed into a Model subclass; call `set_pooled(pooled_dim, context_dim)` in its __init__."""

    pooled_dim: int
    context_dim: int
    pooled_rows: int

    def set_pooled(self, pooled_dim: int, context_dim: int) -> None:
        self.pooled_dim, self.context_dim = int(pooled_dim), int(context_dim)
        self.pooled_rows = math.ceil(self.pooled_dim / self.context_dim)

    def pack(self, context: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        n = context.shape[0]
        rows = torch.zeros(n, self.pooled_rows * self.context_dim, dtype=context.dtype, device=context.device)
        rows[:, :self.pooled_dim] = pooled.to(context.device, context.dtype)
        return torch.cat([context, rows.view(n, self.pooled_rows, self.context_dim)], dim=1)

    def context(self, cond: torch.Tensor) -> torch.Tensor:
        return cond[:, :-self.pooled_rows]

    def pooled(self, cond: torch.Tensor) -> torch.Tensor:
        return cond[:, -self.pooled_rows:].flatten(1)[:, :self.pooled_dim]

    def extend_context(self, cond: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        rows = rows.to(cond.dtype).expand(cond.shape[0], -1, -1)
        return torch.cat([self.context(cond), rows, cond[:, -self.pooled_rows:]], dim=1)
