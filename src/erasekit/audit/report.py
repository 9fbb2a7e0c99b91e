"""report.html of an audit: the rates with no attack, the attacks' pre-ASR and ASR (each with its 95%
interval and n), mean ASR against preservation for the delta, the unedited model and the oracle, and the
adversarial prompts with their images (from each part's own cache)."""

from __future__ import annotations

import json
from pathlib import Path

from ..attacks.report import prompt_table
from ..checkpoint import atomic_write_text
from ..evaluation.cache import ImageCache
from ..evaluation.report import STYLE, _e
from ..stats import format_rate


def _rate(row: dict, key: str, sub: str | None = None) -> str:
    """'0.31 [0.18, 0.47], n=32' for row[key] (row[key][sub] for a per-set rate)."""
    if sub is None:  # an attack's rates have one n for all
        return _e(format_rate(row.get(key), row.get(f"{key}_ci"), row.get(f"{key}_n", row.get("n"))))
    return _e(format_rate(row[key].get(sub), row[f"{key}_ci"].get(sub), row[f"{key}_n"].get(sub)))


def _subjects(results: dict) -> list[tuple[str, dict]]:
    """(label, numbers) for the unedited model, the delta and the oracle (when audited), keys unprefixed."""
    unedited = {k.removeprefix("unedited_"): v for k, v in results.items() if k.startswith("unedited_")}
    rows = [("unedited", unedited), ("delta", results)]
    if results.get("oracle"):
        rows.append((f"oracle ({results['oracle']['model']})", results["oracle"]))
    return rows


def no_attack_table(results: dict) -> str:
    sets = list(results["target_rate"])
    head = "".join(f"<th>target rate<br>{_e(s)}</th>" for s in sets)
    rows = []
    for label, row in _subjects(results):
        cells = "".join(f"<td>{_rate(row, 'target_rate', s)}</td>" for s in sets)
        rows.append(f"<tr><td class=l>{_e(label)}</td>{cells}<td>{_rate(row, 'preservation_accuracy')}</td>"
                    f"<td>{_rate(row, 'base_rate')}</td></tr>")
    return (f"<table><tr><th class=l>model</th>{head}<th>preservation accuracy</th><th>random-prompt base rate</th>"
            f"</tr>{''.join(rows)}</table>")


def attack_table(results: dict) -> str:
    oracle = results.get("oracle")
    head = "<th>delta: pre-ASR</th><th>delta: ASR</th><th>attacked</th>"
    if oracle:
        head += "<th>oracle: pre-ASR</th><th>oracle: ASR</th><th>attacked</th>"
    rows = []
    for name, a in results["attacks"].items():
        cells = f"<td>{_rate(a, 'pre_asr')}</td><td>{_rate(a, 'asr')}</td><td>{a['attacked']}</td>"
        if oracle:
            o = oracle["attacks"][name]
            cells += f"<td>{_rate(o, 'pre_asr')}</td><td>{_rate(o, 'asr')}</td><td>{o['attacked']}</td>"
        rows.append(f"<tr><td class=l>{_e(name)}</td>{cells}</tr>")
    mean = f"<td></td><td>{_rate(results, 'mean_asr')}</td><td></td>"
    if oracle:
        mean += f"<td></td><td>{_rate(oracle, 'mean_asr')}</td><td></td>"
    rows.append(f"<tr><td class=l><b>mean ASR</b></td>{mean}</tr>")
    return f"<table><tr><th class=l>attack</th>{head}</tr>{''.join(rows)}</table>"


def _points(results: dict) -> list[tuple[str, float, list, float, list]]:
    """(label, preservation, its interval, ASR, its interval) per model; the unedited model's ASR is its rate
    on the attacked prompts with no attack (an attack only adds to it)."""
    out = []
    s = results["attacked_set"]
    for label, row in _subjects(results):
        x, xci = row.get("preservation_accuracy"), row.get("preservation_accuracy_ci")
        if label == "unedited":
            y, yci = row["target_rate"].get(s), row["target_rate_ci"].get(s)
        else:
            y, yci = row.get("mean_asr"), row.get("mean_asr_ci")
        if x is not None and y is not None:
            out.append((label, x, xci or [x, x], y, yci or [y, y]))
    return out


