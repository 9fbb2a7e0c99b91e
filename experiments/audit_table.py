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

from erasekit.stats import format_rate

ATTACKS = ("unlearndiff", "p4d", "ringabell")


def _method(results: dict) -> str:
    """The method of the audited delta (the last variant's first delta)."""
    for variant in reversed(results["protocol"].get("variants") or []):
        for delta in variant.get("deltas") or []:
            return delta.get("method") or "?"
    return "?"


def row(results: dict, method: str, prefix: str = "") -> dict:
    """The numbers one table row shows, with their intervals and counts (prefix "unedited_" for the unedited
    model's, which has no attacks)."""
    out = {"method": method}
    for key, name in (("mean_asr", "mean_asr"), ("target_rate_mean", "no_attack"),
                      ("preservation_accuracy", "preservation"), ("base_rate", "base_rate")):
        for suffix in ("", "_ci", "_n"):
            out[name + suffix] = results.get(f"{prefix}{key}{suffix}")
    for name in ATTACKS:
        attack = results.get("attacks", {}).get(name) or {} if not prefix else {}
        out[name], out[f"{name}_ci"] = attack.get("asr"), attack.get("asr_ci")
    return out


def _overlap(a, b) -> bool:
    return a is not None and b is not None and a[0] <= b[1] and b[0] <= a[1]


def _versus(r: dict, other: dict, key: str) -> tuple[float, bool]:
    """r[key] - other[key] in points, and whether their intervals overlap."""
    return round(100 * (r[key] - other[key]), 1), _overlap(r[f"{key}_ci"], other[f"{key}_ci"])


def table(folders: list[Path]) -> dict:
    """{concept: {"suite", "oracle": row, "unedited": row, "methods": [row, ...]}}, methods in the order given."""
    concepts: dict[str, dict] = {}
    for folder in folders:
        results = json.loads((folder / "results.json").read_text())
        block = concepts.setdefault("+".join(results["concepts"]), {
            "suite": results["suite"], "oracle": None, "methods": [],
            "unedited": row(results, "unedited", prefix="unedited_")})
        if block["oracle"] is None and results.get("oracle"):
            block["oracle"] = row(results["oracle"], f"oracle `{results['oracle']['model']}`")
        block["methods"].append({**row(results, _method(results)), "folder": str(folder)})
    for block in concepts.values():
        for r in block["methods"] + [block["oracle"]] * (block["oracle"] is not None):
            r["vs_unedited_points"], r["vs_unedited_tie"] = _versus(r, block["unedited"], "preservation")
        for r in block["methods"] if block["oracle"] else ():
            r["vs_oracle_points"], r["vs_oracle_tie"] = _versus(r, block["oracle"], "mean_asr")
    return concepts


def _diff(points, tie) -> str:
    return "–" if points is None else f"{points:+.1f}" + (" (tie)" if tie else "")


def _line(r: dict) -> str:
    cells = [r["method"], *(format_rate(r[a], r[f"{a}_ci"]) for a in ATTACKS)]
    cells.append("–" if r["mean_asr"] is None else f"**{format_rate(r['mean_asr'], r['mean_asr_ci'])}** "
                 f"({r['mean_asr_n']})")
    cells.append(_diff(r.get("vs_oracle_points"), r.get("vs_oracle_tie")))
    cells.append(f"{format_rate(r['no_attack'], r['no_attack_ci'])} ({r['no_attack_n']})")
    cells.append(f"{format_rate(r['preservation'], r['preservation_ci'], digits=3)} ({r['preservation_n']})")
    cells.append(_diff(r.get("vs_unedited_points"), r.get("vs_unedited_tie")))
    return "| " + " | ".join(cells) + " |"


def markdown(concepts: dict) -> str:
    lines = []
    for concept, block in concepts.items():
        lines += [f"### {concept} (`{block['suite']}`)", "",
                  "| model | UnlearnDiffAtk | P4D-N | Ring-A-Bell | **mean ASR** (n) | vs oracle, points | "
                  "no attack (n) | preservation (n) | vs unedited, points |", "|---" * 9 + "|"]
        lines += [_line(r) for r in block["methods"] + [block["oracle"]] * (block["oracle"] is not None)]
        lines += [_line(block["unedited"]), ""]
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
