"""Reading user files: option mappings (YAML, TOML, JSON) and prompt lists (text or CSV)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from .errors import UserError


def read_mapping(path: str | Path, what: str = "config file") -> dict:
    """A YAML, TOML or JSON file holding one mapping."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise UserError(f"{what} {path} must end in .yaml, .yml, .toml or .json")
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - parser errors become one line
        raise UserError(f"cannot read {what} {path}: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise UserError(f"{what} {path} must hold a mapping of names to values")
    return data


def read_prompt_list(path: str | Path) -> list[str]:
    """Prompts from a text file (one per line) or a CSV file with a 'prompt' column."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompts file {path} does not exist")
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            column = next((c for c in columns if c.strip().lower() == "prompt"), None)
            if column is None:
                raise UserError(f"{path} has no 'prompt' column (columns: {', '.join(columns) or 'none'}): "
                                "name the prompt column 'prompt'")
            prompts = [row[column].strip() for row in reader if (row.get(column) or "").strip()]
    else:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return prompts


def key_values(items: list[str] | None, flag: str) -> dict[str, str]:
    """['a=1', 'b=x'] from repeated KEY=VALUE flags -> {'a': '1', 'b': 'x'}."""
    values = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"{flag} {item!r} is not KEY=VALUE")
        values[key.strip()] = value.strip()
    return values
