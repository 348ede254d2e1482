"""Caption throughput per core: winnow's CoCa captioner (greedy; the image encoded once, then one
decoder pass per token) against the naive loop that calls CoCa's forward with the image every
step (its image tower runs once per token), measured in the same run, at the tiny preset and at
CoCa ViT-L-14's real size with random weights (the compute is the same as with real weights;
both loops run to ``max_new_tokens``). open_clip's own ``generate`` cannot be the baseline here:
it needs transformers' generation classes of the 4.x line and refuses to run with transformers 5.

The vision-language and summary backends (transformers' generation with a KV cache) are measured
the same way against the same generation without the cache (``use_cache=False``: every step runs
the whole prompt and the text so far again, as CoCa's decoder does): at the tiny presets and, with
``--large``, at the size of a real small model with random weights (a Llama decoder shaped like
Qwen2.5-0.5B; for the vlm, CLIP ViT-B/16's vision tower in front, one frame per clip).

    python bench/captions.py [--images 8] [--tokens 20] [--large]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image

from pipeline.models.captioner import CocaCaptioner
from pipeline.models.textgen import SMALL_DIMS, TINY_DIMS, Summarizer, VlmCaptioner, _Generator, tiny_summary, tiny_vlm


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


def bench_hf(kind: str, dims: dict, n: int, tokens: int, batch: int, frames: int, baseline: bool = True) -> dict:
    """Captions/s and new tokens/s of the vlm or summary backend, with the KV cache and without."""
    if kind == "vlm":
        cap = VlmCaptioner(max_new_tokens=tokens)
        if dims is not TINY_DIMS:
            net, cap.processor = tiny_vlm(0, dims)
            cap.gen = _Generator(net, cap.processor.tokenizer, "cpu", tokens, 1)
        pics = images(n * frames)
        rows = [cap.prepare(pics[i * frames:(i + 1) * frames]) for i in range(n)]
    else:
        cap = Summarizer(max_new_tokens=tokens)
        if dims is not TINY_DIMS:
            net, cap.tokenizer = tiny_summary(0, dims)
            cap.gen = _Generator(net, cap.tokenizer, "cpu", tokens, 1)
        rows = [cap.prepare({"caption": f"clip {i} of a street at night", "caption_coca": "a car on a road",
                             "caption_vlm": "cars drive past shops at night, the camera pans left"}) for i in range(n)]
    prompt = int(np.mean([r["input_ids"].shape[-1] for r in rows]))

    def run():
        for i in range(0, n, batch):
            cap.caption(rows[i:i + batch])

    out = {"model": f"{kind} {'tiny' if dims is TINY_DIMS else 'small'}", "batch": batch, "prompt": prompt}
    start = cap.gen.tokens_out
    t = time.perf_counter()
    out["winnow"] = rate(run, n)
    out["tokens_per_s"] = (cap.gen.tokens_out - start) / (time.perf_counter() - t)   # warm-up and timed pass
    if baseline:
        cap.gen.use_cache = False
        out["naive"] = rate(run, n)
    return out


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
    hf = [bench_hf(k, TINY_DIMS, args.images, args.tokens, b, 3) for k in ("vlm", "summary") for b in (1, args.images)]
    if args.large:
        hf += [bench_hf("vlm", SMALL_DIMS, 2, args.tokens // 2, 2, 1, baseline=False),
               bench_hf("summary", SMALL_DIMS, 2, args.tokens // 2, 2, 1)]
    print("vlm (3 frames per clip at the tiny size, 1 at the small) and summary, KV cache against none:")
    for r in hf:
        per_1000 = 1000 / r["winnow"] / 3600
        base = (f"no cache {r['naive']:7.2f}/s ({r['winnow'] / r['naive']:.2f}x)" if "naive" in r
                else "no cache not run (minutes per clip)")
        print(f"  {r['model']:<13} batch {r['batch']:>2}, prompt {r['prompt']:>4} tokens: {r['winnow']:7.2f}/s "
              f"({r['tokens_per_s']:6.1f} tokens/s), {base}; 1,000 clips: {per_1000:.2f} core-hours")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
