"""`erasekit harden`: erase, attack on training prompts, erase again with what the attack found (runner.py)."""

from __future__ import annotations

from pathlib import Path

from .. import arguments as types
from ..errors import UserError


def add_parser(sub, model_arg, erase_args) -> None:
    p = sub.add_parser("harden", help="erase, then rounds of attack on training prompts and re-erasure with the "
                                      "adversarial prompts that revived the concept; writes a delta")
    model_arg(p)
    erase_args(p)
    p.add_argument("--rounds", type=types.count, default=2, help="attack rounds (default 2; stops early when an "
                   "attack revives nothing)")
    p.add_argument("--attack", default="unlearndiff", help="the attack each round runs (default unlearndiff)")
    p.add_argument("--attack-set", action="append", default=[], metavar="KEY=VALUE",
                   help="an attack setting (repeatable), as `erasekit attack --set` takes it")
    p.add_argument("--attack-batch", type=types.count, help="prompts attacked together (default 16)")
    p.add_argument("--suite", help="the training prompts to attack: a CSV/TXT prompt file that the audit will not "
                   "attack (the testbed draws its own, disjoint from its suites)")
    p.add_argument("--prompts", type=types.count, default=16,
                   help="testbed: training prompts per target concept (default 16)")
    p.add_argument("--judge", help="the judge that says whether an attack revived the concept (default: the "
                   "suite's), as for evaluate")
    p.add_argument("--judge-option", action="append", default=[], metavar="KEY=VALUE", help="a judge option")
    p.add_argument("--threshold", type=types.fraction, help="the judge's threshold (default: the judge's own)")
    p.add_argument("--steps", type=types.count, help="sampler steps (default: the model's)")
    p.add_argument("--guidance", type=types.finite, help="guidance scale (default: the model's)")
    p.add_argument("--negative-prompt", default="", help="negative prompt for every image (default none)")
    p.add_argument("--batch-size", type=types.count, default=32)
    p.add_argument("--run-dir", help="where each round's delta and attack go (default: OUT with .harden)")
    p.add_argument("--resume", action="store_true", help="continue a run in --run-dir")
    p.set_defaults(func=cmd_harden, inputs=[("spec", "file"), ("config", "file")],
                   outputs=[("out", "file"), ("run_dir", "folder")])


def cmd_harden(args) -> None:
    from ..attacks import build_config, get
    from ..cli import erase_inputs, load_for_erasing
    from ..evaluation.commands import run_settings, suite_judge
    from ..evaluation.suites import load_suite
    from ..families import is_testbed
    from ..files import key_values
    from ..stats import format_rate
    from .runner import harden, training_suite

    method, cfg, spec = erase_inputs(args)
    attack = get(args.attack)
    attack_cfg = build_config(attack, key_values(args.attack_set, "--attack-set"), testbed=is_testbed(args.model),
                              source="--attack-set")
    if len(spec.targets) != 1:
        raise UserError(f"hardening erases one concept at a time, not {len(spec.targets)}: harden each target "
                        "separately and compose the deltas")
    run_dir = Path(args.run_dir) if args.run_dir else Path(args.out).with_name(Path(args.out).name + ".harden")
    if run_dir.exists() and any(run_dir.iterdir()) and not args.resume and not args.overwrite:
        raise UserError(f"{run_dir} holds an earlier hardening run: pass --resume to continue it or --overwrite "
                        "to start again")
    model = load_for_erasing(args, method, spec)
    concept = spec.targets[0].name
    suite = (load_suite(args.suite, concept=concept) if args.suite else training_suite(model, spec, args.prompts))
    suite, judge = suite_judge(args, suite)
    settings = run_settings(args, model)
    delta, record = harden(model, method, spec, cfg, attack, attack_cfg, suite, judge, settings, run_dir,
                           args.rounds, resume=args.resume, overwrite=args.overwrite, batch=args.attack_batch)
    delta.save(args.out, overwrite=args.overwrite)
    for r in record["rounds"]:
        print(f"round {r['round']}: {attack.name} ASR {format_rate(r['asr'], r['asr_ci'])} on {r['n']} training "
              f"prompts; {len(r['added'])} adversarial prompts added")
    print(f"{method.name} hardened against {attack.name} with {record['adversarial_prompts_added']} adversarial "
          f"prompts; wrote {args.out} (rounds in {run_dir})")
