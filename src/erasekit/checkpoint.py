"""What erasekit writes to disk: atomic files, JSON without NaN, append-only JSONL logs, and training
checkpoints in safetensors + JSON (no pickle).

A checkpoint holds named tensor groups (model weights, EMA weights, optimizer moments) and a
JSON-able dict of everything else (step, optimizer hyper-parameters, config). A JSONL log is appended
one record per line; a kill can tear its last line, so every writer that resumes one calls
`resume_jsonl` first, which truncates the torn line (and any records after the resume point).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import UserError

NON_FINITE_KEY = "non_finite"  # results files list here every NaN/inf value written as null, and why


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


# -- JSON without NaN ------------------------------------------------------------------------------
def finite(data, where: str = "", replaced: dict[str, str] | None = None):
    """data with every NaN/inf float replaced by None; replaced (when given) collects {JSON path: value}."""
    if isinstance(data, float) and not math.isfinite(data):
        if replaced is not None:
            replaced[where or "(top level)"] = repr(data)
        return None
    if isinstance(data, dict):
        return {k: finite(v, f"{where}.{k}" if where else str(k), replaced) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite(v, f"{where}[{i}]", replaced) for i, v in enumerate(data)]
    return data


def json_text(data, indent: int | None = 2) -> str:
    """Strict JSON (no NaN/Infinity, which standard JSON readers reject) for a results file. A non-finite
    number is written as null and, when data is a mapping, named under "non_finite" with its value, so a
    reader sees that the metric was not a number rather than missing."""
    replaced: dict[str, str] = {}
    clean = finite(data, replaced=replaced)
    if replaced and isinstance(clean, dict):
        clean[NON_FINITE_KEY] = {path: f"{value}: not a finite number, written as null"
                                 for path, value in replaced.items()}
    return json.dumps(clean, indent=indent, allow_nan=False) + ("\n" if indent is not None else "")


def atomic_write_json(path: Path, data) -> None:
    """Write data as strict JSON (see json_text) atomically."""
    atomic_write_text(Path(path), json_text(data))


# -- append-only JSONL logs ------------------------------------------------------------------------
def append_jsonl(path: Path, record: dict) -> None:
    """Append one record as one line (NaN/inf written as null)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(finite(record), allow_nan=False) + "\n")


def resume_jsonl(path: Path, keep: Callable[[dict], bool] | None = None) -> list[dict]:
    """The records of an append-only JSONL log a resuming run continues. A torn last line (a write cut
    off by a kill) is truncated away; with keep, the records it rejects (e.g. steps after the checkpoint
    being resumed) are dropped too, so nothing is logged twice. A bad line before the last one is damage,
    not a torn write: UserError naming the line. The file is rewritten atomically when anything is dropped."""
    path = Path(path)
    if not path.is_file():
        return []
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError:
            if number == len(lines):
                break  # the torn last line
            raise UserError(f"log {path} line {number} is not a JSON record (the file is damaged): remove that "
                            "line or the log, then resume") from None
        records.append(record)
    kept = [r for r in records if keep is None or keep(r)]
    if len(kept) != len(lines) or (raw and not raw.endswith(b"\n")):
        atomic_write_text(path, "".join(json.dumps(finite(r), allow_nan=False) + "\n" for r in kept))
    return kept


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
