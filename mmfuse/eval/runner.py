"""``mmfuse eval``: robustness and performance of a running (or embedded) server, written as a report."""
from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import processes
from . import corruptions as C
from . import load as L
from . import metrics as M
from . import robustness as R
from .served_heads import ENSEMBLE, Head, Switcher, describe_machine, discover_heads, served_outputs, served_task

LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


@dataclass
class EvalConfig:
    out: Path
    url: str | None = None  # None: start the embedded server on ``repository``
    repository: Path | None = None  # where the heads are (and what the embedded server serves)
    heads: list[Path] = field(default_factory=list)  # more head folders
    quick: bool = False
    per_kind: int = 24
    calibration_per_kind: int = 64
    levels: tuple[float, ...] = C.LEVELS
    corruptions: tuple[str, ...] = tuple(C.CORRUPTIONS)
    seed: int = 0
    batch: int = 32
    in_flight: int = 3
    ensembles: tuple[str, ...] = ()  # () = every served ensemble
    concurrencies: tuple[int, ...] = (1, 4, 8)
    rates: tuple[float, ...] = ()  # () = 25 %, 50 %, 90 % of the best closed-loop throughput
    load_requests: int = 300
    load_seconds: float = 2.0
    timeout_s: float = 60.0
    robustness: bool = True
    load: bool = True
    data: Path | None = None  # a manifest of the user's own (JSONL/CSV): evaluate on its rows, not the shapes benchmark
    task: str | None = None  # the data's task (classify | match); None: the served head's
    max_rows: int = 200  # data mode: at most this many rows (a seeded subset, classes in turn); 0 = every row
    load_generator: str = "perf_analyzer"  # the load runs': Triton's perf_analyzer, or "python" (mmfuse.loadgen)

    @classmethod
    def quick_defaults(cls, **kwargs) -> EvalConfig:
        values = dict(quick=True, per_kind=4, calibration_per_kind=8, levels=(0.0, 0.5, 1.0), concurrencies=(1, 4),
                      load_requests=24, load_seconds=1.0, max_rows=24)
        values.update(kwargs)
        return cls(**values)


def say(message: str) -> None:
    print(f"[mmfuse eval] {message}", file=sys.stderr, flush=True)


def _bar(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="row", dynamic_ncols=True, file=sys.stderr, leave=False,
                mininterval=0.5)


def _host_port(url: str) -> tuple[str, int]:
    host, _, port = url.rpartition(":")
    return host, int(port)


def _shown(path: Path) -> str:
    """A path as the report shows it: relative to the working directory when inside it."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _control_refused(message: str) -> bool:
    return any(m in message for m in ("explicit model load", "polling is enabled", "not allowed"))


def served_ensembles(client) -> list[str]:
    out = []
    for m in client.get_model_repository_index(as_json=True).get("models", []):
        if m.get("state") == "READY" and client.get_model_config(m["name"]).config.platform == "ensemble":
            out.append(m["name"])
    return sorted(set(out))


def run(cfg: EvalConfig, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Start (or reach) the server, evaluate, write the report; returns the report's JSON."""
    from mmfuse.paths import DEFAULT_MODEL_REPOSITORY
    from mmfuse.server import ServerConfig, TritonServer

    started = time.monotonic()
    cfg.out.mkdir(parents=True, exist_ok=True)
    repository = Path(cfg.repository or DEFAULT_MODEL_REPOSITORY)
    server = None
    if cfg.url is None:
        log = Path(tempfile.gettempdir()) / "mmfuse-eval-tritonserver.log"
        say(f"starting the embedded tritonserver on {repository} (explicit model control; log {log}) ...")
        server = TritonServer(ServerConfig.on_free_ports(model_repository=repository, model_control_mode="explicit"),
                              log_path=log)
        server.__enter__()
        url, pid = server.grpc_url, server.process.pid
    else:
        url = cfg.url
        host, port = _host_port(url)
        if host not in LOOPBACK:
            raise SystemExit(f"mmfuse eval: {url} is not a loopback address; the evaluation only loads servers "
                             "on this machine (127.0.0.1, localhost, ::1)")
        pid = processes.pid_listening_on(port)
    try:
        report = _evaluate(cfg, url, pid, repository, embedded=server is not None)
    finally:
        if server is not None:
            server.stop()
    report["seconds"] = round(time.monotonic() - started, 1)
    report["machine"]["load_average_at_end"] = processes.load_average()
    report["command"] = "mmfuse " + " ".join(argv) if argv is not None else None
    from .report import write_report

    write_report(report, cfg.out)
    say(f"report written to {cfg.out} in {report['seconds']:.0f} s")
    return report


