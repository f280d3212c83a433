"""mmfuse embed {image,text} PATH... --out FILE.npy|FILE.jsonl  (a running server; pipelined asyncio calls)"""
from __future__ import annotations

import argparse
import asyncio
import sys
from collections import Counter

from ._client_args import client_options
from ._io import InputError, RowWriter, add_batch_args, check_output, decode, image_files, run_to_writer, text_rows


def register(sub) -> None:
    p = sub.add_parser("embed", help="embed image files / folders or text files through embed_image / embed_text "
                                     "into .npy or JSONL (progress bar)")
    p.add_argument("modality", choices=("image", "text"))
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="image: files or folders (recursive); text: files with one text per line, folders of "
                        ".txt files, or - for stdin")
    add_batch_args(p)
    p.set_defaults(func=run)


async def embed_rows(client, sources: list[str], load, writer: RowWriter, window: int, progress) -> Counter:
    """Embed rows ``window`` at a time; the next window's files are read while this one is in flight."""
    statuses: Counter = Counter()
    starts = list(range(0, len(sources), window))
    pending = asyncio.ensure_future(asyncio.to_thread(load, 0, window))
    for start in starts:
        data = await pending
        if start + window < len(sources):
            pending = asyncio.ensure_future(asyncio.to_thread(load, start + window, window))
        response = await client.infer(client.request_type(data), progress=progress)
        status = decode(response.status)
        statuses.update(status)
        writer.write(response.embedding, [
            {"source": src, "valid": bool(v), "status": s}
            for src, v, s in zip(sources[start:start + window], response.valid.reshape(-1), status)])
    return statuses


def run(args: argparse.Namespace) -> int:
    from mmfuse.clients.embed_image import AsyncEmbedImageClient
    from mmfuse.clients.embed_text import AsyncEmbedTextClient

    try:
        out = check_output(args.out)
        if args.modality == "image":
            files = image_files(args.paths)
            sources = [str(f) for f in files]
            load = lambda start, n: [f.read_bytes() for f in files[start:start + n]]  # noqa: E731
        else:
            rows = text_rows(args.paths)
            sources = [src for src, _ in rows]
            load = lambda start, n: [text for _, text in rows[start:start + n]]  # noqa: E731
        if not sources:
            raise InputError(f"no {args.modality} inputs found in {' '.join(args.paths)}")
        options = client_options(args, max_batch=args.batch, max_in_flight=args.in_flight)
    except (InputError, ValueError) as error:
        print(f"mmfuse embed: {error}", file=sys.stderr)
        return 2
    client_type = AsyncEmbedImageClient if args.modality == "image" else AsyncEmbedTextClient
    writer = RowWriter(out, len(sources), "embedding")

    async def main() -> Counter:
        from tqdm import tqdm

        async with client_type(options=options) as client:
            with tqdm(total=len(sources), desc=client.spec.name, unit=args.modality, file=sys.stderr,
                      disable=args.no_progress, dynamic_ncols=True) as bar:
                return await embed_rows(client, sources, load, writer, args.batch * args.in_flight * 8, bar)

    return run_to_writer("embed", main, writer, f"embedded {len(sources)} {args.modality} rows")
