"""Inputs and outputs of the batch commands (``mmfuse embed``, ``mmfuse fuse``): not a sub-command itself.

Inputs: image files or folders (searched recursively, sorted), text files (one text per non-blank line) or
folders of ``.txt`` files, ``-`` for standard input. Outputs by suffix: ``.npy`` (a float32 [N, D] array, with
``<name>.rows.jsonl`` beside it: one line per row, same order, naming its source and statuses) or ``.jsonl``
(one line per row, the vector included).
"""
from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
OUTPUT_SUFFIXES = (".npy", ".jsonl")


class InputError(ValueError):
    """A path that does not exist, an unreadable pairs file: the message says which and why."""


def image_files(paths: Sequence[str]) -> list[Path]:
    """Files as given; folders: every image file below them (by suffix), sorted."""
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            out.append(path)
        elif path.is_dir():
            out += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            raise InputError(f"{path}: no such file or folder")
    return out


def _lines(text: str, source: str) -> list[tuple[str, str]]:
    return [(f"{source}:{i}", line) for i, line in enumerate(text.splitlines(), 1) if line.strip()]


def text_rows(paths: Sequence[str]) -> list[tuple[str, str]]:
    """(source, text) rows: one per non-blank line of each text file (``-``: stdin); folders: their .txt files."""
    out: list[tuple[str, str]] = []
    for raw in paths:
        if raw == "-":
            out += _lines(sys.stdin.read(), "<stdin>")
            continue
        path = Path(raw)
        files = [path] if path.is_file() else sorted(path.rglob("*.txt")) if path.is_dir() else None
        if files is None:
            raise InputError(f"{path}: no such file or folder")
        for f in files:
            try:
                out += _lines(f.read_text(encoding="utf-8"), str(f))
            except UnicodeDecodeError as error:
                raise InputError(f"{f}: not UTF-8 text ({error})") from error
    return out


def pair_rows(source: str) -> list[dict[str, Any]]:
    """Image/text pairs from a JSONL file (``{"image": path or null, "text": str or null}`` per line, image paths
    relative to the file's folder) or a folder (each image with the ``.txt`` file of the same stem; either may be
    missing). Rows: ``{"source", "image": Path | None, "text": str | None}``."""
    path = Path(source)
    rows: list[dict[str, Any]] = []
    if path.is_file():
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path}:{i}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as error:
                raise InputError(f"{where}: not JSON ({error})") from error
            if not isinstance(item, dict) or not set(item) <= {"image", "text", "id"}:
                raise InputError(f'{where}: expected {{"image": path, "text": str}}, got {line.strip()[:80]}')
            image = item.get("image")
            image_path = (path.parent / image) if image else None
            if image_path is not None and not image_path.is_file():
                raise InputError(f"{where}: image {image_path} not found")
            rows.append({"source": str(item.get("id", where)), "image": image_path, "text": item.get("text")})
        return rows
    if not path.is_dir():
        raise InputError(f"{path}: no such pairs file or folder")
    stems: dict[Path, dict[str, Path]] = {}
    for p in path.rglob("*"):
        if p.is_file() and (p.suffix.lower() in IMAGE_SUFFIXES or p.suffix == ".txt"):
            stems.setdefault(p.with_suffix(""), {})["text" if p.suffix == ".txt" else "image"] = p
    for stem in sorted(stems):
        found = stems[stem]
        text = found["text"].read_text(encoding="utf-8").strip() if "text" in found else None
        rows.append({"source": str(found.get("image", found.get("text"))), "image": found.get("image"), "text": text})
    return rows


def check_output(out: str) -> Path:
    path = Path(out)
    if path.suffix not in OUTPUT_SUFFIXES:
        raise InputError(f"--out {path}: the suffix says the format, one of {', '.join(OUTPUT_SUFFIXES)}")
    if not path.parent.is_dir():
        raise InputError(f"--out {path}: folder {path.parent} does not exist")
    return path


class RowWriter:
    """Writes rows in order as they come, window by window: .npy via a memory map (N known up front)."""

    def __init__(self, path: Path, n: int, vector_key: str):
        self.path, self.n, self.vector_key = path, n, vector_key
        self.npy = path.suffix == ".npy"
        self.rows_path = path.with_suffix(".rows.jsonl") if self.npy else path
        self._rows = open(self.rows_path, "w", encoding="utf-8")
        self._array = None
        self._next = 0

    def write(self, vectors: np.ndarray, rows: list[dict[str, Any]]) -> None:
        if self.npy:
            if self._array is None:
                self._array = np.lib.format.open_memmap(self.path, mode="w+", dtype=np.float32,
                                                        shape=(self.n,) + vectors.shape[1:])
            self._array[self._next:self._next + len(rows)] = vectors
        for i, row in enumerate(rows):
            row = {"row": self._next + i, **row}
            if not self.npy:
                row[self.vector_key] = vectors[i].tolist()
            self._rows.write(json.dumps(row) + "\n")
        self._next += len(rows)

    def close(self) -> None:
        self._rows.close()
        if self._array is not None:
            self._shape = self._array.shape
            self._array.flush()
            self._array = None

    def describe(self) -> str:
        shape = ", ".join(map(str, getattr(self, "_shape", (self.n, "D"))))
        return f"{self.path} [{shape}] + {self.rows_path}" if self.npy else str(self.path)


def decode(items: np.ndarray) -> list[str]:
    return [x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x) for x in items.reshape(-1)]


def run_to_writer(command: str, main, writer: RowWriter, done: str) -> int:
    """Run the asyncio ``main()`` (it returns a Counter of row statuses), close ``writer`` whatever happens,
    and report: exit 0, or 1 with the client's error."""
    import asyncio

    from mmfuse.clients import MMFuseClientError

    try:
        statuses = asyncio.run(main())
    except MMFuseClientError as error:
        print(f"mmfuse {command}: {error}", file=sys.stderr)
        return 1
    finally:
        writer.close()
    summary = ", ".join(f"{n} {s}" for s, n in sorted(statuses.items()))
    print(f"{done} ({summary}) -> {writer.describe()}", file=sys.stderr)
    return 0


def add_batch_args(p) -> None:
    """The output, batching, progress and connection options of the commands that stream rows (embed, fuse)."""
    from ._client_args import add_connection_args

    p.add_argument("--out", required=True, help="FILE.npy (float32 [N, D] + FILE.rows.jsonl) or FILE.jsonl")
    p.add_argument("--batch", type=int, default=16, help="rows per request (default 16)")
    p.add_argument("--in-flight", type=int, default=4, help="requests in flight at once (default 4)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_connection_args(p)