def _evaluate(cfg: EvalConfig, url: str, pid: int | None, repository: Path, embedded: bool) -> dict[str, Any]:
    import tritonclient.grpc as grpcclient

    from mmfuse.clients import ClientOptions

    client = grpcclient.InferenceServerClient(url)
    options = ClientOptions(url=url, timeout_s=cfg.timeout_s, retries=3, progress=False)
    report: dict[str, Any] = {
        "schema": "mmfuse-eval/1",
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": describe_machine(),
        "server": {"url": url, "embedded": embedded, "pid": pid, "repository": _shown(repository)},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()
                   if k not in ("out",)},
    }
    report["config"]["heads"] = [str(h) for h in cfg.heads]
    switcher = Switcher(client, repository, say)
    report["server"]["served_fusion"] = switcher.served_head()
    rows = None
    try:
        if cfg.data is not None:
            report["config"]["data"] = _shown(cfg.data)
        if cfg.robustness:
            if cfg.data is not None:
                report["robustness"], rows, report["data"] = _robustness_data(cfg, client, options, switcher,
                                                                              repository)
            else:
                report["robustness"] = _robustness(cfg, client, options, switcher, repository)
        if cfg.data is not None and rows is None:
            task = cfg.task or served_task(client) or "classify"
            rows, report["data"] = _data_rows(cfg, task, None)
        if cfg.load:
            switcher.restore()  # performance of what the server serves
            report["load"] = _load(cfg, client, options, url, pid, switcher, report.get("robustness"), rows)
    finally:
        switcher.restore()
        client.close()
    return report


