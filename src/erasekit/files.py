"""Reading user files: option mappings (YAML, TOML, JSON) and prompt lists (text or CSV).

Every user text file goes through `read_text`: UTF-8 only (a UTF-8 byte-order mark is dropped), no NUL
bytes; every CSV through `read_csv`: strict quoting and the header's number of fields on every row. Each
problem is one line naming the file and the line.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from .errors import UserError

UTF16_MARKS = (b"\xff\xfe", b"\xfe\xff")


def read_text(path: str | Path, what: str = "file") -> str:
    """The text of a UTF-8 file (a leading byte-order mark dropped); UserError for another encoding or NUL bytes."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist")
    data = path.read_bytes()
    if data.startswith(UTF16_MARKS):
        raise UserError(f"{what} {path} is UTF-16 text: save it as UTF-8")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise UserError(f"{what} {path} is not UTF-8 (byte 0x{data[exc.start]:02x} on line {line} cannot be decoded; "
                        "latin-1 or another encoding?): save it as UTF-8") from None
    if "\0" in text:
        line = text[:text.index("\0")].count("\n") + 1
        hint = " (UTF-16 without a byte-order mark?)" if text.count("\0") * 4 > len(text) else ""
        raise UserError(f"{what} {path} holds a NUL byte on line {line}{hint}: save it as plain UTF-8 text")
    return text


def read_csv(path: str | Path, what: str = "CSV file") -> tuple[list[str], list[tuple[int, list[str]]]]:
    """(header cells, non-blank rows as (line number, cells)) of a CSV file; UserError for an unclosed quote,
    a stray quote, or a row whose number of fields differs from the header's."""
    path = Path(path)
    reader = csv.reader(io.StringIO(read_text(path, what), newline=""), strict=True)
    header, rows, start = None, [], 1
    try:
        for cells in reader:
            if header is None:
                header = cells
            elif any(c.strip() for c in cells):
                if len(cells) != len(header):
                    raise UserError(f"{what} {path} line {start} has {len(cells)} fields but the header has "
                                    f"{len(header)}: quote cells that hold commas, or fix that row")
                rows.append((start, cells))
            start = reader.line_num + 1
    except csv.Error as exc:
        problem = "a quote that is never closed" if "end of data" in str(exc) else f"bad quoting ({exc})"
        raise UserError(f"{what} {path} line {start}: {problem}; fix the quoting there") from None
    return header or [], rows


def read_mapping(path: str | Path, what: str = "config file") -> dict:
    """A YAML, TOML or JSON file holding one mapping."""
    path = Path(path)
    text = read_text(path, what)
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
    if path.suffix.lower() == ".csv":
        header, rows = read_csv(path, "prompts file")
        names = [h.strip().lower() for h in header]
        if "prompt" not in names:
            raise UserError(f"{path} has no 'prompt' column (columns: {', '.join(header) or 'none'}): "
                            "name the prompt column 'prompt'")
        column = names.index("prompt")
        return [cells[column].strip() for _, cells in rows if cells[column].strip()]
    return [line.strip() for line in read_text(path, "prompts file").splitlines() if line.strip()]


def key_values(items: list[str] | None, flag: str) -> dict[str, str]:
    """['a=1', 'b=x'] from repeated KEY=VALUE flags -> {'a': '1', 'b': 'x'}."""
    values = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"{flag} {item!r} is not KEY=VALUE")
        values[key.strip()] = value.strip()
    return values
