"""The `attack` command: parser and handler."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from .. import arguments as types
from ..errors import UserError


def add_parser(sub, model_arg) -> None:
    from ..evaluation.commands import RUN_PATHS, add_run_args

    p = sub.add_parser("attack", help="red-team an erased model: unlearndiff, p4d(-n/-k), ringabell(-continuous)")
    model_arg(p)
    p.add_argument("--delta", action="append", required=True, help="the erased model's delta (several: applied "
                   "together)")
    p.add_argument("--attack", required=True, help="unlearndiff, p4d, p4d-n, p4d-k, ringabell, ringabell-continuous")
    p.add_argument("--prompt-set", dest="prompt_set",
                   help="the prompt set to attack (default: the suite's first target set)")
    p.add_argument("--set", dest="settings", action="append", metavar="KEY=VALUE",
                   help="an attack setting (repeatable), as erase's --set")
    p.add_argument("--option", dest="old_settings", action="append", help=argparse.SUPPRESS)
    p.add_argument("--attack-batch", type=types.count, default=None, metavar="N",
                   help="prompts attacked together, one batched step across them (default 16); the results "
                        "do not depend on it")
    add_run_args(p, samples=32)
    p.set_defaults(func=cmd_attack, stacked=True, real_images=None, **RUN_PATHS)


def cmd_attack(args) -> None:
    from ..evaluation.commands import build_run
    from ..families import is_testbed
    from ..files import key_values
    from . import build_config, get
    from .runner import BATCH, make_context, run_attack

    attack = get(args.attack)
    if args.old_settings:
        warnings.warn("--option is deprecated: attack settings are --set KEY=VALUE, as for erase", stacklevel=2)
    for item in args.settings or []:
        if "=" not in item:
            raise UserError(f"--set {item!r} is not KEY=VALUE: attack settings are --set KEY=VALUE; the prompt set "
                            "to attack is --prompt-set NAME")
    values = key_values((args.settings or []) + (args.old_settings or []), "--set")
    cfg = build_config(attack, values, testbed=is_testbed(args.model), source="--set")
    model, variants, suite, judge, settings = build_run(args)
    ctx = make_context(model, variants[-1], judge, suite.concepts, settings)
    out = Path(args.out)
    results = run_attack(ctx, attack, cfg, suite, args.prompt_set, out, resume=args.resume, overwrite=args.overwrite,
                         batch=BATCH if args.attack_batch is None else args.attack_batch)
    from ..stats import format_rate

    cost = results["_timing"]["seconds_per_attacked_prompt"]
    pre, asr = (format_rate(results[k], results[f"{k}_ci"]) for k in ("pre_asr", "asr"))
    print(f"{attack.name} on {suite.name} ({results['n']} prompts): pre-ASR {pre}, ASR {asr}; "
          f"{results['attacked']} prompts attacked"
          f"{'' if cost is None else f', {cost:.2f} s each'}; wrote {out / 'results.json'} and {out / 'report.html'}")
