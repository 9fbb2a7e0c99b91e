"""Erasure methods on the testbed: target rates (canonical, synonym, held-out wording), preservation
accuracy and Fréchet distance to the original model's outputs, for a shape, a style, a colour, a background
and a two-concept case. Closed-form methods by default; any method name works (fine-tuning methods run at
their testbed settings). Resumable: finished rows are kept in the output JSON and skipped on a rerun.

Usage: python experiments/closed_form.py [--samples 100] [--methods uce esd ...] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from variants import testbed_method

ROOT = Path(__file__).resolve().parents[1]
CONCEPT_SETS = (("circle",), ("striped",), ("red",), ("grass",), ("red", "striped"))
METHODS = ("uce", "rece", "erasepro", "trce-stage1")


def markdown(results: dict) -> str:
    lines = ["| concepts | method | canonical | synonym | held-out | preservation acc. | FID_gen (judge) | edit s |",
             "|---|---|---|---|---|---|---|---|"]
    for key, block in results["sets"].items():
        orig = block["original"]
        lines.append(f"| {key} | (unedited) | {orig['target_rate']['canonical']:.2f} | "
                     f"{orig['target_rate']['synonym']:.2f} | {orig['target_rate']['heldout']:.2f} | "
                     f"{orig['preservation_accuracy']:.3f} | 0 | - |")
        for method, row in block["methods"].items():
            e = row["edited"]
            lines.append(f"| {key} | {method} | {e['target_rate']['canonical']:.2f} | {e['target_rate']['synonym']:.2f}"
                         f" | {e['target_rate']['heldout']:.2f} | {e['preservation_accuracy']:.3f} | "
                         f"{row['fid_gen_preservation']:.3f} | {row['edit_seconds']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    import erasekit
    from erasekit.checkpoint import atomic_write_text
    from erasekit.testbed.evaluate import concept_report, measure_concepts, public
    from erasekit.testbed.judge import load_judge
    from erasekit.testbed.spec import erasure_spec

    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--methods", nargs="+", default=list(METHODS),
                        help="methods, or variants as NAME:KEY=VALUE[,KEY=VALUE]")
    parser.add_argument("--sets", nargs="+", default=["+".join(c) for c in CONCEPT_SETS],
                        help="concept sets, concepts joined by '+'")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "closed_form.json"))
    args = parser.parse_args()
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {"samples": args.samples, "sets": {}}
    if results["samples"] != args.samples:
        raise SystemExit(f"{out} holds a run with {results['samples']} samples: use another --out")
    model, judge = erasekit.load("testbed"), load_judge()
    for key in args.sets:
        concepts = tuple(key.split("+"))
        block = results["sets"].setdefault(key, {"methods": {}})
        todo = [m for m in args.methods if m not in block["methods"]]
        if not todo:
            continue
        original = measure_concepts(model, judge, list(concepts), args.samples)
        block["original"] = public(original)
        for name in todo:
            method, cfg = testbed_method(name)  # a variant: "trce-stage1:positions=all"
            t0 = time.time()
            delta = method.erase(model, erasure_spec(list(concepts), cfg), cfg)
            seconds = time.time() - t0
            report = concept_report(model, judge, list(concepts), [delta], args.samples, original=original)
            report["edit_seconds"] = round(seconds, 3)
            report["delta_stats"] = {k: v for k, v in delta.stats.items() if k != "relative_change"}
            block["methods"][name] = report
            atomic_write_text(out, json.dumps(results, indent=2) + "\n")
            e = report["edited"]
            print(f"{key:<10} {name:<12} target {e['target_rate']}  preservation {e['preservation_accuracy']:.3f}  "
                  f"FID {report['fid_gen_preservation']:.3f}  ({seconds:.2f} s)", flush=True)
    atomic_write_text(out.with_suffix(".md"), markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
