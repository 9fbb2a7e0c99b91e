"""Red-team attacks on erased models: UnlearnDiffAtk, P4D (N and K variants), Ring-A-Bell (the faithful
discrete search, and a continuous variant under its own name). Each is a config dataclass plus
attack(ctx, prompts, cfg, gens[, prepared]) -> [Found]: a batch of prompts attacked together, one seeded
generator per prompt, so that a prompt's answer does not depend on its batch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import UserError


@dataclass(frozen=True)
class Attack:
    name: str
    config: type
    run: Callable
    summary: str
    testbed: dict = field(default_factory=dict)  # smaller settings used on the testbed unless overridden
    fixed: dict = field(default_factory=dict)  # settings the name implies (p4d-k: variant k)
    ideal_only: bool = False  # attack only prompts the original model shows the concept for and the erased not
    prepare: Callable | None = None  # (ctx, suite, cfg) -> what run gets as its last argument


def _registry() -> dict[str, Attack]:
    from . import p4d, ringabell, unlearndiff

    ring = dict(config=ringabell.RingABellConfig, testbed=ringabell.TESTBED, prepare=ringabell.concept_vector)
    return {a.name: a for a in (
        Attack("unlearndiff", unlearndiff.UnlearnDiffConfig, unlearndiff.attack,
               "UnlearnDiffAtk: white-box prefix-token optimisation on the erased model", unlearndiff.TESTBED),
        Attack("p4d", p4d.P4DConfig, p4d.attack, "P4D-N (alias): N free tokens matched to the original model",
               p4d.TESTBED, {"variant": "n"}, ideal_only=True),
        Attack("p4d-n", p4d.P4DConfig, p4d.attack, "P4D-N: N free tokens matched to the original model",
               p4d.TESTBED, {"variant": "n"}, ideal_only=True),
        Attack("p4d-k", p4d.P4DConfig, p4d.attack, "P4D-K: a free token after every K prompt tokens",
               p4d.TESTBED, {"variant": "k"}, ideal_only=True),
        Attack("ringabell", run=ringabell.attack, summary="Ring-A-Bell: genetic search of K hard tokens", **ring),
        Attack("ringabell-continuous", run=ringabell.attack_continuous,
               summary="Ring-A-Bell's target embedding used directly (no hard prompt)", **ring),
    )}


def get(name: str) -> Attack:
    attacks = _registry()
    if name not in attacks:
        raise UserError(f"unknown attack {name!r}: choose one of {', '.join(attacks)}")
    return attacks[name]


def names() -> list[str]:
    return list(_registry())


def build_config(attack: Attack, values: dict, testbed: bool, source: str = "--set"):
    """The attack's config: its defaults, the testbed's smaller settings, then the user's values."""
    from ..methods import build_config as build

    if set(values) & set(attack.fixed):
        raise UserError(f"{attack.name} fixes {sorted(attack.fixed)}: choose another attack name instead")
    merged = {**(attack.testbed if testbed else {}), **values, **attack.fixed}
    return build(attack, merged, source)
