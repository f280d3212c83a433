"""``mmfuse train --data``: a fusion head for the user's own task, on the repository's own frozen encoders.

1. the manifests are read (:mod:`mmfuse.datasets`; unusable rows are listed, never fatal);
2. every row's fusion inputs are computed once by the served encoder code and cached on disk
   (:mod:`mmfuse.features`): a second run, or a second strategy, starts from the cache;
3. the head is fitted (:mod:`mmfuse.fit`), and the single-modality reference heads on the same rows;
4. all of them are scored on the validation rows: clean, with the image removed, with the text removed;
5. export: a new version folder of the fusion model (head + JSON record + ``references/<modality>/``), the
   fusion model's parameters and the ensembles' outputs following the head (SCORE, or PROBS + LABEL).
"""
from __future__ import annotations

import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .datasets import DatasetError, Manifest, read_manifest
from .features import sha256_file as sha256_of  # noqa: F401 - also the data file's hash in mmfuse eval

REFERENCES = "references"
MIN_TRAIN_ROWS = 8
HOLDOUT_FRACTION = 0.1  # validation rows held out of --data when neither --val nor a split column gives any
HOLDOUT_MIN_ROWS = 50  # below this many rows nothing is held out (and there is no validation)


def say(message: str) -> None:
    print(f"[mmfuse train] {message}", file=sys.stderr, flush=True)


@dataclass
class Split:
    """Rows of one cached manifest used for one purpose (train or validation), with their labels."""

    manifest: Manifest
    cache: Any  # mmfuse.features.FeatureCache
    rows: np.ndarray
    labels: np.ndarray

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.manifest.path), "sha256": sha256_of(self.manifest.path), "rows": int(len(self.rows)),
                "skipped": len(self.manifest.skipped), "feature_cache": self.cache.key}


@dataclass
class Prepared:
    task: str
    classes: tuple[str, ...]
    train: Split
    val: Split | None
    extraction: dict[str, Any]


def read(path: Path, task: str, classes=None, min_rows: int = 1) -> Manifest:
    manifest = read_manifest(path, task, classes=classes, min_rows=min_rows)
    if manifest.skipped:
        say(manifest.report())
    return manifest


def features(repository: Path, manifest: Manifest, cache_dir: Path | None):
    from .features import extract

    cache = extract(repository, manifest, cache_dir=cache_dir)
    if cache.hit:
        say(f"{manifest.path.name}: features from the cache ({cache.rows} rows, {cache.path})")
    else:
        say(f"{manifest.path.name}: features of {cache.rows} rows in {cache.seconds:.1f} s "
            f"({cache.rows / max(cache.seconds, 1e-9):.1f} rows/s), cached in {cache.path}")
    return cache


def split_of(manifest: Manifest, cache, task: str, classes, keep: Callable[[Any], bool]) -> Split:
    from .fit import label_array

    rows = np.asarray([i for i, e in enumerate(manifest.examples) if keep(e)], dtype=np.int64)
    return Split(manifest, cache, rows, label_array([manifest.examples[i].label for i in rows], task, classes))


def prepare(repository: Path, data: Path, val: Path | None, task: str, cache_dir: Path | None = None,
            seed: int = 0, holdout: bool = True) -> Prepared:
    """Read the manifests, cache their features, and pick the training and validation rows.

    Without ``val`` the ``split`` column decides (rows marked ``val`` validate, the others train);
    without either, a seeded ``HOLDOUT_FRACTION`` of the rows validates (none below ``HOLDOUT_MIN_ROWS``), unless
    ``holdout`` is false (every row trains: compare scores on its own test file)."""
    train_manifest = read(data, task, min_rows=MIN_TRAIN_ROWS)
    classes = train_manifest.classes
    if task == "classify" and len(classes) < 2:
        raise DatasetError(f"{data}: task classify needs at least two classes; found {list(classes)}")
    started = time.monotonic()
    train_cache = features(repository, train_manifest, cache_dir)
    if val is not None:
        val_manifest = read(val, task, classes=classes)
        val_split = split_of(val_manifest, features(repository, val_manifest, cache_dir), task, classes, lambda e: True)
        train_split = split_of(train_manifest, train_cache, task, classes, lambda e: True)
    else:
        held = _held_out(train_manifest, seed) if holdout else set()
        train_split = split_of(train_manifest, train_cache, task, classes, lambda e: id(e) not in held)
        val_split = split_of(train_manifest, train_cache, task, classes, lambda e: id(e) in held) if held else None
    if len(train_split.rows) < MIN_TRAIN_ROWS:
        raise DatasetError(f"{data}: {len(train_split.rows)} training rows, fewer than the {MIN_TRAIN_ROWS} needed")
    extraction = {"seconds": round(time.monotonic() - started, 2), "train_cache_hit": train_cache.hit}
    if not train_cache.hit:
        extraction["rows_per_s"] = round(train_cache.rows / max(train_cache.seconds, 1e-9), 2)
    return Prepared(task, classes, train_split, val_split, extraction)


