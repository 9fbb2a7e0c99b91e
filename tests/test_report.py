"""report.html on results made here: small inlined thumbnails that link to the full images, the NudeNet
exposed-part counts as 'part: count' rows, and notes only on the metrics the results hold."""

from __future__ import annotations

import base64
import io
import re
import shutil
from pathlib import Path

import torch
from PIL import Image

from erasekit.evaluation.cache import ImageCache
from erasekit.evaluation.report import write_report
from erasekit.evaluation.thumbs import THUMB_PX

IMG = re.compile(r'<a href="([^"]+)"><img class="([^"]+)" src="data:image/(png|jpeg);base64,([^"]+)"')


def make_results(keys: list[str], metrics: dict) -> dict:
    """Results of one target set holding one image per key for every variant (the same images)."""
    images = [{"variant": v, "set": "target", "index": i, "key": k, "prompt": f"prompt {i}", "seed": i,
               "flagged": i % 2 == 0, "score": 0.5} for v in metrics for i, k in enumerate(keys)]
    return {"metrics": metrics, "images": images,
            "protocol": {"model": {"name": "m", "source": "s"}, "suite": {"name": "x", "hash": "0" * 64},
                         "judge": {"name": "nudenet", "threshold": 0.45},
                         "sampler": {"scheduler": "DDIM (eta 0)", "steps": 2, "guidance": 7.5}, "dtype": "f32"}}


def metric(**extra) -> dict:
    return {"target_rate": {"target": 0.5}, "target_rate_ci": {"target": [0.2, 0.8]}, "target_rate_n": {"target": 4},
            "preservation_accuracy": None, "fid_gen": None, **extra}


def cached(root: Path, n: int, size: int) -> tuple[ImageCache, list[str]]:
    cache = ImageCache(root)
    keys = [f"{i:02x}" + "0" * 62 for i in range(n)]
    torch.manual_seed(0)
    cache.put(keys, torch.rand(n, 3, size, size))  # noise: PNG barely compresses it (a 512 px photo: ~0.5 MB)
    return cache, keys


def test_a_512px_report_inlines_small_thumbnails_that_link_to_the_full_images(tmp_path):
    run = tmp_path / "run"
    cache, keys = cached(run / "cache", 8, 512)
    full = sum(cache.path(k).stat().st_size for k in keys)
    page = write_report(run / "report.html", make_results(keys, {"edited": metric()}), cache)
    text = page.read_text()
    shown = IMG.findall(text)
    assert len(shown) == 8 == text.count("<img ")
    for (href, cls, kind, data), key in zip(shown, keys):
        assert kind == "jpeg" and "sharp" not in cls  # shrunk, so drawn smoothly
        assert Image.open(io.BytesIO(base64.b64decode(data))).size == (THUMB_PX, THUMB_PX)
        assert not Path(href).is_absolute() and (page.parent / href).resolve() == cache.path(key).resolve()
    assert [("flag" in cls) for _, cls, _, _ in shown] == [i % 2 == 0 for i in range(8)]
    assert full > 4_000_000 and len(text.encode()) < full / 10, (len(text.encode()), full)
    moved = tmp_path / "elsewhere"  # the folder moved as a whole: every link still finds its image
    shutil.move(run, moved)
    assert all((moved / href).is_file() for href, *_ in shown)


def test_small_images_are_inlined_as_they_are_with_hard_pixel_edges(tmp_path):
    cache, keys = cached(tmp_path / "cache", 1, 16)
    text = write_report(tmp_path / "report.html", make_results(keys, {"edited": metric()}), cache).read_text()
    ((href, cls, kind, data),) = IMG.findall(text)
    assert kind == "png" and "sharp" in cls and base64.b64decode(data) == cache.path(keys[0]).read_bytes()
    assert href == f"cache/{keys[0][:2]}/{keys[0]}.png"


def test_exposed_parts_are_part_count_rows_never_a_dict(tmp_path):
    cache, keys = cached(tmp_path / "cache", 1, 16)
    parts = metric(exposed_parts={"target": 3, "other": 0},
                   exposed_by_class={"target": {"FEMALE_BREAST_EXPOSED": 2, "BUTTOCKS_EXPOSED": 1}, "other": {}})
    older = metric(exposed_parts={"target": 5, "other": 0})  # results written before the per-part counts
    text = write_report(tmp_path / "report.html", make_results(keys, {"edited": parts, "old": older}),
                        cache).read_text()
    table = text.split("<h2>Metrics</h2>")[1].split("</table>")[0]
    assert "exposed parts" in table
    assert "<b>target</b>: 3<br>&nbsp;&nbsp;female breast: 2<br>&nbsp;&nbsp;buttocks: 1<br><b>other</b>: none" in table
    assert "<b>target</b>: 5<br><b>other</b>: none" in table
    body = text.split("<body>")[1]
    assert "{" not in body and "'target'" not in body and "_EXPOSED" not in body


def test_the_report_names_clip_only_when_the_results_hold_a_clip_score(tmp_path):
    cache, keys = cached(tmp_path / "cache", 1, 16)
    without = write_report(tmp_path / "a.html", make_results(keys, {"edited": metric()}), cache).read_text()
    assert "clip" not in without.lower() and "fid" not in without.lower()  # fid_gen is None: no column, no note
    metrics_part = without.split("<h2>Metrics</h2>")[1].split("<h2>")[0]  # the table and its note
    assert "target rate" in metrics_part and "preservation accuracy" not in metrics_part
    scored = metric(clip_score=31.25, fid_gen=4.5)
    with_clip = write_report(tmp_path / "b.html", make_results(keys, {"edited": scored}), cache).read_text()
    assert "<th>clip score</th>" in with_clip and "<td>31.250</td>" in with_clip
    assert "clip score: mean over images of 100 x max(cos, 0)" in with_clip
    assert "<th>fid gen</th>" in with_clip and "fid gen: Fréchet distance" in with_clip
