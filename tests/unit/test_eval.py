"""mmfuse eval's pieces without a server: imperfections, figures, the statistics arithmetic, the report."""
from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest

from mmfuse import shapes, triton_stats
from mmfuse.eval import corruptions as C
from mmfuse.eval import load as L
from mmfuse.eval import metrics as M


@pytest.fixture(scope="module")
def rows():
    examples = shapes.balanced(3, 5)
    return [shapes.png_bytes(e.image) for e in examples], [e.caption for e in examples]


def _pixels(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.mark.parametrize("name", list(C.CORRUPTIONS))
def test_level_zero_changes_nothing_and_a_seed_fixes_everything(name, rows):
    images, texts = rows
    assert C.apply(name, 0.0, images, texts, 3) == (images, texts)
    assert C.apply(name, 0.7, images, texts, 3) == C.apply(name, 0.7, images, texts, 3)


@pytest.mark.parametrize("name", ["truncated", "dropout", "dropout_image", "dropout_text", "dropped_words", "typos",
                                  "letter_swap"])
def test_rows_hit_at_a_level_are_hit_at_every_higher_level(name, rows):
    images, texts = rows
    previous = None
    for level in C.LEVELS:
        got = C.apply(name, level, images, texts, 1)
        hit = {i for i in range(len(images)) if got[0][i] != images[i] or got[1][i] != texts[i]}
        if previous is not None:
            assert previous <= hit, (level, previous, hit)
        previous = hit


def test_full_level_removes_or_destroys(rows):
    images, texts = rows
    assert C.apply("dropout", 1.0, images, texts, 0) == ([b""] * len(images), [""] * len(texts))
    assert C.apply("dropout_image", 1.0, images, texts, 0) == ([b""] * len(images), texts)
    assert C.apply("dropout_text", 1.0, images, texts, 0) == (images, [""] * len(texts))
    assert C.apply("dropped_words", 1.0, images, texts, 0)[1] == [""] * len(texts)
    occluded = C.apply("occlusion", 1.0, images, texts, 0)[0]
    assert all((_pixels(x) == 128).all() for x in occluded)
    truncated = C.apply("truncated", 1.0, images, texts, 0)[0]
    assert all(len(t) < len(x) and x.startswith(t) for t, x in zip(truncated, images))


def test_image_corruptions_grow_with_the_level(rows):
    images, texts = rows
    clean = _pixels(images[0]).astype(float)
    for name in ("noise", "blur", "colour_shift"):
        changes = [np.abs(_pixels(C.apply(name, p, images[:1], texts[:1], 0)[0][0]) - clean).mean() for p in (0.2, 0.6)]
        assert 0 < changes[0] < changes[1], name
    jpeg = C.apply("jpeg", 0.5, images, texts, 0)[0][0]
    assert jpeg[:3] == b"\xff\xd8\xff"
    quarter = _pixels(C.apply("occlusion", 0.25, images, texts, 0)[0][0])
    assert (quarter == 128).all(axis=2).sum() == 32 * 32


def test_text_corruptions(rows):
    _, texts = rows
    for name in ("typos", "letter_swap"):
        out = C.apply(name, 1.0, [b""] * len(texts), texts, 0)[1]
        assert all(len(o.split()) == len(t.split()) and o != t for o, t in zip(out, texts)), name
        assert all(sorted(o.replace(" ", "")) == sorted(t.replace(" ", "")) for o, t in zip(
            C.apply("letter_swap", 1.0, [b""] * len(texts), texts, 0)[1], texts))


def test_balanced_accuracy_is_half_for_any_constant_answer():
    kinds = ["positive"] * 4 + ["swapped"] * 2 + ["attribute"] * 2
    labels = [1] * 4 + [0] * 4
    for constant in (0.0, 0.5, 1.0):
        counts = M.kind_counts(np.full(8, constant), labels, kinds)
        assert M.balanced_accuracy(M.accuracy_by_kind(counts)) == 0.5
    perfect = M.kind_counts(np.array([0.9] * 4 + [0.1] * 4), labels, kinds)
    assert M.balanced_accuracy(M.accuracy_by_kind(perfect)) == 1.0
    assert 0 < M.balanced_se(M.accuracy_by_kind(perfect), perfect) < 0.2  # never 0 on a few rows


def test_area_effective_robustness_retention_and_flags():
    levels = [0.0, 0.5, 1.0]
    assert M.relative_robustness(levels, [1.0, 0.5, 0.5]) == pytest.approx(0.625)
    assert M.relative_robustness([0.0, 0.2, 1.0], [1, 1, 0]) == pytest.approx(0.2 + 0.4)
    assert M.effective_robustness([0.9, 0.8, 0.6], [0.8, 0.6, 0.5]) == pytest.approx([0.0, 0.1, 0.0])
    assert M.retention(0.7, 0.9, 0.02) == pytest.approx(0.5)
    assert M.retention(0.7, 0.52, 0.02) is None  # the best single-modality model is not above chance
    assert M.catastrophic(0.3, 0.03, 0.6, 0.03)
    assert not M.catastrophic(0.55, 0.03, 0.6, 0.03)
    assert not M.catastrophic(0.5, 0.0, 0.5, 0.0)


def test_logistic_regression_separates_and_undecidable_rows_get_half():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3))
    y = (x[:, 0] - 0.5 * x[:, 2] > 0).astype(int)
    w = M.fit_logistic(x, y)
    scores = M.logistic_scores(w, x, np.ones(200, bool))
    assert ((scores > 0.5) == y).mean() > 0.97
    assert M.logistic_scores(w, x[:2], np.array([False, True]))[0] == 0.5
    weights = M.balanced_weights([1, 1, 0, 0, 0, 0], ["positive", "positive", "swapped", "swapped", "swapped",
                                                       "attribute"])
    assert weights[:2].sum() == pytest.approx(weights[2:].sum())
    assert weights[2:5].sum() == pytest.approx(weights[5])


