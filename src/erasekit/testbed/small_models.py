"""Saving and loading the testbed's small networks (judge, CLIP): fp16 safetensors with their config."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import atomic_write
from ..errors import UserError


def save_small_model(model: nn.Module, path, kind: str, keep_fp32: Callable[[str], bool] = lambda k: False,
                     extra_meta: dict | None = None, dtype=torch.float16) -> Path:
    """Floating tensors in dtype except BatchNorm statistics and those keep_fp32 names; config() in metadata."""
    from safetensors.torch import save_file

    state = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu()
        if v.dtype.is_floating_point and "running_" not in k and not keep_fp32(k):
            v = v.to(dtype)
        state[k] = v.contiguous()
    meta = {"format": f"erasekit.testbed.{kind}/1", "config": json.dumps(model.config())}
    if extra_meta:
        meta["training"] = json.dumps(extra_meta)
    path = Path(path)
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=meta))
    return path


def load_small_model(path: Path, build: Callable[..., nn.Module], kind: str, train_command: str,
                     device: torch.device | str = "cpu") -> nn.Module:
    """The network saved at path, built from its config, fp32, frozen, in eval mode."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not path.exists():
        raise UserError(f"no testbed {kind} weights at {path}; train them with `{train_command}`")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "config" not in meta:
        raise UserError(f"{path} is not a testbed {kind} (no config in its metadata)")
    model = build(**json.loads(meta["config"]))
    model.load_state_dict({k: v.float() if v.dtype.is_floating_point else v
                           for k, v in load_file(str(path)).items()})
    model.requires_grad_(False)
    return model.to(device).eval()
