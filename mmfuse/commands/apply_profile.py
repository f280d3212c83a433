"""mmfuse apply-profile [PROFILE] --out DIR [--model-repository SRC] [--precision P] [--separate-decoding]

Writes a copy of a model repository with a serving profile's settings (mmfuse/profiles/*.json: instances,
batching, precision, engine, threads, decoding topology), on your models and weights; ``mmfuse.profiles``.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from ..paths import DEFAULT_MODEL_REPOSITORY
from .init import print_auto_choice


def register(sub) -> None:
    from ..profiles import PRECISIONS, profile_names

    p = sub.add_parser("apply-profile", help="copy a model repository with a bench profile's serving settings "
                                             "(instances, batching, precision, engine, decoding), validated offline")
    p.add_argument("profile", nargs="?", default="auto", choices=profile_names(),
                   help="auto (default: detect this machine and pick engine, precision, instances, threads, batching "
                        "and decoding; auto-latency for single requests), cpu, latency, gpu (KIND_GPU, fp16), baseline")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="the encoders' precision instead of the profile's (int8: NNCF quantisation on OpenVINO)")
    p.add_argument("--out", required=True, help="the new repository (must not exist, or be empty)")
    p.add_argument("--model-repository", default=str(DEFAULT_MODEL_REPOSITORY), help="the repository to copy")
    p.add_argument("--separate-decoding", action="store_true",
                   help="keep image_preprocess a model of its own even where the profile folds decoding into "
                        "the image encoder (cpu)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..profiles import apply_profile, load_profile
    from ..reconfigure import validate_repository
    from ..repository import copy_repository

    source, out = Path(args.model_repository), Path(args.out)
    if not (source.is_dir() and any(source.glob("*/config.pbtxt"))):
        print(f"mmfuse apply-profile: {source} is not a model repository (no */config.pbtxt)", file=sys.stderr)
        return 2
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        print(f"mmfuse apply-profile: {out} exists and is not empty; choose a new folder", file=sys.stderr)
        return 2
    try:
        profile = load_profile(args.profile, args.precision)
    except ValueError as error:
        print(f"mmfuse apply-profile: {error}", file=sys.stderr)
        return 2
    if out.exists():
        out.rmdir()
    copy_repository(source, out)
    try:
        tuned = apply_profile(out, profile, decoding="separate" if args.separate_decoding else None)
        errors = validate_repository(out) if tuned else [
            f"none of the models profile {args.profile!r} tunes ({', '.join(profile.models)}) is in {source}"]
    except ValueError as error:
        errors = [str(error)]
    if errors:
        shutil.rmtree(out)
        for error in errors:
            print(f"mmfuse apply-profile: {error}", file=sys.stderr)
        print(f"mmfuse apply-profile: profile {args.profile!r} does not fit {source}; nothing written",
              file=sys.stderr)
        return 2
    print_auto_choice(args.profile, args.precision)
    for model in tuned:
        if (out / model).is_dir():
            print(f"tuned   {out / model / 'config.pbtxt'}")
        else:
            print(f"merged  {model} into image_encoder (decode_images: true; its settings and reasons are there)")
    if profile.merges_decoding and args.separate_decoding:
        print("kept    image_preprocess separate (--separate-decoding)")
    print(f"{out}: profile {args.profile!r} applied and validated offline; serve it with "
          f"`mmfuse serve --model-repository {out}`")
    return 0
