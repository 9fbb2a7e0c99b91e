"""UCE (unified concept editing): one closed-form edit of every cross-attention K/V matrix.

Target keys c_i (the target prompt's embedding row) are mapped to v*_i = W0 c_guide_i (the anchor
prompt's row through the original layer) while preserve keys keep their outputs; lam ties W to W0.
Defaults are the public code's (rohitgandikota/unified-concept-editing, trainscripts/uce_sd_erase.py): lam 0.5
(`lamb`), erase and preserve scales 1, keys at [KEY] (attention_mask.sum() - 2), guide "" ("art" with the art
templates). Prompt building is the spec's: `--expand` under the default "uce" expansion builds what the public
--expand_prompts builds (each concept bare plus its five templated prompts, the guide likewise, preserve
concepts not expanded); `--expansion templates` keeps erasekit's earlier rule. docs/METHODS.md has the table.
Each distinct prompt is encoded once (common.Encodings).
On the testbed (and UCE's derivative RECE) the keys are every aligned row: its MiniLM encoder is bidirectional
and writes the concept into every token, so the [KEY] row alone left striped at 0.97 and red at 0.50 of
canonical prompts, and the aligned rows take both to 0.00 (docs/results/closed_form.md).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from ..concepts import ConceptSpec
from ..delta import Delta
from ..linalg import uce_solve
from ..model import Model
from .common import Encodings, KVStack, paired_rows, single_rows

TESTBED = {"positions": "aligned"}


@dataclass
class UCEConfig:
    lam: float = 0.5
    erase_scale: float = 1.0
    preserve_scale: float = 1.0
    positions: str = "key"  # see methods.common.POSITIONS
    synonyms: bool = True  # erase every synonym listed in the spec, not only the name


def erase_keys(model: Model, spec: ConceptSpec, positions: str, synonyms: bool = True,
               encodings: Encodings | None = None, later: list[str] = ()):
    """(target key rows, anchor key rows, preserve key rows or None) of a spec, encoded by model: every distinct
    prompt once, all in one batched call with the prompts the caller needs later (RECE's concept names)."""
    encodings = encodings or Encodings(model)
    pairs = spec.pairs(synonyms=synonyms)
    target_prompts, anchor_prompts = [p.target for p in pairs], [p.anchor for p in pairs]
    preserve = spec.preserve_prompts()
    encodings.prefetch(target_prompts, anchor_prompts, preserve, list(later))
    keys, guides = paired_rows(encodings(target_prompts), encodings(anchor_prompts), positions)
    preserve_keys = single_rows(encodings(preserve), positions) if preserve else None
    return keys, guides, preserve_keys


def solve(kv: KVStack, keys, values, preserve_keys, cfg) -> torch.Tensor:
    """The UCE solve for all layers at once: (sum_out, d) float64."""
    return uce_solve(kv.w0[None], keys.cpu(), values[None], None if preserve_keys is None else preserve_keys.cpu(),
                     lam=cfg.lam, erase_scale=cfg.erase_scale, preserve_scale=cfg.preserve_scale)[0]


def erase(model: Model, spec: ConceptSpec, cfg: UCEConfig | None = None) -> Delta:
    cfg = cfg or UCEConfig()
    start = time.time()
    kv = KVStack(model)
    keys, guides, preserve_keys = erase_keys(model, spec, cfg.positions, cfg.synonyms)
    w = solve(kv, keys, kv.values(guides), preserve_keys, cfg)
    stats = {"erase_keys": len(keys), "preserve_keys": 0 if preserve_keys is None else len(preserve_keys),
             "layers": len(kv.names), "relative_change": kv.norms(w), "seconds": round(time.time() - start, 3)}
    return Delta.from_changes(model, kv.split(w), "uce", {**asdict(cfg), "spec": spec.to_dict()}, stats)
