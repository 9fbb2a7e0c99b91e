"""ErasePro: zero-residual, progressive closed-form erasure (our reading; the paper released no code).

Per edited layer, with X the target's input features and Y the anchor's at the same positions,
    W = argmin ||W - W0||_M  subject to  W X = W0 Y + S      (M = P P^T / n + lam I, P preservation features)
solved in closed form (linalg.constrained_min_norm). Progressive: walk the text pathway shallow to deep,
the text encoder's MLP output projections in order and then the denoiser's K/V (one shared solve, since
all K/V read the same embeddings), recomputing X and Y with every earlier edit in place.

S (match "stream", the default) is what skips around the projection (the residual stream before the add),
anchor minus target: with it the hidden state after the layer, not only the projection's output, becomes
the anchor's at the edited rows, so each later layer starts from the anchor and has only what attention
brings back from other rows to close. Each layer records that remaining gap (relative output distance
before its edit), its update norm and its residual. Without S (match "output") the skip keeps the whole
difference and every layer sees it again.

Default layer set "both" (text encoder and K/V): the K/V edit alone leaves the concept in the text
embedding's other rows, and the text-encoder edits alone leave K/V free to recover it from context.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, replace

import torch

from ..concepts import ConceptSpec
from ..delta import Delta
from ..errors import UserError
from ..linalg import constrained_min_norm
from ..model import Encoded, Model
from .common import KVStack, paired_rows, single_rows

# On the testbed the concept's own rows: [KEY] and [EoT] of a caption are its last words, which the
# bidirectional encoder fills with the concept only through attention (striped, 32 prompts: 0.38 at key+eot,
# 0.00 at the phrase's rows, preservation 0.977)
TESTBED = {"positions": "phrase"}
LAYER_SETS = ("text", "kv", "both")
MATCHES = ("stream", "output")


@dataclass
class EraseProConfig:
    layers: str = "both"  # "text", "kv" or "both"
    positions: str = "key+eot"
    lam: float = 0.1  # preservation metric ridge, relative to the mean squared preservation feature norm
    synonyms: bool = True
    # text layers: "stream" makes the hidden state after the projection's residual sum the anchor's (the
    # projection's output plus what skips around it); "output" makes the projection's output alone the
    # anchor's, leaving the stream's other difference for later layers to see
    match: str = "stream"
    rcond: float = 1e-10  # pseudo-inverse cut-off, relative to the largest singular value of X^T M^-1 X

    def __post_init__(self):
        if self.layers not in LAYER_SETS:
            raise UserError(f"unknown ErasePro layer set {self.layers!r}: use one of {', '.join(LAYER_SETS)}")
        if self.match not in MATCHES:
            raise UserError(f"unknown ErasePro match {self.match!r}: use one of {', '.join(MATCHES)}")


def _capture(model: Model, enc: Encoded, points: list[tuple[torch.nn.Module, str]]) -> list[Encoded]:
    """For each (module, 'input' or 'output'): enc with its embeddings replaced by that module's input or
    output features (N, L, d) for the same prompts, all from one pass of the text encoder."""
    seen: list[list[torch.Tensor]] = [[] for _ in points]

    def keeper(slot: list, where: str):
        def keep(m, args, out):
            value = args[0] if where == "input" else out
            slot.append((value[0] if isinstance(value, tuple) else value).detach())
        return keep

    handles = [module.register_forward_hook(keeper(slot, where)) for (module, where), slot in zip(points, seen)]
    try:
        model.encode(enc.prompts)
    finally:
        for handle in handles:
            handle.remove()
    return [replace(enc, embeddings=torch.cat(slot)) for slot in seen]


def _metric_features(p: torch.Tensor | None, lam: float) -> tuple[torch.Tensor | None, float]:
    """Preservation features scaled so that M = P P^T + lam' I has lam relative to their mean power."""
    if p is None:
        return None, lam
    p = p.double().T / len(p) ** 0.5  # (d, n), so P P^T is the mean outer product
    return p, lam * float((p ** 2).sum() / p.shape[0])


