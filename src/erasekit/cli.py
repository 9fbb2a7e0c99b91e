"""The `erasekit` command line: a thin layer over the Python API.

Every command takes the model as an optional first argument: "testbed" (the default, the
built-in miniature model) or a local diffusers Stable Diffusion folder.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from . import arguments as types
from .arguments import parse_seeds
from .errors import UserError


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if getattr(args, "prompts_file", None):
        from .files import read_prompt_list

        prompts += read_prompt_list(args.prompts_file)
    if not prompts:
        raise UserError("no prompts: give --prompt TEXT (repeatable) or --prompts-file FILE")
    return prompts


def load_model(args):
    from .delta import Delta
    from .families import load

    model = load(args.model, allow_pickle=args.allow_pickle_weights, offline=args.offline)
    deltas = [Delta.load(path, base=model) for path in getattr(args, "delta", None) or []]  # all read against the base
    for delta in deltas:
        delta.apply(model)
    return model


# -- commands -------------------------------------------------------------------------------------
def cmd_info(args) -> None:
    model = load_model(args)
    layers = model.cross_attention_layers()
    info = {
        "model": model.identity(),
        "token_length": model.max_length,
        "latent_shape": list(model.latent_shape),
        "sampler_defaults": model.sampler_defaults,
        "cross_attention_matrices": len(layers),
        "cross_attention_shapes": sorted({f"{tuple(la.weight.shape)}" for la in layers}),
        "edit_layer_sets": {name: len(model.layer_set(name)) for name in model.edit_layer_sets()},
        "unet_parameters": sum(p.numel() for p in model.unet.parameters()),
    }
    print(json.dumps(info, indent=2))


def cmd_generate(args) -> None:
    from .generate import generate_to_folder

    prompts = read_prompts(args)
    model = load_model(args)
    out = generate_to_folder(model, prompts, parse_seeds(args.seeds), Path(args.out), steps=args.steps,
                             guidance=args.guidance, batch_size=args.batch_size, overwrite=args.overwrite,
                             deltas=args.delta or [], height=args.height, width=args.width)
    print(f"wrote {out / 'grid.png'} and {len(prompts) * len(parse_seeds(args.seeds))} images in {out / 'images'}")


def cmd_apply(args) -> None:
    from .delta import Delta
    from .families import load

    model = load(args.model, allow_pickle=args.allow_pickle_weights, offline=args.offline)
    delta = Delta.load(args.delta, base=model)
    delta.check(model)
    change = delta.relative_change(model)
    print(f"delta {args.delta} ({delta.method}) applies cleanly to {model.name}: "
          f"{len(change)} tensors, relative change mean {sum(change.values()) / len(change):.4g}, "
          f"max {max(change.values()):.4g}")
    if delta.is_foreign:
        print(f"  not written by erasekit: provenance unknown, {delta.config['layout']}, file sha256 "
              f"{delta.config['file_sha256']}")
    for part, c in delta.components(model).items():
        print(f"  {part}: {c['tensors']} tensors, relative change mean {c['mean']:.4g}, max {c['max']:.4g}")
    if any(name.endswith(".lora_A.weight") for name in delta.tensors):
        print("  LoRA factors (PEFT layout): stock diffusers loads them with pipe.load_lora_weights(PATH); "
              "`erasekit export` writes merged weights")
    elif any(name.startswith("text_encoder.") for name in delta.tensors):
        print("  note: a stock pipe.unet.load_state_dict(..., strict=False) silently ignores the text encoder's "
              "tensors: load them into pipe.text_encoder without the 'text_encoder.' prefix, or use `erasekit export`")
    if args.verbose:
        for name, rel in change.items():
            print(f"  {rel:.4g}  {name}")


def cmd_export(args) -> None:
    from .delta import Delta
    from .export import export
    from .families import load

    model = load(args.model, allow_pickle=args.allow_pickle_weights, offline=args.offline)
    deltas = [Delta.load(p, base=model) for p in args.delta or []]
    out = export(model, args.out, deltas, overwrite=args.overwrite)
    print(f"wrote pipeline folder {out} ({len(deltas)} delta(s) merged)")


def cmd_testbed_train(args) -> None:
    from .testbed.train import TrainConfig, train

    cfg = TrainConfig(out=args.out, seed=args.seed, steps=args.steps, batch_size=args.batch_size,
                      checkpoint_every=args.checkpoint_every, min_snr_gamma=args.min_snr_gamma,
                      min_snr_from=args.min_snr_from, min_snr_offset=args.min_snr_offset, ema_from=args.ema_from,
                      lr=args.lr, warmup=args.warmup, init_from=args.init_from or "",
                      exclude=tuple(args.exclude or ()))
    train(cfg, resume=not args.restart, argv=["erasekit", *sys.argv[1:]])


def parse_concept(text: str):
    """'star' or 'star:five-pointed star,starburst' -> Concept."""
    from .concepts import Concept

    name, _, synonyms = text.partition(":")
    return Concept(name.strip(), [s.strip() for s in synonyms.split(",") if s.strip()])


def testbed_default_applies(args, targets) -> bool:
    """On the testbed, a bare `--concept VALUE` (no anchor, preserve set, templates or synonyms) of a testbed
    value gets the testbed's fitted spec: the generic one (anchor '', nothing preserved) is not a sane edit
    there (ErasePro lost 0.79 of preservation accuracy with it)."""
    from .testbed import is_testbed
    from .testbed.world import VALUES

    values = {v for vs in VALUES.values() for v in vs}
    return (is_testbed(args.model) and bool(targets) and all(t.name in values and not t.synonyms for t in targets)
            and args.anchor is None and not args.preserve and not args.templates and not args.expand)


def build_spec(args, cfg=None):
    from .concepts import ConceptSpec

    if args.spec:
        spec = ConceptSpec.from_file(args.spec)
        if args.concept:
            raise UserError("give concepts either with --spec or with --concept, not both")
        return spec
    targets = [parse_concept(c) for c in args.concept or []]
    if not args.testbed_spec and testbed_default_applies(args, targets):
        print("erasekit: on the testbed, bare concepts get its fitted spec (--testbed-spec: training synonyms, "
              "a sibling value as anchor, the other values preserved); give --anchor or --preserve to set your own",
              file=sys.stderr)
        args.testbed_spec = True
    if args.testbed_spec:
        from .testbed.spec import erasure_spec

        if args.anchor or args.preserve or args.templates or any(t.synonyms for t in targets):
            raise UserError("--testbed-spec sets synonyms, anchors, preserve concepts and templates itself: "
                            "drop --anchor/--preserve/--templates and the ':synonyms', or drop --testbed-spec")
        return erasure_spec([t.name for t in targets], cfg)
    data = {"targets": targets, "anchors": args.anchor, "preserve": args.preserve or [], "expand": args.expand,
            "expansion": args.expansion}
    if args.templates:
        data["templates"] = args.templates
    return ConceptSpec(**data)


def check_setting_paths(cfg, model_source) -> None:
    """A method's run_dir (checkpoints, log) and cache files are outputs too: checked like --out."""
    from .outputs import check_output, protected_folders

    protected = protected_folders(model_source)
    for part in cfg if isinstance(cfg, list) else [cfg]:
        if getattr(part, "run_dir", ""):
            check_output(part.run_dir, "folder", "--set run_dir", protected)
        if getattr(part, "prior_cache", None):
            check_output(part.prior_cache, "file", "--set prior_cache", protected, overwrite=True)


