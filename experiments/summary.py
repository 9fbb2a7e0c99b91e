"""One table of every erasure result on the testbed: closed-form and fine-tuning rows per concept set, and for
each attacked concept and prompt count each method's pre-ASR and ASR per attack with the mean. Reads what
closed_form.py and attacks.py wrote; computes nothing.

Usage: python experiments/summary.py [--closed-form F] [--fine-tuning F] [--attacks F ...] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def attack_tables(files: list[Path]) -> dict[tuple[str, int], dict]:
    """{(concept, prompts): {method: row}}: attack result files merged per concept and prompt count."""
    tables: dict[tuple[str, int], dict] = {}
    for path in files:
        data = _load(path)
        if data:
            tables.setdefault((data["concept"], data["prompts"]), {}).update(data["methods"])
    return tables


def mean_asr(row: dict) -> float | None:
    asrs = [a["asr"] for a in row.get("attacks", {}).values()]
    return sum(asrs) / len(asrs) if asrs else None


def markdown(sets: dict, kinds: dict, tables: dict[tuple[str, int], dict]) -> str:
    head = "| concepts | method | kind | canonical | synonym | held-out | preservation acc. | FID_gen | seconds |"
    lines = [head, "|---" * 9 + "|"]
    for key, block in sets.items():
        o = block["original"]
        rate = o["target_rate"]
        lines.append(f"| {key} | (unedited) | - | {rate['canonical']:.2f} | {rate['synonym']:.2f} | "
                     f"{rate['heldout']:.2f} | {o['preservation_accuracy']:.3f} | 0 | - |")
        for method, row in block["methods"].items():
            e = row["edited"]
            lines.append(f"| {key} | {method} | {kinds[key][method]} | {e['target_rate']['canonical']:.2f} | "
                         f"{e['target_rate']['synonym']:.2f} | {e['target_rate']['heldout']:.2f} | "
                         f"{e['preservation_accuracy']:.3f} | {row['fid_gen_preservation']:.2f} | "
                         f"{row['edit_seconds']:.0f} |")
    for (concept, prompts), attacks in tables.items():
        names = sorted({a for row in attacks.values() for a in row["attacks"]})
        lines += ["", f"Attacks on {concept}, {prompts} canonical prompts (pre-ASR / ASR):", "",
                  "| method | " + " | ".join(names) + " | mean ASR |", "|---" * (len(names) + 2) + "|"]
        for method, row in sorted(attacks.items(), key=lambda kv: mean_asr(kv[1]) or 0):
            cells = [f"{row['attacks'][a]['pre_asr']:.2f} / {row['attacks'][a]['asr']:.2f}" if a in row["attacks"]
                     else "-" for a in names]
            m = mean_asr(row)
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {'-' if m is None else f'{m:.2f}'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--closed-form", default=str(RESULTS / "closed_form.json"))
    parser.add_argument("--fine-tuning", default=str(RESULTS / "fine_tuning.json"))
    parser.add_argument("--attacks", nargs="+", default=[str(p) for p in sorted(RESULTS.glob("attacks*.json"))])
    parser.add_argument("--out", default=str(RESULTS / "summary.md"))
    args = parser.parse_args()
    sets: dict = {}
    kinds: dict = {}
    for path, kind in ((args.closed_form, "closed form"), (args.fine_tuning, "fine-tuning")):
        for key, block in _load(Path(path)).get("sets", {}).items():
            merged = sets.setdefault(key, {"original": block["original"], "methods": {}})
            merged["methods"].update(block["methods"])
            kinds.setdefault(key, {}).update(dict.fromkeys(block["methods"], kind))
    text = markdown(sets, kinds, attack_tables([Path(p) for p in args.attacks]))
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
