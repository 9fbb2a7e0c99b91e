"""Erasure methods: each a config dataclass and erase(model, spec, cfg) -> Delta."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import UserError


@dataclass(frozen=True)
class Method:
    name: str
    config: type
    erase: Callable
    summary: str


def _registry() -> dict[str, Method]:
    from . import erasepro, rece, trce, uce

    return {m.name: m for m in (
        Method("uce", uce.UCEConfig, uce.erase, "unified concept editing (closed form, K/V)"),
        Method("rece", rece.RECEConfig, rece.erase, "UCE + derived-embedding rounds (closed form, K/V)"),
        Method("erasepro", erasepro.EraseProConfig, erasepro.erase,
               "zero-residual progressive edit (closed form, text encoder + K/V)"),
        Method("trce-stage1", trce.TRCEStage1Config, trce.erase, "TRCE textual erasure of [EoT] (closed form)"),
    )}


def get(name: str) -> Method:
    methods = _registry()
    if name not in methods:
        raise UserError(f"unknown method {name!r}: choose one of {', '.join(methods)}")
    return methods[name]


def names() -> list[str]:
    return list(_registry())


def build_config(method: Method, values: dict[str, Any], source: str = "config") -> Any:
    """A method config from a mapping, converting strings to the fields' types; unknown keys are named."""
    fields = {f.name: f for f in dataclasses.fields(method.config)}
    unknown = set(values) - set(fields)
    if unknown:
        raise UserError(f"{source} has unknown keys {sorted(unknown)} for {method.name}: allowed {sorted(fields)}")
    hints = typing.get_type_hints(method.config)
    converted = {}
    for key, value in values.items():
        converted[key] = _convert(value, hints[key], f"{source}: {key}")
    return method.config(**converted)


def _convert(value: Any, hint: Any, where: str) -> Any:
    if not isinstance(value, str):
        return value
    kinds = typing.get_args(hint) or (hint,)
    if value.lower() in ("none", "null") and type(None) in kinds:
        return None
    for kind in kinds:
        try:
            if kind is bool:
                if value.lower() in ("true", "1", "yes", "false", "0", "no"):
                    return value.lower() in ("true", "1", "yes")
                continue
            if kind in (int, float):
                return kind(value)
            if kind is str:
                return value
        except ValueError:
            continue
    raise UserError(f"{where}: cannot read {value!r} as {hint}")
