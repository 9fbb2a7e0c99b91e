"""Computing a causal text encoder's rows once per distinct token prefix.

In a causal encoder (CLIP) the state of row j of a prompt depends on its tokens 0..j only. So two prompts that
begin with the same tokens ("a photo of a vase", "a photo of a whale") have the same states on those rows,
and the rows after a prompt's [EoT] are read by nothing before them. While `only_distinct_rows` is active,
every Linear layer of the given encoders (where the FLOPs are: projections and MLPs) computes just one row
per distinct prefix up to each prompt's [EoT] and gives the others copies of it; rows after [EoT] get zeros.
Attention, layer norms and activations still run on every row, so the result is the full computation's
for every row up to [EoT] (to float rounding), whatever the prompts share. Model.encode(through_eot=True)
uses it for families whose rows_ignore_padding.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


def distinct_rows(ids: torch.Tensor, eot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, where) for token ids (B, L) and each row's [EoT] position (B,): first holds the flat index
    (b * L + j) of one row per distinct prefix ids[b, :j + 1] with j <= eot[b]; where (B * L,) maps every
    flat row to its prefix's entry in first, or -1 for rows after [EoT]."""
    n, length = ids.shape
    nodes: dict[tuple[int, int], int] = {}  # (parent prefix, token) -> prefix number: a trie over the prompts
    first: list[int] = []
    where = [-1] * (n * length)
    rows = ids.tolist()
    for b in range(n):
        parent = -1
        for j in range(int(eot[b]) + 1):
            key = (parent, rows[b][j])
            if key not in nodes:
                nodes[key] = len(first)
                first.append(b * length + j)
            parent = nodes[key]
            where[b * length + j] = parent
    return torch.tensor(first, dtype=torch.long), torch.tensor(where, dtype=torch.long)


@contextmanager
def only_distinct_rows(encoders, ids: torch.Tensor, eot: torch.Tensor):
    """Inside the block, each Linear of encoders called on (B, L, d) states of these ids computes only the
    rows distinct_rows names (module docstring); calls of other shapes (a pooled projection) run as ever."""
    first, where = distinct_rows(ids, eot)
    shape = tuple(ids.shape)
    after = (where < 0)[:, None]  # rows after [EoT]
    source = where.clamp(min=0)
    patched = []

    def rows_once(linear: torch.nn.Linear):
        def forward(x: torch.Tensor) -> torch.Tensor:
            if x.dim() != 3 or tuple(x.shape[:2]) != shape:
                return torch.nn.functional.linear(x, linear.weight, linear.bias)
            flat = x.reshape(-1, x.shape[-1])
            y = torch.nn.functional.linear(flat[first.to(x.device)], linear.weight, linear.bias)
            out = y.index_select(0, source.to(x.device)).masked_fill_(after.to(x.device), 0.0)
            return out.view(*shape, -1)
        return forward

    for encoder in encoders:
        for module in encoder.modules():
            if isinstance(module, torch.nn.Linear):
                patched.append((module, module.__dict__.get("forward")))
                module.forward = rows_once(module)
    try:
        yield
    finally:
        for module, before in patched:
            if before is None:
                del module.forward
            else:
                module.forward = before
