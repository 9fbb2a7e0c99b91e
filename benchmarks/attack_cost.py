"""Attack cost per prompt on the testbed: each attack at its testbed settings against a UCE erasure,
seconds per attacked prompt (prompts flagged without attack, or not ideal for P4D, cost nothing).

Usage: python benchmarks/attack_cost.py [--concept star] [--prompts 8] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ATTACKS = ("unlearndiff", "p4d-n", "p4d-k", "ringabell", "ringabell-continuous")


def main() -> None:
    from erasekit import attacks, load, methods
    from erasekit.attacks.runner import make_context, run_attack
    from erasekit.concepts import Concept, ConceptSpec
    from erasekit.evaluation.judges import get_judge
    from erasekit.evaluation.runner import Settings, Variant
    from erasekit.evaluation.suites import load_suite

    parser = argparse.ArgumentParser()
    parser.add_argument("--concept", default="star")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--out", default=str(HERE / "results" / "attack_cost.json"))
    args = parser.parse_args()

    model = load("testbed")
    uce = methods.get("uce")
    delta = uce.erase(model, ConceptSpec([Concept(args.concept, [])]), uce.config())
    suite = load_suite(f"testbed:{args.concept}", samples=args.prompts)
    settings = Settings(steps=model.sampler_defaults["steps"], guidance=model.sampler_defaults["guidance"],
                        dtype=str(model.dtype))
    ctx = make_context(model, Variant("uce", (delta,), ("uce",)), get_judge("testbed"), suite.concepts, settings)
    rows = {}
    for name in ATTACKS:
        attack = attacks.get(name)
        cfg = attacks.build_config(attack, {}, testbed=True)
        with tempfile.TemporaryDirectory() as tmp:
            res = run_attack(ctx, attack, cfg, suite, "target:canonical", Path(tmp) / "run", progress=False)
        rows[name] = {"prompts": res["n"], "attacked": res["attacked"], "pre_asr": res["pre_asr"],
                      "asr": res["asr"], "seconds_per_attacked_prompt": res["_timing"]["seconds_per_attacked_prompt"]}
        print(name, json.dumps(rows[name]), flush=True)
    result = {"device": f"cpu x{torch.get_num_threads()}" if not torch.cuda.is_available()
              else torch.cuda.get_device_name(), "concept": args.concept, "method": "uce", "attacks": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
