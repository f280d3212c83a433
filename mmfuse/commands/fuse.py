"""mmfuse fuse PAIRS --out FILE.npy|FILE.jsonl  (image/text pairs through fuse_image_text)"""
from __future__ import annotations

import argparse
import asyncio
import sys
from collections import Counter

from ._client_args import client_options
from ._io import InputError, RowWriter, add_batch_args, check_output, decode, pair_rows, run_to_writer

MODALITIES = ("image", "text")  # fuse_image_text's MODALITY_MASK / MODALITY_STATUS order


def register(sub) -> None:
    p = sub.add_parser("fuse", help="fuse image/text pairs (a JSONL file or a folder of image + same-stem .txt) "
                                    "through fuse_image_text into .npy or JSONL")
    p.add_argument("pairs", help='JSONL with {"image": path or null, "text": str or null} per line (paths relative '
                                 "to the file), or a folder where cat.jpg pairs with cat.txt")
    add_batch_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mmfuse.clients.fuse_image_text import AsyncFuseImageTextClient, FuseImageTextRequest

    try:
        out = check_output(args.out)
        rows = pair_rows(args.pairs)
        if not rows:
            raise InputError(f"no pairs found in {args.pairs}")
        options = client_options(args, max_batch=args.batch, max_in_flight=args.in_flight)
    except (InputError, ValueError) as error:
        print(f"mmfuse fuse: {error}", file=sys.stderr)
        return 2
    writer = RowWriter(out, len(rows), "fused")
    window = args.batch * args.in_flight * 8

    def load(start: int) -> FuseImageTextRequest:
        part = rows[start:start + window]
        return FuseImageTextRequest(image=[r["image"].read_bytes() if r["image"] else None for r in part],
                                    text=[r["text"] for r in part])

    async def main() -> Counter:
        from tqdm import tqdm

        statuses: Counter = Counter()
        async with AsyncFuseImageTextClient(options=options) as client:
            with tqdm(total=len(rows), desc=client.spec.name, unit="pair", file=sys.stderr,
                      disable=args.no_progress, dynamic_ncols=True) as bar:
                pending = asyncio.ensure_future(asyncio.to_thread(load, 0))
                for start in range(0, len(rows), window):
                    request = await pending
                    if start + window < len(rows):
                        pending = asyncio.ensure_future(asyncio.to_thread(load, start + window))
                    response = await client.infer(request, progress=bar)
                    out_rows = []
                    for i, row in enumerate(rows[start:start + window]):
                        status = decode(response.modality_status[i])
                        statuses.update(f"{m}={s}" for m, s in zip(MODALITIES, status))
                        out_rows.append({
                            "source": row["source"],
                            "image": None if row["image"] is None else str(row["image"]),
                            "text": row["text"],
                            "modality_mask": dict(zip(MODALITIES, map(bool, response.modality_mask[i]))),
                            "modality_status": dict(zip(MODALITIES, status)),
                        })
                    writer.write(response.fused, out_rows)
        return statuses

    return run_to_writer("fuse", main, writer, f"fused {len(rows)} pairs")
