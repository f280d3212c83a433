"""mmfuse train: train a fusion head and export it into the model repository.

    mmfuse train --data TRAIN.jsonl [--val VAL.jsonl] --task classify --strategy attention --repository R
                                                                      # your data, on R's frozen encoders
    mmfuse train --strategy attention --from-scratch --repository R   # the demo: tiny encoders + head from scratch
    mmfuse train --strategy late-gmu --repository R                   # a head on R's frozen encoders (shapes data)
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

from ..paths import DEFAULT_MODEL_REPOSITORY


def register(sub) -> None:
    from ..presets import DEFAULTS as d
    from ..presets import PRESETS

    p = sub.add_parser("train", help="train a fusion head (optionally tiny encoders too) and export it")
    p.add_argument("--data", help="training manifest (JSONL or CSV: image, text, label[, split]); rows whose split is "
                                  "'val' validate unless --val is given")
    p.add_argument("--val", help="validation manifest (same columns)")
    p.add_argument("--task", choices=("classify", "match"), default=None,
                   help="with --data: classify (one class name per row; PROBS + LABEL) or match (0/1; SCORE). "
                        "Default classify with --data, match on the shapes data")
    p.add_argument("--epochs", type=float, default=20.0, help="with --data: passes over the training rows "
                                                             "(unless --steps is given)")
    p.add_argument("--cache-dir", help="feature cache (default $MMFUSE_CACHE_DIR or ~/.cache/mmfuse/features)")
    p.add_argument("--strategy", choices=PRESETS, default="attention")
    p.add_argument("--from-scratch", action="store_true",
                   help="train the tiny open_clip encoders together with the head (the demo's recipe)")
    p.add_argument("--model-name", default=d["model_name"], help="open_clip architecture for --from-scratch")
    p.add_argument("--steps", type=int, default=None,
                   help=f"training steps (default: --epochs with --data, {d['steps']} otherwise)")
    p.add_argument("--batch-size", type=int, default=d["batch_size"])
    p.add_argument("--lr", type=float, default=None, help=f"learning rate (default with --data: 1e-2 for late, late-gmu, early, 1e-3 for the token "
                        f"strategies; {d['lr']} otherwise)")
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--modality-dropout", type=float, default=None,
                   help=f"probability of dropping each modality per sample (default 0 with --data, "
                        f"{d['modality_dropout']} otherwise)")
    p.add_argument("--curriculum-steps", type=int, default=d["curriculum_steps"],
                   help="steps over which relation-swapped negatives are phased in")
    p.add_argument("--threads", type=int, default=d["threads"], help="torch threads (0: torch's default)")
    p.add_argument("--eval-per-kind", type=int, default=300, help="fresh examples per kind for the final evaluation")
    p.add_argument("--eval-every", type=int, default=0,
                   help="--from-scratch: evaluate every N steps (recorded in the head's JSON)")
    p.add_argument("--init-head", help="start from this head folder's matching weights")
    p.add_argument("--init-checkpoint", help="--from-scratch: start the encoders from this checkpoint")
    p.add_argument("--option", action="append", default=[], metavar="KEY=JSON",
                   help="strategy hyper-parameter override, e.g. --option layers=3 (repeatable)")
    p.add_argument("--repository", help="the model repository whose encoders are used and into which the head is "
                                        "exported (a new fusion version folder); required unless --no-export")
    p.add_argument("--fusion-model", default="fusion", help="fusion model folder that receives the new version")
    p.add_argument("--no-export", action="store_true", help="train and evaluate only")
    p.set_defaults(func=run)


def _progress(total: int, desc: str):
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True)

    def update(step: int, losses: dict[str, float]) -> None:
        bar.update(1)
        if step % 10 == 0:
            bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items()})
        if step + 1 == total:
            bar.close()

    return update


def _options(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"mmfuse train: --option wants KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def _check(args: argparse.Namespace) -> str | None:
    if not args.repository and not args.no_export:
        return "give --repository DIR (the repository to train on and export into) or --no-export"
    if args.modality_dropout is not None and not 0 <= args.modality_dropout < 1:
        return f"--modality-dropout must be in [0, 1), got {args.modality_dropout}"
    if args.steps is not None and args.steps < 1 or args.epochs <= 0 or args.batch_size < 1:
        return "--steps, --epochs and --batch-size must be positive"
    if args.data and args.from_scratch:
        return "--from-scratch trains the demo's encoders on the shapes data; it takes no --data"
    if (args.val or args.task) and not args.data and args.task != "match":
        return "--val and --task classify need --data"
    return None


def run(args: argparse.Namespace) -> int:
    problem = _check(args)
    if problem:
        print(f"mmfuse train: {problem}", file=sys.stderr)
        return 2
    if args.data:
        return run_on_data(args)
    return run_shapes(args)


def run_on_data(args: argparse.Namespace) -> int:
    from ..datasets import DatasetError
    from ..fit import FitConfig
    from ..train_data import prepare, train

    repo = Path(args.repository or DEFAULT_MODEL_REPOSITORY)
    task = args.task or "classify"
    cfg = FitConfig(preset=args.strategy, task=task, steps=args.steps or 0, epochs=args.epochs,
                    batch_size=args.batch_size, lr=args.lr, modality_dropout=args.modality_dropout or 0.0,
                    seed=args.seed, threads=args.threads, options=_options(args.option))
    command = "mmfuse " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    try:
        prepared = prepare(repo, Path(args.data), Path(args.val) if args.val else None, task,
                           Path(args.cache_dir) if args.cache_dir else None, seed=args.seed)
        record = train(repo, prepared, cfg, export=not args.no_export, fusion_model=args.fusion_model,
                       command=command)
    except (DatasetError, ValueError, FileNotFoundError) as error:
        print(f"mmfuse train: {error}", file=sys.stderr)
        return 2
    summary = {"strategy": args.strategy, "task": task, "seconds": record["training"]["seconds"]}
    if "validation" in record:
        summary["validation"] = {k: round(v["accuracy"], 4) for k, v in record["validation"].items() if k != "chance"}
        summary["chance"] = round(record["validation"]["chance"], 4)
        summary["references"] = {m: round(r["validation"]["accuracy"], 4) for m, r in record["references"].items()}
    print(json.dumps(summary))
    if "version_dir" in record:
        outputs = "PROBS and LABEL" if task == "classify" else "SCORE"
        print(f"fusion head: {record['version_dir']} (strategy {args.strategy}, task {task}); the ensembles now "
              f"answer {outputs}. Serve with `mmfuse serve --model-repository {repo}`; regenerate clients with "
              f"`mmfuse gen-clients --model-repository {repo} --out DIR`")
    return 0


def run_shapes(args: argparse.Namespace) -> int:
    from .. import training
    from ..export import export_encoders, export_head
    from ..presets import DEFAULTS as d
    from ..repository import load_config, parameters

    repo = Path(args.repository or DEFAULT_MODEL_REPOSITORY)
    cfg = training.TrainConfig(
        preset=args.strategy, model_name=args.model_name, steps=args.steps or d["steps"], batch_size=args.batch_size,
        lr=args.lr or d["lr"], seed=args.seed,
        modality_dropout=d["modality_dropout"] if args.modality_dropout is None else args.modality_dropout,
        curriculum_steps=args.curriculum_steps, threads=args.threads, eval_every=args.eval_every,
        extra=_options(args.option), init_head=args.init_head, init_checkpoint=args.init_checkpoint)
    command = "mmfuse " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    started = time.monotonic()
    history: list = []
    if args.from_scratch:
        clip, heads, history = training.train_joint(cfg, _progress(cfg.steps, f"train {args.strategy} + encoders"))
        training.round_to_half(clip)  # what is exported is what was evaluated
        head = heads[args.strategy]
    else:
        params = parameters(load_config(repo, "image_encoder"))
        if not params.get("pretrained"):
            print("mmfuse train: the repository's encoders have no weights; use --from-scratch", file=sys.stderr)
            return 2
        checkpoint = (repo / "image_encoder" / params["pretrained"]).resolve()
        cfg.model_name = params["model_name"]
        clip = training.create_clip(cfg.model_name, cfg.seed, checkpoint).eval()
        head = training.train_head(cfg, clip, _progress(cfg.steps, f"train {args.strategy} head"))
    seconds = time.monotonic() - started
    print(f"trained in {seconds / 60:.1f} min; evaluating on {args.eval_per_kind} fresh examples per kind ...")
    results = training.full_evaluation(clip, {args.strategy: head}, cfg.model_name, seed=cfg.seed + 777_000,
                                       per_kind=args.eval_per_kind)[args.strategy]
    print(json.dumps({"strategy": args.strategy, **{k: round(v, 4) for k, v in results.items()}}))
    if args.no_export:
        return 0
    record = training.train_record(cfg, command, seconds, history, results)
    if args.from_scratch:
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = training.export_checkpoint(clip, Path(tmp) / f"{cfg.model_name}.safetensors")
            relative = export_encoders(repo, checkpoint, cfg.model_name)
        print(f"encoders: {repo / 'image_encoder' / Path(relative).name} (four open_clip models point at it)")
    version_dir = export_head(repo, args.fusion_model, head, record)
    print(f"fusion head: {version_dir} (strategy {head.name}; served as the latest version of {args.fusion_model})")
    return 0
