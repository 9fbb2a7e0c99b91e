"""The image cells of the HTML reports: a small inlined thumbnail that links to the full PNG in the run's cache.

The grids show images DISPLAY_PX CSS pixels wide. An image larger than THUMB_PX (twice that, sharp on a
high-density screen) is inlined as a JPEG shrunk to THUMB_PX a side, so a report of 512 px images stays small;
a smaller one (the testbed's 16 px) is inlined as its own PNG and drawn with hard pixel edges. The link is
relative to the report page, so an output folder moved or copied as a whole keeps working.
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path

from PIL import Image

from .cache import ImageCache

DISPLAY_PX = 96
THUMB_PX = 2 * DISPLAY_PX
JPEG_QUALITY = 85


def thumbnail(path: Path, size: int = THUMB_PX) -> tuple[str, bool]:
    """(data URL, whether it was shrunk) for the image file at path."""
    with Image.open(path) as image:
        if max(image.size) <= size:
            return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode(), False
        small = image.convert("RGB")
        small.thumbnail((size, size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode(), True


def link(target: Path, page: Path) -> str:
    """target's address relative to the folder of the page that links to it ('cache/ab/ab12....png')."""
    return Path(os.path.relpath(Path(target).resolve(), Path(page).resolve().parent)).as_posix()


def image_cell(cache: ImageCache, key: str, page: Path, flagged: bool, title: str = "", alt: str = "") -> str:
    """A table cell with the image's thumbnail (red frame when flagged, else green) linking to the full image."""
    src, shrunk = thumbnail(cache.path(key))
    cls = "px" + (" flag" if flagged else "") + ("" if shrunk else " sharp")
    extra = (f' title="{html.escape(title)}"' if title else "") + f' alt="{html.escape(alt)}"'
    return (f'<td><a href="{html.escape(link(cache.path(key), page))}"><img class="{cls}" src="{src}"{extra}>'
            f"</a></td>")
