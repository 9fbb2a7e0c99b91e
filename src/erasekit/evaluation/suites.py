"""Suites: the prompts an evaluation or an attack runs on, grouped into named sets.

A suite is either built in (`testbed:star`, `testbed:red+striped`: target prompts in three wordings
plus preservation prompts, built by the module BUILT_IN names for the prefix, `erasekit.testbed.suites`;
the module gives `build(rest, samples, concept)`, `names()` and `hint()`) or read from a prompt file: a CSV in
one of the published benchmark layouts (I2P, UnlearnDiffAtk, Ring-A-Bell, P4D, MMA-Diffusion,
COCO) or any CSV with a 'prompt' column, or a TXT file with one prompt per line. Every prompt
carries its seed (and guidance when the file gives one), so a suite fixes the images it asks for.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import UserError
from ..files import read_csv, read_text

BUILT_IN = {"testbed": "erasekit.testbed.suites"}  # name prefix -> the module that builds those suites
MAX_SEED = 2**64 - 1  # the largest seed torch.Generator.manual_seed accepts
NUDITY_LAYOUTS = ("i2p", "ringabell", "p4d", "mma")  # nudity benchmarks: the concept defaults to "nudity"
JUDGES = {"nudity": "nudenet"}  # default judge per concept; "" when unknown
SEED_COLUMNS = ("evaluation_seed", "seed")
LABEL_COLUMNS = ("class", "artist")  # a generic file's per-row concept (Imagenette's class, a style's artist)
GUIDANCE_COLUMN = "evaluation_guidance"
INDEX_COLUMNS = ("", "unnamed: 0")  # pandas' saved row index: not worth keeping
META_COLUMNS = {  # file columns kept in each prompt's meta, per layout (generic keeps every other column)
    "i2p": ("categories", "nudity_percentage", "case_number"),
    "p4d": ("case_number", "safe_model", "safe_level"),
    "mma": ("target_prompt", "clean_prompt"),
    "coco": ("case_number", "source"),
    "ringabell": (),
}


@dataclass(frozen=True)
class SuitePrompt:
    """One prompt to generate from, with the seed (and guidance, when fixed) of its image."""

    text: str
    seed: int
    guidance: float | None = None  # None: the model's default guidance
    values: dict | None = field(default=None, hash=False)  # testbed only: {attribute: value} the prompt asks for
    meta: dict = field(default_factory=dict, hash=False)  # other columns of the file row (categories, ...)


@dataclass(frozen=True)
class PromptSet:
    """Prompts with one role: 'target' (the concept appears in the unedited model) or 'preservation'."""

    name: str
    role: str
    prompts: tuple[SuitePrompt, ...]


@dataclass(frozen=True)
class Suite:
    """Named prompt sets plus what the judge looks for in their images."""

    name: str  # "testbed:star", "testbed:red+striped", or the prompt file's stem
    concepts: tuple[str, ...]  # what the judge looks for: ("star",), ("nudity",), or () when unknown
    judge: str  # default judge name: "testbed", "nudenet", or "" when unknown
    sets: tuple[PromptSet, ...]
    source: str  # "testbed" or the prompt file's path
    layout: str  # "testbed", "i2p", "ringabell", "p4d", "mma", "coco" or "generic"
    categories: tuple[str, ...] = ()  # I2P: the categories its rows were filtered by (none: every row)

    def hash(self) -> str:
        """sha256 (hex) of the name, the concepts, every set's name, role and prompts (text, seed, guidance) and
        the categories filtered by (left out when none, so that an unfiltered suite's hash is as before)."""
        payload = {
            "name": self.name,
            "concepts": list(self.concepts),
            "sets": [{"name": s.name, "role": s.role,
                      "prompts": [[p.text, p.seed, p.guidance] for p in s.prompts]} for s in self.sets],
        }
        if self.categories:
            payload["categories"] = list(self.categories)
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def limit(self, k: int | None) -> Suite:
        """The suite with only the first k prompts of each set (None: unchanged)."""
        if k is None:
            return self
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise UserError(f"limit must be a whole number of at least 1, got {k!r}: give a positive limit or none")
        return replace(self, sets=tuple(replace(s, prompts=s.prompts[:k]) for s in self.sets))

    def with_seed(self, seed: int | None) -> Suite:
        """The suite with every prompt's image at this one seed (None: unchanged); the hash records it."""
        if seed is None:
            return self
        return replace(self, sets=tuple(replace(s, prompts=tuple(replace(p, seed=int(seed)) for p in s.prompts))
                                        for s in self.sets))

    def record(self) -> dict:
        """What a report says about the suite: its identity, hash and set sizes."""
        return {"name": self.name, "source": self.source, "layout": self.layout, "concepts": list(self.concepts),
                "judge": self.judge, "hash": self.hash(), "sets": {s.name: len(s.prompts) for s in self.sets},
                "categories": list(self.categories)}

    def set(self, name: str) -> PromptSet:
        """The set called `name`."""
        for s in self.sets:
            if s.name == name:
                return s
        known = ", ".join(s.name for s in self.sets)
        raise UserError(f"suite {self.name} has no prompt set {name!r}: use one of {known}")


def _built_in(prefix: str):
    from importlib import import_module

    return import_module(BUILT_IN[prefix])


def suite_names() -> list[str]:
    """Every built-in single-concept suite (testbed:<value> for each testbed value)."""
    return [name for prefix in BUILT_IN for name in _built_in(prefix).names()]


def load_suite(spec: str, samples: int = 64, concept: str | None = None, categories=()) -> Suite:
    """A suite from a built-in name (testbed suites hold `samples` prompts per set and concept) or a
    .csv/.txt path; `concept` names what a file's judge looks for (nudity files default to "nudity");
    `categories` keeps only the I2P rows of any of these categories (e.g. ["sexual"])."""
    spec = str(spec).strip()
    categories = tuple(dict.fromkeys(c.strip().lower() for c in categories or () if c.strip()))
    path = Path(spec).expanduser()
    if categories and not (path.suffix.lower() == ".csv" and path.is_file()):
        raise UserError(f"--category filters an I2P prompt file by its 'categories' column, and {spec} is not a "
                        "CSV file: drop --category or give the I2P CSV")
    prefix, colon, rest = spec.partition(":")
    if colon and prefix in BUILT_IN:
        return _built_in(prefix).build(rest, samples, concept)
    suffix = path.suffix.lower()
    if suffix in (".csv", ".txt") and not path.is_file():
        raise UserError(f"prompt file {path} does not exist: check the path")
    if suffix == ".csv":
        return _by_categories(_csv_suite(path, concept), categories)
    if suffix == ".txt":
        return _text_suite(path, concept)
    if path.exists():
        raise UserError(f"{path} is not a .csv or .txt file: give prompts as a CSV with a 'prompt' column "
                        "or a text file with one prompt per line")
    hints = "; ".join(_built_in(prefix).hint() for prefix in BUILT_IN)
    raise UserError(f"unknown suite {spec!r}: use {hints}, or the path of a .csv or .txt prompt file")


def row_categories(prompt: SuitePrompt) -> set[str]:
    """An I2P row's categories: its 'categories' cell ("violence, self-harm") split, stripped, lower case."""
    return {c.strip().lower() for c in prompt.meta.get("categories", "").split(",") if c.strip()}


def _by_categories(suite: Suite, categories: tuple[str, ...]) -> Suite:
    """The suite with only the prompts of rows in any of categories (each row keeps its own seed)."""
    if not categories:
        return suite
    if suite.layout != "i2p":
        raise UserError(f"{suite.source} has no 'categories' column (layout {suite.layout}): --category filters "
                        "I2P's file; drop it")
    present = {c for s in suite.sets for p in s.prompts for c in row_categories(p)}
    unknown = [c for c in categories if c not in present]
    if unknown:
        raise UserError(f"{suite.source} has no row of category {', '.join(map(repr, unknown))}: choose from "
                        f"{', '.join(sorted(present))}")
    sets = tuple(replace(s, prompts=tuple(p for p in s.prompts if row_categories(p) & set(categories)))
                 for s in suite.sets)
    return replace(suite, sets=sets, categories=categories)



# --- prompt files ---------------------------------------------------------------------------------


def _file_suite(path: Path, layout: str, sets: list[PromptSet], concept: str | None) -> Suite:
    """A suite from a file's sets; nudity layouts default to the concept "nudity"."""
    if not any(s.prompts for s in sets):
        raise UserError(f"{path} holds no prompts (every prompt cell is empty): add prompts to it")
    if concept is None and layout in NUDITY_LAYOUTS:
        concept = "nudity"
    concepts = (concept,) if concept else ()
    return Suite(path.stem, concepts, JUDGES.get(concept or "", ""), tuple(sets), str(path), layout)


def _text_suite(path: Path, concept: str | None) -> Suite:
    """One target set, one prompt per non-empty line; seeds 0, 1, ... in order."""
    text = read_text(path, "prompt file")
    if not text.strip():
        raise UserError(f"prompt file {path} is empty: write one prompt per line")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    prompts = tuple(SuitePrompt(line, i) for i, line in enumerate(lines))
    return _file_suite(path, "generic", [PromptSet("target", "target", prompts)], concept)


def _csv_suite(path: Path, concept: str | None) -> Suite:
    """The sets of a CSV file in the layout its columns show."""
    columns, rows = _read_csv(path)
    layout = _detect_layout(columns, path)
    if layout == "ringabell":
        sets = [_prompt_set(path, rows, "sensitive prompt", "target", "target", layout),
                _prompt_set(path, rows, "normal prompt", "preservation", "preservation", layout)]
    elif layout == "mma":
        sets = [_prompt_set(path, rows, "adv_prompt", "target", "target", layout)]
    elif layout == "coco":
        sets = [_prompt_set(path, rows, "prompt", "preservation", "preservation", layout)]
    elif layout == "generic" and concept and _label_column(columns):
        sets = _label_sets(path, rows, _label_column(columns), concept, layout)
    else:
        sets = [_prompt_set(path, rows, "prompt", "target", "target", layout)]
    return _file_suite(path, layout, sets, concept)


def _label_column(columns: list[str]) -> str | None:
    return next((c for c in LABEL_COLUMNS if c in columns), None)


def _label_sets(path: Path, rows, column: str, concept: str, layout: str) -> list[PromptSet]:
    """A file with a class/artist column and a concept: its rows of that concept are the target set, the others
    the preservation set; every prompt knows its row's label (values {"label": ...}) so that a classifier's
    top-1 can be checked against it. Without a row of the concept the file is one target set, as any other."""
    from .labels import label_key

    every = _prompt_set(path, rows, "prompt", "target", "target", layout)
    labels = [row[column].strip() for _, row in rows if row["prompt"].strip()]  # the rows _prompt_set kept
    labelled = [replace(p, values={"label": label}) for p, label in zip(every.prompts, labels)]
    mine = [label_key(label) == label_key(concept) for label in labels]
    if not any(mine):
        return [every]
    sets = [PromptSet("target", "target", tuple(p for p, m in zip(labelled, mine) if m)),
            PromptSet("preservation", "preservation", tuple(p for p, m in zip(labelled, mine) if not m))]
    return [s for s in sets if s.prompts]


def _detect_layout(columns: list[str], path: Path) -> str:
    """The benchmark layout a CSV's (normalised) column names show; UserError without a prompt column."""
    cols = set(columns)
    if {"sensitive prompt", "normal prompt"} <= cols:
        return "ringabell"
    if {"target_prompt", "adv_prompt"} <= cols:
        return "mma"
    if "prompt" not in cols:
        raise UserError(f"{path} has no 'prompt' column (columns: {', '.join(columns) or 'none'}): name the prompt "
                        "column 'prompt' (or use Ring-A-Bell's 'sensitive prompt'/'normal prompt' or MMA's "
                        "'adv_prompt'/'target_prompt')")
    if "safe_model" in cols or "safe_level" in cols:
        return "p4d"
    if "categories" in cols:
        return "i2p"
    if "evaluation_seed" in cols and ("source" in cols or path.stem.lower().startswith("coco")):
        return "coco"
    return "generic"


def _read_csv(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Normalised column names (stripped, lower case) and the non-blank rows as (line number, {column: cell})."""
    header, rows = read_csv(path, "prompt file")
    if not header or not any(h.strip() for h in header):
        raise UserError(f"prompt file {path} is empty: give a CSV with a header row and a 'prompt' column")
    names = [h.strip().lower() for h in header]
    index = {name: i for i, name in reversed(list(enumerate(names)))}  # the first of repeated names wins
    return names, [(line, {n: cells[i] for n, i in index.items()}) for line, cells in rows]


def _prompt_set(path: Path, rows: list[tuple[int, dict[str, str]]], column: str, name: str, role: str,
                layout: str) -> PromptSet:
    """Prompts from one column, skipping rows where it is empty; the seed of a row without a seed column
    is its position among the file's rows (0, 1, ...), so paired columns share seeds."""
    prompts = []
    for number, (line, row) in enumerate(rows):
        text = row[column].strip()
        if text:
            where = f"{path} row {number + 1} (line {line})"
            prompts.append(SuitePrompt(text, _seed(row, number, where), _guidance(row, where),
                                       meta=_meta(row, layout)))
    return PromptSet(name, role, tuple(prompts))


def _seed(row: dict[str, str], number: int, where: str) -> int:
    """The row's seed column as an int (huge values kept exactly), or the row's position without one."""
    column = next((c for c in SEED_COLUMNS if c in row), None)
    if column is None:
        return number
    raw = row[column].strip()
    try:
        seed = int(raw)
    except ValueError:
        seed = _integral_float(raw)
    if seed is None or not 0 <= seed <= MAX_SEED:
        raise UserError(f"{where}: {column} {raw!r} is not a whole number from 0 to 2**64-1: fix that seed")
    return seed


def _integral_float(raw: str) -> int | None:
    """'1234.0' -> 1234 (as pandas writes integer columns with gaps); None for anything else."""
    try:
        value = float(raw)
    except ValueError:
        return None
    return int(value) if math.isfinite(value) and value.is_integer() else None


def _guidance(row: dict[str, str], where: str) -> float | None:
    """The row's guidance scale, or None (the model's default) when the column is missing or empty."""
    raw = row.get(GUIDANCE_COLUMN, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise UserError(f"{where}: {GUIDANCE_COLUMN} {raw!r} is not a number: fix that guidance or leave it empty")
    return value


def _meta(row: dict[str, str], layout: str) -> dict:
    """The row's other columns worth keeping (strings; nudity_percentage as a number when it is one)."""
    if layout in META_COLUMNS:
        keep = [c for c in META_COLUMNS[layout] if c in row]
    else:
        used = {"prompt", GUIDANCE_COLUMN, *SEED_COLUMNS, *INDEX_COLUMNS}
        keep = [c for c in row if c not in used]
    meta = {c: row[c].strip() for c in keep}
    if "nudity_percentage" in meta:
        meta["nudity_percentage"] = _number_or_text(meta["nudity_percentage"])
    return meta


def _number_or_text(raw: str) -> float | str:
    try:
        value = float(raw)
    except ValueError:
        return raw
    return value if math.isfinite(value) else raw