def erase(model: Model, spec: ConceptSpec, cfg: EraseProConfig | None = None) -> Delta:
    cfg = cfg or EraseProConfig()
    start = time.time()
    pairs = spec.pairs(synonyms=cfg.synonyms)
    enc_t = model.encode([p.target for p in pairs])
    enc_a = model.encode([p.anchor for p in pairs])
    preserve = spec.preserve_prompts()
    enc_p = model.encode(preserve) if preserve else None

    new: dict[str, torch.Tensor] = {}
    originals: dict[str, torch.Tensor] = {}
    per_layer = []
    try:
        if cfg.layers in ("text", "both"):
            for key, module in model.text_mlp_layers():
                # the projection's input, and with match "stream" the residual sum it joins, in one pass each
                points = [(module, "input")] + ([model.residual_sum(key)] if cfg.match == "stream" else [])
                feats_t, feats_a = _capture(model, enc_t, points), _capture(model, enc_a, points)
                x, y = paired_rows(feats_t[0], feats_a[0], cfg.positions)
                p = single_rows(_capture(model, enc_p, points[:1])[0], cfg.positions) if enc_p else None
                _check_rank(x, key)
                p, lam = _metric_features(p, cfg.lam)
                w0 = module.weight.detach().double().cpu()
                shift = (_stream_shift(feats_t[1], feats_a[1], cfg.positions, w0, x, y)
                         if cfg.match == "stream" else None)
                dw, res = constrained_min_norm(w0[None], x.T.cpu()[None], y.T.cpu()[None], p, lam=lam, shift=shift,
                                               rcond=cfg.rcond)
                originals[key] = module.weight.detach().clone()
                with torch.no_grad():
                    module.weight.copy_((w0 + dw[0]).to(module.weight.dtype))
                new[key] = (w0 + dw[0]).float()
                per_layer.append({"layer": key, "rows": len(x), "residual": float(res[0]),
                                  "update_norm": float(dw[0].norm() / w0.norm()), "gap": _gap(w0, x, y, shift)})
        if cfg.layers in ("kv", "both"):
            kv = KVStack(model)
            t, a = model.encode(enc_t.prompts), model.encode(enc_a.prompts)  # with text edits in place
            x, y = paired_rows(t, a, cfg.positions)
            p = single_rows(model.encode(preserve), cfg.positions) if preserve else None
            _check_rank(x, "cross-attention K/V")
            p, lam = _metric_features(p, cfg.lam)
            dw, res = constrained_min_norm(kv.w0[None], x.T.double().cpu()[None], y.T.double().cpu()[None], p, lam=lam,
                                           rcond=cfg.rcond)
            new.update(kv.split(kv.w0 + dw[0]))
            per_layer.append({"layer": "cross-attention K/V", "rows": len(x), "residual": float(res[0]),
                              "update_norm": float(dw[0].norm() / kv.w0.norm()), "gap": _gap(kv.w0, x, y, None)})
    finally:
        with torch.no_grad():
            for key, value in originals.items():
                model.parameter(key).copy_(value)
    stats = {"per_layer": per_layer, "seconds": round(time.time() - start, 3)}
    return Delta.from_changes(model, new, "erasepro", {**asdict(cfg), "spec": spec.to_dict()}, stats)


def _stream_shift(sums_t: Encoded, sums_a: Encoded, positions: str, w0: torch.Tensor, x: torch.Tensor,
                  y: torch.Tensor) -> torch.Tensor:
    """(1, out, N) what skips around the projection, anchor minus target, at the paired rows: adding it to
    W0 Y makes the residual sum (and so the hidden state) at every target row the anchor's. The sum is
    W0 x + b + skip, so the skip's difference is the sums' difference less W0 (y - x) (the bias cancels)."""
    s_t, s_a = paired_rows(sums_t, sums_a, positions)
    return ((s_a - s_t).double().cpu() - (y - x).double().cpu() @ w0.T).T[None]


def _gap(w0: torch.Tensor, x: torch.Tensor, y: torch.Tensor, shift: torch.Tensor | None) -> float:
    """How far the target's outputs are from the wanted ones before the edit, relative to the wanted ones:
    what the earlier edits left for this layer to close."""
    x, y = x.double().cpu(), y.double().cpu()
    wanted = y @ w0.T + (shift[0].T if shift is not None else 0)
    return float((wanted - x @ w0.T).norm() / wanted.norm().clamp(min=1e-30))


def _check_rank(x: torch.Tensor, where: str) -> None:
    if x.shape[0] > x.shape[1]:
        warnings.warn(f"ErasePro at {where}: {x.shape[0]} target rows exceed the feature dimension {x.shape[1]}, "
                      "so the residual cannot be zero; the least-squares residual is reported", stacklevel=3)