# -- robustness --------------------------------------------------------------------------------------------------
def _robustness(cfg: EvalConfig, client, options, switcher: Switcher, repository: Path) -> dict[str, Any]:
    names = [n for n in cfg.corruptions if n in C.CORRUPTIONS]
    levels = sorted({0.0, *cfg.levels})
    heads = discover_heads(repository, cfg.heads)
    say(f"heads found: {', '.join(h.name + ' (' + h.source + ')' for h in heads) or 'none'}")
    skipped = {h.name: f"a {h.task} head (classes {list(h.classes)}): the shapes benchmark is a match task; "
                       "evaluate it on its data with --data" for h in heads if h.task != "match"}
    heads = [h for h in heads if h.task == "match"]
    data = R.Dataset.generate(cfg.per_kind, cfg.seed)
    calibration = R.Dataset.generate(cfg.calibration_per_kind, cfg.seed + 1)
    say(f"{len(data)} evaluation rows ({cfg.per_kind} per kind, seed {cfg.seed}); corrupting them at "
        f"{len(levels)} levels x {len(names)} corruptions ...")
    conds = R.conditions(data, names, levels, cfg.seed)

    cache = R.EmbeddingCache(client, options, cfg.batch * 2, cfg.in_flight)
    images = calibration.images + [x for c in conds for x in c.images]
    texts = calibration.texts + [t for c in conds for t in c.texts]
    bar = _bar(len(images) + len(texts), "single-modality models: served embeddings")
    cache.fill("image", images, bar.update)
    cache.fill("text", texts, bar.update)
    bar.close()
    single = R.fit_single_modality(cache, calibration)
    single_scores = {"image": {}, "text": {}}
    for c in conds:
        s = single.scores(cache, c)
        single_scores["image"][c.key] = s["image"]
        single_scores["text"][c.key] = s["text"]
    single_fig = {m: R.figures(single_scores[m], data, names, levels) for m in ("image", "text")}

    baseline = next((h for h in heads if h.is_late_similarity), None)
    if baseline is None:
        baseline = R.fit_late_head(cache, calibration, cfg.out / "heads" / "late-fitted", cfg.seed + 1)
        say(f"no trained late head in the repository: fitted one ({baseline.path})")
        heads.append(baseline)

    strategies: dict[str, dict] = {}
    all_scores: dict[str, dict[str, np.ndarray]] = {}
    failed: dict[str, str] = dict(skipped)
    todo: list[Head | None] = list(heads)
    while todo:
        head = todo.pop(0)
        name = head.name if head is not None else f"served ({switcher.served_head()})"
        bar = _bar(len(conds) * len(data), f"{name}: fuse_image_text")
        try:
            scores = R.evaluate_strategy(client, options, head, switcher, conds, data, cfg.batch, cfg.in_flight,
                                         bar.update)
        except Exception as error:  # noqa: BLE001 - one head that does not load must not end the evaluation
            failed[name] = f"{type(error).__name__}: {error}"
            say(f"{name}: not evaluated: {failed[name]}")
            if head is not None and _control_refused(str(error)):
                failed = {h.name: "the server does not allow model control (start it with --model-control-mode "
                                  "explicit)" for h in heads}
                switcher.changed = False
                todo = [None] if "SCORE" in served_outputs(client, ENSEMBLE) else []
                say("no model control: evaluating what the server serves" if todo else
                    f"no model control and the served {ENSEMBLE} has no SCORE: nothing to evaluate")
            continue
        finally:
            bar.close()
        all_scores[name] = scores
        strategies[name] = R.figures(scores, data, names, levels)
        clean = strategies[name]["clean"]
        say(f"{name}: clean balanced accuracy {clean['balanced']:.3f} "
            f"({', '.join(f'{k} {v:.2f}' for k, v in clean['by_kind'].items())})")
        if head is None:
            heads.append(Head(name, "served", Path("."), "served as is", {}))
    base_name = baseline.name if baseline.name in strategies else None
    R.compare(strategies, single_fig, base_name, names, levels)
    for fig in [*strategies.values(), *single_fig.values()]:  # every figure is in the curves
        fig.pop("conditions")
    np.savez_compressed(
        cfg.out / "scores.npz", labels=np.asarray(data.labels), kinds=np.asarray(data.kinds),
        **{f"{s}|{k}": v for s, per in all_scores.items() for k, v in per.items()},
        **{f"single:{m}|{k}": v for m, per in single_scores.items() for k, v in per.items()})
    return {
        "task": "shapes benchmark match SCORE (mmfuse/shapes.py): does the caption match the image?",
        "chance": 0.5,
        "dataset": {"per_kind": cfg.per_kind, "rows": len(data), "seed": cfg.seed,
                    "rows_per_kind": {k: data.kinds.count(k) for k in dict.fromkeys(data.kinds)},
                    "calibration_per_kind": cfg.calibration_per_kind, "calibration_seed": cfg.seed + 1},
        "levels": levels,
        "corruptions": {n: {"modality": C.CORRUPTIONS[n].modality, "label": C.CORRUPTIONS[n].label} for n in names},
        "heads": [{"name": h.name, "strategy": h.strategy, "source": h.source, "path": _shown(h.path),
                   "hparams": h.description.get("hparams", {})} for h in heads],
        "baseline": base_name,
        "not_evaluated": failed,
        "strategies": strategies,
        "single_modality": {"calibration_balanced_accuracy": single.calibration, **single_fig},
    }


