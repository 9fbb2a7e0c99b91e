"""Training checkpoints in safetensors + JSON (no pickle), written atomically.

A checkpoint holds named tensor groups (model weights, EMA weights, optimizer moments) and a
JSON-able dict of everything else (step, optimizer hyper-parameters, config).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path) and move the result onto path in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into flat tensors and a JSON-able remainder."""
    state = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(path: Path, groups: dict[str, dict[str, torch.Tensor]], meta: dict,
                    optimizer: torch.optim.Optimizer | None = None) -> None:
    """Write groups of tensors ({group: {name: tensor}}) and meta into one safetensors file."""
    flat = {f"{g}/{k}": v.detach().contiguous().cpu() for g, sd in groups.items() for k, v in sd.items()}
    meta = dict(meta)
    if optimizer is not None:
        opt_tensors, opt_meta = optimizer_to_flat(optimizer)
        flat.update({f"optimizer/{k}": v.cpu() for k, v in opt_tensors.items()})
        meta["optimizer"] = opt_meta
    atomic_write(Path(path), lambda tmp: save_file(flat, str(tmp), metadata={"meta": json.dumps(meta)}))


def load_checkpoint(path: Path, optimizer: torch.optim.Optimizer | None = None
                    ) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["meta"])
    flat = load_file(str(path))
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        group, name = key.split("/", 1)
        groups.setdefault(group, {})[name] = value
    if optimizer is not None and "optimizer" in meta:
        optimizer_from_flat(optimizer, groups.pop("optimizer", {}), meta["optimizer"])
    return groups, meta
