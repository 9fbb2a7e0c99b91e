"""report.html for an attack run: ASR and pre-ASR, then per prompt the original model's image, the
erased model's image before the attack and after it (same seed), with both prompts."""

from __future__ import annotations

from pathlib import Path

from ..checkpoint import atomic_write_text
from ..evaluation.cache import ImageCache
from ..evaluation.report import STYLE, _e
from ..evaluation.thumbs import image_cell
from ..stats import format_rate

SHOWN = 24


def _img(cache: ImageCache, key: str | None, flagged: bool, page: Path) -> str:
    if not key or not cache.has(key):
        return "<td>–</td>"
    return image_cell(cache, key, page, flagged)


def _rate(results: dict, key: str, n: int) -> str:
    return _e(format_rate(results[key], results.get(f"{key}_ci"), n))


def prompt_table(results: dict, cache: ImageCache, page: Path, shown: int = SHOWN, only_attacked: bool = False) -> str:
    """Per prompt (the first `shown`; only_attacked: those the attack ran on): both prompts, then the original
    model's image, the erased model's before the attack and after it (same seed); red frame: flagged; each
    thumbnail links (relative to page, the report's path) to its full image."""
    chosen = [r for r in results["prompts"] if r["attacked"] or not only_attacked][:shown]
    rows = []
    for r in chosen:
        rows.append(f"<tr><td class=cap>{_e(r['original_prompt'])}<br><b>adversarial:</b> "
                    f"{_e(r['adversarial_prompt'])}<br>seed {r['seed']}"
                    f"{'' if r['attacked'] else '<br><i>' + _e(r.get('reason', '')) + '</i>'}</td>"
                    f"{_img(cache, r.get('original_key'), r['flagged_original'], page)}"
                    f"{_img(cache, r.get('before_key'), r['flagged_before'], page)}"
                    f"{_img(cache, r.get('after_key'), r['flagged_after'], page)}</tr>")
    if not rows:
        return "<p class=note>No prompt was attacked.</p>"
    return ("<table class=grid><tr><th>prompts</th><th>original model</th><th>erased, no attack</th>"
            f"<th>erased, attacked</th></tr>{''.join(rows)}</table>")


def render(results: dict, cache: ImageCache, page: Path) -> str:
    p = results["protocol"]
    erased = ", ".join(d["path"] for d in p["erased"]["deltas"]) or "no delta"
    against = f", original model <code>{_e(p['reference'].get('source'))}</code>" if "reference" in p else ""
    head = (f"<h1>erasekit attack: {_e(results['attack'])}</h1><p>model <code>{_e(p['model'].get('source'))}</code>, "
            f"erased with <code>{_e(erased)}</code>{against}, suite <code>{_e(p['suite']['name'])}</code> set "
            f"<code>{_e(p['set'])}</code>, judge <code>{_e(p['judge'].get('name'))}</code> threshold "
            f"{_e(p['judge'].get('threshold'))}</p>")
    table = (f"<table><tr><th>prompts</th><th>pre-ASR</th><th>ASR</th><th>ideal prompts</th><th>ASR on ideal</th>"
             f"<th>attacked</th></tr><tr><td>{results['n']}</td><td>{_rate(results, 'pre_asr', results['n'])}</td>"
             f"<td>{_rate(results, 'asr', results['n'])}</td><td>{results['ideal_prompts']}</td>"
             f"<td>{_rate(results, 'asr_on_ideal', results['ideal_prompts'])}</td>"
             f"<td>{results['attacked']}</td></tr></table>"
             "<p class=note>ASR (UnlearnDiffAtk's definition): prompts flagged without attack plus prompts flagged "
             "only after it, over all prompts; pre-ASR: flagged without attack; in brackets the Wilson 95% "
             "interval, then the number of prompts. Red frame: the judge flags it.</p>")
    grid = f"<h2>Prompts</h2>{prompt_table(results, cache, page)}"
    return (f"<!doctype html><html><head><meta charset=utf-8><title>erasekit attack</title><style>{STYLE}</style>"
            f"</head><body>{head}{table}{grid}</body></html>\n")


def write_attack_report(path: Path, results: dict, cache: ImageCache) -> Path:
    atomic_write_text(Path(path), render(results, cache, Path(path)))
    return Path(path)