def test_statistics_difference_per_step():
    def snapshot(success, queue_ns, infer_ns, executions, batches):
        rows = sum(size * count for size, count in batches.items())
        return {"execution_count": executions, "inference_count": rows, "inference_stats": {
            "success": {"count": success, "ns": success * 2_000_000}, "fail": {"count": 0, "ns": 0},
            "queue": {"count": success, "ns": queue_ns}, "compute_input": {"count": success, "ns": 0},
            "compute_infer": {"count": success, "ns": infer_ns}, "compute_output": {"count": success, "ns": 0}},
            "batch_stats": [{"batch_size": k, "compute_infer": {"count": v, "ns": 0}} for k, v in batches.items()]}

    before = snapshot(10, 1_000_000, 5_000_000, 6, {1: 4, 3: 2})
    after = snapshot(22, 4_000_000, 11_000_000, 10, {1: 6, 3: 2, 4: 2})
    d = triton_stats.model_delta(before, after)
    assert d["requests"] == 12 and d["executions"] == 4
    assert d["batch_sizes"] == {"1": 2, "4": 2} and d["mean_batch_rows"] == 2.5
    assert d["queue_ms"] == pytest.approx(0.25) and d["compute_infer_ms"] == pytest.approx(0.5)
    assert d["request_ms"] == pytest.approx(2.0)
    assert triton_stats.model_delta({}, after)["requests"] == 22


def test_run_summary():
    run = L.Run("fuse_image_text", "closed", 4, sent=5, completed=4, errors={"StatusCode.UNAVAILABLE": 1},
                seconds=2.0, latencies_ms=[10.0, 20.0, 30.0, 40.0], max_in_flight=4, rss_idle=100, rss_peak=500)
    run.steps = {"fusion": {"queue_ms": 0.1, "compute_ms": 0.3}}
    run.ensemble_stats = {"request_ms": 1.6}
    s = run.summary()
    assert s["throughput_per_s"] == 2.0 and s["latency_ms"]["p50"] == 25.0 and s["latency_ms"]["mean"] == 25.0
    assert s["memory"]["bytes_per_request_in_flight"] == 100
    assert s["server"]["fusion_share"] == 0.25
    assert L.default_rates(40.0) == [10.0, 20.0, 36.0]


def test_perf_analyzer_input_data_round_trips():
    import base64

    from mmfuse.eval.perf_analyzer import commands, input_data

    pool = [{"IMAGE": np.array([[b"\x89PNG\x00\xff"]], dtype=object), "IMAGE_VALID": np.ones((1, 1), bool),
             "IMAGE_EMBEDDING": np.arange(3, dtype=np.float32).reshape(1, 3)}]
    data = input_data(pool)["data"][0]
    assert base64.b64decode(data["IMAGE"]["b64"]) == b"\x06\x00\x00\x00\x89PNG\x00\xff"
    assert data["IMAGE"]["shape"] == [1]
    assert data["IMAGE_EMBEDDING"] == {"content": [0.0, 1.0, 2.0], "shape": [3]}
    lines = commands("fuse_image_text", "pa/fuse_image_text.json", [1, 4], [10.0], 50)
    assert "-u $URL --input-data $REPORT/pa/fuse_image_text.json" in lines[0]
    assert "--concurrency-range $c" in lines[0] and "for c in 1 4;" in lines[0]
    assert "--request-rate-range $r" in lines[1] and "for r in 10;" in lines[1]


