"""mmfuse make-dataset: a seeded synthetic dataset as image files + JSONL manifests (like your own data).

    mmfuse make-dataset classify --out data/classify        # 8 classes: part image-only, part text-only, part both
    mmfuse make-dataset match --out data/match --train 500  # the shapes benchmark: does the caption match?
    mmfuse train --data data/classify/train.jsonl --val data/classify/val.jsonl --task classify ...

Writes DIR/images/<split>-<index>.png, DIR/train.jsonl, DIR/val.jsonl, DIR/test.jsonl and DIR/dataset.json
(see mmfuse.synthetic). The same --seed gives byte-identical files.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

_SPLITS = ("train", "val", "test")
_DEFAULTS = {"classify": {"train": 2000, "val": 400, "test": 600},  # = mmfuse.synthetic.DEFAULT_COUNTS
             "match": {"train": 2000, "val": 400, "test": 600}}


def register(sub) -> None:
    p = sub.add_parser("make-dataset", help="write a seeded synthetic dataset (images + train/val/test JSONL "
                                            "manifests) for --task classify or match")
    p.add_argument("task", choices=("classify", "match"),
                   help="classify: 8 classes, part of the label only in the image, part only in the text, part in "
                        "both; match: the shapes benchmark (label 1 = the caption matches the image)")
    p.add_argument("--out", required=True, help="folder to write (new, empty, or holding an earlier run's files)")
    for split in _SPLITS:
        p.add_argument(f"--{split}", type=int, default=None, metavar="N",
                       help=f"rows in {split}.jsonl (default {_DEFAULTS['classify'][split]})")
    p.add_argument("--seed", type=int, default=0, help="the same seed gives byte-identical files")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .. import synthetic

    counts = {split: getattr(args, split) if getattr(args, split) is not None else synthetic.DEFAULT_COUNTS[args.task][split]
              for split in _SPLITS}
    out = Path(args.out)
    problem = synthetic.check_request(args.task, out, counts)
    if problem:
        print(f"mmfuse make-dataset: {problem}", file=sys.stderr)
        return 2
    with tqdm(total=sum(counts.values()), desc=f"rendering {args.task}", unit="image", dynamic_ncols=True) as bar:
        try:
            written = synthetic.write_dataset(args.task, out, counts, args.seed, progress=bar.update)
        except (ValueError, OSError) as error:
            print(f"mmfuse make-dataset: {error}", file=sys.stderr)
            return 2
    for split in _SPLITS:
        print(f"wrote {written[split]}: {counts[split]} rows ({split}), images under {out / 'images'}")
    classes = synthetic.CLASSES if args.task == "classify" else ("0", "1")
    print(f"wrote {written['dataset']}: task {args.task}, {len(classes)} classes, seed {args.seed}; train with "
          f"`mmfuse train --data {written['train']} --val {written['val']} --task {args.task} ...`")
    return 0
