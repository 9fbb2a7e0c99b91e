"""ErasePro: zero-residual, progressive closed-form erasure (our reading; the paper released no code).

Per edited layer, with X the target's input features and Y the anchor's at the same positions,
    W = argmin ||W - W0||_M  subject to  W X = W0 Y      (M = P P^T / n + lam I, P preservation features)
solved in closed form (linalg.constrained_min_norm). Progressive: walk the text pathway shallow to deep,
the text encoder's MLP output projections in order and then the denoiser's K/V (one shared solve, since
all K/V read the same embeddings), recomputing X and Y with every earlier edit in place. Earlier edits
pull the target toward the anchor, so later updates shrink; the per-layer update norm is recorded.

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

LAYER_SETS = ("text", "kv", "both")


@dataclass
class EraseProConfig:
    layers: str = "both"  # "text", "kv" or "both"
    positions: str = "key+eot"
    lam: float = 0.1  # preservation metric ridge, relative to the mean squared preservation feature norm
    synonyms: bool = True


def _capture(model: Model, module: torch.nn.Module, enc: Encoded) -> Encoded:
    """enc with its embeddings replaced by module's input features (N, L, d_in) for the same prompts."""
    seen = []
    handle = module.register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    try:
        model.encode(enc.prompts)
    finally:
        handle.remove()
    return replace(enc, embeddings=torch.cat(seen))


def _metric_features(p: torch.Tensor | None, lam: float) -> tuple[torch.Tensor | None, float]:
    """Preservation features scaled so that M = P P^T + lam' I has lam relative to their mean power."""
    if p is None:
        return None, lam
    p = p.double().T / len(p) ** 0.5  # (d, n), so P P^T is the mean outer product
    return p, lam * float((p ** 2).sum() / p.shape[0])


def erase(model: Model, spec: ConceptSpec, cfg: EraseProConfig | None = None) -> Delta:
    cfg = cfg or EraseProConfig()
    if cfg.layers not in LAYER_SETS:
        raise UserError(f"unknown ErasePro layer set {cfg.layers!r}: use one of {', '.join(LAYER_SETS)}")
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
                x, y = paired_rows(_capture(model, module, enc_t), _capture(model, module, enc_a), cfg.positions)
                p = single_rows(_capture(model, module, enc_p), cfg.positions) if enc_p else None
                _check_rank(x, key)
                p, lam = _metric_features(p, cfg.lam)
                w0 = module.weight.detach().double().cpu()
                dw, res = constrained_min_norm(w0[None], x.T.cpu()[None], y.T.cpu()[None], p, lam=lam)
                originals[key] = module.weight.detach().clone()
                with torch.no_grad():
                    module.weight.copy_((w0 + dw[0]).to(module.weight.dtype))
                new[key] = (w0 + dw[0]).float()
                per_layer.append({"layer": key, "rows": len(x), "residual": float(res[0]),
                                  "update_norm": float(dw[0].norm() / w0.norm())})
        if cfg.layers in ("kv", "both"):
            kv = KVStack(model)
            t, a = model.encode(enc_t.prompts), model.encode(enc_a.prompts)  # with text edits in place
            x, y = paired_rows(t, a, cfg.positions)
            p = single_rows(model.encode(preserve), cfg.positions) if preserve else None
            _check_rank(x, "cross-attention K/V")
            p, lam = _metric_features(p, cfg.lam)
            dw, res = constrained_min_norm(kv.w0[None], x.T.double().cpu()[None], y.T.double().cpu()[None], p, lam=lam)
            new.update(kv.split(kv.w0 + dw[0]))
            per_layer.append({"layer": "cross-attention K/V", "rows": len(x), "residual": float(res[0]),
                              "update_norm": float(dw[0].norm() / kv.w0.norm())})
    finally:
        with torch.no_grad():
            for key, value in originals.items():
                model.parameter(key).copy_(value)
    stats = {"per_layer": per_layer, "seconds": round(time.time() - start, 3)}
    return Delta.from_changes(model, new, "erasepro", {**asdict(cfg), "spec": spec.to_dict()}, stats)


def _check_rank(x: torch.Tensor, where: str) -> None:
    if x.shape[0] > x.shape[1]:
        warnings.warn(f"ErasePro at {where}: {x.shape[0]} target rows exceed the feature dimension {x.shape[1]}, "
                      "so the residual cannot be zero; the least-squares residual is reported", stacklevel=3)
