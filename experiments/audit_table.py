"""The audit table: each method's `erasekit audit` results beside the oracle's, per concept. Reads audit folders'
results.json; computes nothing but differences.

Usage: python experiments/audit_table.py AUDIT_DIR ... [--json FILE] [--markdown FILE]

Each AUDIT_DIR is one `erasekit audit` output; its method is read from the delta in its protocol. Rows are
grouped by concept; each concept's oracle row comes from the first audit of that concept that ran the oracle
(audits made with `--reuse` share the same oracle parts). "vs oracle" is mean ASR minus the oracle's, in
points; "vs unedited" is preservation accuracy minus the unedited model's, in points. A difference whose two
intervals overlap is marked as a tie.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ATTACKS = ("unlearndiff", "p4d", "ringabell")


def _method(results: dict) -> str:
    variants = results["protocol"].get("variants") or []
    for variant in reversed(variants):
        for delta in variant.get("deltas") or []:
            return delta.get("method") or "?"
    return "?"


def row(results: dict) -> dict:
    """The numbers one table row shows, with their intervals and counts."""
    out = {"method": _method(results), "mean_asr": results["mean_asr"], "mean_asr_ci": results["mean_asr_ci"],
           "mean_asr_n": results["mean_asr_n"], "no_attack": results["target_rate_mean"],
           "no_attack_ci": results["target_rate_mean_ci"], "no_attack_n": results["target_rate_mean_n"],
           "preservation": results["preservation_accuracy"], "preservation_ci": results["preservation_accuracy_ci"],
           "preservation_n": results["preservation_accuracy_n"]}
    for name in ATTACKS:
        attack = results["attacks"].get(name) or {}
        out[name] = attack.get("asr")
        out[f"{name}_ci"] = attack.get("asr_ci")
    return out


def _overlap(a, b) -> bool:
    return a is not None and b is not None and a[0] <= b[1] and b[0] <= a[1]


def _versus_unedited(r: dict, unedited: dict) -> None:
    r["vs_unedited_points"] = round(100 * (r["preservation"] - unedited["preservation"]), 1)
    r["vs_unedited_tie"] = _overlap(r["preservation_ci"], unedited["preservation_ci"])


def table(folders: list[Path]) -> dict:
    """{concept: {"oracle": row, "unedited": {...}, "methods": [row, ...]}} in the order given."""
    concepts: dict[str, dict] = {}
    for folder in folders:
        results = json.loads((folder / "results.json").read_text())
        concept = "+".join(results["concepts"])
        block = concepts.setdefault(concept, {"oracle": None, "methods": [], "suite": results["suite"]})
        if block["oracle"] is None and results.get("oracle"):
            block["oracle"] = {**row({**results["oracle"], "protocol": {}}), "method": results["oracle"]["model"]}
        block.setdefault("unedited", {
            "no_attack": results["unedited_target_rate_mean"], "no_attack_ci": results["unedited_target_rate_mean_ci"],
            "preservation": results["unedited_preservation_accuracy"],
            "preservation_ci": results["unedited_preservation_accuracy_ci"],
            "preservation_n": results["unedited_preservation_accuracy_n"], "base_rate": results["unedited_base_rate"]})
        if block["oracle"] is not None and "vs_unedited_points" not in block["oracle"]:
            _versus_unedited(block["oracle"], block["unedited"])
        r = row(results)
        r["folder"] = str(folder)
        r["base_rate"], r["base_rate_ci"] = results["base_rate"], results["base_rate_ci"]
        oracle, unedited = block["oracle"], block["unedited"]
        if oracle:
            r["vs_oracle_points"] = round(100 * (r["mean_asr"] - oracle["mean_asr"]), 1)
            r["vs_oracle_tie"] = _overlap(r["mean_asr_ci"], oracle["mean_asr_ci"])
        _versus_unedited(r, unedited)
        block["methods"].append(r)
    return concepts


def _rate(value, ci, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def _diff(points, tie) -> str:
    return "-" if points is None else f"{points:+.1f}" + (" (tie)" if tie else "")


def markdown(concepts: dict) -> str:
    lines = []
    for concept, block in concepts.items():
        lines += [f"### {concept} (`{block['suite']}`)", "",
                  "| model | UnlearnDiffAtk | P4D-N | Ring-A-Bell | **mean ASR** (n) | vs oracle, points | "
                  "no attack (n) | preservation (n) | vs unedited, points |", "|---" * 9 + "|"]
        rows = [(r["method"], r) for r in block["methods"]]
        if block["oracle"]:
            rows.append((f"oracle `{block['oracle']['method']}`", block["oracle"]))
        for label, r in rows:
            lines.append(
                f"| {label} | " + " | ".join(_rate(r[a], r[f"{a}_ci"]) for a in ATTACKS)
                + f" | **{_rate(r['mean_asr'], r['mean_asr_ci'])}** ({r['mean_asr_n']}) | "
                + _diff(r.get("vs_oracle_points"), r.get("vs_oracle_tie"))
                + f" | {_rate(r['no_attack'], r['no_attack_ci'])} ({r['no_attack_n']}) | "
                + f"{_rate(r['preservation'], r['preservation_ci'], 3)} ({r['preservation_n']}) | "
                + (_diff(r["vs_unedited_points"], r["vs_unedited_tie"]) if "vs_unedited_points" in r else "-") + " |")
        u = block["unedited"]
        lines += [f"| unedited | - | - | - | - | - | {_rate(u['no_attack'], u['no_attack_ci'])} | "
                  f"{_rate(u['preservation'], u['preservation_ci'], 3)} ({u['preservation_n']}) | - |", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    concepts = table([f for f in args.folders if (f / "results.json").is_file()])
    text = markdown(concepts)
    if args.json:
        args.json.write_text(json.dumps(concepts, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