def tradeoff_svg(results: dict, width: int = 520, height: int = 340) -> str:
    """Mean ASR (lower is better) against preservation accuracy (higher is better), 95% intervals as whiskers."""
    points = _points(results)
    if not points:
        return "<p class=note>No plot: this suite has no preservation accuracy.</p>"
    pad = 52
    lo = min([p[2][0] for p in points] + [0.5])
    lo = max(0.0, int(lo * 10) / 10)

    def px(x):
        return pad + (x - lo) / max(1.0 - lo, 1e-9) * (width - 2 * pad)

    def py(y):
        return height - pad - y * (height - 2 * pad)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#444"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#444"/>',
             f'<text x="{width / 2}" y="{height - 12}" text-anchor="middle" font-size="12">'
             f'preservation accuracy, higher is better</text>',
             f'<text x="14" y="{height / 2}" font-size="12" text-anchor="middle" '
             f'transform="rotate(-90 14 {height / 2})">mean ASR, lower is better</text>']
    for tick in (0.0, 0.5, 1.0):
        parts.append(f'<text x="{pad - 6}" y="{py(tick) + 4}" font-size="10" text-anchor="end">{tick:.1f}</text>')
    for tick in sorted({lo, (lo + 1) / 2, 1.0}):
        parts.append(f'<text x="{px(tick)}" y="{height - pad + 14}" font-size="10" text-anchor="middle">'
                     f'{tick:.2f}</text>')
    colours = {"unedited": "#888", "delta": "#36c"}
    for label, x, xci, y, yci in points:
        c = colours.get(label, "#2a2")
        parts.append(f'<line x1="{px(xci[0]):.1f}" y1="{py(y):.1f}" x2="{px(xci[1]):.1f}" y2="{py(y):.1f}" '
                     f'stroke="{c}"/><line x1="{px(x):.1f}" y1="{py(yci[0]):.1f}" x2="{px(x):.1f}" '
                     f'y2="{py(yci[1]):.1f}" stroke="{c}"/>')
        parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="5" fill="{c}"/>')
        right = px(x) > width / 2  # labels on the right half go to the point's left, inside the plot
        parts.append(f'<text x="{px(x) + (-8 if right else 8):.1f}" y="{py(y) - 6:.1f}" font-size="11" '
                     f'text-anchor="{"end" if right else "start"}">{_e(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def adversarial_prompts(results: dict, out: Path, page: Path) -> str:
    """Per attack (on the delta, then on the oracle) the prompts it ran on with their three images."""
    runs = [("delta", a) for a in results["attacks"].values()]
    if results.get("oracle"):
        runs += [("oracle", a) for a in results["oracle"]["attacks"].values()]
    html = []
    for who, a in runs:
        folder = out / a["folder"]
        part = json.loads((folder / "results.json").read_text())
        html.append(f"<h3>{_e(a['attack'])} on the {who}: ASR {_rate(a, 'asr')} "
                    f"(<a href='{_e(a['folder'])}/report.html'>its report</a>)</h3>"
                    f"{prompt_table(part, ImageCache(folder / 'cache'), page, only_attacked=True)}")
    return "".join(html)


def render(results: dict, out: Path, page: Path) -> str:
    p = results["protocol"]
    deltas = ", ".join(d["path"] for v in p["variants"] for d in v["deltas"]) or "no delta"
    oracle = results.get("oracle")
    summary = (f"model <code>{_e(p['model'].get('source'))}</code>, delta <code>{_e(deltas)}</code>, suite "
               f"<code>{_e(p['suite']['name'])}</code> (hash {_e(p['suite']['hash'][:12])}), judge "
               f"<code>{_e(p['judge'].get('name'))}</code> threshold {_e(p['judge'].get('threshold'))}, "
               f"{_e(p['sampler']['scheduler'])} {p['sampler']['steps']} steps, guidance {p['sampler']['guidance']}; "
               f"oracle: {_e(oracle['model']) if oracle else 'none installed for this suite'}")
    body = [f"<h1>erasekit audit: {_e(results['suite'])}</h1>", f"<p>{summary}</p>",
            "<h2>No attack</h2>", no_attack_table(results),
            "<p class=note>Each rate with its Wilson 95% interval and the number of images. Target rate: share of "
            "images the judge flags for the concept; base rate: the same for prompts of random words (what a "
            "free-token attack starts from); preservation accuracy: the judge agrees with what the preservation "
            "prompts asked for (its interval treats each image as one trial: conservative).</p>",
            f"<h2>Attacks (on {_e(results['attacked_set'])})</h2>", attack_table(results),
            "<p class=note>ASR: prompts flagged without attack plus those flagged only after it, over all prompts "
            "(UnlearnDiffAtk's definition); pre-ASR: flagged without attack. Mean ASR's interval is that of a mean "
            "of per-prompt scores over n prompts (conservative). The oracle is attacked against the unedited model "
            "as the original.</p>",
            "<h2>Mean ASR against preservation</h2>", tradeoff_svg(results),
            "<p class=note>The unedited model's point is its rate on the attacked prompts with no attack; whiskers "
            "are 95% intervals.</p>",
            "<h2>Adversarial prompts (original model, no attack, attacked; red frame: flagged)</h2>",
            adversarial_prompts(results, out, page),
            "<h2>Parts</h2><ul>" + "".join(f"<li><a href='{_e(n)}/report.html'>{_e(n)}</a></li>"
                                           for n in results["parts"]) + "</ul>"]
    return (f"<!doctype html><html><head><meta charset=utf-8><title>erasekit audit</title>"
            f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>\n")


def write_report(path: Path, results: dict, out: Path) -> Path:
    atomic_write_text(Path(path), render(results, Path(out), Path(path)))
    return Path(path)
