"""Erasure methods: each a config dataclass and erase(model, spec, cfg) -> Delta."""

from __future__ import annotations

import dataclasses
import math
import typing
import warnings
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
    # settings used on the testbed: smaller (fine-tuning, attacks) or fitted to its bidirectional encoder
    testbed: dict = dataclasses.field(default_factory=dict)
    fine_tuning: bool = False  # its erase takes base_values (what an earlier stage changed) when composed
    parts: tuple = ()  # a composition "A+B": the methods it runs in order
    # setting names of the method's public code that differ from erasekit's: {public name: erasekit name}. The
    # erasekit name is a config field, or "anchor" (the spec's anchor: what the public code's guide concepts are)
    aliases: dict = dataclasses.field(default_factory=dict)
    public_code: str = ""  # whose names the aliases are, for the note ("the public UCE code")


# The public names UCE's and RECE's scripts use (erase_scale and preserve_scale are erasekit's names too):
# UCE trainscripts/uce_sd_erase.py --lamb, and --guided_concepts in its older train-scripts/train_erase.py and RECE.
UCE_ALIASES = {"lamb": "lam", "guided_concepts": "anchor"}
RECE_ALIASES = {"lamb": "lam", "regular_scale": "mu", "guided_concepts": "anchor"}  # RECE train.py
# AdvUnlearn's train-scripts/AdvUnlearn.py argument names
ADVUNLEARN_ALIASES = {"iterations": "steps", "warmup_iter": "warmup_steps", "adv_prompt_num": "prefix_tokens",
                      "attack_step": "attack_steps", "adv_prompt_update_step": "attack_every",
                      "retain_loss_w": "retain_weight", "negative_guidance": "eta", "start_guidance": "guidance",
                      "ddim_steps": "sampler_steps"}
SPEC_ALIASES = {"anchor"}  # alias targets that are spec settings, not config fields

# The registry's names by kind, readable without importing the methods (and torch): `erase --help` lists them.
CLOSED_FORM = ("uce", "rece", "erasepro", "trce-stage1")
FINE_TUNING = ("esd", "trce-stage2", "co-erasing", "score", "advunlearn")
COMPOSED = {"trce": "trce-stage1+trce-stage2"}  # named compositions


def _registry() -> dict[str, Method]:
    from ..finetune import advunlearn, coerasing, esd, score, trce2
    from . import erasepro, rece, trce, uce

    methods = {m.name: m for m in (
        Method("uce", uce.UCEConfig, uce.erase, "unified concept editing (closed form, K/V)", uce.TESTBED,
               aliases=UCE_ALIASES, public_code="the public UCE code"),
        Method("rece", rece.RECEConfig, rece.erase, "UCE + derived-embedding rounds (closed form, K/V)",
               uce.TESTBED, aliases=RECE_ALIASES, public_code="the public RECE code"),
        Method("erasepro", erasepro.EraseProConfig, erasepro.erase,
               "zero-residual progressive edit (closed form, text encoder + K/V)", erasepro.TESTBED),
        Method("trce-stage1", trce.TRCEStage1Config, trce.erase, "TRCE textual erasure of [EoT] (closed form)",
               trce.TESTBED),
        Method("esd", esd.ESDConfig, esd.erase, "ESD: negative-guidance fine-tuning (esd-x, -x-strict, -u, -all)",
               esd.TESTBED, fine_tuning=True),
        Method("trce-stage2", trce2.TRCEStage2Config, trce2.erase,
               "TRCE trajectory steering (fine-tuning attn1 and to_q; run after trce-stage1)", trce2.TESTBED,
               fine_tuning=True),
        Method("co-erasing", coerasing.CoErasingConfig, coerasing.erase,
               "Co-Erasing: ESD on text, then ESD with image tokens of the concept (fine-tuning)", coerasing.TESTBED,
               fine_tuning=True),
        Method("score", score.SCOREConfig, score.erase,
               "SCORE as we read it: saliency-masked ESD with a discriminator on clean estimates (fine-tuning)",
               score.TESTBED, fine_tuning=True),
        Method("advunlearn", advunlearn.AdvUnlearnConfig, advunlearn.erase,
               "AdvUnlearn: ESD on the text encoder against adversarial prefix tokens, with retention (fine-tuning)",
               advunlearn.TESTBED, fine_tuning=True, aliases=ADVUNLEARN_ALIASES,
               public_code="the public AdvUnlearn code"),
    )}
    methods["trce"] = _compose(methods, COMPOSED["trce"], name="trce",
                               summary="full TRCE: stage 1 (closed form) then stage 2 (fine-tuning)")
    return methods


