"""UCE (unified concept editing): one closed-form edit of every cross-attention K/V matrix.

Target keys c_i (the target prompt's embedding row) are mapped to v*_i = W0 c_guide_i (the anchor
prompt's row through the original layer) while preserve keys keep their outputs; lam ties W to W0.
Defaults are the public code's (rohitgandikota/unified-concept-editing, trainscripts/uce_sd_erase.py): lam 0.5
(`lamb`), erase and preserve scales 1, keys at [KEY] (attention_mask.sum() - 2), guide "" ("art" with the art
templates). Prompt building is the spec's: `--expand` under the default "uce" expansion builds what the public
--expand_prompts builds (each concept bare plus its five templated prompts, the guide likewise, preserve
concepts not expanded); `--expansion templates` keeps erasekit's earlier rule. docs/METHODS.md has the table.
Each distinct prompt is encoded once, in one batched call, through [EoT] where the family's encoder is causal
(common.Encodings, Model.encode); the solve reads the layers' own weights (linalg.uce_guided).
Layers (`layers`: the family's default set, or sets Model.edit_layer_sets names) are solved per input they read
(KVStack.groups): the context rows for every SD K/V; on FLUX context_embedder with T5 rows and the pooled
projection with the pooled CLIP embedding (one key per prompt, whatever the positions), as the public FLUX
script (trainscripts/uce_flux_edit.py) edits them. Values are W0 times the anchor's input, the bias left out
(the layer adds it to both sides). The FLUX blocks' add_k/add_v option and what it approximates: the FLUX
adapter's docstring (`feature_steps`: the sampler steps whose inputs are its keys).
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
from ..linalg import uce_guided, uce_solve
from ..model import CONTEXT, Model
from .common import THROUGH_EOT, Encodings, KVStack, paired_inputs, single_inputs

TESTBED = {"positions": "aligned"}


@dataclass
class UCEConfig:
    lam: float = 0.5
    erase_scale: float = 1.0
    preserve_scale: float = 1.0
    positions: str = "key"  # see methods.common.POSITIONS
    synonyms: bool = True  # erase every synonym listed in the spec, not only the name
    layers: str = "default"  # the family's layer set(s) to edit (Model.edit_layer_sets; "A+B" for several)
    feature_steps: int = 4  # sampler steps whose inputs are the keys of layers reading the denoiser's states


def edit_prompts(spec: ConceptSpec, synonyms: bool, encodings: Encodings, later: list[str] = ()):
    """(target prompts, anchor prompts, preserve prompts) of a spec, every distinct prompt encoded once, all in
    one batched call with the prompts the caller needs later (RECE's concept names)."""
    pairs = spec.pairs(synonyms=synonyms)
    targets, anchors = [p.target for p in pairs], [p.anchor for p in pairs]
    preserve = spec.preserve_prompts()
    encodings.prefetch(targets, anchors, preserve, list(later))
    return targets, anchors, preserve


def group_keys(encodings: Encodings, reads: str, prompts, positions: str):
    """(target key rows, anchor key rows, preserve key rows or None) in the input of the layers reading
    `reads`."""
    targets, anchors, preserve = prompts
    keys, guides = paired_inputs(encodings.inputs(reads, targets), encodings.inputs(reads, anchors), positions)
    preserve_keys = single_inputs(encodings.inputs(reads, preserve), positions) if preserve else None
    return keys, guides, preserve_keys


def erase_keys(model: Model, spec: ConceptSpec, positions: str, synonyms: bool = True,
               encodings: Encodings | None = None, later: list[str] = ()):
    """(target key rows, anchor key rows, preserve key rows or None) of a spec in the context rows."""
    encodings = encodings or Encodings(model, through_eot=positions in THROUGH_EOT)
    return group_keys(encodings, CONTEXT, edit_prompts(spec, synonyms, encodings, later), positions)


def solve(kv: KVStack, keys, values, preserve_keys, cfg) -> torch.Tensor:
    """The UCE solve for all layers of one input at once with any values (RECE adds its derived keys):
    (sum_out, d) float64. UCE's own edit, whose values are W0 times guide keys, takes linalg.uce_guided."""
    return uce_solve(kv.w0[None], keys.double().cpu(), values[None],
                     None if preserve_keys is None else preserve_keys.double().cpu(),
                     lam=cfg.lam, erase_scale=cfg.erase_scale, preserve_scale=cfg.preserve_scale)[0]


def erase(model: Model, spec: ConceptSpec, cfg: UCEConfig | None = None) -> Delta:
    cfg = cfg or UCEConfig()
    start = time.time()
    groups = KVStack.groups(model, cfg.layers, stacked=False)  # the solve reads the weights themselves
    encodings = Encodings(model, [kv.reads for kv in groups], cfg.feature_steps, cfg.positions in THROUGH_EOT)
    prompts = edit_prompts(spec, cfg.synonyms, encodings)
    changes, keys_per_input, change = {}, {}, {}
    preserve_count = 0
    for kv in groups:
        keys, guides, preserve_keys = group_keys(encodings, kv.reads, prompts, cfg.positions)
        new, moved = uce_guided(kv.weights, keys, guides, preserve_keys, lam=cfg.lam, erase_scale=cfg.erase_scale,
                                preserve_scale=cfg.preserve_scale)
        changes.update(zip(kv.names, new))
        change.update(zip(kv.names, moved))
        keys_per_input[kv.reads] = len(keys)
        preserve_count += 0 if preserve_keys is None else len(preserve_keys)
    stats = {"erase_keys": sum(keys_per_input.values()), "erase_keys_per_input": keys_per_input,
             "preserve_keys": preserve_count, "layers": len(change), "relative_change": change,
             "seconds": round(time.time() - start, 3)}
    return Delta.from_changes(model, changes, "uce", {**asdict(cfg), "spec": spec.to_dict()}, stats)
