"""Export a model, with deltas merged, as a complete diffusers pipeline folder."""

from __future__ import annotations

from pathlib import Path

from .checkpoint import atomic_write_json
from .delta import Delta
from .model import Model
from .outputs import atomic_dir


def export(model: Model, out: str | Path, deltas: list[Delta] = (), overwrite: bool = False) -> Path:
    """Write model (with deltas applied in order) to out; model is left as it was."""
    from .outputs import protected_folders

    protected = protected_folders(model.source)
    applied = []
    try:
        for delta in deltas:
            applied.append(delta.apply(model))
        with atomic_dir(Path(out), overwrite=overwrite, protected=protected) as tmp:
            model.pipe.save_pretrained(tmp, safe_serialization=True)
            record = {"base": model.identity(), "deltas": [d.metadata() for d in deltas],
                      "loading": f"{type(model.pipe).__name__}.from_pretrained(folder); for the testbed, "
                                 "`import erasekit` first (it provides the PixelVAE class)"}
            atomic_write_json(tmp / "erasekit_export.json", record)
    finally:
        for old in reversed(applied):
            Delta.revert(model, old)
    return Path(out)
