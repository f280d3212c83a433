"""mmfuse compare (alias: benchmark): which fusion strategy, measured on the same encoders and data.

    mmfuse compare --data TRAIN.jsonl --test TEST.jsonl --task classify [--repository R] [--out F.json]

With ``--data``: every strategy is trained on the repository's frozen encoders (cached features) with and
without modality dropout and scored on the test rows (mmfuse/comparison.py says what each column is).
``--readme`` replaces the table between ``<!-- compare:TASK:start -->`` and ``<!-- compare:TASK:end -->``.

Without ``--data`` (the shapes benchmark): for each strategy, a head is trained on the repository's frozen encoders (the served head is used
as it is for the served strategy) and evaluated on freshly generated data: accuracy on positives,
on relation-swapped and on attribute negatives, and balanced accuracy with the image or the text
removed. Prints a Markdown table; ``--out`` writes JSON, ``--readme`` replaces the table between a
Markdown file's benchmark markers.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from ..paths import DEFAULT_MODEL_REPOSITORY

START, END = "<!-- benchmark-table:start -->", "<!-- benchmark-table:end -->"


def register(sub) -> None:
    from ..presets import PRESETS

    p = sub.add_parser("compare", aliases=["benchmark"],
                       help="train every strategy's head on the frozen encoders and tabulate accuracy")
    p.add_argument("--repository", default=str(DEFAULT_MODEL_REPOSITORY))
    p.add_argument("--strategies", nargs="+", choices=PRESETS, default=list(PRESETS))
    p.add_argument("--data", help="training manifest (JSONL or CSV); with --test: compare on your data")
    p.add_argument("--test", help="test manifest (same columns)")
    p.add_argument("--task", choices=("classify", "match"), default="classify", help="with --data")
    p.add_argument("--modality-dropout", type=float, default=0.3,
                   help="with --data: the dropout each strategy is also trained with (besides none)")
    p.add_argument("--epochs", type=float, default=20.0, help="with --data: passes over the training rows")
    p.add_argument("--cache-dir", help="feature cache (default $MMFUSE_CACHE_DIR or ~/.cache/mmfuse/features)")
    p.add_argument("--steps", type=int, default=None, help="training steps per head (default: 1500; with --data: "
                                                            "from --epochs)")
    p.add_argument("--per-kind", type=int, default=300, help="fresh evaluation examples per kind")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="write the results as JSON to this file")
    p.add_argument("--readme", default="", help="a Markdown file whose table between the benchmark markers is replaced")
    p.set_defaults(func=run)


def table(results: dict[str, dict[str, float]], served: str | None) -> str:
    rows = ["| strategy | positives | relation-swapped | attribute | no image | no text |",
            "| --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        label = f"**{name}** (served)" if name == served else name
        rows.append(f"| {label} | {r['positive']:.1%} | {r['swapped']:.1%} | {r['attribute']:.1%} "
                    f"| {r['no_image']:.1%} | {r['no_text']:.1%} |")
    return "\n".join(rows)


def update_readme(path: Path, text: str, start: str = START, end: str = END) -> None:
    readme = path.read_text()
    if start not in readme or end not in readme:
        raise SystemExit(f"{path} has no {start} ... {end} markers")
    head, rest = readme.split(start, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{start}\n{text}\n{end}{tail}")


def run(args: argparse.Namespace) -> int:
    if args.data or args.test:
        return run_on_data(args)
    return run_shapes(args)


def run_on_data(args: argparse.Namespace) -> int:
    from ..comparison import compare, table
    from ..datasets import DatasetError
    from ..fit import FitConfig
    from ..train_data import features, prepare, read, say, split_of

    if not (args.data and args.test):
        print("mmfuse compare: --data and --test go together", file=sys.stderr)
        return 2
    if not 0 <= args.modality_dropout < 1:
        print(f"mmfuse compare: --modality-dropout must be in [0, 1), got {args.modality_dropout}", file=sys.stderr)
        return 2
    repo = Path(args.repository)
    cache_dir = Path(args.cache_dir) if args.cache_dir else None
    cfg = FitConfig(task=args.task, steps=args.steps or 0, epochs=args.epochs, seed=args.seed)
    started = time.monotonic()
    try:
        prepared = prepare(repo, Path(args.data), None, args.task, cache_dir, holdout=False)
        test_manifest = read(Path(args.test), args.task, classes=prepared.classes)
        test = split_of(test_manifest, features(repo, test_manifest, cache_dir), args.task, prepared.classes,
                      lambda e: True)
        report = compare(prepared, test, args.strategies, args.modality_dropout, cfg, say)
    except (DatasetError, ValueError, FileNotFoundError) as error:
        print(f"mmfuse compare: {error}", file=sys.stderr)
        return 2
    report["seconds"] = round(time.monotonic() - started, 1)
    report["features"] = prepared.extraction
    from ..processes import cpu_model_and_flags

    report["machine"] = {"cpu": cpu_model_and_flags()[0], "cores": os.cpu_count()}
    text = table(report)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
    if args.readme:
        update_readme(Path(args.readme), text, f"<!-- compare:{args.task}:start -->", f"<!-- compare:{args.task}:end -->")
    return 0


def run_shapes(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from mmfuse.serving.strategies import load_head

    from .. import training
    from ..repository import load_config, parameters

    repo = Path(args.repository)
    enc = parameters(load_config(repo, "image_encoder"))
    if not enc.get("pretrained"):
        print("mmfuse benchmark: the repository's encoders have no trained weights (mmfuse train --from-scratch)",
              file=sys.stderr)
        return 2
    clip = training.create_clip(enc["model_name"], args.seed, (repo / "image_encoder" / enc["pretrained"]).resolve())
    fusion = parameters(load_config(repo, "fusion"))
    served_preset = None
    heads = {}
    if fusion.get("head_dir"):
        from ..export import versions

        version_dir = repo / "fusion" / str(versions(repo / "fusion")[-1])
        head, description = load_head((version_dir / fusion["head_dir"]).resolve())
        served_preset = description.get("training", {}).get("config", {}).get("preset", head.name)
        if served_preset in args.strategies:
            heads[served_preset] = head
    started = time.monotonic()
    for preset in args.strategies:
        if preset in heads:
            continue
        cfg = training.TrainConfig(preset=preset, model_name=enc["model_name"], steps=args.steps or 1500, seed=args.seed,
                                   eval_every=0)
        bar = tqdm(total=cfg.steps, desc=f"train {preset} head", unit="step", dynamic_ncols=True)
        heads[preset] = training.train_head(cfg, clip, lambda step, losses, bar=bar: bar.update(1))
        bar.close()
    print(f"evaluating {len(heads)} strategies on {args.per_kind} fresh examples per kind ...")
    results = training.full_evaluation(clip, heads, enc["model_name"], seed=args.seed + 999_000,
                                       per_kind=args.per_kind)
    results = {p: results[p] for p in args.strategies}
    text = table(results, served_preset)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"results": results, "served": served_preset, "steps_per_head": args.steps or 1500,
                                   "per_kind": args.per_kind, "seed": args.seed,
                                   "seconds": round(time.monotonic() - started, 1)}, indent=2) + "\n")
    if args.readme:
        update_readme(Path(args.readme), text)
    return 0
