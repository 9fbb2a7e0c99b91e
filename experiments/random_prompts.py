"""How often a concept appears for prompts of random words, per erased model: the base rate a
free-token attack (P4D-N: 16 free tokens from the attack vocabulary) starts from, with no optimisation.

Each prompt is 16 words drawn uniformly from the attack vocabulary (seeded); every model renders the same
prompts with the same seeds and the testbed judge names each image's shape, colour, style and background.
The prompts are `erasekit.evaluation.random_prompts`'s, which `erasekit audit` measures its base_rate on; that
flags an image by the judge's threshold (as target rates do), this script names each image's value by argmax.

Usage: python experiments/random_prompts.py [--concept circle] [--prompts 64] [--methods uce trce-stage1 trce]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from variants import testbed_method

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    import torch

    import erasekit
    from erasekit.checkpoint import atomic_write_text
    from erasekit.evaluation.random_prompts import FIRST_SEED, random_prompts
    from erasekit.testbed.evaluate import judge_verdicts
    from erasekit.testbed.judge import load_judge
    from erasekit.testbed.prompts import attribute_of
    from erasekit.testbed.spec import erasure_spec
    from erasekit.testbed.world import VALUES

    parser = argparse.ArgumentParser()
    parser.add_argument("--concept", default="circle")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--words", type=int, default=16)
    parser.add_argument("--methods", nargs="+", default=["uce", "trce-stage1", "trce"])
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "random_prompts.json"))
    args = parser.parse_args()
    model, judge = erasekit.load("testbed"), load_judge()
    attr = attribute_of(args.concept)
    index = VALUES[attr].index(args.concept)
    prompts = random_prompts(model, args.prompts, args.words)  # the prompts `erasekit audit` measures base_rate on
    seeds = list(range(FIRST_SEED, FIRST_SEED + args.prompts))

    def measure() -> dict:
        judged = judge_verdicts(judge, model.sample(prompts, seeds))[attr].cpu()
        counts = torch.bincount(judged, minlength=len(VALUES[attr])).tolist()
        return {"rate": round(float((judged == index).float().mean()), 4), "counts": dict(zip(VALUES[attr], counts))}

    out = Path(args.out)
    results = {"concept": args.concept, "prompts": args.prompts, "words": args.words, "examples": prompts[:3],
               "models": {"(unedited)": measure()}}
    for name in args.methods:
        method, cfg = testbed_method(name)
        delta = method.erase(model, erasure_spec([args.concept], cfg), cfg)
        with delta.applied(model):
            results["models"][name] = measure()
        print(f"{name:<40} {args.concept} rate {results['models'][name]['rate']:.3f}", flush=True)
    atomic_write_text(out, json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["models"], indent=1))


if __name__ == "__main__":
    main()
