"""The `audit` command: parser and handler; the runner does the work."""

from __future__ import annotations

from pathlib import Path

from .. import arguments as types
from ..errors import UserError


def add_parser(sub, model_arg) -> None:
    from ..evaluation.commands import RUN_PATHS, add_run_args
    from ..evaluation.random_prompts import PROMPTS
    from . import ATTACKS

    p = sub.add_parser("audit", help="one resumable run: rates with no attack, the attacks "
                       f"({', '.join(ATTACKS)}), the random-prompt base rate and the oracle, with 95%% intervals")
    model_arg(p)
    p.add_argument("--delta", action="append", required=True, help="the delta to audit (several: applied together)")
    p.add_argument("--random-prompts", type=types.count, default=PROMPTS,
                   help=f"random-word prompts for the base rate (default {PROMPTS}; --limit applies too)")
    p.add_argument("--set", dest="settings", action="append", metavar="ATTACK.KEY=VALUE",
                   help="an attack setting, e.g. p4d.iterations=50 (repeatable; default: each attack's own)")
    p.add_argument("--reuse", metavar="DIR", help="an earlier audit's folder (same suite and settings, another "
                   "delta): its parts that this audit shares (the oracle's; the unedited model's images) are copied "
                   "in and not computed again; DIR is only read")
    add_run_args(p, samples=32)
    p.set_defaults(func=cmd_audit, stacked=True, real_images=None, **RUN_PATHS)


def attack_options(items: list[str] | None) -> dict[str, dict[str, str]]:
    """['p4d.iterations=50'] -> {'p4d': {'iterations': '50'}}, every name one of the audit's attacks."""
    from ..files import key_values
    from . import ATTACKS

    options: dict[str, dict[str, str]] = {name: {} for name in ATTACKS}
    for key, value in key_values(items, "--set").items():
        name, dot, setting = key.partition(".")
        if not dot or name not in options or not setting:
            raise UserError(f"--set {key}={value} must be ATTACK.KEY=VALUE with ATTACK one of {', '.join(ATTACKS)}")
        options[name][setting] = value
    return options


def build_audit(args):
    """The Audit from parsed arguments (run_audit makes the checks that need the loaded model first)."""
    from .. import attacks
    from ..evaluation.commands import build_run
    from ..evaluation.random_prompts import random_suite
    from ..families import load
    from .runner import Audit, oracle_name

    options = attack_options(args.settings)
    model, variants, suite, judge, settings = build_run(args)
    configs = {}
    for name, values in options.items():
        attack = attacks.get(name)
        configs[name] = (attack, attacks.build_config(attack, values, testbed=model.world is not None,
                                                      source="--set"))
    random = random_suite(model, suite, args.random_prompts).limit(args.limit)
    oracle = oracle_name(model, suite)
    return Audit(model, variants, suite, random, judge, settings, configs,
                 oracle=None if oracle is None else load(oracle, device=model.device))  # run_audit checks the rest


def _rate(row: dict, key: str) -> str:
    from ..stats import format_rate

    return format_rate(row.get(key), row.get(f"{key}_ci"), row.get(f"{key}_n", row.get("n")))  # an attack's: n


def cmd_audit(args) -> None:
    from .runner import run_audit

    audit = build_audit(args)
    out = Path(args.out)
    r = run_audit(audit, out, resume=args.resume, overwrite=args.overwrite,
                  reuse=None if args.reuse is None else Path(args.reuse))
    unedited = {k.removeprefix("unedited_"): v for k, v in r.items() if k.startswith("unedited_")}
    print(f"unedited: preservation {_rate(unedited, 'preservation_accuracy')}; "
          f"base rate {_rate(unedited, 'base_rate')}")
    rows = [("delta", r)] + ([(f"oracle {r['oracle']['model']}", r["oracle"])] if r["oracle"] else [])
    for label, row in rows:
        asr = ", ".join(f"{name} {_rate(a, 'asr')}" for name, a in row["attacks"].items())
        print(f"{label}: ASR {asr}; mean ASR {_rate(row, 'mean_asr')}; preservation "
              f"{_rate(row, 'preservation_accuracy')}; base rate {_rate(row, 'base_rate')}")
    print(f"{r['_timing']['wall_time_s']} s; wrote {out / 'results.json'} and {out / 'report.html'}")
