"""Datasets of the user's own: a JSONL or CSV manifest of image + text (+ label) rows.

One example per line (JSONL) or per row (CSV, header ``image,text,label[,split]``)::

    {"image": "photos/cat.jpg", "text": "a cat on a sofa", "label": "pets", "split": "train"}

* ``image``: a path, relative to the manifest's folder or absolute; absent, null or empty = the image is
  missing for that row (a row may carry text only);
* ``text``: a string; absent, null or empty = missing;
* ``label``: a class name (task ``classify``) or 0/1, true/false (task ``match``);
* ``split``: optional, e.g. ``train`` / ``val`` / ``test``.

A row that cannot be used (malformed line, image file not found or not a readable image, unknown or
missing label, nothing present at all) is counted and reported with its line number; it never crashes a
run. ``read_manifest`` fails with one clear message only when fewer than ``min_rows`` usable rows remain.
"""
from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

TASKS = ("classify", "match")
FIELDS = ("image", "text", "label", "split")
_TRUE, _FALSE = ("1", "true", "yes"), ("0", "false", "no")


class DatasetError(ValueError):
    """The manifest cannot be used (the message names the file and why)."""


@dataclass(frozen=True)
class Example:
    line: int  # 1-based line of the manifest (CSV: counting the header)
    image: Path | None
    text: str | None
    label: str | int  # class name (classify) or 0/1 (match)
    split: str | None = None


@dataclass
class Manifest:
    path: Path
    task: str
    examples: list[Example]
    classes: tuple[str, ...]  # classify: sorted class names (the PROBS order); match: ("0", "1")
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (line, reason)

    def split(self, name: str) -> list[Example]:
        return [e for e in self.examples if e.split == name]

    def report(self, most: int = 10) -> str:
        """One line of counts, then the first ``most`` skipped rows with their line numbers."""
        reasons = Counter(reason.split(":")[0] for _, reason in self.skipped)
        head = (f"{self.path}: {len(self.examples)} usable rows, {len(self.skipped)} skipped"
                + (f" ({', '.join(f'{n} {r}' for r, n in reasons.most_common())})" if reasons else ""))
        lines = [f"  line {line}: {reason}" for line, reason in self.skipped[:most]]
        if len(self.skipped) > most:
            lines.append(f"  ... and {len(self.skipped) - most} more")
        return "\n".join([head] + lines)


def _raw_rows(path: Path) -> list[tuple[int, dict | str]]:
    """(line, row dict) per example, or (line, reason) for a malformed one."""
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        missing = {"image", "text", "label"} - set(reader.fieldnames or ())
        if missing:
            raise DatasetError(f"{path}: the CSV header needs the columns image, text, label (missing: "
                               f"{', '.join(sorted(missing))})")
        return [(i, dict(row)) for i, row in enumerate(reader, 2)]
    rows: list[tuple[int, dict | str]] = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as error:
            rows.append((i, f"malformed: not JSON ({error.msg})"))
            continue
        rows.append((i, item if isinstance(item, dict) else f"malformed: not a JSON object: {line.strip()[:60]}"))
    return rows


def _label(value, task: str) -> str | int | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if task == "classify":
        return str(value).strip()
    text = str(value).strip().lower()
    return 1 if text in _TRUE else 0 if text in _FALSE else None


def _image_problem(path: Path) -> str | None:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        return f"missing file: image {path} not found"
    try:
        with Image.open(path) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        return f"undecodable image: {path} ({type(error).__name__})"
    return None


def read_manifest(path: str | Path, task: str = "classify", *, classes: Sequence[str] | None = None,
                  min_rows: int = 1, check_images: bool = True) -> Manifest:
    """Read a JSONL/CSV manifest; rows that cannot be used are skipped and listed, never fatal.

    ``classes``: the class names a trained head knows (evaluation data must not invent new ones: a row with
    another label is skipped as ``unknown label``); by default the classes are the labels found.
    """
    path = Path(path)
    if task not in TASKS:
        raise DatasetError(f"unknown task {task!r}: expected one of {', '.join(TASKS)}")
    if not path.is_file():
        raise DatasetError(f"{path}: no such manifest file")
    known = set(classes) if classes is not None else None
    examples, skipped = [], []
    for line, row in _raw_rows(path):
        if isinstance(row, str):
            skipped.append((line, row))
            continue
        unknown_fields = set(row) - set(FIELDS) - {"id"}
        if unknown_fields:
            skipped.append((line, f"malformed: unknown field(s) {', '.join(sorted(map(str, unknown_fields)))}"))
            continue
        image_value = row.get("image")
        image = None
        if image_value not in (None, ""):
            image = Path(str(image_value)).expanduser()
            image = image if image.is_absolute() else path.parent / image
            problem = _image_problem(image) if check_images else None
            if problem:
                skipped.append((line, problem))
                continue
        text = row.get("text")
        text = None if text is None or str(text) == "" else str(text)
        if image is None and text is None:
            skipped.append((line, "no modality: neither image nor text"))
            continue
        label = _label(row.get("label"), task)
        if label is None:
            skipped.append((line, f"bad label: {row.get('label')!r} is not a {'class name' if task == 'classify' else '0/1 or true/false'}"))
            continue
        if known is not None and task == "classify" and label not in known:
            skipped.append((line, f"unknown label: {label!r} (the head knows {', '.join(sorted(known))})"))
            continue
        split = row.get("split")
        examples.append(Example(line, image, text, label, str(split) if split not in (None, "") else None))
    if len(examples) < min_rows:
        manifest = Manifest(path, task, examples, (), skipped)
        raise DatasetError(f"{path}: {len(examples)} usable rows, fewer than the {min_rows} needed\n"
                           + manifest.report())
    if task == "classify":
        names = tuple(classes) if classes is not None else tuple(sorted({str(e.label) for e in examples}))
    else:
        names = ("0", "1")
    return Manifest(path, task, examples, names, skipped)
