"""Closed-form solvers against straightforward float64 references on random matrices."""

from __future__ import annotations

import pytest
import torch

from erasekit import linalg


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def rand(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def test_uce_solve_matches_the_per_layer_formula(gen):
    B, out, d, ne, npres = 3, 7, 10, 4, 6
    w0, c, p = rand(gen, B, out, d), rand(gen, ne, d), rand(gen, npres, d)
    guide = rand(gen, ne, d)
    v = torch.einsum("bod,nd->bno", w0, guide)  # v*_i = W0 c_guide_i
    lam, se, sp = 0.5, 1.0, 0.7
    got = linalg.uce_solve(w0, c, v, p, lam=lam, erase_scale=se, preserve_scale=sp)
    for b in range(B):
        a = lam * w0[b] + se * sum(torch.outer(v[b, i], c[i]) for i in range(ne)) + sp * sum(
            torch.outer(w0[b] @ p[j], p[j]) for j in range(npres))
        m = lam * torch.eye(d, dtype=torch.float64) + se * c.T @ c + sp * p.T @ p
        assert torch.allclose(got[b], a @ torch.linalg.inv(m), atol=1e-10)


def test_uce_guided_equals_uce_solve_with_guide_values(gen):
    """Layer by layer on the weights as they are (float64 and float32 layers of different heights): the same W
    as uce_solve with v*_i = W0 g_i, and the relative change of each layer."""
    d, ne, npres = 10, 4, 6
    weights = [rand(gen, 7, d), rand(gen, 3, d).float()]
    c, g, p = rand(gen, ne, d), rand(gen, ne, d), rand(gen, npres, d)
    new, change = linalg.uce_guided(weights, c, g, p, lam=0.5, erase_scale=1.3, preserve_scale=0.7)
    for w, got, moved in zip(weights, new, change):
        ref = linalg.uce_solve(w.double()[None], c, (g @ w.double().T)[None], p, lam=0.5, erase_scale=1.3,
                               preserve_scale=0.7)[0]
        tol = 1e-10 if w.dtype == torch.float64 else 1e-5
        assert got.dtype == w.dtype and torch.allclose(got.double(), ref, atol=tol * ref.abs().max())
        assert moved == pytest.approx(float((ref - w.double()).norm() / w.double().norm()), rel=1e-4)


def test_uce_with_per_layer_keys_and_float32_input(gen):
    w0, c = rand(gen, 2, 5, 8).float(), rand(gen, 2, 3, 8).float()
    v = rand(gen, 2, 3, 5)
    got = linalg.uce_solve(w0, c, v, lam=0.1)
    for b in range(2):
        ref = (0.1 * w0[b].double() + v[b].T @ c[b].double()) @ torch.linalg.inv(
            0.1 * torch.eye(8, dtype=torch.float64) + c[b].double().T @ c[b].double())
        assert torch.allclose(got[b], ref, atol=1e-9)
    assert got.dtype == torch.float64


def test_prior_solve_matches_the_normal_equations(gen):
    B, out, d, n = 2, 6, 9, 5
    w0, s, t, e = rand(gen, B, out, d), rand(gen, n, d), rand(gen, n, d), rand(gen, 40, d)
    k = e.T @ e
    got = linalg.prior_solve(w0, s, t, k, prior_scale=0.02, ridge=1e-3)
    eye = torch.eye(d, dtype=torch.float64)
    for b in range(B):
        ref = w0[b] @ (t.T @ s + 0.02 * k + 1e-3 * eye) @ torch.linalg.inv(s.T @ s + 0.02 * k + 1e-3 * eye)
        assert torch.allclose(got[b], ref, atol=1e-9)
    # it is the minimiser: the gradient of the objective vanishes
    w = got[0].clone().requires_grad_(True)
    loss = ((w @ s.T - w0[0] @ t.T) ** 2).sum() + 0.02 * ((w @ e.T - w0[0] @ e.T) ** 2).sum() + 1e-3 * (
        (w - w0[0]) ** 2).sum()
    loss.backward()
    assert w.grad.abs().max() < 1e-8


def test_regenerating_embedding_minimises_the_rece_objective(gen):
    B, out, d = 4, 6, 8
    w0, we, c = rand(gen, B, out, d), rand(gen, B, out, d), rand(gen, 3, d)
    mu = 1e-2
    got = linalg.regenerating_embedding(we, w0, c, mu=mu)
    lhs = sum(we[b].T @ we[b] for b in range(B)) + mu * torch.eye(d, dtype=torch.float64)
    rhs = sum(we[b].T @ w0[b] for b in range(B))
    for i in range(3):
        assert torch.allclose(got[i], torch.linalg.solve(lhs, rhs @ c[i]), atol=1e-9)
    toward = rand(gen, 3, d)
    got2 = linalg.regenerating_embedding(we, w0, c, mu=mu, toward=toward)
    assert torch.allclose(got2[0], torch.linalg.solve(lhs, rhs @ c[0] + mu * toward[0]), atol=1e-9)


def test_constrained_min_norm_zero_residual_and_minimum_norm(gen):
    B, out, d, n = 3, 12, 10, 4
    w0, x, y = rand(gen, B, out, d), rand(gen, 1, d, n), rand(gen, 1, d, n)
    dw, residual = linalg.constrained_min_norm(w0, x, y)
    assert residual.max() < 1e-10
    assert torch.allclose((w0 + dw) @ x, w0 @ y, atol=1e-9)
    # minimum norm: dW lies in the row space of X^T (any other solution adds a component Z with Z X = 0)
    ref = w0 @ (y - x) @ torch.linalg.pinv(x[0])
    assert torch.allclose(dw, ref, atol=1e-9)


def test_constrained_min_norm_reaches_shifted_outputs(gen):
    out, d, n = 8, 10, 3
    w0, x, y, shift = rand(gen, 1, out, d), rand(gen, 1, d, n), rand(gen, 1, d, n), rand(gen, 1, out, n)
    dw, residual = linalg.constrained_min_norm(w0, x, y, shift=shift)
    assert residual.max() < 1e-10
    assert torch.allclose((w0 + dw) @ x, w0 @ y + shift, atol=1e-9)
    assert not torch.allclose(dw, linalg.constrained_min_norm(w0, x, y)[0])


def test_constrained_min_norm_with_preservation_metric_and_overdetermined(gen):
    out, d, n = 8, 6, 4
    w0, x, y, p = rand(gen, 1, out, d), rand(gen, 1, d, n), rand(gen, 1, d, n), rand(gen, d, 20)
    dw, residual = linalg.constrained_min_norm(w0, x, y, preserve=p, lam=0.1)
    assert residual.max() < 1e-9
    m = p @ p.T + 0.1 * torch.eye(d, dtype=torch.float64)
    minv = torch.linalg.inv(m)
    r = w0[0] @ (y[0] - x[0])
    ref = r @ torch.linalg.pinv(x[0].T @ minv @ x[0]) @ x[0].T @ minv
    assert torch.allclose(dw[0], ref, atol=1e-9)
    # more targets than the input width: the residual cannot be zero, and is reported
    xs, ys = rand(gen, 1, d, 3 * d), rand(gen, 1, d, 3 * d)
    _, res = linalg.constrained_min_norm(w0, xs, ys)
    assert res.item() > 1e-3


def test_right_solve_rejects_an_indefinite_matrix(gen):
    with pytest.raises(ValueError, match="positive definite"):
        linalg.right_solve(rand(gen, 2, 3), -torch.eye(3, dtype=torch.float64))
