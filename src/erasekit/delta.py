"""Delta: the tensors an erasure method changed, the unit of erasekit's output.

A delta maps diffusers parameter names to new values. UNet parameters keep their bare names, so
a stock pipeline takes a saved delta with `pipe.unet.load_state_dict(load_file(path), strict=False)`;
text-encoder parameters carry a "text_encoder." prefix, and strict=False silently IGNORES them there:
load those into `pipe.text_encoder` without the prefix (`erasekit apply` lists what a delta touches).
The file is safetensors with one JSON metadata entry: method, config, base model identity, a hash
of the tensors it replaces, a sha256 of its own tensors, and the erasekit version. Loading checks that
sha256 and refuses NaN/inf values; applying checks names, shapes and the base hash, so a delta made for
another base model fails with one clear line.

A delta may hold LoRA factors instead (a fine-tuning run with lora_rank): PEFT-layout keys under the pipeline
component's prefix ("transformer.<module>.lora_A.weight"), which stock diffusers' `pipe.load_lora_weights(path)`
reads; erasekit merges them into the base weights when it checks or applies the delta (`values`).

A foreign delta, a safetensors file of changed tensors without erasekit metadata (e.g. the public UCE
code's output), is read too: its keys are diffusers UNet names or "text_encoder."-prefixed names, it is
matched to the base by names and shapes only, and its record says its provenance is unknown. The other
layouts the field publishes (an erased pipeline folder, a text-encoder checkpoint, LoRA weights) are read
against the base model by erasekit.delta_sources. Pickle files (.pt, .ckpt, .bin, .pth, or any file that is
not safetensors) are never loaded.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .checkpoint import atomic_write, json_text
from .errors import UserError
from .model import Model

FORMAT = "erasekit.delta/1"
FOREIGN = "foreign delta, provenance unknown"  # the method of a delta file erasekit did not write
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")
CONVERT_HINT = ("convert it to safetensors outside erasekit, in an environment you trust with that file "
                "(python -c \"import torch; from safetensors.torch import save_file; "
                "save_file(torch.load('IN', weights_only=True), 'OUT.safetensors')\")")


def tensor_hash(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names and fp16-rounded values: the same for a base loaded in fp32 or fp16."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().to("cpu", torch.float16).contiguous().numpy().tobytes())
    return h.hexdigest()


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the sorted names, dtypes, shapes and exact bytes of tensors: a delta file's own checksum."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        value = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}\0{value.dtype}\0{tuple(value.shape)}\0".encode())
        h.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors holding NaN or inf."""
    return [name for name, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def refuse_pickle(path: Path, what: str = "delta") -> None:
    """UserError unless path looks like safetensors: a pickle-format suffix, or a pickle or zip (torch.save)
    header, is refused before anything reads it."""
    with open(path, "rb") as f:
        head = f.read(9)
    safetensors_shaped = head[8:9] == b"{"  # an 8-byte header length, then the JSON header
    pickled = head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")  # pickle protocol 2-5
    if path.suffix.lower() in PICKLE_SUFFIXES or head[:4] == b"PK\x03\x04" or (pickled and not safetensors_shaped):
        raise UserError(f"{what} {path} is a pickle checkpoint, not safetensors: erasekit loads no pickle (unpickling "
                        f"can run code); {CONVERT_HINT}")


def _needs(base: Model | None, path: Path, what: str) -> Model:
    """The base model a layout is read against, or a UserError for a caller that gave none."""
    if base is None:
        raise UserError(f"{path} is {what}: it is read against the base model (Delta.load(path, base=model))")
    return base


def _setting(config, key: str):
    """The first value of key in a (nested) config mapping, or None."""
    if isinstance(config, dict):
        if key in config:
            return config[key]
        for value in config.values():
            found = _setting(value, key)
            if found is not None:
                return found
    return None


@dataclass
class Delta:
    tensors: dict[str, torch.Tensor]
    method: str
    config: dict = field(default_factory=dict)
    base: dict = field(default_factory=dict)  # Model.identity() of the base
    base_hash: str = ""  # tensor_hash of the base's values of these tensors
    stats: dict = field(default_factory=dict)  # method-specific measurements (residuals, norms, times)
    version: str = ""

    @classmethod
    def from_changes(cls, model: Model, new: dict[str, torch.Tensor], method: str, config: dict | None = None,
                     stats: dict | None = None) -> Delta:
        """A delta from new values of some of model's parameters (model must still hold the base values)."""
        from . import __version__

        old = model.parameters_of(new)
        return cls(tensors={k: v.detach().to("cpu", torch.float32).contiguous() for k, v in new.items()},
                   method=method, config=dict(config or {}), base=model.identity(), base_hash=tensor_hash(old),
                   stats=dict(stats or {}), version=__version__)

    @classmethod
    def from_factors(cls, model: Model, factors: dict[str, torch.Tensor], targets: list[str], method: str,
                     config: dict | None = None, stats: dict | None = None) -> Delta:
        """A delta of LoRA factors (PEFT layout, "<component>.<module>.lora_A.weight" / "lora_B"), adapting the
        weights `targets` (delta keys) of model, which must still hold the base values."""
        delta = cls.from_changes(model, {}, method, config, stats)
        delta.tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in factors.items()}
        delta.base_hash = tensor_hash({name: model.parameter(name) for name in targets})
        return delta

    @property
    def is_lora(self) -> bool:
        """Whether the delta holds LoRA factors (merged into the base when applied) rather than new tensors."""
        from .delta_sources import is_lora

        return is_lora(self.tensors)

    def values(self, model: Model) -> dict[str, torch.Tensor]:
        """The new values of the model's tensors the delta replaces, by delta key: its tensors, or its LoRA
        factors merged into model's current (base) weights."""
        if not self.is_lora:
            return self.tensors
        from .delta_sources import merge_lora

        return merge_lora(self.tensors, model, Path(self.config.get("file", "the delta")), read_config=False)

    # -- files ------------------------------------------------------------------------------
    def metadata(self) -> dict:
        return {"format": FORMAT, "method": self.method, "config": self.config, "base": self.base,
                "base_hash": self.base_hash, "stats": self.stats, "erasekit_version": self.version}

    def save(self, path: str | Path, overwrite: bool = False, dtype: torch.dtype | None = None) -> Path:
        """Write the delta atomically; refuses to replace an existing file unless overwrite."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise UserError(f"{path} already exists: choose another path or pass --overwrite")
        bad = non_finite(self.tensors)
        if bad:
            lr = _setting(self.config, "lr")
            lower = (f"lower lr (it was {lr}) or the number of steps" if lr is not None
                     else "use milder settings (--set) for the method")
            raise UserError(f"{self.method} diverged: {len(bad)} of {len(self.tensors)} edited tensors hold NaN or "
                            f"inf values (e.g. {bad[0]}); nothing was written to {path}: {lower} and run it again")
        tensors = {k: (v.to(dtype) if dtype else v).contiguous() for k, v in self.tensors.items()}
        meta = {"erasekit": json_text({**self.metadata(), "tensors_sha256": tensors_sha256(tensors)}, indent=None)}
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
        return path

    @classmethod
    def load(cls, path: str | Path, base: Model | None = None) -> Delta:
        """Read a delta: erasekit's own file (its tensors_sha256 checked), a foreign safetensors file of changed
        tensors, or, against base (the model it will be applied to), an erased model folder, a text-encoder
        checkpoint or LoRA weights (erasekit.delta_sources); refuses pickle files, damaged files and NaN/inf
        values with one line."""
        from . import delta_sources

        path = Path(path)
        if path.is_dir():
            delta_sources.check_path(path)
            tensors, config = delta_sources.from_folder(path, _needs(base, path, "an erased model folder"))
            return cls._foreign(path, tensors, config)
        if not path.is_file():
            raise UserError(f"delta file {path} does not exist: give the .safetensors file `erasekit erase` wrote, "
                            "or an erased model folder")
        refuse_pickle(path)
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                raw_meta = (f.metadata() or {}).get("erasekit")
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise UserError(f"delta file {path} is corrupt, truncated or not safetensors "
                            f"({str(exc).splitlines()[0][:120]}): erasekit reads deltas only as safetensors (and "
                            "loads no pickle); re-create it with `erasekit erase`") from exc
        bad = non_finite(tensors)
        if bad:
            raise UserError(f"delta {path} holds NaN or inf values in {len(bad)} of {len(tensors)} tensors (e.g. "
                            f"{bad[0]}): the method that wrote it diverged; re-create it with milder settings")
        if raw_meta is None:
            return cls.foreign(path, tensors, base)
        try:
            meta = json.loads(raw_meta)
        except ValueError:
            meta = None
        if not isinstance(meta, dict):
            raise UserError(f"delta {path} has unreadable erasekit metadata: re-create it with `erasekit erase`")
        if meta.get("format") != FORMAT:
            raise UserError(f"{path} has delta format {meta.get('format')!r}, this erasekit reads {FORMAT!r}")
        recorded = meta.get("tensors_sha256")
        if recorded is not None and recorded != tensors_sha256(tensors):
            raise UserError(f"delta {path} is damaged: its tensors do not match the sha256 recorded when it was "
                            "written; re-create it with `erasekit erase`")
        return cls(tensors=tensors, method=meta["method"], config=meta.get("config", {}), base=meta.get("base", {}),
                   base_hash=meta.get("base_hash", ""), stats=meta.get("stats", {}),
                   version=meta.get("erasekit_version", ""))

    @classmethod
    def foreign(cls, path: Path, tensors: dict[str, torch.Tensor], base: Model | None = None) -> Delta:
        """A safetensors file of changed tensors that erasekit did not write: diffusers UNet names, or
        'text_encoder.'-prefixed names ('unet.'-prefixed UNet names are accepted too); a text encoder's weights
        under bare CLIPTextModel names; or LoRA weights, merged into base's tensors. No base hash: it is
        matched to a base by names and shapes only."""
        from . import delta_sources

        if not tensors:
            raise UserError(f"{path} holds no tensors: give a delta with the changed weights")
        layout = "changed tensors (state dict)"
        if delta_sources.is_lora(tensors):
            layout, tensors = delta_sources.LORA, delta_sources.merge_lora(tensors, _needs(base, path, "LoRA"), path)
        elif delta_sources.is_text_model_file(tensors, base):
            layout = delta_sources.TEXT_FILE
            tensors = (delta_sources.changed(base, tensors, "text_encoder.", path) if base is not None
                       else {"text_encoder." + k: v for k, v in tensors.items()})
            if not tensors:
                raise UserError(f"{path} has the text encoder's weights unchanged from {base.name}: nothing to apply")
        renamed = {k.removeprefix("unet."): v for k, v in tensors.items()}
        if len(renamed) != len(tensors):
            raise UserError(f"{path} names a UNet tensor both with and without the 'unet.' prefix: keep one")
        return cls._foreign(path, renamed, {"layout": layout, "file_sha256": file_sha256(path)})

    @classmethod
    def _foreign(cls, path: Path, tensors: dict[str, torch.Tensor], config: dict) -> Delta:
        return cls(tensors=tensors, method=FOREIGN, config={"file": str(path), **config, "provenance": "unknown"},
                   base={"name": "unknown (foreign delta)"})

    @property
    def is_foreign(self) -> bool:
        return self.method == FOREIGN

    # -- applying -----------------------------------------------------------------------------
    def check(self, model: Model) -> None:
        """Raise a one-line UserError unless this delta fits model's current weights."""
        base_name = self.base.get("name", "?")
        if self.is_foreign:
            missing = ("a foreign delta's keys must be this model's diffusers UNet parameter names, or its text "
                       "encoder's with a 'text_encoder.' prefix")
            wrong = "this foreign delta was made for another model"
        else:
            missing = wrong = f"this delta was made for another architecture ({base_name})"
        values = self.values(model)
        for name, value in values.items():
            try:
                param = model.parameter(name)
            except KeyError:
                raise UserError(f"delta tensor {name!r} does not exist in {model.name}: {missing}") from None
            if tuple(param.shape) != tuple(value.shape):
                raise UserError(f"delta tensor {name!r} has shape {tuple(value.shape)} but {model.name} has "
                                f"{tuple(param.shape)}: {wrong}")
        current = tensor_hash({name: model.parameter(name) for name in values})
        if self.base_hash and current != self.base_hash:
            raise UserError(f"this delta was made for base model {base_name!r} (tensor hash {self.base_hash[:12]}) "
                            f"but {model.name} has different weights (hash {current[:12]}): apply it to the model "
                            "it was made for")

    def apply(self, model: Model, check: bool = True) -> dict[str, torch.Tensor]:
        """Write the delta's values into model in place; returns the replaced values (for revert)."""
        if check:
            self.check(model)
        old = {}
        with torch.no_grad():
            for name, value in self.values(model).items():
                param = model.parameter(name)
                old[name] = param.detach().clone()
                param.copy_(value.to(param.device, param.dtype))
        return old

    @staticmethod
    def revert(model: Model, old: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, value in old.items():
                model.parameter(name).copy_(value)

    @contextmanager
    def applied(self, model: Model, check: bool = True):
        """with delta.applied(model): ... the model is edited inside the block, restored after."""
        old = self.apply(model, check=check)
        try:
            yield model
        finally:
            self.revert(model, old)

    @staticmethod
    @contextmanager
    def swapped(model: Model, values: dict[str, torch.Tensor]):
        """with Delta.swapped(model, values): the named parameters hold values inside the block."""
        current = {name: model.parameter(name).detach().clone() for name in values}
        Delta.revert(model, values)
        try:
            yield model
        finally:
            Delta.revert(model, current)

    def relative_change(self, model: Model) -> dict[str, float]:
        """||new - base|| / ||base|| per tensor, against model's current (base) values."""
        out = {}
        for name, value in self.values(model).items():
            base = model.parameter(name).detach().float().cpu()
            out[name] = float((value.float() - base).norm() / base.norm().clamp(min=1e-12))
        return out

    def components(self, model: Model) -> dict[str, dict]:
        """What the delta touches, per component ("UNet cross-attention K/V", "other UNet tensors", "text
        encoder"): {component: {"tensors": n, "mean": mean relative change, "max": max}} (touched ones only)."""
        kv = {la.name for la in model.cross_attention_layers()}
        change = self.relative_change(model)
        groups: dict[str, list[float]] = {}
        for name, rel in change.items():
            part = "text encoder" if name.startswith("text_encoder.") else (
                "UNet cross-attention K/V" if name in kv else "other UNet tensors")
            groups.setdefault(part, []).append(rel)
        order = ("UNet cross-attention K/V", "other UNet tensors", "text encoder")
        return {part: {"tensors": len(groups[part]), "mean": sum(groups[part]) / len(groups[part]),
                       "max": max(groups[part])} for part in order if part in groups}
