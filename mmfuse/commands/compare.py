"""mmfuse compare (alias: benchmark): which fusion strategy, measured on the same encoders and data.

For each strategy, a head is trained on the repository's frozen encoders (the served head is used
as it is for the served strategy) and evaluated on freshly generated data: accuracy on positives,
on relation-swapped and on attribute negatives, and balanced accuracy with the image or the text
removed. Prints a Markdown table; ``--out`` writes JSON, ``--readme`` replaces the table between a
Markdown file's benchmark markers.
"""
from __future__ import annotations

import argparse
import json
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
    p.add_argument("--steps", type=int, default=1500, help="training steps per head")
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


def update_readme(path: Path, text: str) -> None:
    readme = path.read_text()
    if START not in readme or END not in readme:
        raise SystemExit(f"{path} has no {START} ... {END} markers")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{START}\n{text}\n{END}{tail}")


def run(args: argparse.Namespace) -> int:
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
        cfg = training.TrainConfig(preset=preset, model_name=enc["model_name"], steps=args.steps, seed=args.seed,
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
        out.write_text(json.dumps({"results": results, "served": served_preset, "steps_per_head": args.steps,
                                   "per_kind": args.per_kind, "seed": args.seed,
                                   "seconds": round(time.monotonic() - started, 1)}, indent=2) + "\n")
    if args.readme:
        update_readme(Path(args.readme), text)
    return 0
