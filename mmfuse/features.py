"""Per-modality features of a dataset, computed once by the served encoder code and cached on disk.

Training a fusion head on a user's dataset must see exactly what the served fusion model sees: the
repository's own frozen encoders, with their weights, preprocessing and precision. ``extract`` therefore
runs, in this process, the handlers of the ensemble's steps that feed the fusion step (read from the
ensemble's ``ensemble_scheduling``, so that a repository whose image decoding is merged into the encoder, or
one with other steps, is handled the same way), built from their config.pbtxt exactly as the Triton adapter
builds them, and keeps per manifest row what the fusion step receives:

* ``<M>_EMBEDDING`` [N,D], ``<M>_VALID`` [N,1], ``<M>_STATUS`` (as str) for every modality ``M`` of the
  fusion model's ``modalities`` parameter (and any other tensor the ensemble maps into the fusion step);
* with ``sequences=True``, ``<M>_SEQUENCE`` [T,W] and ``<M>_SEQUENCE_MASK`` [T] for every modality whose
  encoder writes them, requested from that encoder even when the ensemble does not route them to fusion.

Cache layout (``default_cache_dir()`` = ``$MMFUSE_CACHE_DIR`` or ``~/.cache/mmfuse/features``)::

    <cache_dir>/<key>/meta.json                      key parts, rows, shapes, shard lengths, timing
    <cache_dir>/<key>/<NAME>.npy                     whole arrays: <M>_EMBEDDING, <M>_VALID, <M>_STATUS (unicode)
    <cache_dir>/<key>/<NAME>.lengths.npy             per row: real positions of a sequence (last True of its mask + 1)
    <cache_dir>/<key>/<NAME>.<shard:05d>.npy         <M>_SEQUENCE [S,T_s,W] / <M>_SEQUENCE_MASK [S,T_s], S <= SHARD_ROWS

A shard holds ``SHARD_ROWS`` consecutive rows padded (zeros, mask False) to its own longest row, and is
written as soon as it is complete: neither extraction nor ``FeatureCache.batch`` ever holds every sequence.
Positions after a row's last real (mask True) position are not stored: they are padding the fusion
strategies mask (and trim) anyway. ``batch`` pads the selected rows to the longest of them; a row without
any real position (a missing modality) counts as long as the shortest real row of that tensor, so a
fixed-length sequence (image patches) keeps its length.

The key is a sha256 over: the format version, the mmfuse version, the wiring of the steps that run (the
ensemble's inputs, each step's input map, the tensors feeding the fusion step's embeddings; not the ensemble's
outputs, which a head export changes), the config.pbtxt text of every step model run, the fusion model's
``modalities``, every weights file those configs point at (parameters ``pretrained`` and ``model_config_file``
resolved against the model folder, every file of the served version folder: size and sha256 of the contents,
hashed once per process), the manifest file's bytes, the sha256 of every
row's image bytes and its text, and ``sequences``. A folder is written to a temporary name and renamed into place;
one that does not load back in full (no or bad meta.json, a missing or truncated file) is removed and rebuilt.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .datasets import Manifest
from .wire import MISSING, NON_FINITE, OK, as_bytes, bytes_column, column_bytes

#: Bump when what is stored, or how, changes: older cache folders are then never read.
FORMAT_VERSION = 1
#: Rows per sequence shard (read at call time: tests lower it).
SHARD_ROWS = 2048
#: The environment variable naming the cache folder.
CACHE_ENV = "MMFUSE_CACHE_DIR"
META = "meta.json"

_SEQUENCE_SUFFIXES = ("_SEQUENCE", "_SEQUENCE_MASK")
_FIELD_ORDER = ("EMBEDDING", "VALID", "STATUS", "SEQUENCE", "SEQUENCE_MASK")
_MIB = 1 << 20
# numpy dtypes of config.pbtxt data types: a step's outputs are cast to what its config declares, as Triton does.
_NUMPY_TYPES = {
    "TYPE_BOOL": np.bool_, "TYPE_UINT8": np.uint8, "TYPE_UINT16": np.uint16, "TYPE_UINT32": np.uint32,
    "TYPE_UINT64": np.uint64, "TYPE_INT8": np.int8, "TYPE_INT16": np.int16, "TYPE_INT32": np.int32,
    "TYPE_INT64": np.int64, "TYPE_FP16": np.float16, "TYPE_FP32": np.float32, "TYPE_FP64": np.float64,
    "TYPE_STRING": np.object_,
}


def default_cache_dir() -> Path:
    """``$MMFUSE_CACHE_DIR``, else ``~/.cache/mmfuse/features``."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "mmfuse" / "features"


