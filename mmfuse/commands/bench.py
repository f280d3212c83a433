"""mmfuse bench: served throughput and latency against the machine's compute limit, in one run.

The logic lives in the mmfuse.bench package; this module is the command line.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got {text!r}") from None
    if width < 8 or height < 8:
        raise argparse.ArgumentTypeError(f"image size {text!r} is too small")
    return width, height


def _profiles(text: str) -> tuple[str, ...]:
    from ..profiles import AUTO_PROFILES, profile_names

    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if names in ((), ("none",)):
        return ()
    unknown = [n for n in names if n not in profile_names() or n in AUTO_PROFILES]
    if unknown:
        known = [n for n in profile_names() if n not in AUTO_PROFILES]
        raise argparse.ArgumentTypeError(f"not a hand-picked profile: {', '.join(unknown)} (known: {', '.join(known)})")
    return names


def register(sub) -> None:
    from ..profiles import PRECISIONS, profile_names

    p = sub.add_parser("bench", help="measure the serving path against the machine's matmul limit (starts its own "
                                     "tritonserver on a generated ViT-B-32 repository); prints a table, writes JSON")
    p.add_argument("--model", default="ViT-B-32", help="open_clip architecture, random weights (default ViT-B-32)")
    p.add_argument("--profile", choices=profile_names(), default="auto",
                   help="serving settings (default auto: chosen for this machine, printed with the hardware class)")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="replace the profile's encoder precision (int8: OpenVINO, quantised at load)")
    p.add_argument("--compare", type=_profiles,
                   help="comma-separated hand-picked profiles served alone beside --profile under the same load, for "
                        "the 'auto vs best hand-picked' target (default: baseline,cpu,latency on a CPU; baseline,gpu "
                        "on a GPU); 'none' serves none")
    p.add_argument("--baseline", action="store_true",
                   help="also serve the shipped settings (fp32, one instance each) for before/after (it is among the "
                        "compared profiles by default; this adds it to --compare)")
    p.add_argument("--no-latency", dest="latency", action="store_false",
                   help="skip the concurrency-1 runs (p50/p99 of single requests), the auto-latency server and the "
                        "in-process single-image time they are held to")
    p.add_argument("--quick", action="store_true", help="a small, fast run (for tests): few inputs, seconds per step")
    decode = p.add_mutually_exclusive_group()
    decode.add_argument("--jpeg-draft", dest="jpeg_draft", action="store_const", const=True,
                        help="serve with reduced-size JPEG decoding (jpeg_draft; the cpu and gpu profiles' default)")
    decode.add_argument("--exact-decode", dest="jpeg_draft", action="store_const", const=False,
                        help="serve with full-size JPEG decoding (jpeg_draft false; the baseline's)")
    p.add_argument("--rows", type=int, help="rows per request (default 4; quick 2)")
    p.add_argument("--concurrency", type=int, help="requests in flight in the closed loop (default 8; quick 4)")
    p.add_argument("--duration", type=float, help="seconds per served measurement (default 20; quick 3)")
    p.add_argument("--images", type=int, help="distinct input images (default 16; quick 4)")
    p.add_argument("--image-size", type=_size, help="WIDTHxHEIGHT of the generated JPEGs (default 640x480)")
    p.add_argument("--load-generator", choices=("perf_analyzer", "python"), default="perf_analyzer",
                   help="what loads the served runs: Triton's perf_analyzer (default; from the tritonclient wheel) or "
                        "mmfuse's asyncio Python client")
    p.add_argument("--no-served", action="store_true", help="in-process measurements only (no tritonserver)")
    p.add_argument("--out", default="", help="write the full results as JSON to this file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..bench import BenchOptions, run_bench, table, write_json
    from ..perf_analyzer import PerfAnalyzerError
    from ..profiles import load_profile
    from ..server import ServerError

    options = BenchOptions.quick_options() if args.quick else BenchOptions()
    options.model, options.profile, options.baseline = args.model, args.profile, args.baseline
    options.precision, options.compare, options.latency = args.precision, args.compare, args.latency
    options.jpeg_draft, options.served = args.jpeg_draft, not args.no_served
    try:
        # auto: chosen for this machine here; a precision it cannot serve (bf16 without bf16 units) is refused
        settings = load_profile(args.profile, args.precision)
    except ValueError as error:
        print(f"mmfuse bench: {error}", file=sys.stderr)
        return 2
    if any(t.kind == "KIND_GPU" for t in settings.models.values()):
        import torch

        if not torch.cuda.is_available():
            print(f"mmfuse bench: --profile {args.profile} needs a CUDA GPU (KIND_GPU instances); none is visible here",
                  file=sys.stderr)
            return 2
        options.device = "cuda"
    if args.images is not None:
        options.images = args.images
    if args.image_size is not None:
        options.image_size = args.image_size
    plan = options.plan
    plan.load_generator = args.load_generator
    for name, value in (("rows", args.rows), ("concurrency", args.concurrency), ("duration_s", args.duration)):
        if value is not None:
            if value <= 0:
                print(f"mmfuse bench: --{name.split('_')[0]} must be > 0", file=sys.stderr)
                return 2
            setattr(plan, name, type(getattr(plan, name))(value))
    if options.images < 1:
        print("mmfuse bench: --images must be >= 1", file=sys.stderr)
        return 2
    try:
        if options.served and plan.load_generator == "perf_analyzer":  # before minutes of in-process measurements
            from ..perf_analyzer import find_perf_analyzer, library_dir

            find_perf_analyzer()
            library_dir()
        result = run_bench(options, progress=lambda message: print(f"mmfuse bench: {message}", file=sys.stderr, flush=True))
    except (ServerError, PerfAnalyzerError) as error:
        print(f"mmfuse bench: {error}", file=sys.stderr)
        return 1
    print(table(result))
    if args.out:
        write_json(result, Path(args.out))
        print(f"wrote {args.out}")
    return 0