def erase_inputs(args):
    """(method, config, spec) from erase's arguments, every setting and output path checked."""
    from . import methods
    from .families import is_testbed
    from .files import key_values, read_mapping

    method = methods.get(args.method)
    values = read_mapping(args.config, "config file") if args.config else {}
    values.update(key_values(args.set, "--set"))
    values, spec_values = methods.spec_settings(method, values, source=args.config or "--set")
    if spec_values.get("anchor") is not None:
        if args.anchor is not None or args.spec or args.testbed_spec:
            raise UserError("guided_concepts sets the anchor: drop it, or drop --anchor/--spec/--testbed-spec")
        args.anchor = spec_values["anchor"]
    cfg = methods.build_config(method, values, source=args.config or "--set", testbed=is_testbed(args.model))
    spec = build_spec(args, cfg)
    check_setting_paths(cfg, args.model)
    return method, cfg, spec


def load_for_erasing(args, method, spec):
    """The model on this process's device, refusing in one line a method its family cannot run."""
    from .evaluation.commands import load_for_run
    from .methods.common import warn_unknown_tokens

    model = load_for_run(args.model, allow_pickle=args.allow_pickle_weights, offline=args.offline)
    if method.fine_tuning or any(part.fine_tuning for part in method.parts):
        model.require("fine-tuning")
    for part in method.parts or (method,):
        model.require(part.name)  # a method the family cannot run says why in one line
    for phrase in warn_unknown_tokens(model, [p for t in spec.targets for p in t.phrases]):
        warnings.warn(f"every token of {phrase!r} is unknown to the tokenizer: it carries no meaning to erase",
                      stacklevel=2)
    return model


