"""Metrics on features and judge verdicts."""

from __future__ import annotations

import torch


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a (N, F) and b (M, F), in float64:
    ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    vals, vecs = torch.linalg.eigh(s_a)
    root_a = vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T
    middle = root_a @ s_b @ root_a
    trace_root = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    return float(((mu_a - mu_b) ** 2).sum() + torch.trace(s_a) + torch.trace(s_b) - 2 * trace_root)
