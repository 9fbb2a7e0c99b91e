"""Closed-form solvers shared by every closed-form erasure method: pure functions, batched over layers.

Conventions: a layer's weight W is (out, d); keys are row vectors stacked as (N, d); a batch of layers
is (B, out, d). Matrices shared by all layers of one input width (the keys are text embeddings, the
same for every K/V projection) are solved once. Everything is solved in float64 through a Cholesky
factorisation, never with an explicit inverse.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def gram(keys: Tensor, weights: Tensor | None = None) -> Tensor:
    """sum_i w_i k_i k_i^T for keys (..., N, d) -> (..., d, d), in float64."""
    k = keys.double()
    if weights is not None:
        return torch.einsum("...n,...ni,...nj->...ij", weights.double(), k, k)
    return k.transpose(-1, -2) @ k


def right_solve(rhs: Tensor, spd: Tensor) -> Tensor:
    """X with X @ spd = rhs for a symmetric positive-definite spd; rhs (..., out, d), spd (d, d) or (..., d, d).

    One Cholesky factorisation per distinct spd; a shared spd solves all layers in one call."""
    spd = spd.double()
    rhs = rhs.double()
    chol, info = torch.linalg.cholesky_ex(spd)
    if bool((info != 0).any()):
        raise ValueError("the system matrix is not positive definite: raise the regulariser (lambda / ridge)")
    # X spd = rhs  <=>  spd X^T = rhs^T (spd symmetric)
    return torch.cholesky_solve(rhs.transpose(-1, -2), chol).transpose(-1, -2)


def uce_solve(w0: Tensor, erase_keys: Tensor, erase_values: Tensor, preserve_keys: Tensor | None = None,
              lam: float = 0.5, erase_scale: float = 1.0, preserve_scale: float = 1.0) -> Tensor:
    """UCE's closed form, batched over layers.

    W = (lam W0 + s_e sum_i v*_i c_i^T + s_p sum_j W0 c_j c_j^T) (lam I + s_e sum_i c_i c_i^T + s_p sum_j c_j c_j^T)^-1

    Since the right factor is M = lam I + s_e C^T C + s_p P^T P, the left one equals W0 M + s_e (V* - W0 C^T) C,
    so W = W0 + s_e (V* - W0 C^T) (C M^-1): a rank-N update, computed without ever forming W0 M (rows x d^2).

    w0: (B, out, d); erase_keys: (N_e, d) or (B, N_e, d); erase_values: (B, N_e, out) (v*_i per layer);
    preserve_keys: (N_p, d) or (B, N_p, d) or None. Returns W (B, out, d) in float64.
    """
    d = w0.shape[-1]
    w0, keys = w0.double(), erase_keys.double()
    metric = lam * torch.eye(d, dtype=torch.float64, device=w0.device) + erase_scale * gram(keys)
    if preserve_keys is not None and preserve_keys.shape[-2] > 0:
        metric = metric + preserve_scale * gram(preserve_keys)
    residual = erase_values.double() - keys @ w0.transpose(-1, -2)  # (B, N, out): v*_i - W0 c_i
    factor = right_solve(keys, metric).expand(w0.shape[0], -1, -1)  # (B, N, d)
    return torch.baddbmm(w0, residual.transpose(-1, -2), factor, alpha=erase_scale)  # one pass over W0


def uce_guided(weights: list[Tensor], keys: Tensor, guide_keys: Tensor, preserve_keys: Tensor | None = None,
               lam: float = 0.5, erase_scale: float = 1.0, preserve_scale: float = 1.0
               ) -> tuple[list[Tensor], list[float]]:
    """uce_solve for UCE's own values, each layer's output for a guide key (v*_i = W0 g_i), layer by layer in
    the weights' own dtype and without stacking or copying them: the residual is W0 (G - C)^T, so

    W = W0 + s_e W0 (G - C)^T (C M^-1),   M = lam I + s_e C^T C + s_p P^T P.

    The small factors (M's Cholesky factor, C M^-1, G - C) are float64; the two products with each W0 run in
    its dtype (float32: about 1e-7 relative error in the update). weights: [(out_l, d)]; keys, guide_keys:
    (N, d) paired rows. Returns the new weights and each layer's relative Frobenius change ||W - W0|| / ||W0||,
    taken from the rank-N factors (||U F||^2 = sum((U^T U) * (F F^T))) without forming W - W0 again."""
    keys = keys.double().cpu()
    d = keys.shape[-1]
    metric = lam * torch.eye(d, dtype=torch.float64) + erase_scale * gram(keys)
    if preserve_keys is not None and preserve_keys.shape[-2] > 0:
        metric = metric + preserve_scale * gram(preserve_keys.double().cpu())
    factor = right_solve(keys, metric)  # (N, d): C M^-1
    factor_gram = factor @ factor.T
    diff = guide_keys.double().cpu() - keys  # (N, d): G - C
    new, change = [], []
    for w in weights:
        residual = w @ diff.to(w.device, w.dtype).T  # (out, N): v*_i - W0 c_i
        new.append(torch.addmm(w, residual, factor.to(w.device, w.dtype), alpha=erase_scale))
        r = residual.double().cpu()
        moved = erase_scale * float((r.T @ r * factor_gram).sum().clamp(min=0).sqrt())
        change.append(moved / float(torch.linalg.vector_norm(w, dtype=torch.float64)))
    return new, change


def prior_solve(w0: Tensor, source_keys: Tensor, target_keys: Tensor, prior: Tensor | None = None,
                prior_scale: float = 0.01, ridge: float = 1e-4) -> Tensor:
    """TRCE-style mapping with a covariance prior, batched over layers:

    min_W sum_i ||W s_i - W0 t_i||^2 + eta sum_k ||W e_k - W0 e_k||^2 + ridge ||W - W0||^2
      => W M = W0 (T^T S + eta K + ridge I),   M = S^T S + eta K + ridge I,   K = sum_k e_k e_k^T (the prior)
      => W = W0 + W0 (T - S)^T (S M^-1)        (a rank-N update).

    source_keys, target_keys: (N, d) paired rows; prior: (d, d) covariance of preservation embeddings.
    """
    d = w0.shape[-1]
    w0, s, t = w0.double(), source_keys.double(), target_keys.double()
    metric = s.transpose(-1, -2) @ s + ridge * torch.eye(d, dtype=torch.float64, device=w0.device)
    if prior is not None:
        metric = metric + prior_scale * prior.double()
    return w0 + (w0 @ (t - s).transpose(-1, -2)) @ right_solve(s, metric)


def regenerating_embedding(w_edit: Tensor, w0: Tensor, concept: Tensor, mu: float = 1e-3,
                           toward: Tensor | None = None) -> Tensor:
    """RECE: the embedding that best regenerates the concept through the edited layers.

    c* = argmin_c sum_l ||W'_l c - W0_l c_concept||^2 + mu ||c - c_ref||^2
       = (sum_l W'^T_l W'_l + mu I)^-1 (sum_l W'^T_l W0_l c_concept + mu c_ref)
    w_edit, w0: (B, out, d) layers sharing the input width d; concept: (N, d) rows (each solved);
    toward: optional (N, d) c_ref (default 0). Returns (N, d) float64.
    """
    d = w0.shape[-1]
    we, wo = w_edit.double(), w0.double()
    lhs = (we.transpose(-1, -2) @ we).sum(0) + mu * torch.eye(d, dtype=torch.float64, device=w0.device)
    cross = (we.transpose(-1, -2) @ wo).sum(0)  # (d, d)
    rhs = concept.double() @ cross.T
    if toward is not None:
        rhs = rhs + mu * toward.double()
    return right_solve(rhs, lhs)


def constrained_min_norm(w0: Tensor, x: Tensor, y: Tensor, preserve: Tensor | None = None,
                         lam: float = 1e-2, rcond: float = 1e-10, shift: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """ErasePro's zero-residual update, batched over layers.

    min ||dW||^2_{M}  s.t.  (W0 + dW) X = W0 Y + S   with X, Y (B or 1, d, N) target/anchor input features
    (columns), S an optional (B or 1, out, N) shift of the wanted outputs (default 0), M = P P^T + lam I
    (P: (d, N_p) preservation features; M = I without them):
        dW = R (X^T M^-1 X)^+ X^T M^-1,   R = W0 (Y - X) + S.
    Exactly zero residual when X has full column rank (N <= d); otherwise the least-squares fit.
    Returns (dW (B, out, d) float64, relative residual per layer (B,) = ||(W0+dW)X - T|| / ||T||, T = W0 Y + S).
    """
    w0, x, y = w0.double(), x.double(), y.double()
    d = w0.shape[-1]
    eye = torch.eye(d, dtype=torch.float64, device=w0.device)
    if preserve is not None and preserve.shape[-1] > 0:
        p = preserve.double()
        metric = p @ p.transpose(-1, -2) + lam * eye
        chol = torch.linalg.cholesky(metric)
        minv_x = torch.cholesky_solve(x, chol)  # M^-1 X  (.., d, N)
    else:
        minv_x = x
    target = w0 @ y if shift is None else w0 @ y + shift.double()
    r = target - w0 @ x  # (B, out, N)
    small = x.transpose(-1, -2) @ minv_x  # X^T M^-1 X  (.., N, N)
    dw = r @ torch.linalg.pinv(small, rtol=rcond, hermitian=True) @ minv_x.transpose(-1, -2)
    residual = ((w0 + dw) @ x - target).flatten(1).norm(dim=1) / target.flatten(1).norm(dim=1).clamp(min=1e-30)
    return dw, residual