def cmd_erase(args) -> None:
    import time

    from .evaluation.runner import distributed_state

    method, cfg, spec = erase_inputs(args)
    model = load_for_erasing(args, method, spec)
    start = time.time()
    delta = method.erase(model, spec, cfg)
    delta.config["spec"] = {"source": "--spec" if args.spec else "testbed spec" if args.testbed_spec
                            else "--concept/--anchor/--preserve", **spec.to_dict()}
    state = distributed_state()
    if state is not None and not state.is_main_process:
        return  # every process trained the same weights (averaged gradients); the main one writes them
    delta.save(args.out, overwrite=args.overwrite)
    change = delta.relative_change(model)
    print(f"{method.name}: erased {', '.join(t.name for t in spec.targets)} from {model.name}: edited "
          f"{len(delta.tensors)} tensors (relative change mean {sum(change.values()) / len(change):.3g}, "
          f"max {max(change.values()):.3g}) in {time.time() - start:.2f} s; wrote {args.out}")
    for row in delta.stats.get("per_layer", []):
        print(f"  {row['layer']}: residual {row['residual']:.2e}, update norm {row['update_norm']:.3g}")


def cmd_testbed_evaluate(args) -> None:
    from .checkpoint import atomic_write_json
    from .delta import Delta
    from .testbed.adapter import load_testbed
    from .testbed.evaluate import attribute_accuracy, concept_report
    from .testbed.judge import load_judge

    model, judge = load_testbed(args.weights), load_judge()
    deltas = [Delta.load(p, base=model) for p in args.delta or []]
    for delta in deltas:
        delta.check(model)
    if args.concept:
        result = concept_report(model, judge, args.concept, deltas, samples=args.samples, steps=args.steps,
                                guidance=args.guidance)
    else:
        from contextlib import ExitStack

        with ExitStack() as stack:
            for delta in deltas:
                stack.enter_context(delta.applied(model))
            result = attribute_accuracy(model, judge, samples=args.samples, seed=args.seed, steps=args.steps,
                                        guidance=args.guidance)
        result["deltas"] = args.delta or []
    if args.json:
        atomic_write_json(Path(args.json), result)
    print(json.dumps(result, indent=2))


def cmd_testbed_train_judge(args) -> None:
    from .testbed.judge import train_judge

    print(json.dumps(train_judge(out_path=args.out, seed=args.seed, steps=args.steps), indent=2))


