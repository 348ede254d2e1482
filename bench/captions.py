"""Caption throughput per core: winnow's CoCa captioner (greedy; the image encoded once, then one
decoder pass per token) against the naive loop that calls CoCa's forward with the image every
step (its image tower runs once per token), measured in the same run, at the tiny preset and at
CoCa ViT-L-14's real size with random weights (the compute is the same as with real weights;
both loops run to ``max_new_tokens``). open_clip's own ``generate`` cannot be the baseline here:
it needs transformers' generation classes of the 4.x line and refuses to run with transformers 5.

    python bench/captions.py [--images 8] [--tokens 20] [--large]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image

from pipeline.models.captioner import CocaCaptioner


def images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)) for _ in range(n)]


def rate(fn, n: int) -> float:
    fn()                                   # warm up (allocations, first-call overheads)
    t = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t)


def bench(model: str, n: int, tokens: int, batch: int) -> dict:
    cap = CocaCaptioner(model, None if model.startswith("winnow") else "random", max_new_tokens=tokens)
    x = [cap.prepare(im) for im in images(n)]

    def ours():
        for i in range(0, n, batch):
            cap.caption(x[i:i + batch])

    def naive():
        with torch.inference_mode():
            for i in range(0, n, batch):
                image = torch.stack(x[i:i + batch])
                text = torch.full((len(image), 1), 49406)
                for _ in range(tokens):
                    logits = cap.model(image, text, output_labels=False)["logits"][:, -1]
                    text = torch.cat([text, logits.argmax(-1, keepdim=True)], dim=1)

    return {"model": model, "batch": batch, "winnow": rate(ours, n), "naive": rate(naive, n)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--large", action="store_true", help="also CoCa ViT-L-14 (random weights, ~2.5 GB)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    runs = [bench("winnow-tiny-coca", args.images, args.tokens, b) for b in (1, args.images)]
    if args.large:
        few = max(2, args.images // 4)
        runs += [bench("coca_ViT-L-14", few, args.tokens, b) for b in (1, few)]
    print(f"captions per second on one core, {args.tokens} new tokens each (greedy, run to the cap):")
    for r in runs:
        per_1000 = 1000 / r["winnow"] / 3600
        print(f"  {r['model']:<18} batch {r['batch']:>2}: winnow {r['winnow']:7.2f}/s, naive loop "
              f"{r['naive']:7.2f}/s ({r['winnow'] / r['naive']:.2f}x); 1,000 clips: {per_1000:.2f} core-hours")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
