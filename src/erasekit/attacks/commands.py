"""The `attack` command: parser and handler."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError


def add_parser(sub, model_arg) -> None:
    p = sub.add_parser("attack", help="red-team an erased model: unlearndiff, p4d(-n/-k), ringabell(-continuous)")
    model_arg(p)
    p.add_argument("--delta", action="append", required=True, help="the erased model's delta (several: applied "
                   "together)")
    p.add_argument("--attack", required=True, help="unlearndiff, p4d, p4d-n, p4d-k, ringabell, ringabell-continuous")
    p.add_argument("--suite", required=True, help="testbed:CONCEPT or a prompt CSV (its target prompts are attacked)")
    p.add_argument("--set", dest="prompt_set", help="the prompt set to attack (default: the suite's first target set)")
    p.add_argument("--out", required=True, help="output folder: results.json, report.html, images")
    p.add_argument("--limit", type=int, help="attack the first K prompts")
    p.add_argument("--samples", type=int, default=32, help="testbed suites: prompts per set (default 32)")
    p.add_argument("--concept", help="the concept a CSV suite targets (default: from the file's layout)")
    p.add_argument("--judge", help="testbed, nudenet, nudenet-extended or module:attr (default: the suite's)")
    p.add_argument("--threshold", type=float, help="the judge's threshold (default: the judge's own)")
    p.add_argument("--option", action="append", metavar="KEY=VALUE", help="an attack setting (repeatable)")
    p.add_argument("--steps", type=int, help="sampler steps (default: the model's)")
    p.add_argument("--guidance", type=float, help="guidance scale (default: the model's)")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--resume", action="store_true", help="continue a run in --out")
    p.add_argument("--overwrite", action="store_true", help="replace another run's results in --out")
    p.set_defaults(func=cmd_attack, stacked=True, real_images=None)


def parse_options(items: list[str] | None) -> dict[str, str]:
    values = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--option {item!r} is not KEY=VALUE")
        values[key.strip()] = value.strip()
    return values


def cmd_attack(args) -> None:
    from ..evaluation.commands import build_run
    from . import build_config, get
    from .runner import make_context, run_attack

    attack = get(args.attack)
    model, variants, suite, judge, settings = build_run(args)
    cfg = build_config(attack, parse_options(args.option), testbed=model.name == "testbed", source="--option")
    ctx = make_context(model, variants[-1], judge, suite.concepts, settings)
    out = Path(args.out)
    results = run_attack(ctx, attack, cfg, suite, args.prompt_set, out, resume=args.resume, overwrite=args.overwrite)
    cost = results["_timing"]["seconds_per_attacked_prompt"]
    print(f"{attack.name} on {suite.name} ({results['n']} prompts): pre-ASR {results['pre_asr']:.3f}, "
          f"ASR {results['asr']:.3f}; {results['attacked']} prompts attacked"
          f"{'' if cost is None else f', {cost:.2f} s each'}; wrote {out / 'results.json'} and {out / 'report.html'}")