def cmd_testbed_train_clip(args) -> None:
    from .testbed.clip import train_clip

    print(json.dumps(train_clip(out_path=args.out, seed=args.seed, steps=args.steps), indent=2))


def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(args.out, samples=args.samples, concept=args.concept, method=args.method)


# -- parser ---------------------------------------------------------------------------------------
def erase_args(p) -> None:
    """What to erase and how: the arguments erase and harden share."""
    from .methods import listing

    p.add_argument("--method", required=True, help=listing())
    p.add_argument("--concept", action="append",
                   help="a target concept, optionally with synonyms: 'star' or 'star:five-pointed star,starburst' "
                        "(repeatable)")
    p.add_argument("--anchor", action="append",
                   help="the anchor/guide concept (one, or one per target; default '', 'art' with --templates art)")
    p.add_argument("--preserve", action="append", help="a concept to preserve (repeatable)")
    p.add_argument("--expand", action="store_true", help="expand every phrase with the prompt templates")
    p.add_argument("--templates", help="template set for --expand: object (default) or art")
    p.add_argument("--expansion", default="uce", help="--expand's rule: uce (the public UCE code's: bare phrase plus "
                   "templates, preserve concepts as given; default) or templates (templated prompts only, for all)")
    p.add_argument("--testbed-spec", action="store_true",
                   help="testbed only: the spec of its experiments (training synonyms, another value of the same "
                        "attribute as anchor, the other values preserved, 24 captions in the testbed's grammar; "
                        "the ESD family gets the phrases alone)")
    p.add_argument("--spec", help="a YAML/TOML/JSON concept spec instead of --concept/--anchor/--preserve")
    p.add_argument("--config", help="a YAML/TOML/JSON file of method options")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="a method option (repeatable)")
    p.add_argument("--out", required=True, help="the delta file to write (.safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing delta file")


def _model_arg(p) -> None:
    p.add_argument("model", nargs="?", default="testbed",
                   help="'testbed' (default), a testbed oracle trained without a value ('testbed:no-circle', "
                        "'testbed:no-red'), a local diffusers pipeline folder (Stable Diffusion 1.x/2.x, SDXL or "
                        "FLUX.1) or a hub id (ORG/NAME or ORG/NAME@REVISION) from the local Hugging Face cache")
    p.add_argument("--offline", action="store_true",
                   help="never download: a hub id must be in the local Hugging Face cache (also HF_HUB_OFFLINE=1)")
    p.add_argument("--allow-pickle-weights", action="store_true",
                   help="also load a model folder's pickled .bin weights (unpickling can run code: only for a source "
                        "you trust; default: safetensors only)")


