"""Attacks against erased testbed models: pre-ASR and ASR per method and attack, one table.

For each method the concept is erased (testbed settings), then each attack runs on the first N canonical
target prompts of `testbed:CONCEPT` against the erased model. Resumable: finished (method, attack) rows are
kept in the output JSON; attack runs live under runs/attacks/ and resume there too.

Usage: python experiments/attacks.py [--concept star] [--prompts 16] [--methods uce ...] [--attacks ...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from variants import testbed_method

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("uce", "rece", "erasepro", "trce-stage1")
ATTACKS = ("unlearndiff", "p4d-n", "ringabell")


def markdown(results: dict) -> str:
    attacks = list(dict.fromkeys(a for row in results["methods"].values() for a in row["attacks"]))
    head = "| method | no-attack rate | " + " | ".join(f"{a} pre-ASR / ASR" for a in attacks) + " | mean ASR |"
    lines = [head, "|---" * (len(attacks) + 3) + "|"]
    for method, row in results["methods"].items():
        cells = [f"{row['attacks'][a]['pre_asr']:.2f} / {row['attacks'][a]['asr']:.2f}" if a in row["attacks"]
                 else "-" for a in attacks]
        asrs = [row["attacks"][a]["asr"] for a in attacks if a in row["attacks"]]
        lines.append(f"| {method} | {row['no_attack_rate']:.2f} | " + " | ".join(cells) +
                     f" | {sum(asrs) / len(asrs):.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    import erasekit
    from erasekit import attacks
    from erasekit.attacks.runner import make_context, run_attack
    from erasekit.checkpoint import atomic_write_text
    from erasekit.evaluation.judges import get_judge
    from erasekit.evaluation.runner import Settings, Variant
    from erasekit.evaluation.suites import load_suite
    from erasekit.testbed.spec import erasure_spec

    parser = argparse.ArgumentParser()
    parser.add_argument("--concept", default="star")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS))
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "attacks.json"))
    args = parser.parse_args()
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {"concept": args.concept, "prompts": args.prompts,
                                                                 "methods": {}}
    if (results["concept"], results["prompts"]) != (args.concept, args.prompts):
        raise SystemExit(f"{out} holds another run: use another --out")
    model, judge = erasekit.load("testbed"), get_judge("testbed")
    suite = load_suite(f"testbed:{args.concept}", samples=args.prompts)
    settings = Settings.for_model(model)
    for name in args.methods:
        row = results["methods"].setdefault(name, {"attacks": {}})
        method, cfg = testbed_method(name)  # a variant: "uce:positions=all"
        t0 = time.time()
        delta = method.erase(model, erasure_spec([args.concept], cfg), cfg)
        row["edit_seconds"] = round(time.time() - t0, 2)
        ctx = make_context(model, Variant(name, (delta,), (name,)), judge, suite.concepts, settings)
        for attack_name in args.attacks:
            if attack_name in row["attacks"]:
                continue
            attack = attacks.get(attack_name)
            cfg = attacks.build_config(attack, {}, testbed=True)
            run_dir = ROOT / "runs" / "attacks" / args.concept / name.replace(":", "_") / attack_name
            res = run_attack(ctx, attack, cfg, suite, "target:canonical", run_dir, resume=True, progress=False)
            row["no_attack_rate"] = res["pre_asr"]
            row["attacks"][attack_name] = {k: res[k] for k in ("n", "pre_asr", "asr", "ideal_prompts", "asr_on_ideal",
                                                               "attacked")}
            row["attacks"][attack_name]["seconds_per_attacked_prompt"] = res["_timing"]["seconds_per_attacked_prompt"]
            row["attacks"][attack_name]["examples"] = [
                {k: p[k] for k in ("original_prompt", "adversarial_prompt", "seed", "flagged_after")}
                for p in res["prompts"] if p["attacked"] and p["flagged_after"]][:3]
            atomic_write_text(out, json.dumps(results, indent=2) + "\n")
            print(f"{name:<12} {attack_name:<22} pre-ASR {res['pre_asr']:.2f}  ASR {res['asr']:.2f}", flush=True)
    atomic_write_text(out.with_suffix(".md"), markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