# -- robustness on a dataset of the user's own (--data) -----------------------------------------------------------
def _data_rows(cfg: EvalConfig, task: str, classes: tuple[str, ...] | None) -> tuple[R.DataRows, dict[str, Any]]:
    """The manifest's usable rows (unusable ones reported with their line numbers, never fatal) and its
    description for the report: path, sha256, rows used / usable / skipped, task, classes."""
    from collections import Counter

    from mmfuse.datasets import read_manifest
    from mmfuse.train_data import sha256_of

    manifest = read_manifest(cfg.data, task, classes=classes, min_rows=1)
    if manifest.skipped:
        say(manifest.report())
    limit = cfg.max_rows or None
    rows = R.DataRows.from_manifest(manifest, limit, cfg.seed)
    say(f"{cfg.data}: {len(manifest.examples)} usable rows, {len(manifest.skipped)} skipped; "
        f"{len(rows)} rows evaluated (task {task}, classes {', '.join(manifest.classes)})")
    reasons = Counter(reason.split(":")[0] for _, reason in manifest.skipped)
    described = {
        "path": _shown(cfg.data), "sha256": sha256_of(Path(cfg.data)), "task": task, "classes": list(manifest.classes),
        "rows_used": len(rows), "rows_usable": len(manifest.examples), "rows_skipped": len(manifest.skipped),
        "skipped_reasons": dict(reasons.most_common()),
        "skipped": [{"line": line, "reason": reason} for line, reason in manifest.skipped[:100]],
        "selection": ("every usable row" if len(rows) == len(manifest.examples) else
                      f"a seeded subset of {len(rows)} rows (seed {cfg.seed}, classes in turn; --max-rows)"),
        "rows_per_class": {c: rows.labels.count(i) for i, c in enumerate(rows.classes)},
        "example": {"line": rows.lines[rows.example_row()], "image": rows.image_paths[rows.example_row()],
                    "text": rows.texts[rows.example_row()]} if len(rows) else None,
    }
    return rows, described


def _served_classes(switcher: Switcher) -> tuple[str, ...]:
    import json

    text = switcher.original["fusion"].parameters["classes"].string_value if (
        "classes" in switcher.original["fusion"].parameters) else ""
    try:
        value = json.loads(text) if text else []
    except ValueError:
        value = []
    return tuple(str(c) for c in value) if isinstance(value, list) else ()


def _data_heads(heads: list[Head], task: str, served: tuple[str, ...]) -> tuple[tuple[str, ...] | None, list[Head],
                                                                                    dict[str, str]]:
    """The classes of the evaluation (classify: the served head's, else the newest classify head's), the heads
    that answer them, and why each other head is not evaluated."""
    skipped: dict[str, str] = {}
    if task == "match":
        chosen = [h for h in heads if h.task == "match"]
        skipped = {h.name: f"a {h.task} head; the data is {task}" for h in heads if h.task != "match"}
        return None, chosen, skipped
    candidates = [h for h in heads if h.task == "classify"]
    classes = served if served and any(h.classes == served for h in candidates) else (
        candidates[-1].classes if candidates else None)
    chosen = []
    for h in heads:
        if h.task != "classify":
            skipped[h.name] = f"a {h.task} head; the data is {task}"
        elif h.classes != classes:
            skipped[h.name] = f"classes {list(h.classes)} differ from the evaluated classes {list(classes or ())}"
        else:
            chosen.append(h)
    return classes, chosen, skipped


