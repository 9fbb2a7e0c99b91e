"""How a delta is read from whatever the user gives as --delta: the layouts the field publishes.

Delta.load(path, base) is the one entry; it reads erasekit's own delta files and plain foreign safetensors
itself and hands the other layouts here:
- an erased model folder: a diffusers pipeline folder (model_index.json) with the base's architecture, or one
  component folder (config.json): a UNet2DConditionModel, or a CLIPTextModel as AdvUnlearn publishes its text
  encoder. The changed tensors are found by comparing with the base (at fp16 resolution, as tensor_hash does).
- a safetensors of text-encoder weights under bare CLIPTextModel names ("text_model...."): applied to the
  base's text encoder (only the tensors that differ from the base are kept).
- LoRA weights in PEFT or diffusers layout ("M.lora_A.weight"/"M.lora_B.weight", or "M.lora.down.weight"/
  "M.lora.up.weight", the old "attn2.processor.to_k_lora.down.weight"; an "M.alpha" tensor or the
  adapter_config.json's lora_alpha beside the file, else alpha = rank): merged into the base tensors,
  W + alpha / rank * up @ down.
Every one of them is a foreign delta (provenance unknown) whose config names its layout and the sha256 of the
files read. Weights are read from safetensors only; a folder holding only pickled weights is refused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .errors import UserError

PIPELINE, UNET, TEXT_ENCODER = "erased pipeline folder", "UNet folder", "text-encoder folder"
TEXT_FILE, LORA = "text-encoder safetensors (bare CLIPTextModel names)", "LoRA (PEFT/diffusers), merged into the base"
LORA_PAIRS = ((".lora_A.weight", ".lora_B.weight"), (".lora_A.default.weight", ".lora_B.default.weight"),
              (".lora.down.weight", ".lora.up.weight"), (".lora_down.weight", ".lora_up.weight"))
PREFIXES = ("base_model.model.", "unet.", "transformer.")  # PEFT's wrapper, diffusers' denoiser component prefixes
FOLDER_HINT = ("give a delta .safetensors file, an erased diffusers pipeline folder (model_index.json), or a UNet or "
               "CLIPTextModel folder (config.json and safetensors weights)")


def folder_layout(path: Path) -> str | None:
    """The layout of a folder given as a delta, or None when it is none erasekit reads."""
    if (path / "model_index.json").is_file():
        return PIPELINE
    config = path / "config.json"
    if not config.is_file():
        return None
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    if data.get("_class_name") == "UNet2DConditionModel":
        return UNET
    if "CLIPTextModel" in (data.get("architectures") or []):
        return TEXT_ENCODER
    return None


def check_path(path: Path, flag: str = "--delta") -> None:
    """A one-line UserError unless path is a file or a folder in a layout erasekit reads (before any work)."""
    if not path.exists():
        raise UserError(f"{flag} {path} does not exist: {FOLDER_HINT}")
    if path.is_dir() and folder_layout(path) is None:
        raise UserError(f"{flag} {path} is a folder but not an erased model erasekit reads: {FOLDER_HINT}")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _weights(folder: Path, what: str) -> list[Path]:
    """The safetensors weight files of one component folder (one, or a sharded set); pickle-only is refused."""
    from .delta import CONVERT_HINT, PICKLE_SUFFIXES

    files = sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith("."))
    if files:
        return files
    if any(p.suffix.lower() in PICKLE_SUFFIXES for p in folder.iterdir()):
        raise UserError(f"{folder} ({what}) holds pickled weights and no safetensors: erasekit loads no pickle "
                        f"(unpickling can run code); {CONVERT_HINT}")
    raise UserError(f"{folder} ({what}) holds no .safetensors weights: {FOLDER_HINT}")


def _read(files: list[Path]) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in files:
        try:
            tensors.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise UserError(f"{f} is corrupt, truncated or not safetensors ({str(exc).splitlines()[0][:120]}): "
                            "re-save the model with safe_serialization=True") from exc
    return tensors


def changed(base, tensors: dict[str, torch.Tensor], prefix: str, source: Path) -> dict[str, torch.Tensor]:
    """The tensors (component names, given erasekit's prefix) whose fp16-rounded values differ from the base's.
    A name the base's component does not have, or a shape it has otherwise, is another architecture."""
    from .model import text_model_name

    component = base.text_encoder if prefix else base.unet
    params = dict(component.named_parameters())
    state = set(component.state_dict())
    out = {}
    for name, value in tensors.items():
        name = text_model_name(name, state) if prefix else name
        if name not in params:
            if name in state:
                continue  # a buffer (position ids), not a weight
            raise UserError(f"{source} has {name!r}, which {base.name}'s {'text encoder' if prefix else 'UNet'} does "
                            "not have: it is not the base's architecture; give the erased model made from this base")
        old = params[name].detach().to("cpu")
        if tuple(old.shape) != tuple(value.shape):
            raise UserError(f"{source}: {name!r} has shape {tuple(value.shape)} but {base.name} has "
                            f"{tuple(old.shape)}: it is not the base's architecture")
        if not torch.equal(value.to(torch.float16), old.to(torch.float16)):
            out[prefix + name] = value.to(torch.float32).contiguous()
    return out


def from_folder(path: Path, base) -> tuple[dict[str, torch.Tensor], dict]:
    """(changed tensors, config) of an erased model folder against base."""
    layout = folder_layout(path)
    if layout is None:
        check_path(path)
    parts = {PIPELINE: [("unet", ""), ("text_encoder", "text_encoder.")], UNET: [(".", "")],
             TEXT_ENCODER: [(".", "text_encoder.")]}[layout]
    tensors, files = {}, {}
    for sub, prefix in parts:
        folder = path / sub
        if layout == PIPELINE and not folder.is_dir():
            continue  # a pipeline without that component changed nothing there
        weights = _weights(folder, sub if sub != "." else layout)
        tensors.update(changed(base, _read(weights), prefix, path))
        files.update({str(f.relative_to(path)): sha256_of(f) for f in weights})
    if not files:
        raise UserError(f"{path} has neither unet/ nor text_encoder/ weights: {FOLDER_HINT}")
    if not tensors:
        raise UserError(f"{path} has the same weights as {base.name} (no tensor differs): it is not an erased "
                        "version of this base")
    digest = hashlib.sha256("".join(f"{k}\0{v}\n" for k, v in sorted(files.items())).encode()).hexdigest()
    identity = {"folder": str(path), "name": path.name}
    index = path / "model_index.json"
    if index.is_file():
        identity["pipeline_class"] = json.loads(index.read_text()).get("_class_name")
    return tensors, {"layout": layout, "identity": identity, "files": files, "file_sha256": digest}


def is_text_model_file(tensors: dict[str, torch.Tensor], base=None) -> bool:
    """Whether a file holds text-encoder weights under bare CLIPTextModel names: "text_model."-prefixed (older
    transformers, as AdvUnlearn publishes them), or, given the base, names its text encoder has and its UNet
    has not (newer transformers write them without "text_model.")."""
    if not tensors:
        return False
    if all(k.startswith("text_model.") for k in tensors):
        return True
    if base is None:
        return False
    text, unet = set(base.text_encoder.state_dict()), set(base.unet.state_dict())
    return all(k in text and k not in unet for k in tensors)


def is_lora(tensors: dict[str, torch.Tensor]) -> bool:
    return any(k.endswith(suffix) for k in tensors for pair in LORA_PAIRS for suffix in pair)


def _module_name(stem: str) -> str:
    """A LoRA key's module as a delta key stem: PEFT and 'unet.' prefixes dropped, the old attention-processor
    names ("attn2.processor.to_k_lora") mapped to the module they adapt ("attn2.to_k")."""
    for prefix in PREFIXES:
        stem = stem.removeprefix(prefix)
    if ".processor." in stem:
        head, _, tail = stem.partition(".processor.")
        tail = tail.removesuffix("_lora")
        stem = f"{head}.{'to_out.0' if tail == 'to_out' else tail}"
    return "text_encoder." + stem if stem.startswith("text_model.") else stem


def merge_lora(tensors: dict[str, torch.Tensor], base, path: Path, read_config: bool = True) -> dict[str, torch.Tensor]:
    """The base tensors with every LoRA pair merged: W + alpha / rank * up @ down, under delta key names;
    read_config: take alpha from an adapter_config.json beside path when there is one."""
    config_alpha = None
    config = path.parent / "adapter_config.json"
    if read_config and config.is_file():
        try:
            config_alpha = float(json.loads(config.read_text()).get("lora_alpha"))
        except (OSError, ValueError, TypeError):
            config_alpha = None
    used, out = set(), {}
    for key in tensors:
        for down_suffix, up_suffix in LORA_PAIRS:
            if not key.endswith(down_suffix):
                continue
            stem = key.removesuffix(down_suffix)
            up_key = stem + up_suffix
            if up_key not in tensors:
                raise UserError(f"LoRA file {path} has {key!r} but not {up_key!r}: every down (A) needs its up (B)")
            down, up = tensors[key].double(), tensors[up_key].double()
            rank = down.shape[0]
            alpha_t = tensors.get(stem + ".alpha")
            alpha = float(alpha_t) if alpha_t is not None else config_alpha if config_alpha is not None else rank
            name = _module_name(stem) + ".weight"
            try:
                weight = base.parameter(name)
            except KeyError:
                raise UserError(f"LoRA file {path} adapts {stem!r}, which {base.name} does not have ({name!r}): a LoRA "
                                "for another architecture") from None
            if up.shape[0] * down[0].numel() != weight.numel():
                raise UserError(f"LoRA file {path}: {stem!r} has factors of shapes {tuple(up.shape)} and "
                                f"{tuple(down.shape)} but {base.name}'s {name} is {tuple(weight.shape)}: a LoRA for "
                                "another architecture")
            update = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * (alpha / rank)
            out[name] = (weight.detach().double().cpu() + update).float().contiguous()
            used |= {key, up_key, stem + ".alpha"}
    left = sorted(set(tensors) - used)
    if left:
        raise UserError(f"LoRA file {path} also holds {left[0]!r} ({len(left)} tensors not in a LoRA pair): give the "
                        "LoRA weights alone, or a delta of plain tensors")
    return out
