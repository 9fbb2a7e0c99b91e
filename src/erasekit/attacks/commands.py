"""The `attack` command: parser and handler."""

from __future__ import annotations

from pathlib import Path


def add_parser(sub, model_arg) -> None:
    from ..evaluation.commands import add_run_args

    p = sub.add_parser("attack", help="red-team an erased model: unlearndiff, p4d(-n/-k), ringabell(-continuous)")
    model_arg(p)
    p.add_argument("--delta", action="append", required=True, help="the erased model's delta (several: applied "
                   "together)")
    p.add_argument("--attack", required=True, help="unlearndiff, p4d, p4d-n, p4d-k, ringabell, ringabell-continuous")
    p.add_argument("--set", dest="prompt_set", help="the prompt set to attack (default: the suite's first target set)")
    p.add_argument("--option", action="append", metavar="KEY=VALUE", help="an attack setting (repeatable)")
    add_run_args(p, samples=32)
    p.set_defaults(func=cmd_attack, stacked=True, real_images=None)


def cmd_attack(args) -> None:
    from ..evaluation.commands import build_run
    from ..files import key_values
    from . import build_config, get
    from .runner import make_context, run_attack

    attack = get(args.attack)
    model, variants, suite, judge, settings = build_run(args)
    cfg = build_config(attack, key_values(args.option, "--option"), testbed=model.name == "testbed", source="--option")
    ctx = make_context(model, variants[-1], judge, suite.concepts, settings)
    out = Path(args.out)
    results = run_attack(ctx, attack, cfg, suite, args.prompt_set, out, resume=args.resume, overwrite=args.overwrite)
    from ..stats import format_rate

    cost = results["_timing"]["seconds_per_attacked_prompt"]
    pre, asr = (format_rate(results[k], results[f"{k}_ci"]) for k in ("pre_asr", "asr"))
    print(f"{attack.name} on {suite.name} ({results['n']} prompts): pre-ASR {pre}, ASR {asr}; "
          f"{results['attacked']} prompts attacked"
          f"{'' if cost is None else f', {cost:.2f} s each'}; wrote {out / 'results.json'} and {out / 'report.html'}")