# -- the plan: which steps run, what they read and write ------------------------------------------------------------
@dataclass
class _Step:
    name: str  # model name
    model_dir: Path
    version: int
    config: Any  # ModelConfig protobuf
    config_text: str
    input_map: dict[str, str]  # step input -> ensemble tensor
    output_map: dict[str, str]  # step output -> ensemble tensor (extras for the sequences added at build time)


@dataclass
class _Plan:
    repository: Path
    ensemble: str
    fusion_model: str
    modalities: tuple[str, ...]
    inputs: tuple[str, ...]  # the ensemble's inputs (IMAGE, TEXT)
    steps: list[_Step]  # in dependency order
    fields: dict[str, str]  # cached name (a fusion input) -> ensemble tensor
    sequences: bool
    extras_for: dict[str, str] = field(default_factory=dict)  # modality -> step whose EMBEDDING feeds it


def _model_modalities(repository: Path, fusion_model: str) -> tuple[str, ...]:
    from .repository import load_config, parameters

    raw = parameters(load_config(repository, fusion_model)).get("modalities", "") or "image,text"
    return tuple(m.strip().upper() for m in raw.split(",") if m.strip())


def _plan(repository: Path, ensemble: str, fusion_model: str, sequences: bool) -> _Plan:
    from .repository import config_path, load_config

    repository = Path(repository)
    config = load_config(repository, ensemble)
    if config.platform != "ensemble":
        raise ValueError(f"model '{ensemble}' of {repository} is not an ensemble (platform {config.platform!r})")
    steps = list(config.ensemble_scheduling.step)
    fusion_at = [i for i, s in enumerate(steps) if s.model_name == fusion_model]
    if len(fusion_at) != 1:
        raise ValueError(f"ensemble '{ensemble}' has {len(fusion_at)} steps running '{fusion_model}' (expected 1)")
    fusion = steps[fusion_at[0]]
    fusion_inputs = dict(fusion.input_map)
    modalities = tuple(m for m in _model_modalities(repository, fusion_model) if f"{m}_EMBEDDING" in fusion_inputs)
    if not modalities:
        raise ValueError(f"ensemble '{ensemble}': the '{fusion_model}' step reads no <M>_EMBEDDING of the modalities "
                         f"of '{fusion_model}' ({', '.join(_model_modalities(repository, fusion_model))})")
    for m in modalities:
        if f"{m}_VALID" not in fusion_inputs:
            raise ValueError(f"ensemble '{ensemble}': the '{fusion_model}' step reads {m}_EMBEDDING but no {m}_VALID")

    # The steps the fusion step depends on, walked back from its inputs.
    produced_by = {tensor: i for i, s in enumerate(steps) for tensor in s.output_map.values()}
    needed: set[int] = set()
    stack = list(fusion_inputs.values())
    while stack:
        index = produced_by.get(stack.pop())
        if index is None or index in needed:
            continue
        if index == fusion_at[0]:
            raise ValueError(f"ensemble '{ensemble}': the '{fusion_model}' step feeds a step it depends on")
        needed.add(index)
        stack.extend(steps[index].input_map.values())
    produced = {tensor for i in needed for tensor in steps[i].output_map.values()}
    available = {t.name for t in config.input}
    ordered: list[int] = []
    pending = sorted(needed)
    while pending:  # dependency order; ties in the ensemble's own order
        ready = next((i for i in pending
                      if all(t in available or t not in produced for t in steps[i].input_map.values())), None)
        if ready is None:
            raise ValueError(f"ensemble '{ensemble}': its steps depend on each other in a cycle")
        pending.remove(ready)
        ordered.append(ready)
        available.update(steps[ready].output_map.values())

    plan_steps = []
    for i in ordered:
        step = steps[i]
        model_dir = repository / step.model_name
        version = step.model_version if step.model_version > 0 else _latest_version(model_dir)
        plan_steps.append(_Step(step.model_name, model_dir, version, load_config(repository, step.model_name),
                                config_path(repository, step.model_name).read_text(), dict(step.input_map),
                                dict(step.output_map)))
    fields = {name: tensor for name, tensor in fusion_inputs.items()
              if sequences or not name.endswith(_SEQUENCE_SUFFIXES)}
    extras_for = {}
    if sequences:
        for m in modalities:
            embedding = fusion_inputs[f"{m}_EMBEDDING"]
            owner = next((s for s in plan_steps if s.output_map.get("EMBEDDING") == embedding), None)
            if owner is not None:
                extras_for[m] = owner.name
    return _Plan(repository, ensemble, fusion_model, modalities,
                 tuple(t.name for t in config.input), plan_steps, _ordered_fields(fields, modalities), sequences,
                 extras_for)


