"""Output folders: refuse to clobber, write atomically, never inside a source model folder."""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError


def check_out_dir(out: Path, overwrite: bool, protected: list[Path] = ()) -> None:
    """Refuse an output folder that is not empty (unless overwrite) or lies inside a protected folder."""
    out = Path(out)
    refuse_overlap(out, protected)
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {out} exists and is a file: choose a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"output folder {out} exists and is not empty: choose another folder or pass --overwrite")


def refuse_overlap(out: Path, protected: list[Path] = ()) -> None:
    """Refuse an output folder that is, contains or lies inside a protected (source model) folder."""
    resolved = Path(out).resolve()
    for folder in protected:
        folder = Path(folder).resolve()
        if resolved == folder or folder in resolved.parents or resolved in folder.parents:
            raise UserError(f"output folder {out} overlaps the source model folder {folder}: "
                            "choose an output folder outside it (erasekit never writes into a source model)")


@contextmanager
def atomic_dir(out: Path, overwrite: bool = False, protected: list[Path] = ()):
    """Yield a temporary sibling folder; on success it replaces out in one rename."""
    out = Path(out)
    check_out_dir(out, overwrite, protected)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        yield tmp
        tmp.chmod(0o755)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
