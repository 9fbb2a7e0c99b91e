"""Model families: which adapter serves a model source, and loading it.

A source is a name a family registers ("testbed", "testbed:no-circle"), a local diffusers pipeline folder,
or a Hugging Face hub id ("ORG/NAME", optionally "ORG/NAME@REVISION") resolved through the local cache.
A folder's family is read from its model_index.json (the pipeline class it was saved with); each family
names the adapter class (an erasekit.model.Model subclass) and the diffusers pipeline class that load it.
Nothing outside this package and a family's own adapter asks which family a model is.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..model import Model, quiet_libraries
from .hub import is_hub_id, resolve


@dataclass(frozen=True)
class Family:
    name: str  # recorded in Model.identity()["family"]
    pipelines: tuple[str, ...]  # model_index.json "_class_name" values this family loads
    pipeline_class: str  # the diffusers class that loads its folders
    adapter: str  # "module:Class" of its Model subclass, imported when used


FAMILIES = (
    Family("sd", ("StableDiffusionPipeline",), "StableDiffusionPipeline", "erasekit.model:Model"),
    Family("sdxl", ("StableDiffusionXLPipeline",), "StableDiffusionXLPipeline", "erasekit.families.sdxl:SDXLModel"),
    Family("flux", ("FluxPipeline",), "FluxPipeline", "erasekit.families.flux:FluxModel"),
)
KNOWN = {p: f for f in FAMILIES for p in f.pipelines}
NOT_YET = {"StableDiffusion3Pipeline": "Stable Diffusion 3", "FluxKontextPipeline": "FLUX.1 Kontext"}


def is_testbed(source) -> bool:
    """True for a source the testbed family serves ("testbed", "testbed:no-circle"): its settings differ."""
    from ..testbed import is_testbed as named

    return named(source)


def family_of(folder: Path) -> Family:
    """The family of a pipeline folder, from the class its model_index.json names."""
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    cls = index.get("_class_name", "")
    if cls in KNOWN:
        return KNOWN[cls]
    if cls in NOT_YET:
        raise UserError(f"{folder} is a {NOT_YET[cls]} pipeline ({cls}): erasekit has no {NOT_YET[cls]} adapter yet; "
                        f"families it loads: {', '.join(sorted(KNOWN))}")
    raise UserError(f"{folder} holds a {cls or 'unnamed'} pipeline, which no erasekit family loads: give a folder "
                    f"saved by one of {', '.join(sorted(KNOWN))}")


def _device(device: str | torch.device | None) -> torch.device:
    """The device asked for, else CUDA when present, else the CPU."""
    return torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load(source: str | Path = "testbed", device: str | torch.device | None = None,
         dtype: torch.dtype = torch.float32, allow_pickle: bool = False, offline: bool = False) -> Model:
    """Load a model: "testbed" (the built-in miniature model), one of its oracles ("testbed:no-circle", trained
    without circle), a local diffusers pipeline folder (SD1.x/2.x, SDXL or FLUX.1), or a hub id found in the local
    Hugging Face cache (downloaded when absent unless offline). A folder's weights are read only from
    safetensors files unless allow_pickle (pickled .bin weights can run code when loaded: only for a
    source you trust)."""
    from ..testbed.adapter import load_testbed, weights_for

    if is_testbed(source):
        return load_testbed(weights_for(str(source)), device=device, dtype=dtype, source=str(source))
    folder, origin = resolve(str(source), offline=offline, allow_pickle=allow_pickle)
    family = family_of(folder) if (folder / "model_index.json").is_file() else FAMILIES[0]
    quiet_libraries()
    pipe = load_folder(folder, family, allow_pickle=allow_pickle, dtype=dtype)
    module, _, cls = family.adapter.partition(":")
    adapter = getattr(__import__(module, fromlist=[cls]), cls)
    name = str(source) if is_hub_id(str(source)) else folder.name
    return adapter(pipe.to(_device(device), dtype), str(source), name, origin=origin)


PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
PICKLE_FIX = ("convert it to safetensors in an environment you trust with it (DiffusionPipeline.from_pretrained"
              "(folder).save_pretrained(new_folder, safe_serialization=True)), or pass --allow-pickle-weights "
              "(Python: allow_pickle=True) if you trust its source")


def pickled_only(folder: Path) -> list[Path]:
    """Per component folder of a pipeline folder, a pickled weight file when the folder has no safetensors one."""
    found = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        pickled = sorted(f for pattern in PICKLE_WEIGHTS for f in sub.glob(pattern))
        if pickled and not any(sub.glob("*.safetensors")):
            found.append(pickled[0])
    return found


def load_folder(path: Path, family: Family, allow_pickle: bool = False, dtype: torch.dtype = torch.float32):
    """The family's diffusers pipeline from a local folder, safetensors only unless allow_pickle, its weights read
    straight into dtype (no float32 copy on the way: FLUX.1-dev's would be 67 GB)."""
    import diffusers

    if not path.is_dir() or not (path / "model_index.json").is_file():
        raise UserError(f"{path} is not a diffusers pipeline folder (no model_index.json): give the folder that "
                        "holds model_index.json, unet/, text_encoder/, tokenizer/, vae/ and scheduler/")
    pickled = pickled_only(path)
    if pickled and not allow_pickle:
        raise UserError(f"{path} holds pickled weights ({pickled[0].relative_to(path)}) and no safetensors for "
                        f"{pickled[0].parent.name}/: erasekit loads no pickle by default (unpickling can run code); "
                        + PICKLE_FIX)
    extra = {"safety_checker": None, "requires_safety_checker": False} if family.name == "sd" else {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return getattr(diffusers, family.pipeline_class).from_pretrained(
                path, local_files_only=True, use_safetensors=None if allow_pickle else True, torch_dtype=dtype,
                **extra)
    except Exception as exc:  # noqa: BLE001 - any loader failure becomes one line for the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"could not load {path} as a {family.pipeline_class}: {first[:300]}") from exc
