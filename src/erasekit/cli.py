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

from .errors import UserError


def parse_seeds(text: str) -> list[int]:
    """'0-7', '1,5,9' or '3' -> a list of seeds."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part[1:]:
                lo, hi = part.split("-", 1)
                seeds.extend(range(int(lo), int(hi) + 1))
            elif part:
                seeds.append(int(part))
    except ValueError:
        raise UserError(f"cannot read seeds {text!r}: use a range like 0-7 or a list like 1,5,9") from None
    if not seeds:
        raise UserError(f"no seeds in {text!r}: use a range like 0-7 or a list like 1,5,9")
    return seeds


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if getattr(args, "prompts_file", None):
        path = Path(args.prompts_file)
        if not path.is_file():
            raise UserError(f"prompts file {path} does not exist")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise UserError("no prompts: give --prompt TEXT (repeatable) or --prompts-file FILE")
    return prompts


def load_model(args):
    from .delta import Delta
    from .model import load

    model = load(args.model)
    for path in getattr(args, "delta", None) or []:
        Delta.load(path).apply(model)
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
        "unet_parameters": sum(p.numel() for p in model.unet.parameters()),
    }
    print(json.dumps(info, indent=2))


def cmd_generate(args) -> None:
    from .generate import generate_to_folder

    prompts = read_prompts(args)
    model = load_model(args)
    out = generate_to_folder(model, prompts, parse_seeds(args.seeds), Path(args.out), steps=args.steps,
                             guidance=args.guidance, batch_size=args.batch_size, overwrite=args.overwrite,
                             deltas=args.delta or [])
    print(f"wrote {out / 'grid.png'} and {len(prompts) * len(parse_seeds(args.seeds))} images in {out / 'images'}")


def cmd_apply(args) -> None:
    from .delta import Delta
    from .model import load

    model = load(args.model)
    delta = Delta.load(args.delta)
    delta.check(model)
    change = delta.relative_change(model)
    print(f"delta {args.delta} ({delta.method}) applies cleanly to {model.name}: "
          f"{len(change)} tensors, relative change mean {sum(change.values()) / len(change):.4g}, "
          f"max {max(change.values()):.4g}")
    if args.verbose:
        for name, rel in change.items():
            print(f"  {rel:.4g}  {name}")


def cmd_export(args) -> None:
    from .delta import Delta
    from .export import export
    from .model import load

    model = load(args.model)
    deltas = [Delta.load(p) for p in args.delta or []]
    out = export(model, args.out, deltas, overwrite=args.overwrite)
    print(f"wrote pipeline folder {out} ({len(deltas)} delta(s) merged)")


def cmd_testbed_train(args) -> None:
    from .testbed.train import TrainConfig, train

    cfg = TrainConfig(out=args.out, seed=args.seed, steps=args.steps, batch_size=args.batch_size,
                      checkpoint_every=args.checkpoint_every)
    train(cfg, resume=not args.restart, argv=["erasekit", *sys.argv[1:]])


# -- parser ---------------------------------------------------------------------------------------
def _model_arg(p) -> None:
    p.add_argument("model", nargs="?", default="testbed",
                   help="'testbed' (default) or a local diffusers Stable Diffusion folder")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="erasekit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="describe a model: architecture, cross-attention layers, sampler")
    _model_arg(p)
    p.add_argument("--delta", action="append", help="apply this delta first (repeatable)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("generate", help="generate images for prompts and seeds: a grid and per-image files")
    _model_arg(p)
    p.add_argument("--prompt", "-p", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts-file", help="a text file with one prompt per line")
    p.add_argument("--seeds", default="0-3", help="seeds for every prompt: '0-7' or '1,5,9' (default 0-3)")
    p.add_argument("--steps", type=int, help="sampler steps (default: the model's)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the model's)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--delta", action="append", help="apply this delta (repeatable, in order)")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("apply", help="check that a delta fits a model and show what it changes")
    _model_arg(p)
    p.add_argument("--delta", required=True, help="a delta .safetensors file")
    p.add_argument("--verbose", "-v", action="store_true", help="list every tensor")
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("export", help="write a complete diffusers pipeline folder with deltas merged")
    _model_arg(p)
    p.add_argument("--delta", action="append", help="a delta to merge (repeatable, in order)")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.set_defaults(func=cmd_export)

    testbed = sub.add_parser("testbed", help="the built-in miniature text-to-image model")
    tsub = testbed.add_subparsers(dest="testbed_command", required=True, metavar="COMMAND")
    p = tsub.add_parser("train", help="train the testbed denoiser (seeded, resumable)")
    p.add_argument("--out", default="runs/testbed", help="run folder: checkpoint, log, final weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--restart", action="store_true", help="ignore an existing checkpoint in --out")
    p.set_defaults(func=cmd_testbed_train)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"erasekit: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # import-time notices are not for our users
    warnings.showwarning = _show_warning
    try:
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
