"""mmfuse train: train a fusion head on the shapes benchmark and export it into the model repository.

    mmfuse train --strategy attention --from-scratch --repository R   # the demo: tiny encoders + head from scratch
    mmfuse train --strategy late-gmu --repository R                   # a head on R's frozen encoders
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
    p.add_argument("--strategy", choices=PRESETS, default="attention")
    p.add_argument("--from-scratch", action="store_true",
                   help="train the tiny open_clip encoders together with the head (the demo's recipe)")
    p.add_argument("--model-name", default=d["model_name"], help="open_clip architecture for --from-scratch")
    p.add_argument("--steps", type=int, default=d["steps"])
    p.add_argument("--batch-size", type=int, default=d["batch_size"])
    p.add_argument("--lr", type=float, default=d["lr"])
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--modality-dropout", type=float, default=d["modality_dropout"],
                   help="probability of dropping each modality per sample")
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


def run(args: argparse.Namespace) -> int:
    from .. import training
    from ..export import export_encoders, export_head
    from ..repository import load_config, parameters

    if not args.repository and not args.no_export:
        print("mmfuse train: give --repository DIR (the repository to train on and export into) or --no-export",
              file=sys.stderr)
        return 2
    repo = Path(args.repository or DEFAULT_MODEL_REPOSITORY)
    cfg = training.TrainConfig(
        preset=args.strategy, model_name=args.model_name, steps=args.steps, batch_size=args.batch_size,
        lr=args.lr, seed=args.seed, modality_dropout=args.modality_dropout,
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