def _robustness_data(cfg: EvalConfig, client, options, switcher: Switcher,
                     repository: Path) -> tuple[dict[str, Any], R.DataRows, dict[str, Any]]:
    from mmfuse.datasets import DatasetError

    names = [n for n in cfg.corruptions if n in C.CORRUPTIONS]
    levels = sorted({0.0, *cfg.levels})
    all_heads = discover_heads(repository, cfg.heads)
    task = cfg.task or served_task(client) or next((h.task for h in reversed(all_heads)), "classify")
    say(f"heads found: {', '.join(f'{h.name} ({h.source}, {h.task})' for h in all_heads) or 'none'}; data task {task}")
    classes, heads, failed = _data_heads(all_heads, task, _served_classes(switcher))
    if task == "classify" and classes is None:
        say("no classify head in the repository: the classes are the labels of the data")
    rows, described = _data_rows(cfg, task, classes)
    if not len(rows):
        raise DatasetError(f"{cfg.data}: no usable rows")
    chance = M.chance_of(rows.classes)
    conds = R.conditions(rows, names, levels, cfg.seed)
    say(f"{len(rows)} rows, corrupted at {len(levels)} levels x {len(names)} corruptions; chance {chance:.3f}")

    references: dict[Path, R.ReferenceHeads] = {}
    for h in heads:
        if R.has_references(h.path):
            references[h.path] = R.ReferenceHeads(h.path)
    cache = R.EmbeddingCache(client, options, cfg.batch * 2, cfg.in_flight)
    if references:
        images = [x for c in conds for x in c.images]
        texts = [t for c in conds for t in c.texts]
        bar = _bar(len(images) + len(texts), "single-modality references: served embeddings")
        cache.fill("image", images, bar.update)
        cache.fill("text", texts, bar.update)
        bar.close()
    reference_scores: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    reference_figures: dict[str, dict[str, dict]] = {}
    for path, refs in references.items():
        source = _shown(path)
        per = {"image": {}, "text": {}}
        for c in conds:
            out = refs.outputs(cache, c)
            per["image"][c.key], per["text"][c.key] = out["image"], out["text"]
        reference_scores[source] = per
        reference_figures[source] = {m: R.figures(per[m], rows, names, levels) for m in ("image", "text")}

    strategies: dict[str, dict] = {}
    all_scores: dict[str, dict[str, np.ndarray]] = {}
    singles: dict[str, dict[str, dict]] = {}
    reference_of: dict[str, str | None] = {}
    todo: list[Head | None] = list(heads)
    evaluated_heads: list[Head] = list(heads)
    while todo:
        head = todo.pop(0)
        name = head.name if head is not None else f"served ({switcher.served_head()})"
        bar = _bar(len(conds) * len(rows), f"{name}: fuse_image_text")
        check: dict[str, int] = {}
        try:
            scores = R.evaluate_strategy(client, options, head, switcher, conds, rows, cfg.batch, cfg.in_flight,
                                         bar.update, task=task, label_check=check)
        except Exception as error:  # noqa: BLE001 - one head that does not load must not end the evaluation
            failed[name] = f"{type(error).__name__}: {error}"
            say(f"{name}: not evaluated: {failed[name]}")
            if head is not None and _control_refused(str(error)):
                for h in heads:
                    failed[h.name] = ("the server does not allow model control (start it with --model-control-mode "
                                      "explicit)")
                switcher.changed = False
                ok = served_task(client) == task and (task == "match" or _served_classes(switcher) == classes)
                todo = [None] if ok else []
                say("no model control: evaluating what the server serves" if todo else
                    f"no model control and the served {ENSEMBLE} does not answer this data's task/classes: "
                    "nothing to evaluate")
            continue
        finally:
            bar.close()
        all_scores[name] = scores
        fig = R.figures(scores, rows, names, levels)
        fig["output"] = "PROBS" if task == "classify" else "SCORE"
        if check:
            fig["label_check"] = check
        strategies[name] = fig
        path = head.path if head is not None else None
        source = _shown(path) if path is not None and path in references else (
            next(iter(reference_figures), None))
        reference_of[name] = source
        if source is not None:
            singles[name] = reference_figures[source]
        clean = fig["clean"]
        say(f"{name}: clean balanced accuracy {clean['balanced']:.3f}, macro-F1 {clean['macro_f1']:.3f} "
            f"({', '.join(f'{k} {v:.2f}' for k, v in clean['by_class'].items())})")
        if head is None:
            evaluated_heads.append(Head(name, "served", Path("."), "served as is",
                                        {"task": task, "classes": list(classes or ())}))
    late = next((h.name for h in evaluated_heads if h.strategy == "late" and h.name in strategies), None)
    baseline_note = None if late else (
        f"no late head of task {task}" + (f" with classes {list(rows.classes)}" if task == "classify" else "")
        + " was evaluated: effective robustness n/a (train one: mmfuse train --data ... --strategy late)")
    R.compare(strategies, None, late, names, levels, chance=chance, singles=singles, retention_reference="remaining")
    for s, fig in strategies.items():
        if s not in singles:
            fig["retention_note"] = ("no single-modality references (references/image, references/text of the "
                                     "head's version folder, written by mmfuse train --data): retention and the "
                                     "catastrophic flag n/a")
    for fig in [*strategies.values(), *(f for per in reference_figures.values() for f in per.values())]:
        fig.pop("conditions")
    np.savez_compressed(
        cfg.out / "scores.npz", labels=np.asarray(rows.labels), lines=np.asarray(rows.lines),
        classes=np.asarray(rows.classes),
        **{f"{s}|{k}": v for s, per in all_scores.items() for k, v in per.items()},
        **{f"reference:{src}:{m}|{k}": v for src, per in reference_scores.items() for m, d in per.items()
           for k, v in d.items()})
    task_text = (f"classify: {len(rows.classes)} classes, the served PROBS (argmax) against the row's label"
                 if task == "classify" else "match: the served SCORE (> 0.5 = match) against the row's 0/1 label")
    result = {
        "mode": "data",
        "task": f"{described['path']} ({task_text}).",
        "task_name": task,
        "classes": list(rows.classes),
        "chance": chance,
        "dataset": {"rows": len(rows), "seed": cfg.seed, "path": described["path"], "sha256": described["sha256"],
                    "rows_per_class": described["rows_per_class"]},
        "levels": levels,
        "corruptions": {n: {"modality": C.CORRUPTIONS[n].modality, "label": C.CORRUPTIONS[n].label} for n in names},
        "heads": [{"name": h.name, "strategy": h.strategy, "source": h.source, "path": _shown(h.path),
                   "hparams": h.description.get("hparams", {}), "task": h.task, "classes": list(h.classes),
                   "references": reference_of.get(h.name)} for h in evaluated_heads],
        "heads_found": [{"name": h.name, "source": h.source, "task": h.task, "classes": list(h.classes)}
                        for h in all_heads],
        "baseline": late,
        "baseline_note": baseline_note,
        "not_evaluated": failed,
        "strategies": strategies,
        "single_modality": {"references": reference_figures, "of_strategy": reference_of},
    }
    return result, rows, described


