"""The `evaluate` and `compare` commands (parsers and handlers); the runner does the work."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from .. import arguments as types
from .. import samplers
from ..errors import UserError
from . import presets

# the paths evaluate and compare read and write, checked before any work (cli.preflight)
RUN_PATHS = {"inputs": [("delta", "delta"), ("real_images", "folder"), ("clip", "folder"),
                        ("fid_features", "features")],  # load_suite checks --suite itself
             "outputs": [("out", "folder")]}


def add_run_args(p, samples: int = 64) -> None:
    """The arguments every suite-running command shares (evaluate, compare, attack)."""
    p.add_argument("--suite", help="testbed:CONCEPT (e.g. testbed:star, testbed:red+striped) or a prompt CSV/TXT "
                   "file (required; with --protocol, the protocol's prompt file)")
    p.add_argument("--protocol", type=presets.check_name, metavar="NAME", help=presets.help_text())
    p.add_argument("--out", required=True, help="output folder: results.json, report.html and the image cache")
    p.add_argument("--limit", type=types.count, help="take the first K prompts of each prompt set")
    p.add_argument("--samples", type=types.count, default=samples,
                   help=f"testbed suites: prompts per prompt set (default {samples})")
    p.add_argument("--concept", help="the concept a CSV suite targets (default: from the file's layout)")
    p.add_argument("--category", action="append", metavar="NAME",
                   help="I2P files: keep only rows of this category (repeatable: rows of any), e.g. sexual for "
                   "nudity; recorded in the suite hash (default: every row)")
    p.add_argument("--judge", help="testbed, nudenet, nudenet-extended, classifier:FOLDER or clip:FOLDER (a local "
                   "transformers image classifier or CLIP folder), or a plug-in module:attr (default: the suite's); a "
                   "plug-in imports that module, which runs its code: name only code you trust. erasekit then calls "
                   "only a Judge subclass or a function marked @erasekit.judge_factory")
    p.add_argument("--threshold", type=types.fraction, help="the judge's threshold (default: the judge's own)")
    p.add_argument("--judge-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the judge (repeatable), e.g. top_k=3 or labels=imagenette for classifier:, "
                   "anchor=... or template=... for clip:; whole numbers and decimals are read as numbers")
    p.add_argument("--steps", type=types.count, help="sampler steps (default: the model's)")
    p.add_argument("--guidance", type=types.finite, help="guidance scale when a prompt has none (default: the model's)")
    p.add_argument("--scheduler", type=samplers.check_name, metavar="NAME",
                   help=f"the sampler: {samplers.names()} (default ddim, eta 0), built from the model folder's "
                   "scheduler config")
    p.add_argument("--dtype", type=presets.check_dtype, metavar="NAME",
                   help=f"{', '.join(presets.DTYPES)} (default fp32); the CPU always runs fp32 and records the request")
    p.add_argument("--seed", type=types.seed, help="one seed for every prompt's image (default: each prompt's own, "
                   "from its file's evaluation_seed column, else its row number)")
    types.add_size_args(p)
    p.add_argument("--negative-prompt", default="", help="negative prompt for every image (default none)")
    p.add_argument("--batch-size", type=types.count, default=32)
    p.add_argument("--resume", action="store_true", help="continue a run in --out, reusing its cached images")
    p.add_argument("--overwrite", action="store_true", help="replace another run's results in --out")


def add_common(p) -> None:
    add_run_args(p)
    p.add_argument("--real-images", help="a folder of real images for FID_real")
    p.add_argument("--clip", help="a local CLIP model folder (e.g. openai/clip-vit-large-patch14 saved there): CLIP "
                   "score, 100 * max(cos, 0), of every image against its prompt (the testbed has its own)")
    p.add_argument("--fid-features", metavar="FOLDER|inception:FILE",
                   help="the features FID_gen and FID_real use (default: the judge's own): a local CLIP or DINOv2 "
                   "folder's image embeddings, or inception:FILE, the standard FID Inception-v3 pool3 features "
                   "(2048-d, as pytorch-fid computes them) with FILE its weights, "
                   "pt_inception-2015-12-05-6726825d.pth (read with torch.load(weights_only=True): tensors only) "
                   "or a .safetensors copy")


def add_parsers(sub, model_arg) -> None:
    p = sub.add_parser("evaluate", help="generate a suite, judge it, write results.json and report.html")
    model_arg(p)
    p.add_argument("--delta", action="append", help="a delta to evaluate; several are applied together")
    add_common(p)
    p.set_defaults(func=cmd_evaluate, stacked=True, **RUN_PATHS)

    p = sub.add_parser("compare", help="several deltas side by side (each on its own) in one report")
    model_arg(p)
    p.add_argument("--delta", action="append", required=True, help="a delta to compare (repeatable)")
    add_common(p)
    p.set_defaults(func=cmd_evaluate, stacked=False, **RUN_PATHS)


def run_device():
    """This process's device: accelerate's when launched with several processes, else CUDA when present."""
    from ..families import _device
    from .runner import distributed_state

    state = distributed_state()
    return _device(state.device if state is not None else None)


def load_for_run(source: str, allow_pickle: bool = False, offline: bool = False, dtype=None):
    """The model on this process's device (accelerate's when launched with several processes)."""
    import torch

    from ..families import load

    return load(source, device=run_device(), dtype=dtype or torch.float32, allow_pickle=allow_pickle,
                offline=offline)


def note_short_limit(limit: int | None, suite) -> None:
    """Say so when --limit asks for more prompts than any set holds: every prompt is used, not `limit`."""
    largest = max((len(s.prompts) for s in suite.sets), default=0)
    if limit and largest and limit > largest:
        more = "; a testbed suite takes --samples N for more" if suite.layout == "testbed" else ""
        print(f"erasekit: --limit {limit} is more than any prompt set of {suite.name} holds ({largest}): every prompt "
              f"is used{more}", file=sys.stderr)


def build_run(args):
    """(model, variants, suite, judge, settings) from parsed arguments; every check before any work. A
    --protocol preset fills the settings the user left unset first (evaluation.presets)."""
    from .runner import load_variants
    from .suites import load_suite

    presets.require_suite(args)
    applied = presets.apply(args)

    def read(categories):
        return load_suite(args.suite, samples=args.samples, concept=args.concept,
                          categories=categories).limit(args.limit)

    suite = presets.adjust_suite(applied, args, read(getattr(args, "category", None) or ()), read)
    note_short_limit(args.limit, suite)
    suite, judge = suite_judge(args, suite)
    deviations = [] if applied is None else applied.deviations
    dtype = presets.run_dtype(getattr(args, "dtype", None), run_device(), deviations)
    model = load_for_run(args.model, allow_pickle=getattr(args, "allow_pickle_weights", False),
                         offline=getattr(args, "offline", False), dtype=dtype)
    variants = load_variants(args.delta or [], stacked=args.stacked, base=model)
    for variant in variants:
        for delta in variant.deltas:
            delta.check(model)
    settings = run_settings(args, model)
    model.use_sampler(settings.sampler)  # a sampler the model cannot step with is refused here, before any work
    presets.warn(deviations)
    return model, variants, suite, judge, dataclasses.replace(
        settings, preset=None if applied is None else applied.record(), deviations=tuple(deviations))


def suite_judge(args, suite):
    """(the suite with the judge's concepts, the judge) that --judge, --judge-option and --threshold name
    (default: the suite's own judge)."""
    from .judges import get_judge
    from .runner import require_suite_judge

    judge_name = args.judge or suite.judge
    if not judge_name:
        raise UserError(f"suite {suite.name} names no judge: pass --judge (testbed, nudenet, or module:attr)")
    options = judge_options(getattr(args, "judge_option", None) or [])
    if args.threshold is not None:
        options["threshold"] = args.threshold
    judge = get_judge(judge_name, **options)
    return require_suite_judge(suite, judge), judge


def run_settings(args, model):
    """Sampler steps, guidance, negative prompt, batch size and image size from the arguments, else the model's."""
    from .runner import Settings

    overrides = {"steps": args.steps or None, "guidance": args.guidance, "sampler": getattr(args, "scheduler", None)}
    return Settings.for_model(model, batch_size=args.batch_size, negative_prompt=args.negative_prompt,
                              height=getattr(args, "height", None), width=getattr(args, "width", None),
                              **{k: v for k, v in overrides.items() if v is not None})


def judge_options(items: list[str]) -> dict:
    """--judge-option KEY=VALUE items as a dict; whole numbers become ints and decimals floats."""
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise UserError(f"--judge-option {item!r} is not KEY=VALUE: write e.g. --judge-option top_k=3")
        if key in options:
            raise UserError(f"--judge-option {key} is given twice: give each option once")
        options[key] = _option_value(value.strip())
    return options


def _option_value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


def quality_metrics(args):
    """The CLIP scorer and FID feature model the arguments name (each None when not asked for)."""
    from .inception import feature_model
    from .measure import Quality
    from .vision import ClipScorer

    return Quality(clip=ClipScorer(args.clip) if getattr(args, "clip", None) else None,
                   fid_features=feature_model(args.fid_features) if getattr(args, "fid_features", None) else None)


def cmd_evaluate(args) -> None:
    from .runner import evaluate

    quality = quality_metrics(args)
    model, variants, suite, judge, settings = build_run(args)
    out = Path(args.out)
    results = evaluate(model, variants, suite, judge, out, settings, resume=args.resume, overwrite=args.overwrite,
                       real_images=Path(args.real_images) if args.real_images else None, quality=quality)
    if results is None:
        return
    from ..stats import format_rate

    for name, m in results["metrics"].items():
        rates = ", ".join(f"{k} {format_rate(v, m['target_rate_ci'][k], m['target_rate_n'][k])}"
                          for k, v in m["target_rate"].items())
        extra = "" if m.get("preservation_accuracy") is None else (
            f"; preservation {format_rate(m['preservation_accuracy'], m['preservation_accuracy_ci'])}")
        fid = "" if m.get("fid_gen") is None else f"; FID_gen {m['fid_gen']:.3f}"
        clip = "" if m.get("clip_score") is None else f"; CLIP score {m['clip_score']:.2f}"
        print(f"{name}: target rate {rates}{extra}{fid}{clip}")
    t = results["_timing"]
    print(f"{t['images_generated_here']} images generated, {t['images_cached_before']} reused, "
          f"{t['wall_time_s']} s; wrote {out / 'results.json'} and {out / 'report.html'}")
