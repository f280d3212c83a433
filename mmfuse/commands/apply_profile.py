"""mmfuse apply-profile PROFILE --out DIR [--model-repository SRC] [--separate-decoding]

Writes a copy of a model repository with a bench profile's serving settings: the settings ``mmfuse bench``
measured (instances, batching, precision, engine, threads, decoding), on your models and weights. The logic
lives in mmfuse/bench.py (``PROFILES``, ``apply_profile``).
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from ..paths import DEFAULT_MODEL_REPOSITORY


def register(sub) -> None:
    from ..bench import PROFILES

    p = sub.add_parser("apply-profile", help="copy a model repository with a bench profile's serving settings "
                                             "(instances, batching, precision, engine, decoding), validated offline")
    p.add_argument("profile", choices=sorted(PROFILES), help="cpu, gpu (KIND_GPU, fp16) or baseline")
    p.add_argument("--out", required=True, help="the new repository (must not exist, or be empty)")
    p.add_argument("--model-repository", default=str(DEFAULT_MODEL_REPOSITORY), help="the repository to copy")
    p.add_argument("--separate-decoding", action="store_true",
                   help="keep image_preprocess a model of its own even where the profile folds decoding into "
                        "the image encoder (cpu)")
    p.set_defaults(func=run)


def validate_repository(repository: Path) -> list[str]:
    """Every model checked offline as `mmfuse reconfigure` checks a change (the handlers' own parameter
    parsing without loading weights, Triton's ensemble rules, response-cache guards)."""
    from ..reconfigure import ModelChange, validate
    from ..repository import config_path, load_config, models

    changes = [ModelChange(name, load_config(repository, name), None, config_path(repository, name))
               for name in models(repository)]
    return validate(changes, {}, repository)


def run(args: argparse.Namespace) -> int:
    from ..bench import MERGE_IMAGE_DECODING, PROFILES, apply_profile
    from ..repository import copy_repository

    source, out = Path(args.model_repository), Path(args.out)
    if not (source.is_dir() and any(source.glob("*/config.pbtxt"))):
        print(f"mmfuse apply-profile: {source} is not a model repository (no */config.pbtxt)", file=sys.stderr)
        return 2
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        print(f"mmfuse apply-profile: {out} exists and is not empty; choose a new folder", file=sys.stderr)
        return 2
    if out.exists():
        out.rmdir()
    copy_repository(source, out)
    merge = False if args.separate_decoding else None
    try:
        tuned = apply_profile(out, args.profile, merge_decoding=merge)
        errors = validate_repository(out) if tuned else [
            f"none of the models profile {args.profile!r} tunes ({', '.join(PROFILES[args.profile])}) is in {source}"]
    except ValueError as error:
        errors = [str(error)]
    if errors:
        shutil.rmtree(out)
        for error in errors:
            print(f"mmfuse apply-profile: {error}", file=sys.stderr)
        print(f"mmfuse apply-profile: profile {args.profile!r} does not fit {source}; nothing written",
              file=sys.stderr)
        return 2
    for model in tuned:
        if (out / model).is_dir():
            print(f"tuned   {out / model / 'config.pbtxt'}")
        else:
            print(f"merged  {model} into image_encoder (decode_images: true; its settings and reasons are there)")
    if MERGE_IMAGE_DECODING[args.profile] and args.separate_decoding:
        print("kept    image_preprocess separate (--separate-decoding)")
    print(f"{out}: profile {args.profile!r} applied and validated offline; serve it with "
          f"`mmfuse serve --model-repository {out}`")
    return 0