# -- performance -------------------------------------------------------------------------------------------------
def _load(cfg: EvalConfig, client, options, url: str, pid: int | None, switcher: Switcher,
          robustness: dict | None, rows: R.DataRows | None = None) -> dict[str, Any]:
    if rows is not None:  # the user's rows: those with both modalities first
        both = [i for i in range(len(rows)) if rows.images[i] and rows.texts[i]]
        chosen = (both + [i for i in range(len(rows)) if i not in both])[:16]
        pool_images, pool_texts = [rows.images[i] for i in chosen], [rows.texts[i] for i in chosen]
    else:
        data = R.Dataset.generate(8, cfg.seed + 2)
        pool_images = [x for i, x in enumerate(data.images) if data.kinds[i] == "positive"][:16] or data.images[:16]
        pool_texts = [t for i, t in enumerate(data.texts) if data.kinds[i] == "positive"][:16] or data.texts[:16]
    ensembles = list(cfg.ensembles) or served_ensembles(client)
    if cfg.load_generator == "perf_analyzer":  # before any run: a missing perf_analyzer fails at once
        from ..perf_analyzer import find_perf_analyzer, library_dir

        find_perf_analyzer()
        library_dir()
    runs: list[dict] = []
    pools: dict[str, list] = {}
    best_per_s: dict[str, float] = {}  # the best closed-loop throughput per ensemble: bounds perf_analyzer's counts

    def measure(ensemble, pool, outputs, mode, load, requests, pid_):
        return L.measure(client, url, ensemble, pool, outputs, mode, load, requests, cfg.load_seconds, pid_,
                         cfg.timeout_s, load_generator=cfg.load_generator, throughput_hint=best_per_s.get(ensemble))

    for ensemble in ensembles:
        outputs = [o.name for o in client.get_model_config(ensemble).config.output]
        pool = L.request_pool(client, options, ensemble, pool_images, pool_texts, cfg.seed)
        pools[ensemble] = pool
        L.warm_up(client, options, ensemble, pool, outputs)
        best = 0.0
        for concurrency in cfg.concurrencies:
            run = measure(ensemble, pool, outputs, "closed", concurrency, cfg.load_requests, pid)
            summary = run.summary()
            runs.append(summary)
            best = max(best, summary["throughput_per_s"] or 0.0)
            best_per_s[ensemble] = best
            say(f"{ensemble}: concurrency {concurrency}: {summary['throughput_per_s']} req/s, "
                f"p50 {summary['latency_ms']['p50']} ms, p99 {summary['latency_ms']['p99']} ms, "
                f"errors {sum(summary['errors'].values())}")
        rates = list(cfg.rates) or L.default_rates(best)
        for rate in rates:
            run = measure(ensemble, pool, outputs, "open", rate, cfg.load_requests, pid)
            summary = run.summary()
            runs.append(summary)
            say(f"{ensemble}: {rate} req/s offered: {summary['throughput_per_s']} req/s, "
                f"p50 {summary['latency_ms']['p50']} ms, p99 {summary['latency_ms']['p99']} ms, "
                f"errors {sum(summary['errors'].values())}")
    overhead = []
    if robustness and ENSEMBLE in ensembles:
        concurrency = max(cfg.concurrencies)
        for h in robustness["heads"]:
            if h["name"] not in robustness["strategies"]:
                continue
            task = h.get("task") or "match"
            outputs = ["FUSED", "MODALITY_MASK", "MODALITY_STATUS"] + (
                ["PROBS", "LABEL"] if task == "classify" else ["SCORE"])
            if h["strategy"] != "served":
                switcher.use(Head(h["name"], h["strategy"], Path(h["path"]).resolve(), h["source"],
                                  {"hparams": h["hparams"], "task": task, "classes": h.get("classes") or []}))
            # A freshly loaded fusion model's first requests are slow: a discarded run first.
            measure(ENSEMBLE, pools[ENSEMBLE], outputs, "closed", concurrency, min(50, cfg.load_requests), None)
            run = measure(ENSEMBLE, pools[ENSEMBLE], outputs, "closed", concurrency, cfg.load_requests, pid)
            summary = run.summary()
            summary["strategy"] = h["name"]
            overhead.append(summary)
            say(f"{ENSEMBLE} with {h['name']}: {summary['throughput_per_s']} req/s, p50 "
                f"{summary['latency_ms']['p50']} ms, fusion share {summary['server']['fusion_share']}")
        switcher.restore()
    from .perf_analyzer import fill_commands, write_inputs

    result = {"runs": runs, "strategy_overhead": overhead,
              "perf_analyzer": write_inputs(cfg.out / "perf_analyzer", pools, url),
              "bounds": {"requests": cfg.load_requests, "seconds": cfg.load_seconds,
                         "concurrencies": list(cfg.concurrencies)}}
    fill_commands(result)
    return result
