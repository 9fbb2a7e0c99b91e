"""Running methods in order (a closed-form stage, then fine-tuning stages) into one delta."""

from __future__ import annotations

from ..concepts import ConceptSpec
from ..delta import Delta
from ..model import Model


def erase_composed(model: Model, spec: ConceptSpec, cfgs: list, parts: tuple, name: str) -> Delta:
    """Each part erases on the model the earlier parts made; the result holds every changed tensor
    (a later part's value wins where two parts change the same tensor)."""
    from ..errors import UserError

    if any(getattr(cfg, "lora_rank", 0) for cfg in cfgs):
        raise UserError(f"{name}: a composition's stages train full tensors (one delta of new values): drop "
                        "lora_rank, or run the LoRA stage on its own")
    merged: dict = {}
    base_values: dict = {}  # the original values of everything changed so far
    stats, configs = {}, {}
    try:
        for part, cfg in zip(parts, cfgs):
            if part.fine_tuning:
                delta = part.erase(model, spec, cfg, base_values=dict(base_values))
            else:
                delta = part.erase(model, spec, cfg)
            old = delta.apply(model, check=False)
            for key, value in old.items():
                base_values.setdefault(key, value)
            merged.update(delta.tensors)
            stats[part.name] = delta.stats
            configs[part.name] = delta.config
    finally:
        Delta.revert(model, base_values)
    return Delta.from_changes(model, merged, name, configs, stats)
