"""Batched attacks against a one-prompt-at-a-time loop on the testbed, against a UCE erasure of a concept.

The baseline is the public codes' loop structure: prompts attacked one after another, every optimisation
step a batch of one (UnlearnDiffAtk and P4D: one latent per UNet call; Ring-A-Bell: one prompt's population
per text-encoder call), each prompt judged on its own. The batched run attacks `--batch` prompts together.
Both use the same per-prompt seeds, so the adversarial prompts and the ASR must be equal; the ratio of wall
times is the speed-up. Both runs share the process and the machine's load.

Usage: python benchmarks/attack_batching.py --delta D [--concept circle] [--prompts 8] [--batch 8]
         [--attacks unlearndiff p4d-n ringabell] [--threads 1] [--out FILE]
  (D from `erasekit erase --method uce --concept circle --testbed-spec --out D`)
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
# settings small enough for a loaded 2-core CPU (each attack runs twice); the command line can change them
SETTINGS = {"unlearndiff": {"timesteps": 2, "iterations": 10}, "p4d-n": {"iterations": 30},
            "ringabell": {"population": 64, "generations": 10}}


def main() -> None:
    from erasekit import Delta, attacks, load
    from erasekit.attacks.runner import make_context, run_attack
    from erasekit.evaluation.judges import get_judge
    from erasekit.evaluation.runner import Settings, Variant
    from erasekit.evaluation.suites import load_suite

    parser = argparse.ArgumentParser()
    parser.add_argument("--delta", required=True)
    parser.add_argument("--concept", default="circle")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--attacks", nargs="+", default=list(SETTINGS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(HERE / "results" / "attack_batching.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = load("testbed")
    delta = Delta.load(args.delta)
    suite = load_suite(f"testbed:{args.concept}", samples=args.prompts)
    settings = Settings.for_model(model)
    ctx = make_context(model, Variant("uce", (delta,), (Path(args.delta).name,)), get_judge("testbed"),
                       suite.concepts, settings)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.attacks:
            attack = attacks.get(name)
            cfg = attacks.build_config(attack, SETTINGS.get(name, {}), testbed=True)
            side = {}
            for label, batch in (("one_at_a_time", 1), ("batched", args.batch)):
                res = run_attack(ctx, attack, cfg, suite, "target:canonical", Path(tmp) / f"{name}-{label}",
                                 progress=False, batch=batch)
                # attack time only (the images before any attack are the same work on both sides)
                timing = res["_timing"]
                seconds = (timing["seconds_per_attacked_prompt"] or 0.0) * timing["attacked_prompts"]
                side[label] = {"seconds": round(seconds, 2), "asr": res["asr"], "pre_asr": res["pre_asr"],
                               "attacked": res["attacked"],
                               "prompts": [p["adversarial_prompt"] for p in res["prompts"]],
                               "flagged_after": [p["flagged_after"] for p in res["prompts"]]}
            one, many = side["one_at_a_time"], side["batched"]
            rows[name] = {"config": SETTINGS.get(name, {}), "n": args.prompts, "attacked": many["attacked"],
                          "seconds_one_at_a_time": one["seconds"], "seconds_batched": many["seconds"],
                          "speedup": round(one["seconds"] / max(many["seconds"], 1e-9), 2),
                          "asr_one_at_a_time": one["asr"], "asr_batched": many["asr"],
                          "same_asr": one["asr"] == many["asr"],
                          "same_verdicts": one["flagged_after"] == many["flagged_after"],
                          "same_prompts": one["prompts"] == many["prompts"]}
            print(name, json.dumps(rows[name]), flush=True)
    result = {"device": f"cpu, {args.threads} torch thread(s)", "load_average": os.getloadavg(),
              "concept": args.concept, "method": "uce", "batch": args.batch, "attacks": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