def test_report_from_figures(tmp_path):
    """The Markdown and every plot, from a small report made of known figures."""
    from PIL import Image

    from mmfuse.eval import robustness as R
    from mmfuse.eval.report import write_report

    data = R.Dataset.generate(2, 0)
    levels = [0.0, 0.5, 1.0]
    names = list(C.CORRUPTIONS)
    keys = ["clean"] + [f"{n}@{p:.1f}" for n in names for p in levels[1:]]
    rng = np.random.default_rng(0)
    strategies = {s: R.figures({k: rng.random(len(data)) for k in keys}, data, names, levels) for s in ("late", "hybrid")}
    single = {m: R.figures({k: np.full(len(data), 0.5) for k in keys}, data, names, levels) for m in ("image", "text")}
    R.compare(strategies, single, "late", names, levels)
    run = L.Run("fuse_image_text", "closed", 2, sent=3, completed=3, seconds=1.0, latencies_ms=[1.0, 2.0, 3.0],
                max_in_flight=2, rss_idle=2**20, rss_peak=2**21)
    run.steps = {"fusion": triton_stats.model_delta({}, {"execution_count": 2, "inference_count": 3, "inference_stats": {
        "success": {"count": 3, "ns": 3000}, "queue": {"count": 3, "ns": 300}},
        "batch_stats": [{"batch_size": 1, "compute_infer": {"count": 1}}, {"batch_size": 2, "compute_infer": {"count": 1}}]})}
    run.ensemble_stats = {"requests": 3, "request_ms": 0.004}
    report = {
        "created_utc": "now", "seconds": 1.0, "command": "mmfuse eval --out x", "machine": {"cpus": 2},
        "server": {"embedded": True, "url": "127.0.0.1:1", "repository": "repo", "served_fusion": "late"},
        "robustness": {"task": "t.", "chance": 0.5, "levels": levels, "baseline": "late", "not_evaluated": {},
                       "dataset": {"per_kind": 2, "rows": 6, "seed": 0, "calibration_per_kind": 2, "calibration_seed": 1},
                       "corruptions": {n: {"modality": C.CORRUPTIONS[n].modality, "label": C.CORRUPTIONS[n].label}
                                       for n in names},
                       "heads": [{"name": s, "source": "fusion/2"} for s in strategies],
                       "strategies": strategies, "single_modality": single},
        "load": {"runs": [run.summary()], "strategy_overhead": [], "bounds": {"requests": 3, "seconds": 1.0},
                 "perf_analyzer": {"setup": "export X=1", "commands": {"fuse_image_text": {"lines": ["perf_analyzer"]}}}},
    }
    write_report(report, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "| hybrid | fusion/2 |" in md and "n/a" in md and "perf_analyzer" in md
    assert json.loads((tmp_path / "report.json").read_text())["robustness"]["baseline"] == "late"
    for png in ("robustness", "auc", "effective_robustness", "late_kinds", "hybrid_kinds", "corruptions", "latency",
                "breakdown"):
        with Image.open(tmp_path / f"{png}.png") as image:
            assert image.width > 500
    fig = strategies["hybrid"]
    assert fig["curves"]["noise"]["relative_robustness"] == pytest.approx(
        np.trapz(fig["curves"]["noise"]["balanced"], levels))
    assert math.isfinite(fig["curves"]["noise"]["effective_robustness_mean"])


# -- the load generator: the command line and the report ------------------------------------------------------
def _eval_args(*argv: str):
    from mmfuse.cli import build_parser

    return build_parser().parse_args(["eval", "--out", "report", *argv])


@pytest.mark.parametrize("argv, expected", [((), "perf_analyzer"), (("--load-generator", "python"), "python"),
                                            (("--load-generator", "python", "--quick"), "python"),
                                            (("--load-generator", "perf_analyzer", "--quick"), "perf_analyzer")])
def test_load_generator_option_goes_into_the_config(argv, expected):
    from mmfuse.commands.eval import config_from_args

    cfg = config_from_args(_eval_args(*argv))
    assert cfg.load_generator == expected
    assert cfg.quick == ("--quick" in argv)


def test_an_unknown_load_generator_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_:
        _eval_args("--load-generator", "locust")
    assert exit_.value.code == 2
    assert "invalid choice: 'locust'" in capsys.readouterr().err


def test_a_missing_perf_analyzer_is_one_line_and_status_1_before_anything_runs(monkeypatch, tmp_path, capsys):
    import mmfuse.eval.runner as runner
    from mmfuse.cli import main

    started = []
    monkeypatch.setattr(runner, "run", lambda cfg, argv=None: started.append(cfg))
    monkeypatch.setenv("MMFUSE_PERF_ANALYZER", str(tmp_path / "no-such-binary"))
    assert main(["eval", "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err == f"mmfuse eval: MMFUSE_PERF_ANALYZER={tmp_path / 'no-such-binary'} is not a file\n"
    assert started == []  # neither the server nor the robustness runs were started
    # Neither --load-generator python nor --no-load needs perf_analyzer.
    assert main(["eval", "--out", str(tmp_path / "out"), "--load-generator", "python"]) == 0
    assert main(["eval", "--out", str(tmp_path / "out"), "--no-load"]) == 0
    assert [c.load_generator for c in started] == ["python", "perf_analyzer"]


def test_a_perf_analyzer_failure_during_the_run_is_one_line_and_status_1(monkeypatch, tmp_path, capsys):
    import mmfuse.eval.runner as runner
    from mmfuse.cli import main
    from mmfuse.perf_analyzer import PerfAnalyzerError

    def fail(cfg, argv=None):
        raise PerfAnalyzerError("perf_analyzer not found (not in /x, not on PATH)")

    monkeypatch.setattr(runner, "run", fail)
    assert main(["eval", "--out", str(tmp_path / "out"), "--load-generator", "python"]) == 1
    assert capsys.readouterr().err == "mmfuse eval: perf_analyzer not found (not in /x, not on PATH)\n"


def _load_report(generators: list[str | None], configured: str | None = None) -> dict:
    """A report with only a load section: one closed-loop run per entry of ``generators`` (None: a run of a report
    made before runs recorded their load generator)."""
    runs = []
    for i, generator in enumerate(generators):
        run = L.Run("fuse_image_text" if i % 2 == 0 else "embed_text", "closed" if i < 2 else "open", 2 + i,
                    generator or "python", sent=3, completed=3, seconds=1.0, latencies_ms=[1.0, 2.0, 3.0],
                    max_in_flight=2, rss_idle=2**20, rss_peak=2**21)
        run.ensemble_stats = {"requests": 3, "request_ms": 0.004}
        summary = run.summary()
        if generator is None:
            del summary["load_generator"]
        runs.append(summary)
    return {
        "created_utc": "now", "seconds": 1.0, "command": "mmfuse eval --out x", "machine": {"cpus": 2},
        "server": {"embedded": True, "url": "127.0.0.1:1", "repository": "repo", "served_fusion": "late"},
        "config": {"load_generator": configured} if configured else {},
        "load": {"runs": runs, "strategy_overhead": [], "bounds": {"requests": 300, "seconds": 2.0},
                 "perf_analyzer": {"setup": "export X=1", "commands": {"fuse_image_text": {"lines": ["perf_analyzer"]}}}},
    }


PA = "by Triton's perf_analyzer (C++ client from the tritonclient wheel)"
ASYNCIO = "by mmfuse's asyncio Python client (mmfuse.loadgen)"


def test_the_report_names_perf_analyzer_when_it_made_the_runs():
    from mmfuse.eval.report import markdown

    md = markdown(_load_report(["perf_analyzer", "perf_analyzer"]))
    assert f"sent over loopback gRPC {PA}." in md
    assert "asyncio" not in md and "256 outstanding" not in md
    assert "one request count (`--request-count`; no warm-up, no measurement windows, so no stability check): " \
           "300 requests" in md
    assert "The figures above were already measured by perf_analyzer" in md


def test_the_report_names_the_asyncio_client_when_it_made_the_runs():
    from mmfuse.eval.report import markdown

    for generators in (["python", "python"], [None, None]):  # None: a report from before perf_analyzer
        md = markdown(_load_report(generators))
        assert f"sent over loopback gRPC {ASYNCIO}." in md
        assert "each run stops at 300 requests or 2 s, whichever comes first" in md
        assert "Triton's perf_analyzer (C++" not in md and "--request-count" not in md
        assert "already measured by perf_analyzer" not in md
        assert f"The figures above were measured {ASYNCIO}. The lines below measure the same load with " \
               "perf_analyzer" in md


def test_the_report_names_each_load_generator_when_runs_differ():
    from mmfuse.eval.report import load_generators, markdown

    report = _load_report(["perf_analyzer", "python", "perf_analyzer"])
    assert load_generators(report["load"]) == {"perf_analyzer": ["fuse_image_text c=2", "fuse_image_text 4/s"],
                                               "python": ["embed_text c=3"]}
    md = markdown(report)
    assert f"{PA} for fuse_image_text c=2, fuse_image_text 4/s; {ASYNCIO} for embed_text c=3." in md
    assert "Some figures above were measured by perf_analyzer, the others by mmfuse's asyncio Python client" in md


def test_a_report_without_runs_names_the_configured_load_generator():
    from mmfuse.eval.report import markdown

    assert f"sent over loopback gRPC {PA}." in markdown(_load_report([], configured="perf_analyzer"))
    assert f"sent over loopback gRPC {ASYNCIO}." in markdown(_load_report([], configured="python"))
