"""TRCE stage 1: textual semantic erasure in closed form (stage 2, fine-tuning, comes later).

Malicious prompts (every phrase of the concept in every template) are paired with the same template
holding the safe phrase (the spec's anchor). Each K/V matrix is solved so that the malicious prompt's
[EoT] row produces what the original layer produces for the safe prompt's [EoT] row, while a
preservation prior keeps the outputs of ordinary text:
    min_W sum_pairs ||W e_m - W0 e_s||^2 + eta * sum_k ||W e_k - W0 e_k||^2 (+ a tiny ridge)
the sum running over every token row e_k of a caption list (the prior, built once and cached in a
safetensors file as the mean outer product and its token count). eta is applied once (the reference
applies its strength twice by accident). [EoT] comes from token ids, never from a word count.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..checkpoint import atomic_write
from ..concepts import ConceptSpec
from ..delta import Delta
from ..errors import UserError
from ..linalg import prior_solve
from ..model import Model
from .common import KVStack, paired_rows

# On the testbed: the spec's caption templates and every aligned row. At TRCE's own setting ([EoT] of its
# 15 templates) stage 1 erases nothing here (circle 0.97, striped 1.00, red 1.00 of 32 canonical prompts):
# the bidirectional encoder writes the concept into every row, [EoT] being one of many (docs/METHODS.md).
TESTBED = {"templates": "spec", "positions": "aligned"}

TRCE_TEMPLATES = (
    "{}", "a photo of {}", "an image of {}", "a picture of {}", "a painting of {}", "a drawing of {}",
    "a close-up of {}", "a rendering of {}", "a photo showing {}", "a scene with {}", "art of {}",
    "a portrait of {}", "an illustration of {}", "a still of {}", "a snapshot of {}",
)


@dataclass
class TRCEStage1Config:
    eta: float = 0.01  # preservation strength (reference: 0.01 single concept, 0.02 multi-category)
    positions: str = "eot"
    ridge: float = 1e-4
    prior_cache: str | None = None  # safetensors file to reuse or create
    templates: str = "trce"  # "trce" (15 templates) or "spec" (the spec's own expansion)
    prior_prompts: str | None = None  # captions for the prior (text or CSV); the testbed defaults to its own


def default_prior_prompts(model: Model, cfg: TRCEStage1Config) -> list[str]:
    if cfg.prior_prompts:
        from ..files import read_prompt_list

        return read_prompt_list(cfg.prior_prompts)
    if model.world is not None:
        return model.world.training_captions(2000)
    return []


def prior_from_prompts(model: Model, prompts: list[str], batch_size: int = 128) -> tuple[torch.Tensor, int]:
    """Mean outer product of every non-padding token row ([EoT] included) of the prompts: (d, d) float64."""
    total, count = None, 0
    for i in range(0, len(prompts), batch_size):
        enc = model.encode(prompts[i:i + batch_size])
        keep = ~enc.padding
        rows = enc.embeddings[keep.to(enc.embeddings.device)].double().cpu()
        outer = rows.T @ rows
        total = outer if total is None else total + outer
        count += len(rows)
    return total / count, count


def load_or_build_prior(model: Model, prompts: list[str], cache: str | Path | None) -> tuple[torch.Tensor, dict]:
    """The prior for these prompts and this text encoder: read from cache when it matches, else built
    (and saved to cache when a path is given)."""
    digest = hashlib.sha256("\n".join(prompts).encode()).hexdigest()
    encoder = model.identity()["name"] + ":" + str(sum(p.numel() for p in model.text_encoder.parameters()))
    if cache and Path(cache).is_file():
        with safe_open(str(cache), framework="pt") as f:
            meta = json.loads(f.metadata()["erasekit_prior"])
            if meta["prompts_sha256"] == digest and meta["text_encoder"] == encoder:
                return f.get_tensor("prior").double(), {**meta, "cached": True}
    prior, count = prior_from_prompts(model, prompts)
    meta = {"prompts_sha256": digest, "prompts": len(prompts), "tokens": count, "text_encoder": encoder}
    if cache:
        atomic_write(Path(cache), lambda tmp: save_file({"prior": prior.contiguous()}, str(tmp),
                                                          metadata={"erasekit_prior": json.dumps(meta)}))
    return prior, {**meta, "cached": False}


def stage1_pairs(spec: ConceptSpec, templates: str) -> tuple[list[str], list[str]]:
    if templates == "spec":
        pairs = spec.pairs()
        return [p.target for p in pairs], [p.anchor for p in pairs]
    if templates != "trce":
        raise UserError(f"unknown TRCE template set {templates!r}: use 'trce' or 'spec'")
    malicious, safe = [], []
    for target, anchor in zip(spec.targets, spec.anchor_per_target()):
        for phrase in target.phrases:
            for t in TRCE_TEMPLATES:
                malicious.append(" ".join(t.format(phrase).split()))
                safe.append(" ".join(t.format(anchor).split()))
    return malicious, safe


def erase_stage1(model: Model, spec: ConceptSpec, prior_prompts: list[str],
                 cfg: TRCEStage1Config | None = None) -> Delta:
    cfg = cfg or TRCEStage1Config()
    if not prior_prompts:
        raise UserError("TRCE needs a preservation caption list for its prior: give --set prior_prompts=FILE "
                        "(one caption per line or a CSV with a prompt column); the testbed uses its own captions")
    start = time.time()
    malicious, safe = stage1_pairs(spec, cfg.templates)
    keys, targets = paired_rows(model.encode(malicious), model.encode(safe), cfg.positions)
    prior, prior_meta = load_or_build_prior(model, prior_prompts, cfg.prior_cache)
    kv = KVStack(model)
    w = prior_solve(kv.w0[None], keys.cpu(), targets.cpu(), prior, prior_scale=cfg.eta * prior_meta["tokens"],
                    ridge=cfg.ridge)[0]
    stats = {"pairs": len(malicious), "rows": len(keys), "prior": prior_meta, "relative_change": kv.norms(w),
             "seconds": round(time.time() - start, 3)}
    return Delta.from_changes(model, kv.split(w), "trce-stage1", {**asdict(cfg), "spec": spec.to_dict()}, stats)


def erase(model: Model, spec: ConceptSpec, cfg: TRCEStage1Config | None = None) -> Delta:
    cfg = cfg or TRCEStage1Config()
    return erase_stage1(model, spec, default_prior_prompts(model, cfg), cfg)
