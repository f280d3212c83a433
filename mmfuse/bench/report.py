"""The bench's report: the ratios (``summarise``, ``serving_ceiling``), the printed table, the JSON file."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..serving.hardware import REPORTED_FLAGS

SERVED_RUNS = ("embed_image", "fuse_image_text", "embed_text", "fuse_image_text_at_load", "embed_image_c1",
               "embed_text_c1")


def jsonable(value):
    """``value`` with tuples as lists, numpy scalars as Python numbers and non-finite floats as None."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (np.floating, np.integer)):
        return jsonable(value.item())
    return value


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    """The ratios the issue asks for, in one place."""
    limit, naive, served_ = result["limit"], result.get("naive") or {}, result.get("served") or {}
    summary: dict[str, Any] = {"limit_dtype": limit["dtype"]}
    for ensemble in ("embed_image", "embed_text", "fuse_image_text"):
        row = served_.get(ensemble)
        if not row:
            continue
        rate = row["items_per_s"]
        entry = {"served_per_s": rate, "limit_per_s": limit[f"{ensemble}_per_s"],
                 "served_over_limit": rate / limit[f"{ensemble}_per_s"],
                 "load_generator": row.get("load_generator", "python")}
        cores, used = (result.get("machine") or {}).get("cores"), row.get("server_cpu_cores")
        if cores and used:
            # On a shared machine the server gets only part of the CPU: what it served per core it used,
            # times the cores, estimates the figure on a machine of its own (an estimate, labelled as one).
            entry["served_per_server_core"] = rate / used
            entry["load_normalised_served_over_limit"] = rate / used * cores / limit[f"{ensemble}_per_s"]
        if naive.get(f"{ensemble}_per_s"):
            entry["naive_per_s"] = naive[f"{ensemble}_per_s"]
            entry["served_over_naive"] = rate / naive[f"{ensemble}_per_s"]
        base = (result.get("served_baseline") or {}).get(ensemble)
        if base:
            entry["baseline_per_s"] = base["items_per_s"]
            entry["served_over_baseline"] = rate / base["items_per_s"]
        summary[ensemble] = entry
    load = served_.get("fuse_image_text_at_load")
    if load:
        summary["at_load"] = {k: load[k] for k in ("load_fraction", "items_per_s_offered", "requests", "p50_ms", "p95_ms", "p99_ms",
                                                   "p99_over_p50", "fusion_ms", "fusion_share_of_p50")}
        summary["at_load"]["load_generator"] = load.get("load_generator", "python")
    trim = result.get("text_trimming")
    if trim:
        summary["text_trim_speedup"] = trim["speedup"]
        summary["text_trim_max_abs_diff_fp32"] = trim["trimmed_vs_padded"]["fp32"]["max_abs_diff"]
    prec = result.get("precision") or {}
    for p in ("bf16", "fp16"):
        if p in prec:
            summary[f"{p}_min_cosine_vs_fp32"] = min(prec[p]["image_min_cosine_vs_fp32"], prec[p]["text_min_cosine_vs_fp32"])
            summary[f"{p}_image_speedup"] = prec[f"{p}_image_speedup"]
    ceiling = serving_ceiling(result)
    if ceiling:
        summary["ceiling"] = ceiling
    measured = result.get("ceiling_measured")
    if measured:
        entry = {"embed_image_per_s": measured["embed_image_per_s"],
                 "embed_image_over_limit": measured["embed_image_per_s"] / limit["embed_image_per_s"]}
        if "embed_image" in summary:
            entry["served_over_ceiling"] = summary["embed_image"]["served_per_s"] / measured["embed_image_per_s"]
        summary["ceiling_measured"] = entry
    single = {name: {k: served_[f"{name}_c1"][k] for k in ("p50_ms", "p99_ms", "items_per_s")}
              for name in ("embed_image", "embed_text") if served_.get(f"{name}_c1")}
    if single:
        summary["concurrency_1"] = single
    summary["targets"] = targets(result, summary)
    if served_.get("outputs"):
        summary["served_min_cosine_vs_fp32"] = min(served_["outputs"]["image_min_cosine_vs_fp32_in_process"],
                                                   served_["outputs"]["text_min_cosine_vs_fp32_in_process"])
    return jsonable(summary)