def _latest_version(model_dir: Path) -> int:
    from mmfuse.serving.params import ModelContext

    return ModelContext.latest_version(model_dir)


def _ordered_fields(fields: Mapping[str, str], modalities: Sequence[str]) -> dict[str, str]:
    def rank(name: str) -> tuple[int, int, str]:
        for i, m in enumerate(modalities):
            for j, suffix in enumerate(_FIELD_ORDER):
                if name == f"{m}_{suffix}":
                    return (i, j, name)
        return (len(modalities), 0, name)

    return {name: fields[name] for name in sorted(fields, key=rank)}


# -- the key ----------------------------------------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    """The sha256 of a file's bytes, read in blocks (a dataset's manifest, a checkpoint)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_MIB), b""):
            digest.update(block)
    return digest.hexdigest()


def file_fingerprint(path: Path, base: Path | None = None) -> dict[str, Any]:
    """size and sha256 of the whole file: the key follows the contents, not where or when they were copied.
    ``path`` is named relative to ``base`` where it lies under it (a copied repository keeps its key)."""
    stat = path.stat()
    name = str(path)
    if base is not None:
        try:
            name = path.resolve().relative_to(Path(base).resolve()).as_posix()
        except ValueError:
            pass
    return {"path": name, "size": stat.st_size, "sha256": _sha256_memo(str(path.resolve()), stat.st_size, stat.st_mtime_ns)}


@functools.lru_cache(maxsize=64)
def _sha256_memo(path: str, size: int, mtime_ns: int) -> str:
    """One hash per file version and process (an encoder checkpoint is named by several steps)."""
    return sha256_file(Path(path))