def build_parser() -> argparse.ArgumentParser:
    parser = types.Parser(prog="erasekit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="describe a model: architecture, cross-attention layers, sampler")
    _model_arg(p)
    p.add_argument("--delta", action="append", help="apply this delta first (repeatable)")
    p.set_defaults(func=cmd_info, inputs=[("delta", "delta")])

    p = sub.add_parser("generate", help="generate images for prompts and seeds: a grid and per-image files")
    _model_arg(p)
    p.add_argument("--prompt", "-p", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts-file", help="a text file with one prompt per line")
    p.add_argument("--seeds", default="0-3", help="seeds for every prompt: '0-7' or '1,5,9' (default 0-3)")
    p.add_argument("--steps", type=types.count, help="sampler steps (default: the model's)")
    p.add_argument("--guidance", type=types.finite, help="classifier-free guidance scale (default: the model's)")
    types.add_size_args(p)
    p.add_argument("--batch-size", type=types.count, default=16)
    p.add_argument("--delta", action="append", help="apply this delta (repeatable, in order)")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.set_defaults(func=cmd_generate, inputs=[("delta", "delta"), ("prompts_file", "file")],
                   outputs=[("out", "folder")])

    p = sub.add_parser("apply", help="check that a delta fits a model and show what it changes")
    _model_arg(p)
    p.add_argument("--delta", required=True, help="a delta .safetensors file")
    p.add_argument("--verbose", "-v", action="store_true", help="list every tensor")
    p.set_defaults(func=cmd_apply, inputs=[("delta", "delta")])

    p = sub.add_parser("export", help="write a complete diffusers pipeline folder with deltas merged")
    _model_arg(p)
    p.add_argument("--delta", action="append", help="a delta to merge (repeatable, in order)")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.set_defaults(func=cmd_export, inputs=[("delta", "delta")], outputs=[("out", "folder")])

    p = sub.add_parser("erase", help="erase concepts with a method; writes a delta")
    _model_arg(p)
    erase_args(p)
    p.set_defaults(func=cmd_erase, inputs=[("spec", "file"), ("config", "file")], outputs=[("out", "file")])

    p = sub.add_parser("demo", help="the whole story on the built-in testbed: generate, judge, erase, measure")
    p.add_argument("--out", default="erasekit-demo", help="output folder (default erasekit-demo)")
    p.add_argument("--samples", type=types.count, default=10, help="prompts per wording kind and per prompt set")
    p.add_argument("--concept", default="red", help="the testbed concept the demo erases (default red)")
    p.add_argument("--method", default="uce", help="the closed-form method the demo erases with (default uce)")
    p.set_defaults(func=cmd_demo, outputs=[("out", "folder")])

    from .evaluation.commands import add_parsers as add_evaluation_parsers

    add_evaluation_parsers(sub, _model_arg)
    from .attacks.commands import add_parser as add_attack_parser

    add_attack_parser(sub, _model_arg)
    from .audit.commands import add_parser as add_audit_parser

    add_audit_parser(sub, _model_arg)
    from .hardening.commands import add_parser as add_harden_parser

    add_harden_parser(sub, _model_arg, erase_args)

    testbed = sub.add_parser("testbed", help="the built-in miniature text-to-image model")
    tsub = testbed.add_subparsers(dest="testbed_command", required=True, metavar="COMMAND")
    p = tsub.add_parser("train", help="train the testbed denoiser (seeded, resumable)")
    p.add_argument("--out", default="runs/testbed", help="run folder: checkpoint, log, final weights")
    p.add_argument("--seed", type=types.seed, default=0)
    p.add_argument("--steps", type=types.count, default=2000)
    p.add_argument("--batch-size", type=types.count, default=32)
    p.add_argument("--checkpoint-every", type=types.count, default=250)
    p.add_argument("--min-snr-gamma", type=types.non_negative, default=0.0,
                   help="min-SNR weighting of the loss (0: off)")
    p.add_argument("--min-snr-from", type=types.whole, default=0, help="the step min-SNR weighting starts at")
    p.add_argument("--min-snr-offset", type=types.non_negative, default=0.0,
                   help="added to the min-SNR weight; 1 keeps the high-noise steps in the loss")
    p.add_argument("--ema-from", type=types.whole, default=0, help="restart the EMA (with a warm-up) at this step")
    p.add_argument("--lr", type=types.non_negative, default=1e-3, help="peak learning rate (default 1e-3)")
    p.add_argument("--warmup", type=types.whole, default=200, help="learning-rate warm-up steps (default 200)")
    p.add_argument("--init-from", metavar="DIR",
                   help="start from these weights (a run's weights/ folder) instead of random ones")
    p.add_argument("--exclude", action="append", metavar="VALUE",
                   help="leave this value (e.g. circle, red) out of the data entirely, an oracle that never saw "
                        "it; repeatable")
    p.add_argument("--restart", action="store_true", help="ignore an existing checkpoint in --out")
    p.set_defaults(func=cmd_testbed_train, inputs=[("init_from", "folder")], outputs=[("out", "folder")])

    p = tsub.add_parser("evaluate", help="judge accuracy against the prompt per attribute and wording kind")
    p.add_argument("--samples", type=types.count, default=200, help="prompts per wording kind (default 200)")
    p.add_argument("--weights", metavar="DIR",
                   help="evaluate these weights (a `testbed train` run's weights/ folder) instead of the shipped ones")
    p.add_argument("--seed", type=types.seed, default=1000, help="first seed of the prompt sets")
    p.add_argument("--steps", type=types.count, help="sampler steps (default: the testbed's)")
    p.add_argument("--guidance", type=types.finite, help="guidance scale (default: the testbed's)")
    p.add_argument("--delta", action="append", help="evaluate with this delta applied (repeatable)")
    p.add_argument("--concept", action="append",
                   help="report target rates for this concept (repeatable) next to the unedited model")
    p.add_argument("--json", help="also write the result to this file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    p.set_defaults(func=cmd_testbed_evaluate, inputs=[("delta", "delta"), ("weights", "folder")],
                   outputs=[("json", "file")])

    p = tsub.add_parser("train-judge", help="train the testbed's attribute classifier (the judge)")
    p.add_argument("--out", required=True, help="weights file to write (.safetensors)")
    p.add_argument("--seed", type=types.seed, default=0)
    p.add_argument("--steps", type=types.count, default=1600)
    p.add_argument("--overwrite", action="store_true", help="replace an existing weights file")
    p.set_defaults(func=cmd_testbed_train_judge, outputs=[("out", "file")])

    p = tsub.add_parser("train-clip", help="train the testbed's image encoder aligned with its text encoder")
    p.add_argument("--out", required=True, help="weights file to write (.safetensors)")
    p.add_argument("--seed", type=types.seed, default=0)
    p.add_argument("--steps", type=types.count, default=800)
    p.add_argument("--overwrite", action="store_true", help="replace an existing weights file")
    p.set_defaults(func=cmd_testbed_train_clip, outputs=[("out", "file")])
    return parser


def flag_values(args, attr: str) -> list:
    value = getattr(args, attr, None)
    return [] if value is None else [v for v in (value if isinstance(value, list) else [value]) if v not in ("", None)]


def preflight(args) -> list[Path]:
    """Check every input path a command names and every output it will write, before any work; returns
    the outputs, which the command then holds locked. Each parser declares its inputs and outputs."""
    from .outputs import check_output, protected_folders

    for attr, kind in getattr(args, "inputs", ()):
        flag = "--" + attr.replace("_", "-")
        for value in flag_values(args, attr):
            path = Path(value)
            if kind == "features":  # a model folder, or inception:FILE (erasekit.evaluation.inception)
                from .evaluation.inception import weights_path

                file = weights_path(value)
                path, kind = (path, "folder") if file is None else (file, "file")
            if kind == "delta":  # a delta file or an erased model folder (erasekit.delta_sources)
                from .delta_sources import check_path

                check_path(path, flag)
                continue
            if kind == "file" and not path.is_file():
                raise UserError(f"{flag} {path} {'is a folder' if path.is_dir() else 'does not exist'}: "
                                "give an existing file")
            if kind == "folder" and not path.is_dir():
                raise UserError(f"{flag} {path} {'is a file' if path.exists() else 'does not exist'}: "
                                "give an existing folder")
    protected = protected_folders(getattr(args, "model", None))
    outputs = []
    for attr, kind in getattr(args, "outputs", ()):
        for value in flag_values(args, attr):
            check_output(value, kind, "--" + attr.replace("_", "-"), protected, getattr(args, "overwrite", False))
            outputs.append(Path(value))
    return outputs


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"erasekit: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except UserError as exc:
        print(f"erasekit: error: {exc}", file=sys.stderr)
        return 2
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # import-time notices are not for our users
    warnings.showwarning = _show_warning
    try:
        from .outputs import output_lock

        with output_lock(preflight(args)):
            args.func(args)
    except UserError as exc:
        print(f"erasekit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("erasekit: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
