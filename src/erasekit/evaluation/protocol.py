"""What a result file records, and the rules for an output folder that already holds a run."""

from __future__ import annotations

import hashlib
import json
import shutil
from importlib import metadata
from pathlib import Path

from ..checkpoint import atomic_write_json
from ..delta import tensor_hash
from ..errors import UserError
from ..outputs import refuse_overlap

MARKER = "run.json"
PACKAGES = ("erasekit", "torch", "diffusers", "transformers", "accelerate", "safetensors", "numpy", "nudenet")


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def weights_hash(model) -> str:
    """sha256 of the denoiser's and text encoders' current weights (fp16-rounded), computed once per model."""
    cached = getattr(model, "_erasekit_weights_hash", None)
    if cached is None:
        tensors = {f"{part}.{k}": v for part, module in model.components().items()
                   for k, v in module.state_dict().items()}
        cached = tensor_hash(tensors)
        model._erasekit_weights_hash = cached
    return cached


def protocol_hash(protocol: dict) -> str:
    return hashlib.sha256(json.dumps(protocol, sort_keys=True).encode()).hexdigest()


def check_run_dir(out: Path, protocol: dict, resume: bool, overwrite: bool, protected: list[Path] = ()) -> bool:
    """Prepare out for a run with this protocol. The same run, killed before it finished, continues; a
    folder holding another run's results is refused unless resume (reuse its cached images) or overwrite.
    Returns False when the folder held another run (resumed): its per-item records are not this run's."""
    out = Path(out)
    refuse_overlap(out, protected)
    same = True
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {out} exists and is a file: choose a folder path")
    marker = out / MARKER
    if out.is_dir() and any(out.iterdir()):
        if overwrite:
            shutil.rmtree(out)
        elif not marker.is_file():
            raise UserError(f"output folder {out} is not empty and holds no erasekit run: choose another folder "
                            "or pass --overwrite")
        elif _marker_hash(marker) != protocol_hash(protocol):
            if not resume:
                raise UserError(f"output folder {out} holds another run's results: pass --resume to continue it "
                                "(cached images are reused where they match), --overwrite to replace it, "
                                "or choose another folder")
            same = False
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(marker, {"protocol_hash": protocol_hash(protocol), "protocol": protocol})
    return same


def _marker_hash(marker: Path) -> str:
    try:
        return json.loads(marker.read_text()).get("protocol_hash", "")
    except (OSError, ValueError):
        return ""
