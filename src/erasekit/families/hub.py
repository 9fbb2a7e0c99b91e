"""Model sources as diffusers users name them: a local folder, or a hub id ("ORG/NAME[@REVISION]") found in
the local Hugging Face cache (HF_HUB_CACHE / HF_HOME, as huggingface_hub reads them). A hub id that is not
cached is downloaded by diffusers unless offline (--offline, or HF_HUB_OFFLINE=1)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import UserError

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*(@[A-Za-z0-9_./-]+)?$")


def is_hub_id(source: str) -> bool:
    """ORG/NAME or ORG/NAME@REVISION that is not a path present on disk."""
    return bool(HUB_ID.match(source)) and not Path(source).expanduser().exists()


def split_revision(source: str) -> tuple[str, str | None]:
    repo, _, revision = source.partition("@")
    return repo, revision or None


def resolve(source: str, offline: bool = False, allow_pickle: bool = False) -> tuple[Path, dict]:
    """(local folder, origin record) of a source. origin holds the hub repo and the snapshot's commit for a
    hub id, {} for a folder."""
    path = Path(source).expanduser()
    if path.exists() or not is_hub_id(source):
        if not path.exists():
            raise UserError(f"model folder {path} does not exist: give a local diffusers pipeline folder, a hub id "
                            "in the local Hugging Face cache (ORG/NAME) or 'testbed'")
        return path, {}
    repo, revision = split_revision(source)
    offline = offline or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    folder = cached_snapshot(repo, revision) or (None if offline else download(repo, revision, allow_pickle))
    if folder is None:
        from huggingface_hub.constants import HF_HUB_CACHE

        raise UserError(f"{source} is not in the local Hugging Face cache ({HF_HUB_CACHE}) and --offline forbids "
                        f"downloading it: fetch it on a machine with network (`huggingface-cli download {repo}`), "
                        "point HF_HUB_CACHE at a cache that holds it, or give a local folder")
    return folder, {"hub_id": repo, "revision": folder.name}


def local_model_folder(path: str) -> tuple[Path, dict]:
    """A judge's or metric's transformers model: a local folder, or a hub id found in the local cache (judge
    models are not downloaded: fetch them with `huggingface-cli download ORG/NAME`)."""
    folder = Path(path).expanduser()
    if folder.exists() or not is_hub_id(path):
        return folder, {}
    repo, revision = split_revision(path)
    snapshot = cached_snapshot(repo, revision, marker="config.json")
    if snapshot is None:
        from huggingface_hub.constants import HF_HUB_CACHE

        raise UserError(f"{path} is neither a folder nor a model in the local Hugging Face cache ({HF_HUB_CACHE}): "
                        f"fetch it with `huggingface-cli download {repo}` or give its folder")
    return snapshot, {"hub_id": repo, "revision": snapshot.name}


def cached_snapshot(repo: str, revision: str | None, marker: str = "model_index.json") -> Path | None:
    """The cached snapshot folder of repo at revision (a branch, tag or commit; default main), if it holds
    marker (a pipeline's model_index.json; a transformers model's config.json)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, marker, revision=revision)
    return Path(found).parent if isinstance(found, str) else None


def download(repo: str, revision: str | None, allow_pickle: bool) -> Path:
    """Download a pipeline into the cache with diffusers (safetensors weights only unless allow_pickle)."""
    from diffusers import DiffusionPipeline

    try:
        return Path(DiffusionPipeline.download(repo, revision=revision,
                                               use_safetensors=None if allow_pickle else True))
    except Exception as exc:  # noqa: BLE001 - network, auth and missing-repo failures become one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"could not download {repo} from the Hugging Face hub: {first[:300]} (give a local "
                        "folder, or pass --offline to use only the local cache)") from exc