TARGETS_FILE = Path(__file__).resolve().parent / "targets.json"


def target_data() -> dict[str, Any]:
    """The targets (mmfuse/bench/targets.json): thresholds, and the other servers' figures with their machine."""
    return json.loads(TARGETS_FILE.read_text())


def _target(name: str, wanted: str, figure: str, ratio: float | None, met: bool | None, detail: str) -> dict[str, Any]:
    return {"target": name, "wanted": wanted, "figure": figure, "ratio": ratio, "met": met, "detail": detail}


def targets(result: dict[str, Any], summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target of targets.json with its figure from this run: ``met`` True or False, or None where the run
    could not decide it (not measured here, or a reference from another kind of machine); ``detail`` says why."""
    data, served_ = target_data(), result.get("served") or {}
    out: list[dict[str, Any]] = []
    profile = result["options"]["profile"]
    compare = result.get("compare") or {}
    rule = data["auto_over_best_hand_picked"]
    for ensemble in rule["ensembles"]:
        name, wanted = f"auto vs the best hand-picked profile, {ensemble}", f">= {rule['at_least']:.2f}"
        rates = {p: r[ensemble]["items_per_s"] for p, r in compare.items() if (r.get(ensemble) or {}).get("items_per_s")}
        mine = (served_.get(ensemble) or {}).get("items_per_s")
        if profile != "auto" or not rates or not mine:
            why = ("--profile is not auto" if profile != "auto" else "no hand-picked profile served in this run"
                   if not rates else "not served in this run")
            out.append(_target(name, wanted, "-", None, None, f"not measured: {why}"))
            continue
        best = max(rates, key=rates.get)
        ratio = mine / rates[best]
        others = ", ".join(f"{p} {r:.1f}" for p, r in rates.items())
        out.append(_target(name, wanted, f"{ratio:.2f}", ratio, ratio >= rule["at_least"],
                           f"auto {mine:.1f} items/s vs {best} {rates[best]:.1f} (served alone, same load; {others})"))
    rule = data["served_over_ceiling"]
    name, wanted = "served embed_image / in-process ceiling", f">= {rule['at_least']:.2f}"
    measured, raw = summary.get("ceiling_measured") or {}, result.get("ceiling_measured") or {}
    if "served_over_ceiling" in measured:
        ratio = measured["served_over_ceiling"]
        out.append(_target(name, wanted, f"{ratio:.2f}", ratio, ratio >= rule["at_least"],
                           f"{summary['embed_image']['served_per_s']:.1f} img/s served vs {measured['embed_image_per_s']:.1f} "
                           f"in-process ({raw.get('engine')}, {raw.get('precision')}, {raw.get('workers')} processes)"))
    else:
        out.append(_target(name, wanted, "-", None, None, "not measured: the ceiling is measured on a CPU device, "
                                                           "with a served embed_image run"))
    others = data["other_servers"]
    peak = ((result.get("peak") or {}).get("fp32") or {}).get("peak_gflops")
    unlike = _unlike_the_reference(result, others, peak)
    for ensemble, at_least in others["at_least"].items():
        best_name = max(others["servers"], key=lambda n: others["servers"][n][ensemble])
        reference = others["servers"][best_name][ensemble]
        name, wanted = f"{ensemble} vs the best other server", f">= {at_least:.1f}x"
        mine = (served_.get(ensemble) or {}).get("items_per_s")
        if not mine:
            out.append(_target(name, wanted, "-", None, None, "not measured: not served in this run"))
            continue
        ratio = mine / reference
        detail = f"{mine:.1f} items/s vs {best_name} {reference:.1f}, measured on {others['machine']}"
        row = _target(name, wanted, f"{ratio:.2f}x", ratio, None if unlike else ratio >= at_least, detail)
        if unlike:
            row["detail"] += f"; {'; '.join(unlike)}: the ratio is for orientation only"
            if peak:
                scaled = mine * others["machine_fp32_peak_gflops"] / peak
                row["scaled_ratio"] = scaled / reference
                row["detail"] += (f" (scaled to that machine's fp32 peak, {others['machine_fp32_peak_gflops']:.0f} vs "
                                  f"{peak:.0f} GFLOP/s here: {scaled:.1f} items/s = {scaled / reference:.2f}x)")
        out.append(row)
    rule = data["single_image_latency"]
    name, wanted = "embed_image p50 at concurrency 1 / in-process single image", f"<= {rule['at_most']:.2f}"
    runs = (served_ if profile == "auto-latency" else result.get("served_latency") or {})
    c1, alone = runs.get("embed_image_c1"), result.get("single_image")
    if c1 and alone:
        ratio = c1["p50_ms"] / alone["p50_ms"]
        out.append(_target(name, wanted, f"{ratio:.2f}", ratio, ratio <= rule["at_most"],
                           f"served p50 {c1['p50_ms']:.1f} ms (auto-latency, p99 {c1['p99_ms']:.1f}) vs in-process "
                           f"{alone['p50_ms']:.1f} ms ({alone['engine']}, {alone['precision']}, {alone['threads']} "
                           "thread(s))"))
    else:
        out.append(_target(name, wanted, "-", None, None, "not measured: needs the concurrency-1 runs on a CPU "
                                                           "(off with --no-latency)"))
    return out


def _unlike_the_reference(result: dict[str, Any], others: dict[str, Any], peak: float | None) -> list[str]:
    """Why this machine is not the kind the other servers' figures come from (nothing where it is): another
    class or core count, an emulated class, or a torch fp32 ``peak`` outside ``peak_tolerance`` of that machine's."""
    hw, why = result.get("hardware") or {}, []
    if hw.get("class") != others["machine_class"] or hw.get("cores") != others["machine_cores"]:
        why.append(f"this machine is {hw.get('class')} with {hw.get('cores')} cores, not that kind")
    if (result.get("machine") or {}).get("emulation"):
        why.append("this run emulates its class on another CPU")
    reference = others["machine_fp32_peak_gflops"]
    if not peak or abs(peak / reference - 1) > others["peak_tolerance"]:
        why.append(f"its torch fp32 peak is {_f(peak, '.0f')} GFLOP/s against that machine's {reference:.0f}")
    return why


def serving_ceiling(result: dict[str, Any]) -> dict[str, Any] | None:
    """What embed_image could serve with no serving overhead at all: every core running the image tower
    in-process (one thread, the served precision) plus its image's decoding and resizing, nothing else.
    Against the limit, this bounds served/limit from above on this machine and these kernels."""
    limit, prec, pre = result.get("limit") or {}, result.get("precision") or {}, result.get("preprocessing") or {}
    cores = (result.get("machine") or {}).get("cores")
    one_thread = ((result.get("peak") or {}).get(limit.get("dtype")) or {}).get("one_thread_gflops")
    tower = prec.get(result.get("served_precision") or limit.get("dtype")) or {}  # the tower as served
    if not (cores and one_thread and tower.get("image_per_s") and prec.get("threads") == 1 and pre.get("per_image")):
        return None
    draft = bool(result.get("served_jpeg_draft"))
    engine = result.get("served_engine") or "torch"
    rate = tower.get("image_openvino_per_s") if engine == "openvino" else tower["image_per_s"]
    if not rate:
        return None
    tower_ms = 1e3 / rate
    pre_ms = pre["per_image"]["jpeg_draft_path_ms" if draft else "exact_path_ms"]
    per_core = 1e3 / (tower_ms + pre_ms)
    return {"tower_ms_per_image": tower_ms, "preprocess_ms_per_image": pre_ms, "jpeg_draft": draft, "engine": engine,
            "tower_over_one_thread_peak": rate * result["flops"]["image_flops"] / 1e9 / one_thread,
            "embed_image_per_s": per_core * cores, "embed_image_over_limit": per_core * cores / limit["embed_image_per_s"]}


def _f(value, fmt: str = ".1f", suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:{fmt}}{suffix}"


def table(result: dict[str, Any]) -> str:
    """The printed report: limit, served, naive, ratios, latency, fusion share, and the optimisations' figures."""
    m, peak, flops, limit = result["machine"], result["peak"], result["flops"], result["limit"]
    s = result["summary"]
    served_ = result.get("served") or {}
    lines = [
        f"mmfuse bench: {result['options']['model']}, profile '{result['options']['profile']}', "
        f"{m['cpu']} ({m['cores']} cores; bf16 matrix units: {'yes' if m['bf16_matrix_units'] else 'no'}), "
        f"load average {result['load_average_start']} -> {result.get('load_average_end')}",
        "",
        *_auto_lines(result),
        "",
        *_target_lines(s.get("targets") or []),
        "",
        "| limit | |",
        "| --- | --- |",
    ]
    for dtype, p in peak.items():
        detail = (f" (all threads {p['all_threads_gflops']:.0f}, one thread {p['one_thread_gflops']:.0f} x {m['cores']})"
                  if "all_threads_gflops" in p else "")
        emulated = " - emulated: no bf16 units on this CPU" if p.get("emulated") else ""
        lines.append(f"| peak matmul {dtype} | {p['peak_gflops']:.0f} GFLOP/s{detail}{emulated} |")
    lines += [
        f"| FLOPs per image | {flops['image_flops'] / 1e9:.3f} GFLOP (torch flop counter: {flops['image_flops_counted'] / 1e9:.3f}, "
        "without the attention products) |",
        f"| FLOPs per caption | {flops['text_flops'] / 1e9:.3f} GFLOP at {flops['text_tokens']} tokens "
        f"({flops['text_flops_padded'] / 1e9:.2f} padded to {flops['context_length']}) |",
        f"| limit used | {limit['dtype']}: {limit['why']} |",
        "",
    ]
    if not served_:
        lines.append("(served: not measured in this run)")
    lines += [] if not served_ else [
        "| ensemble | served items/s | limit items/s | served/limit | naive items/s | served/naive | baseline items/s | "
        "served/baseline | p50 ms | p95 ms | p99 ms | server cores |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for ensemble in ("embed_image", "fuse_image_text", "embed_text"):
        e = s.get(ensemble)
        if not e:
            continue
        r = served_[ensemble]
        lines.append(
            f"| {ensemble} | {e['served_per_s']:.1f} | {e['limit_per_s']:.1f} | {e['served_over_limit']:.2f} | "
            f"{_f(e.get('naive_per_s'))} | {_f(e.get('served_over_naive'), '.1f', 'x')} | {_f(e.get('baseline_per_s'))} | "
            f"{_f(e.get('served_over_baseline'), '.1f', 'x')} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['p99_ms']:.0f} | "
            f"{_f(r.get('server_cpu_cores'), '.2f')} |")
    normalised = [f"{name} {s[name]['load_normalised_served_over_limit']:.2f}" for name in ("embed_image", "fuse_image_text", "embed_text")
                  if "load_normalised_served_over_limit" in s.get(name, {})]
    if normalised:
        lines.append("served/limit if the server had had the whole machine (served per server core x cores; an "
                     "estimate for shared machines): " + ", ".join(normalised))
    single = s.get("concurrency_1")
    if single:
        lines.append(f"single requests (concurrency 1, one row each, profile '{result['options']['profile']}'): " + "; ".join(
            f"{name} p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms ({r['items_per_s']:.1f} items/s)"
            for name, r in single.items()))
    lines += _compare_lines(result)
    c = s.get("ceiling")
    if c:
        lines.append(f"ceiling with no serving overhead (in-process, one thread per core): image tower ({c.get('engine', 'torch')}) "
                     f"{c['tower_ms_per_image']:.1f} ms "
                     f"({c['tower_over_one_thread_peak']:.0%} of the one-thread matmul peak) + "
                     f"{'jpeg_draft' if c['jpeg_draft'] else 'exact'} decoding and resizing {c['preprocess_ms_per_image']:.1f} ms "
                     f"per image = {c['embed_image_per_s']:.1f} img/s on {m['cores']} cores = {c['embed_image_over_limit']:.2f} "
                     "of the limit")
    cm, raw = s.get("ceiling_measured"), result.get("ceiling_measured")
    if cm and raw:
        lines.append(f"ceiling measured: {raw['workers']} processes at once, each decoding and encoding batches of "
                     f"{raw['batch']} in one thread ({raw['engine']}, {raw['precision']}, "
                     f"{'jpeg_draft' if raw['jpeg_draft'] else 'exact'} decoding), no server: "
                     f"{cm['embed_image_per_s']:.1f} img/s = {cm['embed_image_over_limit']:.2f} of the limit"
                     + (f"; served embed_image = {cm['served_over_ceiling']:.2f} of it" if "served_over_ceiling" in cm else ""))
    plan = result["options"]["plan"]
    if served_:
        generators = _load_generators(served_)
        lines.append(f"(closed loop: {plan['concurrency']} requests in flight of {plan['rows']} rows, "
                     f"{plan['duration_s']:.0f} s after {_warm_up(served_, plan)}; loopback gRPC; load generator: "
                     f"{generators}; server cores: CPU time of tritonserver and its model processes per second, "
                     f"of {m['cores']})")
    if "at_load" in s:
        a = s["at_load"]
        lines += ["", f"fuse_image_text at {a['load_fraction']:.0%} of its peak ({a['items_per_s_offered']:.1f} items/s, "
                      f"fixed rate by {a.get('load_generator', 'python')}, {a.get('requests', 0):.0f} requests measured): p50 {a['p50_ms']:.0f} ms, p95 {a['p95_ms']:.0f} ms, p99 {a['p99_ms']:.0f} ms, "
                      f"p99/p50 {a['p99_over_p50']:.2f}; fusion step {a['fusion_ms']:.2f} ms per request = "
                      f"{a['fusion_share_of_p50']:.1%} of p50"]
        models = served_["fuse_image_text_at_load"]["models"]
        lines += ["", "| model (at load) | requests | queue ms | compute ms | mean batch rows |", "| --- | --- | --- | --- | --- |"]
        for name in ("fuse_image_text", "image_preprocess", "image_encoder", "text_preprocess", "text_encoder", "fusion"):
            if name in models:
                r = models[name]
                lines.append(f"| {name} | {r['requests']:.0f} | {r['queue_ms']:.1f} | {r['compute_ms']:.1f} | "
                             f"{_f(r['mean_batch_rows'])} |")
    t = result.get("text_trimming")
    if t:
        lines += ["", f"text trimming ({t['precision']}, batch {t['batch']}, captions of {t['mean_tokens']:.1f} tokens on "
                      f"average, longest {t['longest_tokens']} of {t['context_length']}): trimmed {t['trimmed_per_s']:.0f}/s vs "
                      f"padded {t['padded_per_s']:.0f}/s = {t['speedup']:.1f}x; trimmed vs padded max |diff| fp32 "
                      f"{t['trimmed_vs_padded']['fp32']['max_abs_diff']:.1e}"]
    p = result.get("precision")
    if p:
        parts = []
        for prec in ("fp32", "bf16", "fp16"):
            if prec in p:
                r = p[prec]
                parts.append(f"{prec}: image {r['image_per_s']:.1f}/s text {r['text_per_s']:.0f}/s, cosine vs fp32 >= "
                             f"{min(r['image_min_cosine_vs_fp32'], r['text_min_cosine_vs_fp32']):.4f}"
                             + (f" (engine openvino: image {r['image_openvino_per_s']:.1f}/s, cosine vs torch fp32 >= "
                                f"{r['image_openvino_min_cosine_vs_fp32']:.4f}"
                                + (f"; text {r['text_openvino_per_s']:.0f}/s, cosine >= "
                                   f"{r['text_openvino_min_cosine_vs_fp32']:.4f}" if "text_openvino_per_s" in r else "")
                                + ")" if "image_openvino_per_s" in r else ""))
        lines += ["", f"precision (in-process, batch {p['batch']}, {p['threads']} thread(s), {p['device']}): " + "; ".join(parts)]
    g = result.get("tower_gemm")
    if p and g and g["dtype"] in p and "one_thread_gflops" in peak.get(g["dtype"], {}):
        one = peak[g["dtype"]]["one_thread_gflops"]
        achieved = p[g["dtype"]]["image_per_s"] * flops["image_flops"] / 1e9 / p["threads"]
        lines.append(f"image tower {g['dtype']}, one thread: {achieved:.0f} GFLOP/s in-process (batch {p['batch']}) = "
                     f"{achieved / one:.0%} of the one-thread peak {one:.0f}; its own matmul shapes alone (M = "
                     f"{g['batch']}x{g['tokens']}) run at {g['gflops']:.0f} GFLOP/s = {g['gflops'] / one:.0%}")
    e = result.get("encoder_steps")
    if e and "patch_embedding_conv_ms" in e:
        lines.append(f"image encoder steps ({e['precision']}, batch {e['batch']}, one thread): patch embedding as a "
                     f"convolution {e['patch_embedding_conv_ms']:.1f} ms -> as one matmul {e['patch_embedding_matmul_ms']:.1f} ms; "
                     f"tower with the token sequence converted {e['tower_with_sequence_ms']:.0f} ms -> embedding only "
                     f"{e['tower_embedding_only_ms']:.0f} ms")
    if "served_min_cosine_vs_fp32" in s:
        decoding = "jpeg_draft" if result.get("served_jpeg_draft") else "exact"
        lines.append(f"served embeddings ({served_['outputs']['served_precision']}, {decoding} decoding) vs in-process fp32 "
                     f"with exact decoding: cosine >= "
                     f"{s['served_min_cosine_vs_fp32']:.5f}")
    pre = result.get("preprocessing")
    if pre:
        st = pre["per_image"]
        lines += ["", f"preprocessing per {pre['image_size'][0]}x{pre['image_size'][1]} JPEG ({pre['encoded_kb']} KB), one "
                      f"thread: decode {st['decode_ms']:.2f} ms, resize+crop {st['resize_crop_ms']:.2f} ms, ToTensor+Normalize "
                      f"{st['to_tensor_normalize_ms']:.2f} ms (lookup table {st['lookup_table_tail_ms']:.2f} ms); whole: "
                      f"open_clip transform {st['open_clip_transform_path_ms']:.2f} ms, exact path {st['exact_path_ms']:.2f} ms "
                      f"(max |diff| {pre['exact_vs_open_clip_max_abs']:.0e}), jpeg_draft {st['jpeg_draft_path_ms']:.2f} ms "
                      f"(mean |diff| {pre['draft_vs_exact_mean_abs']:.4f}, max {pre['draft_vs_exact_max_abs']:.3f}, "
                      f"normalised units; embedding cosine vs exact >= {_f(pre.get('draft_vs_exact_embedding_min_cosine'), '.5f')}); handler images/s by decode threads: "
                      + ", ".join(f"{k}: {v:.0f}" for k, v in pre["handler_images_per_s_by_decode_threads"].items())]
        enc = (served_.get("embed_image") or {}).get("models", {})
        if "image_preprocess" in enc and "image_encoder" in enc:
            pre_ms = enc["image_preprocess"]["compute_infer_ms"]
            enc_ms = enc["image_encoder"]["compute_infer_ms"]
            lines.append(f"served embed_image: image_preprocess compute {pre_ms:.1f} ms vs image_encoder {enc_ms:.1f} ms "
                         f"per request ({pre_ms / enc_ms:.0%})")
    n = result.get("naive")
    if n:
        lines += ["", f"naive loop: open_clip fp32, one item at a time, {n['items']} items, the faster of torch's default "
                      f"{n['default_threads']} threads and 1 thread: embed_image " + ", ".join(
                          f"{k} thread(s) {v:.1f}/s" for k, v in n["embed_image_per_s_by_threads"].items())]
    lines.append(f"({result['seconds']:.0f} s; machine {m['host']}, {m['time_utc']})")
    return _paragraphs(lines)


def _auto_lines(result: dict[str, Any]) -> list[str]:
    """The hardware class the run detected and what ``auto`` chose for each goal."""
    hw, choices = result.get("hardware"), result.get("auto") or {}
    if not hw:
        return []
    flags = " ".join(hw.get("flags") or []) or "no AVX2"
    gpus = f"; GPU: {', '.join(hw['gpus'])}" if hw.get("gpus") else ""
    lines = [f"hardware class: {hw['class']} ({hw.get('cpu') or 'unknown CPU'}, {hw['cores']} usable cores; {flags}{gpus})"]
    emulated = (result.get("machine") or {}).get("emulation")
    if emulated:
        shown = {k: (" ".join(f for f in v.split() if f in REPORTED_FLAGS) + f" of {len(v.split())} flags"
                     if k == "MMFUSE_CPU_FLAGS" and len(v.split()) > 8 else v) for k, v in emulated.items()}
        lines.append("EMULATED class: " + ", ".join(f"{k}={v}" for k, v in shown.items()) + " (this CPU's flags "
                     "replaced and its kernels held to those instructions; the figures are this CPU's, not that class's)")
    for goal, c in choices.items():
        name = "auto" if goal == "throughput" else "auto-latency"
        encoders = "; ".join(f"{m} {e['instances']} x {e.get('torch_threads', '0')} thread(s) {e.get('engine', 'torch')} "
                             f"{e.get('precision', 'fp32')}" for m, e in c["encoders"].items())
        lines.append(f"{name} chose: profile '{c['base_profile']}' adapted, decoding {c['decoding']}; {encoders}")
    return lines


def _target_lines(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    lines = ["| target | wanted | measured | met | how |", "| --- | --- | --- | --- | --- |"]
    for t in rows:
        met = {True: "yes", False: "NO", None: "-"}[t["met"]]
        lines.append(f"| {t['target']} | {t['wanted']} | {t['figure']} | {met} | {t['detail']} |")
    return lines


def _compare_lines(result: dict[str, Any]) -> list[str]:
    """The hand-picked profiles served beside the run's profile: each alone, the same closed-loop load."""
    compare, served_ = result.get("compare") or {}, result.get("served") or {}
    if not compare:
        return []
    rows = {result["options"]["profile"]: served_, **compare}
    lines = ["", "| profile (served alone, same load) | embed_image items/s | embed_text items/s | server cores (image) |",
             "| --- | --- | --- | --- |"]
    for name, runs in rows.items():
        image, text = runs.get("embed_image") or {}, runs.get("embed_text") or {}
        lines.append(f"| {name} | {_f(image.get('items_per_s'))} | {_f(text.get('items_per_s'))} | "
                     f"{_f(image.get('server_cpu_cores'), '.2f')} |")
    return lines


def _load_generators(served_: dict[str, Any]) -> str:
    """Which load generator made the served figures: one name, or each ensemble's."""
    runs = {name: served_[name].get("load_generator", "python") for name in SERVED_RUNS if served_.get(name)}
    names = set(runs.values())
    if len(names) == 1:
        name = names.pop()
        return ("perf_analyzer (Triton's C++ client)" if name == "perf_analyzer"
                else f"{name} (mmfuse.loadgen's asyncio client)")
    return ", ".join(f"{k} {v}" for k, v in runs.items())


def _warm_up(served_: dict[str, Any], plan: dict[str, Any]) -> str:
    counts = {(served_[name].get("perf_analyzer") or {}).get("warmup_requests") for name in SERVED_RUNS[:3]
              if (served_.get(name) or {}).get("load_generator") == "perf_analyzer"}
    counts.discard(None)
    if len(counts) == 1:
        return f"a warm-up of {counts.pop()} requests"
    return f"{plan['warmup_s']:.0f} s warm-up"


def _paragraphs(lines: list[str]) -> str:
    """Markdown: a blank line between paragraphs and around tables, none inside a table."""
    out: list[str] = []
    for line in lines:
        if line and out and out[-1] and not (line.startswith("|") and out[-1].startswith("|")):
            out.append("")
        if line or (out and out[-1]):
            out.append(line)
    return "\n".join(out)


def write_json(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(result), indent=2, sort_keys=False) + "\n")
