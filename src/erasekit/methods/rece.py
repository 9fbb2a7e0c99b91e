"""RECE (reliable and efficient concept erasure): UCE, then rounds of derived-embedding erasure.

Each round derives the embedding that best regenerates the concept through the edited layers,
    c* = argmin_c sum_l ||W'_l c - W0_l c_concept||^2 + mu ||c||^2,
for every token row of the concept's embedding, adds c* as a new erase key mapped to the anchor, and
re-solves UCE from the original weights. Defaults (nudity in the paper): lam 0.1, 3 rounds, mu 1e-3.
Layers reading different inputs (UCE's `layers`; FLUX's T5 rows, pooled embedding, blocks' streams) are solved
apart, each with c* in its own input: the objective is a sum over layers and no layer reads another's input,
so this is the joint problem's solution. For an input with one row per prompt (the pooled embedding) c* is
derived from the concept name's row and mapped to the anchor's.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from ..concepts import ConceptSpec
from ..delta import Delta
from ..linalg import regenerating_embedding
from ..model import CONTEXT, Model
from .common import THROUGH_EOT, Encodings, KVStack
from .uce import edit_prompts, group_keys, solve


@dataclass
class RECEConfig:
    lam: float = 0.1
    erase_scale: float = 1.0
    preserve_scale: float = 1.0
    positions: str = "key"
    synonyms: bool = True
    epochs: int = 3
    mu: float = 1e-3
    toward_concept: bool = False  # regularise c* toward c_concept instead of 0 (the paper's variant)
    layers: str = "default"  # as UCE's
    feature_steps: int = 4  # as UCE's


def concept_rows(model: Model, spec: ConceptSpec, encodings: Encodings | None = None, reads: str = CONTEXT
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every content and [EoT] row of each target name's features in the input `reads` (the context rows by
    default), and its anchor's [KEY] row per row; an input with one row per prompt gives that row and the
    anchor's."""
    encodings = encodings or Encodings(model, through_eot=True)  # its rows end at [EoT]
    names = [t.name for t in spec.targets]
    encodings.prefetch(names, spec.anchor_per_target())
    enc, anchors = encodings.inputs(reads, names), encodings.inputs(reads, spec.anchor_per_target())
    if isinstance(enc, torch.Tensor):
        return enc.double().cpu(), anchors.double().cpu()
    rows, guides = [], []
    for i in range(len(enc.prompts)):
        n = int(enc.eot[i]) + 1
        first = 1 if n > 1 and int(enc.input_ids[i, 0]) == begin_token(model) else 0  # T5 has no start token
        rows.append(enc.embeddings[i, first:n])  # content tokens and [EoT], not the start token
        guides.append(anchors.rows(anchors.key)[i].expand(n - first, -1))
    return torch.cat(rows).double().cpu(), torch.cat(guides).double().cpu()


def begin_token(model: Model) -> int | None:
    tok = model.tokenizer
    return tok.bos_token_id if tok.bos_token_id is not None else tok.cls_token_id


def erase_group(kv: KVStack, encodings: Encodings, model: Model, spec: ConceptSpec, prompts, cfg: RECEConfig):
    """UCE then cfg.epochs rounds of derived embeddings, in the input of one stack: (W, its rounds)."""
    keys, guides, preserve_keys = group_keys(encodings, kv.reads, prompts, cfg.positions)
    keys, values = keys.double().cpu(), kv.values(guides)
    w = solve(kv, keys, values, preserve_keys, cfg)
    rows, row_guides = concept_rows(model, spec, encodings, kv.reads)
    target_out = kv.values(rows)
    rounds = []
    for _ in range(cfg.epochs):
        c_star = regenerating_embedding(w[None], kv.w0[None], rows, mu=cfg.mu,
                                        toward=rows if cfg.toward_concept else None)
        regen = float((c_star @ w.T - target_out).norm() / target_out.norm())
        keys = torch.cat([keys, c_star])
        values = torch.cat([values, kv.values(row_guides)])
        w = solve(kv, keys, values, preserve_keys, cfg)
        rounds.append({"derived_norm": float(c_star.norm(dim=1).mean()), "regeneration_error_before": regen,
                       "regeneration_error_after": float((c_star @ w.T - target_out).norm() / target_out.norm())})
    return w, len(keys), rounds


def erase(model: Model, spec: ConceptSpec, cfg: RECEConfig | None = None) -> Delta:
    """Each input's layers (KVStack.groups) are solved on their own: the layers of one input see nothing of
    another's, so the derived embedding of each input is the joint problem's, split."""
    cfg = cfg or RECEConfig()
    start = time.time()
    groups = KVStack.groups(model, cfg.layers)
    encodings = Encodings(model, [kv.reads for kv in groups], cfg.feature_steps, cfg.positions in THROUGH_EOT)
    prompts = edit_prompts(spec, cfg.synonyms, encodings, later=[t.name for t in spec.targets]
                           + spec.anchor_per_target())
    changes, change, key_count, rounds = {}, {}, 0, {}
    for kv in groups:
        w, count, group_rounds = erase_group(kv, encodings, model, spec, prompts, cfg)
        changes.update(kv.split(w))
        change.update(kv.norms(w))
        key_count += count
        rounds[kv.reads] = group_rounds
    stats = {"erase_keys": key_count, "rounds": rounds.get(CONTEXT, next(iter(rounds.values()))),
             "rounds_per_input": rounds, "relative_change": change, "seconds": round(time.time() - start, 3)}
    return Delta.from_changes(model, changes, "rece", {**asdict(cfg), "spec": spec.to_dict()}, stats)
