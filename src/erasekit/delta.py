"""Delta: the tensors an erasure method changed, the unit of erasekit's output.

A delta maps diffusers parameter names to new values. UNet parameters keep their bare names, so
a stock pipeline takes a saved delta with `pipe.unet.load_state_dict(load_file(path), strict=False)`;
text-encoder parameters carry a "text_encoder." prefix (unexpected keys that strict=False ignores).
The file is safetensors with one JSON metadata entry: method, config, base model identity, a hash
of the tensors it replaces, and the erasekit version. Applying a delta checks names, shapes and
that hash, so a delta made for another base model fails with one clear line.
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

from .checkpoint import atomic_write
from .errors import UserError
from .model import Model

FORMAT = "erasekit.delta/1"


def tensor_hash(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names and fp16-rounded values: the same for a base loaded in fp32 or fp16."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().to("cpu", torch.float16).contiguous().numpy().tobytes())
    return h.hexdigest()


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

        old = {name: model.parameter(name) for name in new}
        return cls(tensors={k: v.detach().to("cpu", torch.float32).contiguous() for k, v in new.items()},
                   method=method, config=dict(config or {}), base=model.identity(), base_hash=tensor_hash(old),
                   stats=dict(stats or {}), version=__version__)

    # -- files ------------------------------------------------------------------------------
    def metadata(self) -> dict:
        return {"format": FORMAT, "method": self.method, "config": self.config, "base": self.base,
                "base_hash": self.base_hash, "stats": self.stats, "erasekit_version": self.version}

    def save(self, path: str | Path, overwrite: bool = False, dtype: torch.dtype | None = None) -> Path:
        """Write the delta atomically; refuses to replace an existing file unless overwrite."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise UserError(f"{path} already exists: choose another path or pass --overwrite")
        tensors = {k: v.to(dtype) if dtype else v for k, v in self.tensors.items()}
        meta = {"erasekit": json.dumps(self.metadata())}
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Delta:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"delta file {path} does not exist: give the .safetensors file `erasekit erase` wrote")
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                raw_meta = (f.metadata() or {}).get("erasekit")
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise UserError(f"delta file {path} is corrupt or truncated ({str(exc).splitlines()[0][:120]}): "
                            "re-create it with `erasekit erase`") from exc
        if raw_meta is None:
            raise UserError(f"{path} is a safetensors file but not an erasekit delta (no 'erasekit' metadata)")
        meta = json.loads(raw_meta)
        if meta.get("format") != FORMAT:
            raise UserError(f"{path} has delta format {meta.get('format')!r}, this erasekit reads {FORMAT!r}")
        return cls(tensors=tensors, method=meta["method"], config=meta.get("config", {}), base=meta.get("base", {}),
                   base_hash=meta.get("base_hash", ""), stats=meta.get("stats", {}),
                   version=meta.get("erasekit_version", ""))

    # -- applying -----------------------------------------------------------------------------
    def check(self, model: Model) -> None:
        """Raise a one-line UserError unless this delta fits model's current weights."""
        base_name = self.base.get("name", "?")
        for name, value in self.tensors.items():
            try:
                param = model.parameter(name)
            except KeyError:
                raise UserError(f"delta tensor {name!r} does not exist in {model.name}: this delta was made for "
                                f"another architecture ({base_name})") from None
            if tuple(param.shape) != tuple(value.shape):
                raise UserError(f"delta tensor {name!r} has shape {tuple(value.shape)} but {model.name} has "
                                f"{tuple(param.shape)}: this delta was made for another architecture ({base_name})")
        current = tensor_hash({name: model.parameter(name) for name in self.tensors})
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
            for name, value in self.tensors.items():
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
        for name, value in self.tensors.items():
            base = model.parameter(name).detach().float().cpu()
            out[name] = float((value.float() - base).norm() / base.norm().clamp(min=1e-12))
        return out