def _weights_files(step: _Step) -> list[Path]:
    from .repository import parameters

    files = set()
    values = parameters(step.config)
    for key in ("pretrained", "model_config_file"):
        value = values.get(key, "")
        if value:
            path = Path(value).expanduser()
            path = path if path.is_absolute() else (step.model_dir / path).resolve()
            if path.is_file():
                files.add(path)
    version_dir = step.model_dir / str(step.version)
    if version_dir.is_dir():
        files.update(p.resolve() for p in version_dir.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    return sorted(files)


def _rows_digest(manifest: Manifest) -> str:
    digest = hashlib.sha256()
    for example in manifest.examples:
        image = sha256_file(example.image) if example.image is not None else "-"
        text = hashlib.sha256(as_bytes(example.text)).hexdigest() if example.text is not None else "-"
        digest.update(f"{image} {text}\n".encode())
    return digest.hexdigest()


def _key_parts(plan: _Plan, manifest: Manifest) -> dict[str, Any]:
    from . import __version__

    return {
        "format": FORMAT_VERSION,
        "mmfuse": __version__,
        "ensemble": plan.ensemble,
        # The wiring of the steps that run (not the whole ensemble config: exporting a head changes its outputs
        # and the sequence routing, not what the encoders compute).
        "wiring_sha256": hashlib.sha256(json.dumps(
            {"inputs": list(plan.inputs), "steps": [[s.name, sorted(s.input_map.items())] for s in plan.steps],
             "embeddings": {m: plan.fields.get(f"{m}_EMBEDDING") for m in plan.modalities}},
            sort_keys=True).encode()).hexdigest(),
        "fusion_model": plan.fusion_model,
        "modalities": list(plan.modalities),
        "steps": {s.name: {"version": s.version,
                           "config_sha256": hashlib.sha256(s.config_text.encode()).hexdigest(),
                           "weights": [file_fingerprint(p, plan.repository) for p in _weights_files(s)]}
                  for s in plan.steps},
        "manifest": str(manifest.path),
        "manifest_sha256": sha256_file(Path(manifest.path)),
        "rows": len(manifest.examples),
        "rows_sha256": _rows_digest(manifest),
        "sequences": plan.sequences,
    }


def _key_of(parts: Mapping[str, Any]) -> str:
    # The manifest's location is recorded, not keyed: the same bytes elsewhere are the same features.
    keyed = {k: v for k, v in parts.items() if k != "manifest"}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()


def cache_key(repository: Path, manifest: Manifest, *, ensemble: str = "fuse_image_text",
              fusion_model: str = "fusion", sequences: bool = True) -> str:
    """The key ``extract`` files these features under (reads configs, fingerprints and rows; builds nothing)."""
    return _key_of(_key_parts(_plan(Path(repository), ensemble, fusion_model, sequences), manifest))


# -- running the steps ------------------------------------------------------------------------------------------------
def _build_handler(step: _Step):
    """The step's handler, built from its config.pbtxt as the Triton adapter builds it."""
    from google.protobuf import json_format

    from mmfuse.serving.handler import check_config
    from mmfuse.serving.params import ModelContext, Params

    context = ModelContext(step.name, step.model_dir, instance_kind="CPU", version=step.version)
    params = Params.from_model_config(step.name, json_format.MessageToDict(step.config,
                                                                           preserving_proto_field_name=True))
    handler_class, parsed = check_config(context, params, [t.name for t in step.config.input],
                                         [t.name for t in step.config.output])
    return handler_class.build(context, parsed)


@dataclass
class _Runner:
    step: _Step
    handler: Any
    requested: frozenset[str]
    dtypes: dict[str, Any]


def _runners(plan: _Plan, runners: list[_Runner]) -> list[_Runner]:
    """Builds each step's handler into ``runners`` (the caller closes those built, whatever happens)."""
    for step in plan.steps:
        handler = _build_handler(step)
        outputs = dict(step.output_map)
        writes = set(type(handler).output_names(handler.config))
        if plan.sequences:
            for m, owner in plan.extras_for.items():
                if owner != step.name or not {"SEQUENCE", "SEQUENCE_MASK"} <= writes:
                    continue
                for name in ("SEQUENCE", "SEQUENCE_MASK"):
                    target = f"{m}_{name}"
                    if target not in plan.fields:  # not routed to fusion: requested for the cache alone
                        tensor = outputs.get(name) or f"__features__.{step.name}.{name}"
                        outputs[name] = tensor
                        plan.fields[target] = tensor
        step.output_map = outputs
        dtypes = {o.name: _NUMPY_TYPES.get(_data_type_name(o.data_type)) for o in step.config.output}
        runners.append(_Runner(step, handler, frozenset(), dtypes))
    plan.fields = _ordered_fields(plan.fields, plan.modalities)
    # What each step is asked for: the outputs a later step or the cache reads (an ensemble asks for every
    # output it maps; those nothing here reads, e.g. sequences with sequences=False, are not computed).
    read = set(plan.fields.values()) | {t for s in plan.steps for t in s.input_map.values()}
    for runner in runners:
        runner.step.output_map = {k: t for k, t in runner.step.output_map.items() if t in read}
        runner.requested = frozenset(runner.step.output_map)
    return runners


def _data_type_name(value: int) -> str:
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2.DataType.Name(value)


def _run_batch(plan: _Plan, runners: Sequence[_Runner], examples) -> dict[str, np.ndarray]:
    from mmfuse.serving.adapter import validate_request_inputs

    tensors: dict[str, np.ndarray] = {}
    for name in plan.inputs:
        if name == "IMAGE":
            tensors[name] = bytes_column([e.image.read_bytes() if e.image is not None else b"" for e in examples])
        elif name == "TEXT":
            tensors[name] = bytes_column([e.text if e.text is not None else b"" for e in examples])
        else:
            raise ValueError(f"ensemble '{plan.ensemble}' takes input '{name}', which a manifest row does not give "
                             "(only IMAGE and TEXT)")
    for runner in runners:
        arrays = {spec.name: tensors.get(runner.step.input_map[spec.name]) if spec.name in runner.step.input_map
                  else None for spec in runner.handler.inputs}
        present, rows = validate_request_inputs(runner.step.name, runner.handler.inputs, arrays)
        outputs = runner.handler(present, runner.requested)
        for name, tensor in runner.step.output_map.items():
            if name not in outputs:
                raise RuntimeError(f"model '{runner.step.name}': its handler gave no output '{name}'")
            array = outputs[name]
            dtype = runner.dtypes.get(name)
            tensors[tensor] = np.ascontiguousarray(array, dtype=dtype) if dtype is not None else np.asarray(array)
            if tensors[tensor].shape[0] != rows:
                raise RuntimeError(f"model '{runner.step.name}': output '{name}' has {tensors[tensor].shape[0]} rows "
                                   f"for {rows}")
    return {name: tensors[tensor] for name, tensor in plan.fields.items()}


# -- writing -------------------------------------------------------------------------------------------------------
def _is_sequence(name: str) -> bool:
    return name.endswith(_SEQUENCE_SUFFIXES)


def _mask_of(name: str) -> str:
    return name if name.endswith("_SEQUENCE_MASK") else f"{name}_MASK"


def _real_lengths(mask: np.ndarray) -> np.ndarray:
    """Per row: the last True position + 1 (0 where none)."""
    mask = np.asarray(mask, dtype=bool)
    if mask.shape[1] == 0:
        return np.zeros(mask.shape[0], np.int64)
    last = mask.shape[1] - np.argmax(mask[:, ::-1], axis=1)
    return np.where(mask.any(axis=1), last, 0).astype(np.int64)


class _Writer:
    """Accumulates batches into a temporary folder: whole arrays at the end, sequence shards as they fill."""

    def __init__(self, folder: Path, fields: Sequence[str], shard_rows: int):
        self.folder = folder
        self.fields = list(fields)
        self.shard_rows = shard_rows
        self.arrays: dict[str, list[np.ndarray]] = {n: [] for n in self.fields if not _is_sequence(n)}
        self.sequences = [n for n in self.fields if _is_sequence(n)]
        self.pending: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {n: [] for n in self.sequences}
        self.pending_rows = 0
        self.lengths: dict[str, list[np.ndarray]] = {n: [] for n in self.sequences}
        self.native: dict[str, int] = {}  # shortest T an encoder gave (the floor when no row has a real position)
        self.tail: dict[str, tuple[int, ...]] = {}  # per-position shape (W for a sequence, () for a mask)
        self.shard_lengths: dict[str, list[int]] = {n: [] for n in self.sequences}
        self.rows = 0

    def add(self, batch: Mapping[str, np.ndarray]) -> None:
        rows = next(iter(batch.values())).shape[0]
        for name in self.arrays:
            self.arrays[name].append(np.asarray(batch[name]))
        for name in self.sequences:
            array = np.asarray(batch[name])
            mask_name = _mask_of(name)
            mask = batch.get(mask_name)
            lengths = (_real_lengths(mask) if mask is not None
                       else np.full(rows, array.shape[1] if array.ndim > 1 else 0, np.int64))
            self.native[name] = min(self.native.get(name, array.shape[1]), array.shape[1])
            self.tail.setdefault(name, array.shape[2:])
            keep = int(lengths.max(initial=0))
            # positions after the longest real row are padding: not kept
            self.pending[name].append((np.ascontiguousarray(array[:, :keep]), lengths))
            self.lengths[name].append(lengths)
        self.pending_rows += rows
        self.rows += rows
        while self.pending_rows >= self.shard_rows:
            self._flush(self.shard_rows)

    def _flush(self, rows: int) -> None:
        for name in self.sequences:
            pieces, taken, count = self.pending[name], [], 0
            while count < rows:
                piece, lengths = pieces.pop(0)
                if count + piece.shape[0] > rows:
                    pieces.insert(0, (piece[rows - count:], lengths[rows - count:]))
                    piece, lengths = piece[: rows - count], lengths[: rows - count]
                taken.append((piece, lengths))
                count += piece.shape[0]
            length = max((int(lengths.max(initial=0)) for _, lengths in taken), default=0)  # the shard's longest row
            dtype = np.bool_ if name.endswith("_MASK") else np.float32
            shard = np.zeros((rows, length) + self.tail[name], dtype=dtype)
            offset = 0
            for piece, _ in taken:
                width = min(length, piece.shape[1])
                shard[offset: offset + piece.shape[0], :width] = piece[:, :width]
                offset += piece.shape[0]
            index = len(self.shard_lengths[name])
            np.save(self.folder / f"{name}.{index:05d}.npy", shard)
            self.shard_lengths[name].append(length)
        self.pending_rows -= rows

    def close(self) -> dict[str, Any]:
        if self.pending_rows:
            self._flush(self.pending_rows)
        shapes: dict[str, Any] = {}
        for name, pieces in self.arrays.items():
            if not pieces:
                array = np.zeros((0,), np.float32)
            elif pieces[0].dtype == object:  # a TYPE_STRING column: stored as unicode, without pickle
                array = np.asarray([b.decode("utf-8", "replace") for p in pieces for b in column_bytes(p)], dtype=str)
            else:
                if len({p.shape[1:] for p in pieces}) != 1:
                    raise ValueError(f"the fusion input '{name}' changes shape between batches: "
                                     f"{sorted({p.shape[1:] for p in pieces})}")
                array = np.concatenate(pieces, axis=0)
            np.save(self.folder / f"{name}.npy", array)
            shapes[name] = {"shape": list(array.shape), "dtype": str(array.dtype),
                            "kind": "string" if array.dtype.kind == "U" else "array"}
        for name in self.sequences:
            lengths = np.concatenate(self.lengths[name]) if self.lengths[name] else np.zeros(0, np.int64)
            np.save(self.folder / f"{name}.lengths.npy", lengths)
            real = lengths[lengths > 0]
            floor = int(real.min()) if real.size else int(self.native.get(name, 1))
            shapes[name] = {"kind": "sequence", "tail": list(self.tail.get(name, ())),
                            "dtype": "bool" if name.endswith("_MASK") else "float32",
                            "shard_lengths": self.shard_lengths[name], "floor": max(floor, 1),
                            "max_length": int(lengths.max(initial=0))}
        return shapes


# -- the cache ------------------------------------------------------------------------------------------------------
class FeatureCache:
    """The fusion inputs of every row of a manifest, as cached on disk by ``extract``."""

    def __init__(self, path: Path, meta: Mapping[str, Any], hit: bool):
        self.path = Path(path)
        self.meta = dict(meta)
        self.key: str = self.meta["key"]
        self.rows: int = int(self.meta["rows"])
        self.modalities: tuple[str, ...] = tuple(self.meta["modalities"])
        self.hit = hit
        self.seconds: float = 0.0 if hit else float(self.meta["seconds"])
        self.fields: dict[str, dict[str, Any]] = self.meta["fields"]
        self.shard_rows = int(self.meta["shard_rows"])
        self._arrays: dict[str, np.ndarray] = {}
        self._shards: dict[tuple[str, int], np.ndarray] = {}
        self._pooled: tuple[np.ndarray, np.ndarray] | None = None

    def __repr__(self) -> str:
        return (f"FeatureCache({self.path}, rows={self.rows}, modalities={self.modalities}, hit={self.hit}, "
                f"sequences={self.has_sequences()})")

    @property
    def rows_per_s(self) -> float:
        """Extraction speed of the run that wrote this cache."""
        return float(self.meta.get("rows_per_s", 0.0))

    # -- loading ----------------------------------------------------------------------------------------------
    def _array(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            self._arrays[name] = np.load(self.path / f"{name}.npy", mmap_mode="r", allow_pickle=False)
        return self._arrays[name]

    def _lengths(self, name: str) -> np.ndarray:
        key = f"{name}.lengths"
        if key not in self._arrays:
            self._arrays[key] = np.load(self.path / f"{key}.npy", allow_pickle=False)
        return self._arrays[key]

    def _shard(self, name: str, index: int) -> np.ndarray:
        if (name, index) not in self._shards:
            self._shards[(name, index)] = np.load(self.path / f"{name}.{index:05d}.npy", mmap_mode="r",
                                                  allow_pickle=False)
        return self._shards[(name, index)]

    def _check(self) -> None:
        """Every file there, of the recorded shape: raises otherwise (the folder is then rebuilt)."""
        for name, info in self.fields.items():
            if info["kind"] == "sequence":
                lengths = self._lengths(name)
                if lengths.shape != (self.rows,):
                    raise ValueError(f"{name}.lengths has shape {lengths.shape}")
                shards = info["shard_lengths"]
                if len(shards) != -(-self.rows // self.shard_rows):
                    raise ValueError(f"{name}: {len(shards)} shards for {self.rows} rows")
                for index, length in enumerate(shards):
                    rows = min(self.shard_rows, self.rows - index * self.shard_rows)
                    shape = self._shard(name, index).shape
                    if shape != (rows, length, *info["tail"]):
                        raise ValueError(f"{name} shard {index} has shape {shape}")
            elif list(self._array(name).shape) != info["shape"] or self._array(name).shape[:1] != (self.rows,):
                raise ValueError(f"{name} has shape {self._array(name).shape}")

    # -- access -----------------------------------------------------------------------------------------------
    def has_sequences(self) -> bool:
        return any(info["kind"] == "sequence" for info in self.fields.values())

    def pooled(self) -> tuple[np.ndarray, np.ndarray]:
        """(embeddings [N,M,D] float32, present [N,M] bool): present = VALID and every value finite. Read once
        (training calls it per head: a comparison trains twelve), returned read-only."""
        if self._pooled is None:
            self._pooled = self._read_pooled()
        return self._pooled

    def _read_pooled(self) -> tuple[np.ndarray, np.ndarray]:
        embeddings = [np.asarray(self._array(f"{m}_EMBEDDING"), dtype=np.float32) for m in self.modalities]
        if len({e.shape[1:] for e in embeddings}) != 1:
            raise ValueError("embedding sizes differ: " + ", ".join(f"{m}_EMBEDDING {list(e.shape)}"
                                                                    for m, e in zip(self.modalities, embeddings)))
        stacked = np.stack(embeddings, axis=1)
        valid = np.stack([np.asarray(self._array(f"{m}_VALID")).reshape(self.rows) for m in self.modalities],
                         axis=1).astype(bool)
        present = valid & np.isfinite(stacked).all(axis=2)
        stacked.flags.writeable = present.flags.writeable = False
        return stacked, present

    def statuses(self) -> list[list[str]]:
        """[N][M] the status of each modality of each row as the fusion model reports it (MODALITY_STATUS): the
        encoder's STATUS (ok / missing without one), non_finite where a valid embedding is not finite."""
        embeddings, present = self.pooled()
        valid = np.stack([np.asarray(self._array(f"{m}_VALID")).reshape(self.rows) for m in self.modalities],
                         axis=1).astype(bool)
        columns = []
        for j, m in enumerate(self.modalities):
            if f"{m}_STATUS" in self.fields:
                columns.append([str(s) for s in self._array(f"{m}_STATUS")])
            else:
                columns.append([str(OK) if v else str(MISSING) for v in valid[:, j]])
        out = [[columns[j][i] for j in range(len(self.modalities))] for i in range(self.rows)]
        for i, j in zip(*np.nonzero(valid & ~present)):
            out[i][j] = str(NON_FINITE)
        return out

    def batch(self, indices: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        """The fusion model's inputs for those rows, as its handler receives them in one batch."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < -self.rows or idx.max() >= self.rows):
            raise IndexError(f"row index out of range for {self.rows} rows")
        idx = np.where(idx < 0, idx + self.rows, idx)
        out: dict[str, np.ndarray] = {}
        for name, info in self.fields.items():
            if info["kind"] == "sequence":
                out[name] = self._sequence_rows(name, info, idx)
            elif info["kind"] == "string":
                out[name] = bytes_column([str(s) for s in self._array(name)[idx]])
            else:
                out[name] = np.array(self._array(name)[idx])
        return out

    def _sequence_rows(self, name: str, info: Mapping[str, Any], idx: np.ndarray) -> np.ndarray:
        lengths = self._lengths(name)[idx]
        floor = int(info["floor"])  # a row without real positions: as long as the shortest real row
        length = int(np.where(lengths > 0, lengths, floor).max()) if idx.size else floor
        dtype = np.bool_ if info["dtype"] == "bool" else np.float32
        out = np.zeros((idx.size, length, *info["tail"]), dtype=dtype)
        shards = idx // self.shard_rows
        for shard in np.unique(shards):
            at = np.nonzero(shards == shard)[0]
            local = idx[at] - int(shard) * self.shard_rows
            data = self._shard(name, int(shard))
            keep = min(length, data.shape[1])
            order = np.argsort(local, kind="stable")  # memory-mapped reads in file order
            out[at[order], :keep] = data[local[order], :keep]
        return out


def _open(folder: Path, key: str) -> FeatureCache | None:
    """The cache in ``folder``, or None when it is not there or not whole."""
    try:
        meta = json.loads((folder / META).read_text())
        if meta.get("format") != FORMAT_VERSION or meta.get("key") != key or not meta.get("complete"):
            return None
        cache = FeatureCache(folder, meta, hit=True)
        cache._check()
        return cache
    except (OSError, ValueError, KeyError, TypeError, EOFError):
        return None


# -- extraction ---------------------------------------------------------------------------------------------------
def _say(message: str) -> None:
    print(f"[mmfuse features] {message}", file=sys.stderr, flush=True)


def extract(repository: Path, manifest: Manifest, *, ensemble: str = "fuse_image_text", fusion_model: str = "fusion",
            sequences: bool = True, cache_dir: Path | None = None, batch_size: int = 32,
            progress: bool = True) -> FeatureCache:
    """Every manifest row's fusion inputs, computed by the ensemble's steps before ``fusion_model`` (their own
    handlers, built from their config.pbtxt) and cached on disk; a second call with the same configs, weights,
    manifest and rows loads the cache without building anything.

    ``sequences``: also keep each modality's token sequence and mask (for token-level strategies), requested from
    its encoder even where the ensemble does not route them; False keeps the pooled inputs only (and drops any
    sequence the ensemble routes). ``batch_size``: rows per handler call.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    repository = Path(repository)
    plan = _plan(repository, ensemble, fusion_model, sequences)
    parts = _key_parts(plan, manifest)
    key = _key_of(parts)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    folder = root / key
    if folder.exists():
        cache = _open(folder, key)
        if cache is not None:
            return cache
        if progress:
            _say(f"{folder}: incomplete or corrupt cache, rebuilt")
        shutil.rmtree(folder, ignore_errors=True)

    root.mkdir(parents=True, exist_ok=True)
    temp = root / f".{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    temp.mkdir()
    try:
        meta = _extract_into(temp, plan, manifest, parts, key, batch_size, progress)
        try:
            os.rename(temp, folder)
        except OSError:  # written meanwhile by another process: keep the whole one
            cache = _open(folder, key)
            if cache is not None:
                shutil.rmtree(temp, ignore_errors=True)
                return cache
            shutil.rmtree(folder, ignore_errors=True)
            os.rename(temp, folder)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    if progress:
        _say(f"{meta['rows']} rows in {meta['seconds']:.1f} s: {meta['rows_per_s']:.1f} rows/s "
             f"({meta['encode_rows_per_s']:.1f} rows/s after {meta['build_seconds']:.1f} s building the handlers), "
             f"cached in {folder}")
    return FeatureCache(folder, meta, hit=False)


def _extract_into(folder: Path, plan: _Plan, manifest: Manifest, parts: Mapping[str, Any], key: str,
                  batch_size: int, progress: bool) -> dict[str, Any]:
    from tqdm import tqdm

    threads = _torch_threads()
    started = time.perf_counter()
    runners: list[_Runner] = []
    try:
        _runners(plan, runners)
        built = time.perf_counter() - started
        writer = _Writer(folder, list(plan.fields), int(SHARD_ROWS))
        examples = manifest.examples
        with tqdm(total=len(examples), desc="features", unit="row", file=sys.stderr, dynamic_ncols=True,
                  mininterval=0.5, disable=not progress) as bar:
            for start in range(0, len(examples), batch_size):
                chunk = examples[start: start + batch_size]
                writer.add(_run_batch(plan, runners, chunk))
                bar.update(len(chunk))
        fields = writer.close()
    finally:
        for runner in runners:
            runner.handler.close()
        _restore_torch_threads(threads)
    seconds = time.perf_counter() - started
    meta = {
        "format": FORMAT_VERSION,
        "key": key,
        "key_parts": dict(parts),
        "rows": writer.rows,
        "seconds": round(seconds, 3),
        "rows_per_s": round(writer.rows / max(seconds, 1e-9), 2),  # building the handlers included
        "build_seconds": round(built, 3),
        "encode_rows_per_s": round(writer.rows / max(seconds - built, 1e-9), 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "modalities": list(plan.modalities),
        "sequences": plan.sequences,
        "shard_rows": writer.shard_rows,
        "batch_size": batch_size,
        "sources": dict(plan.fields),  # cached name -> ensemble tensor
        "fields": fields,
        "complete": True,
    }
    (folder / META).write_text(json.dumps(meta, indent=2))  # last: a folder without it is never read
    return meta


def _torch_threads() -> int | None:
    """The encoders set torch's thread count for the whole process (torch_threads); it is put back afterwards."""
    try:
        import torch
    except ImportError:
        return None
    return torch.get_num_threads()


def _restore_torch_threads(threads: int | None) -> None:
    torch = sys.modules.get("torch")
    if torch is not None and threads is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
