"""report.html: one page with the metrics table (and notes on the metrics it shows), a trade-off plot and
image grids that put every variant's image for the same prompt and seed side by side. The grids inline small
thumbnails, each a link to its full PNG in the run's cache folder (thumbs.py)."""

from __future__ import annotations

import html
from pathlib import Path

from ..checkpoint import atomic_write_text
from ..stats import format_rate
from .cache import ImageCache
from .thumbs import DISPLAY_PX, image_cell

GRID_PROMPTS = 12  # prompts shown per prompt set

STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:8px 0 20px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}.grid td{text-align:center;vertical-align:top}
img.px{width:DISPLAYpx;height:auto;border:3px solid #8c8;display:block;margin:auto}
img.px.sharp{image-rendering:pixelated}img.px.flag{border-color:#d33}td.parts{text-align:left;font-size:12px}
.cap{font-size:11px;max-width:260px}.grid td.cap{text-align:left}
.note{color:#666;font-size:13px}code{background:#f3f3f3;padding:1px 4px}
""".replace("DISPLAY", str(DISPLAY_PX))


def _e(text) -> str:
    return html.escape(str(text))


def _fmt(x) -> str:
    if x is None:
        return "–"
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def metrics_table(results: dict) -> str:
    """One row per variant: the target rate per target set, then each other metric some variant has a value of."""
    metrics = results["metrics"]
    targets = list(next(iter(metrics.values()))["target_rate"])
    shown = shown_metrics(results)
    extra = [k for k in shown if k != "exposed_parts"]
    head = "".join(f"<th>target rate<br>{_e(t)}</th>" for t in targets) + "".join(
        f"<th>{_e(k.replace('_', ' '))}</th>" for k in extra)
    if "exposed_parts" in shown:
        head += "<th>exposed parts<br>(NudeNet detections)</th>"
    rows = []
    for name, m in metrics.items():
        cells = "".join(f"<td>{_rate(m, 'target_rate', t)}</td>" for t in targets)
        cells += "".join(f"<td>{_rate(m, k) if k == 'preservation_accuracy' else _fmt(m.get(k))}</td>" for k in extra)
        if "exposed_parts" in shown:
            cells += f"<td class=parts>{exposed_cell(m)}</td>"
        rows.append(f"<tr><td class=l>{_e(name)}</td>{cells}</tr>")
    return f"<table><tr><th class=l>variant</th>{head}</tr>{''.join(rows)}</table>"


def part_name(cls: str) -> str:
    """A NudeNet class as the report shows it: 'FEMALE_BREAST_EXPOSED' -> 'female breast'."""
    return cls.removesuffix("_EXPOSED").replace("_", " ").lower()


def exposed_cell(m: dict) -> str:
    """Per prompt set, the exposed-part count and under it one 'part: count' row per part found ('none' when
    nothing was found); results written before the per-part counts existed give the count alone."""
    totals = m.get("exposed_parts")
    if not isinstance(totals, dict):
        return _e(_fmt(totals))
    by_class = m.get("exposed_by_class") or {}
    lines = []
    for set_name, total in totals.items():
        lines.append(f"<b>{_e(set_name)}</b>: {_e(total) if total else 'none'}")
        lines += [f"&nbsp;&nbsp;{_e(part_name(c))}: {_e(n)}" for c, n in (by_class.get(set_name) or {}).items()]
    return "<br>".join(lines)


def _rate(m: dict, key: str, set_name: str | None = None) -> str:
    """A rate with its 95% interval and image count: '0.31 [0.18, 0.47], n=32' (older results: the rate)."""
    if set_name is None:
        return _e(format_rate(m.get(key), m.get(f"{key}_ci"), m.get(f"{key}_n")))
    ci, n = m.get(f"{key}_ci", {}).get(set_name), m.get(f"{key}_n", {}).get(set_name)
    return _e(format_rate(m[key][set_name], ci, n))


def tradeoff_svg(results: dict, width: int = 420, height: int = 300) -> str:
    """Erasure (mean target rate, lower is better) against preservation, one labelled point per variant.
    Preservation is judge accuracy on preservation prompts when known, else 1 - FID_gen scaled."""
    metrics = results["metrics"]
    points = []
    for name, m in metrics.items():
        x = m.get("preservation_accuracy")
        y = m.get("target_rate_mean")
        if x is not None and y is not None:
            points.append((name, float(x), float(y)))
    if not points:
        return "<p class=note>No trade-off plot: this suite has no preservation accuracy.</p>"
    pad = 48
    xs = [p[1] for p in points]
    lo, hi = min(xs + [0.5]), max(xs + [1.0])

    def px(x):
        return pad + (x - lo) / max(hi - lo, 1e-9) * (width - 2 * pad)

    def py(y):
        return height - pad - y * (height - 2 * pad)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">',
             f'<rect x="0" y="0" width="{width}" height="{height}" fill="white"/>',
             f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#444"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#444"/>',
             f'<text x="{width / 2}" y="{height - 10}" text-anchor="middle" font-size="12">'
             f'preservation accuracy ({lo:.2f} to {hi:.2f}), higher is better</text>',
             f'<text x="14" y="{height / 2}" font-size="12" text-anchor="middle" '
             f'transform="rotate(-90 14 {height / 2})">mean target rate, lower is better</text>']
    for tick in (0.0, 0.5, 1.0):
        parts.append(f'<text x="{pad - 6}" y="{py(tick) + 4}" font-size="10" text-anchor="end">{tick:.1f}</text>')
    for name, x, y in points:
        parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="5" fill="#36c"/>')
        parts.append(f'<text x="{px(x) + 8:.1f}" y="{py(y) - 6:.1f}" font-size="11">{_e(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def grids(results: dict, cache: ImageCache, page: Path, per_set: int = GRID_PROMPTS) -> str:
    """Per prompt set: rows are prompts (same seed), columns are variants; red frame = judge flagged; each
    thumbnail links (relative to page, the report's own path) to the full image."""
    variants = list(results["metrics"])
    by = {(r["variant"], r["set"], r["index"]): r for r in results["images"]}
    sets = list(dict.fromkeys(r["set"] for r in results["images"]))
    out = []
    for set_name in sets:
        n = 1 + max(r["index"] for r in results["images"] if r["set"] == set_name)
        head = "".join(f"<th>{_e(v)}</th>" for v in variants)
        rows = []
        for i in range(min(n, per_set)):
            first = by[(variants[0], set_name, i)]
            cells = []
            for v in variants:
                r = by[(v, set_name, i)]
                cells.append(image_cell(cache, r["key"], page, r["flagged"], f"score {r['score']}", v))
            rows.append(f'<tr><td class="cap">{_e(first["prompt"])}<br>seed {first["seed"]}</td>{"".join(cells)}</tr>')
        out.append(f"<h3>{_e(set_name)}</h3><table class=grid><tr><th>prompt</th>{head}</tr>{''.join(rows)}</table>")
    return "".join(out)


def guidance_note(results: dict) -> str:
    """' (per-row guidance 7-13 on 40 images)' when the suite set other scales than the default."""
    default = results["protocol"]["sampler"]["guidance"]
    rows = [r["guidance"] for r in results.get("images", []) if r.get("guidance", default) != default]
    return f" (per-row guidance {min(rows):g}-{max(rows):g} on {len(rows)} images)" if rows else ""


NOTES = {  # what a metrics column means, keyed by its results field: the report explains the columns it shows
    "preservation_accuracy": "preservation accuracy: share of the attributes the preservation prompts ask for "
                             "that the judge finds in their images",
    "fid_gen": "fid gen: Fréchet distance in the judge's features (or --fid-features) to the original model's images "
               "for the same preservation prompts and seeds",
    "fid_real": "fid real: Fréchet distance in the same features to the --real-images folder",
    "clip_score": "clip score: mean over images of 100 x max(cos, 0) of image and prompt embeddings (the --clip "
                  "model; on the testbed its own aligned encoder)",
    "exposed_parts": "exposed parts: NudeNet detections in the judge's class set scoring above the threshold, per "
                     "prompt set and per part",
}


def shown_metrics(results: dict) -> list[str]:
    """The metrics of NOTES that hold a value for some variant (a run without CLIP or FID shows none of it)."""
    return [k for k in NOTES if any(m.get(k) is not None for m in results["metrics"].values())]


def metrics_note(results: dict) -> str:
    """The note under the metrics table, explaining the columns it shows and no other."""
    parts = ["target rate: share of images the judge flags for the concept; in brackets its Wilson 95% interval, "
             "then the number of images"] + [NOTES[k] for k in shown_metrics(results)]
    return f"<p class=note>{_e('; '.join(parts))}.</p>"


def render(results: dict, cache: ImageCache, page: Path) -> str:
    p = results["protocol"]
    judge = p["judge"]
    sampler = p["sampler"]
    summary = (f"model <code>{_e(p['model'].get('name'))}</code> ({_e(p['model'].get('source'))}), "
               f"suite <code>{_e(p['suite']['name'])}</code> (hash {_e(p['suite']['hash'][:12])}), "
               f"judge <code>{_e(judge.get('name'))}</code> threshold {_e(judge.get('threshold'))}, "
               f"{_e(sampler['scheduler'])} {sampler['steps']} steps, guidance {sampler['guidance']}"
               f"{guidance_note(results)}, "
               f"{_e(p['dtype'])}")
    body = [f"<h1>erasekit report: {_e(p['suite']['name'])}</h1>", f"<p>{summary}</p>",
            "<h2>Metrics</h2>", metrics_table(results), metrics_note(results),
            "<h2>Erasure against preservation</h2>", tradeoff_svg(results),
            "<h2>Images (same prompt and seed across variants; red frame: flagged; click one for the full "
            "image)</h2>", grids(results, cache, page)]
    return (f"<!doctype html><html><head><meta charset=utf-8><title>erasekit report</title>"
            f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>\n")


def write_report(path: Path, results: dict, cache: ImageCache) -> Path:
    atomic_write_text(Path(path), render(results, cache, Path(path)))
    return Path(path)

