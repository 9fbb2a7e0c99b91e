"""Output folders: refuse to clobber, write atomically, never inside a source model folder."""

from __future__ import annotations

import os
import shutil
import socket
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


def protected_folders(model_source: str | Path | None) -> list[Path]:
    """Folders no command may write into: the source model folder (a folder, or a hub id's cached snapshot)
    and the testbed's shipped weights inside the installed package."""
    from .families.hub import cached_snapshot, is_hub_id, split_revision
    from .testbed import WEIGHTS_DIR

    folders = [WEIGHTS_DIR]
    if model_source is not None and Path(model_source).is_dir():
        folders.append(Path(model_source))
    elif model_source is not None and is_hub_id(str(model_source)):
        snapshot = cached_snapshot(*split_revision(str(model_source)))
        folders += [snapshot] if snapshot is not None else []
    return folders


def check_output(path: str | Path, kind: str, flag: str, protected: list[Path] = (), overwrite: bool = False) -> None:
    """Refuse, before any work, an output path that cannot or must not be written: inside a protected
    folder, under a file, in a folder without write permission, a folder where a file goes (or the
    reverse), or an existing file without --overwrite. kind is "file" or "folder"."""
    path = Path(path)
    if kind == "folder":
        refuse_overlap(path, protected)
    else:
        for folder in protected:
            folder = Path(folder).resolve()
            if folder == path.resolve() or folder in path.resolve().parents:
                raise UserError(f"{flag} {path} lies inside the source model folder {folder}: write it outside "
                                "(erasekit never writes into a source model)")
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{flag} {path}: {parent} is a file, not a folder: choose another path")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise UserError(f"{flag} {path}: no permission to write in {parent}: choose a folder you can write to")
            break
    if kind == "file" and path.is_dir():
        raise UserError(f"{flag} {path} is a folder: give a file path")
    if kind == "file" and path.exists() and not overwrite:
        raise UserError(f"{flag} {path} already exists: choose another path or pass --overwrite")
    if kind == "folder" and path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} exists and is a file: choose a folder path")
    if kind == "folder" and path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: no permission to write in it: choose a folder you can write to")


def _lock_path(path: Path) -> Path:
    path = Path(path).absolute()
    return path.with_name(f".{path.name}.lock")


def _holder_alive(lock: Path) -> bool:
    try:
        host, pid = lock.read_text().split()[:2]
    except (OSError, ValueError):
        return True  # being written this instant, or unreadable: treat as held
    if host != socket.gethostname():
        return True  # another machine's run: cannot tell, so it holds
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    return True


@contextmanager
def output_lock(paths: list[Path]):
    """Hold a lock beside each output path for the command's duration: a second writer to the same path
    is refused with one line instead of silently replacing the first's files. A lock left by a killed
    run (its process gone) is taken over. Processes after the first of an `accelerate launch` run share
    the first one's lock."""
    if os.environ.get("RANK", "0") != "0" or os.environ.get("LOCAL_RANK", "0") != "0":
        yield
        return
    taken = []
    try:
        for path in paths:
            lock = _lock_path(path)
            lock.parent.mkdir(parents=True, exist_ok=True)
            for _ in range(2):
                try:
                    fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    if _holder_alive(lock):
                        raise UserError(f"another erasekit run is writing {path} (lock {lock}): wait for it to "
                                        "finish, or choose another output") from None
                    lock.unlink(missing_ok=True)
                    continue
                with os.fdopen(fd, "w") as f:
                    f.write(f"{socket.gethostname()} {os.getpid()}\n")
                taken.append(lock)
                break
        yield
    finally:
        for lock in taken:
            lock.unlink(missing_ok=True)