def _held_out(manifest: Manifest, seed: int) -> set[int]:
    """The validation rows of a manifest read without --val (as ``id()`` of its examples)."""
    marked = {id(e) for e in manifest.examples if e.split == "val"}
    if marked:
        say(f"{manifest.path.name}: {len(marked)} rows marked split=val validate")
        return marked
    n = len(manifest.examples)
    if n < HOLDOUT_MIN_ROWS:
        say(f"{manifest.path.name}: no --val and only {n} rows: no validation")
        return set()
    picked = np.random.default_rng(seed).permutation(n)[: max(1, round(HOLDOUT_FRACTION * n))]
    say(f"{manifest.path.name}: no --val and no split=val rows: {len(picked)} rows ({HOLDOUT_FRACTION:.0%}, "
        f"seed {seed}) held out for validation")
    return {id(manifest.examples[i]) for i in picked}


def bar(total: int, desc: str):
    from tqdm import tqdm

    progress = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, file=sys.stderr, mininterval=0.5)

    def update(step: int, loss: float) -> None:
        progress.update(1)
        if step % 20 == 0:
            progress.set_postfix(loss=f"{loss:.3f}")
        if step + 1 == total:
            progress.close()

    return update


def evaluate(head, split: Split, task: str, classes, modalities=None) -> dict[str, Any]:
    """Scores on ``split``: clean and with each modality removed (for a head over several modalities)."""
    from .fit import predict, scores

    names = tuple(modalities or split.cache.modalities)
    out = {"clean": scores(task, predict(head, split.cache, split.rows, modalities=names), split.labels)}
    if len(names) > 1:
        for m in names:
            out[f"no_{m.lower()}"] = scores(task, predict(head, split.cache, split.rows, drop=m, modalities=names),
                                            split.labels)
    return out


def train(repository: Path, prepared: Prepared, cfg, *, export: bool, fusion_model: str = "fusion",
          command: str = "") -> dict[str, Any]:
    """Fit the head and the references, score them, export them; returns the record written with the head."""
    import torch

    from .fit import chance, fit_head, fit_references

    train_split = prepared.train
    steps = cfg.steps_for(len(train_split.rows))
    say(f"{cfg.preset} head for {prepared.task} ({len(prepared.classes) if prepared.task == 'classify' else 2} "
        f"classes) on {len(train_split.rows)} rows, {steps} steps, modality dropout {cfg.modality_dropout}")
    head, fitted = fit_head(cfg, train_split.cache, train_split.rows, train_split.labels, prepared.classes,
                            bar(steps, f"train {cfg.preset}"))
    references = fit_references(cfg, train_split.cache, train_split.rows, train_split.labels, prepared.classes,
                                lambda m: say(f"single-modality reference: {m.lower()} only"))
    record: dict[str, Any] = {
        "task": prepared.task, "classes": list(prepared.classes),
        "training": {"command": command, "config": cfg.record(), "data": train_split.describe(),
                     "val": prepared.val.describe() if prepared.val is not None else None,
                     "seed": cfg.seed, "seconds": fitted["seconds"], "steps": fitted["steps"], "lr": fitted["lr"],
                     "final_loss": fitted["final_loss"], "features": prepared.extraction,
                     "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, CPU",
                     "torch": torch.__version__},
    }
    if prepared.val is not None:
        val = prepared.val
        record["validation"] = evaluate(head, val, prepared.task, prepared.classes)
        record["validation"]["chance"] = chance(prepared.task, val.labels, len(prepared.classes))
        record["references"] = {m: {"path": f"{REFERENCES}/{m.lower()}",
                                    "validation": evaluate(r, val, prepared.task, prepared.classes, (m,))["clean"]}
                                for m, r in references.items()}
    else:
        record["references"] = {m: {"path": f"{REFERENCES}/{m.lower()}"} for m in references}
    if export:
        record["version_dir"] = str(export_trained(repository, fusion_model, head, references, record))
    return record


def export_trained(repository: Path, fusion_model: str, head, references: dict, record: dict[str, Any]) -> Path:
    from mmfuse.serving.strategies import save_head

    from .export import export_head
    from .repository import ensembles_using, set_sequence_routing

    version_dir = export_head(repository, fusion_model, head, record)
    for modality, reference in references.items():
        save_head(reference, version_dir / REFERENCES / modality.lower(),
                  extra={"task": record["task"], "classes": record["classes"], "reference_of": head.name})
    if head.needs_sequences:  # the served ensembles must route the token sequences this head reads
        for ensemble in ensembles_using(repository, fusion_model):
            set_sequence_routing(repository, ensemble, fusion_model, True)
    return version_dir