def _compose(methods: dict[str, Method], text: str, name: str | None = None, summary: str = "") -> Method:
    """A method that runs its parts in order ("uce+esd"): each later part on the model the earlier
    parts made, and one delta with all their tensors."""
    from .compose import erase_composed

    parts = tuple(get_single(methods, part.strip()) for part in text.split("+"))
    if len(parts) < 2:
        raise UserError(f"a composition needs two methods joined by '+', got {text!r}")
    for later in parts[1:]:
        if not later.fine_tuning:
            raise UserError(f"in {text!r}, {later.name} comes after another method but is closed form: "
                            "put the closed-form method first and fine-tuning methods after it")
    name = name or "+".join(p.name for p in parts)

    def erase(model, spec, cfgs):
        return erase_composed(model, spec, cfgs, parts, name)

    return Method(name, type(None), erase, summary or " then ".join(p.name for p in parts), parts=parts)


def get_single(methods: dict[str, Method], name: str) -> Method:
    if name not in methods:
        raise UserError(f"unknown method {name!r}: choose one of {', '.join(methods)} (or join two with '+')")
    return methods[name]


def get(name: str) -> Method:
    methods = _registry()
    if "+" in name:
        return _compose(methods, name)
    return get_single(methods, name)


def variant(text: str) -> tuple[Method, dict[str, str]]:
    """A method with settings written "NAME" or "NAME:KEY=VALUE[,KEY=VALUE]" (e.g. "uce:positions=all"):
    (the method, its settings as strings for build_config)."""
    name, _, options = text.partition(":")
    values = {}
    for item in filter(None, options.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise UserError(f"method variant {text!r}: write settings as KEY=VALUE, separated by commas")
        values[key.strip()] = value.strip()
    return get(name), values


def names() -> list[str]:
    return list(_registry())


def listing() -> str:
    """Every method by kind, and how to compose them: the help of `erase --method`."""
    composed = "; ".join(f"{name} ({parts})" for name, parts in COMPOSED.items())
    return (f"closed form: {', '.join(CLOSED_FORM)}; fine-tuning: {', '.join(FINE_TUNING)}; composed: {composed}; "
            "or a composition A+B[+C]: any method, then fine-tuning ones, run in order into one delta "
            "(e.g. uce+esd)")


def resolve_aliases(method: Method, values: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """values with the method's public setting names (Method.aliases) renamed to erasekit's, each with a one-line
    note; a public name given beside its erasekit name is refused. Spec settings ("anchor") are left to
    spec_settings."""
    aliases = getattr(method, "aliases", {})
    out = dict(values)
    for alias, own in aliases.items():
        if alias not in out or own in SPEC_ALIASES:
            continue
        if own in out:
            raise UserError(f"{source} sets both {alias!r} and its erasekit name {own!r} for {method.name}: give one")
        value = out.pop(alias)
        warnings.warn(f"{source}: {alias!r} is {method.public_code}'s name for {own!r}: read as {own}={value}",
                      stacklevel=3)
        out[own] = value
    return out


def spec_settings(method: Method, values: dict[str, Any], source: str = "--set") -> tuple[dict, dict]:
    """(config values, spec values): a public name that means a spec setting (guided_concepts: the anchors,
    ';'-separated as the public UCE code reads them) is taken out of the config values, with a note."""
    config, spec = dict(values), {}
    for alias, own in getattr(method, "aliases", {}).items():
        if alias in config and own in SPEC_ALIASES:
            value = str(config.pop(alias))
            spec[own] = [v.strip() for v in value.split(";")]
            warnings.warn(f"{source}: {alias!r} is {method.public_code}'s name for the spec's anchor: read as "
                          + " ".join(f"--anchor {v!r}" for v in spec[own]), stacklevel=2)
    return config, spec


def build_config(method: Method, values: dict[str, Any], source: str = "config", testbed: bool = False) -> Any:
    """A method config from a mapping, converting strings to the fields' types; unknown keys are named.
    The public code's setting names are accepted as aliases (Method.aliases, with a note). On the testbed the
    method's testbed settings come first. A composition gets a list of configs, one per part: 'part.key' goes to
    that part, a plain key to every part that has it."""
    if getattr(method, "parts", ()):
        return _composed_configs(method, values, source, testbed)
    spec_only = sorted(a for a, own in getattr(method, "aliases", {}).items() if own in SPEC_ALIASES and a in values)
    if spec_only:
        raise UserError(f"{source}: {spec_only[0]!r} is {method.public_code}'s name for the concept spec's anchor, "
                        "not a method setting: give it as --anchor (or anchors: in --spec)")
    values = {**(getattr(method, "testbed", {}) if testbed else {}), **resolve_aliases(method, values, source)}
    fields = {f.name: f for f in dataclasses.fields(method.config)}
    unknown = set(values) - set(fields)
    if unknown:
        raise UserError(f"{source} has unknown keys {sorted(unknown)} for {method.name}: allowed {sorted(fields)}")
    hints = typing.get_type_hints(method.config)
    converted = {}
    for key, value in values.items():
        converted[key] = check_setting(key, _convert(value, hints[key], f"{source}: {key}"), hints[key],
                                       f"{source}: {key}")
    return method.config(**converted)


# Setting names whose value may be 0 (every other whole-number setting counts something: at least 1), and
# number settings that are fractions or may be negative (every other number setting must be >= 0).
ZERO_ALLOWED = {"seed", "stage1_steps", "lora_rank"}  # lora_rank 0: full tensors
FRACTIONS = {"crossover", "elite", "mutation", "early_fraction", "saliency"}
SIGNED = {"eta", "guidance"}


def check_setting(key: str, value: Any, hint: Any, where: str) -> Any:
    """A setting's value of the field's type and in its range (finite, counts >= 1, fractions in [0, 1]):
    a NaN learning rate or a zero-step run is refused when read, before any work."""
    kinds = typing.get_args(hint) or (hint,)
    if value is None and type(None) in kinds:
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        if not any(isinstance(value, k) and not (isinstance(value, bool) and k is not bool)
                   for k in kinds if isinstance(k, type)):
            raise UserError(f"{where}: {value!r} is not a {' or '.join(k.__name__ for k in kinds)}")
        return value
    if float in kinds and int not in kinds:
        value = float(value)
    elif int in kinds and (isinstance(value, float) and not value.is_integer()):
        raise UserError(f"{where}: {value!r} is not a whole number")
    elif int in kinds:
        value = int(value)
    else:
        raise UserError(f"{where}: {value!r} is not a {' or '.join(k.__name__ for k in kinds)}")
    if not math.isfinite(value):
        raise UserError(f"{where}: {value} is not a finite number: give a number")
    if isinstance(value, int) and key == "seed" and not 0 <= value < 2**32:
        raise UserError(f"{where}: seed {value} is out of range: use 0 to {2**32 - 1}")
    if isinstance(value, int) and key not in ZERO_ALLOWED and value < 1:
        raise UserError(f"{where}: {value} must be at least 1")
    if isinstance(value, int) and value < 0:
        raise UserError(f"{where}: {value} must not be negative")
    if key in FRACTIONS and not 0 <= value <= 1:
        raise UserError(f"{where}: {value} must be between 0 and 1")
    if isinstance(value, float) and key not in SIGNED and value < 0:
        raise UserError(f"{where}: {value} must not be negative")
    return value


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


def _composed_configs(method: Method, values: dict[str, Any], source: str, testbed: bool) -> list:
    routed: dict[str, dict[str, Any]] = {p.name: {} for p in method.parts}
    for key, value in values.items():
        part, dot, field = key.partition(".")
        if dot and part in routed:
            routed[part][field] = value
            continue
        owners = [p.name for p in method.parts
                  if key in {f.name for f in dataclasses.fields(p.config)} | set(getattr(p, "aliases", {}))]
        if not owners:
            raise UserError(f"{source} has unknown key {key!r} for {method.name}: no part has it")
        for owner in owners:
            routed[owner][key] = value
    return [build_config(p, routed[p.name], source, testbed) for p in method.parts]
