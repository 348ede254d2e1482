"""LoRA against full fine-tuning: step time, peak memory and what training holds, on the same UNet.

    python bench/lora.py [--kind sd|sdxl|svd] [--size 256] [--batch 4] [--steps 12] [--rank 16] [--device cpu|cuda]

Each mode runs in a fresh process (so its peak RSS is its own): the family's tiny preset UNet (or
``--pretrained``'s), one fixed batch, ``--steps`` steps of forward, backward and AdamW, the first two
left out of the timing. The LoRA mode goes through ``training.lora.add_lora`` as a run does. Prints
ms per step, peak RSS (CPU) or peak allocated memory (CUDA), and the trainable parameters with their
gradient and AdamW state, and the LoRA / full ratios from the same invocation.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one(args) -> dict:
    import resource
    import tempfile

    import torch

    sys.path.insert(0, ROOT)
    from training import families
    from training.lora import add_lora
    from training.train_spec import LoraSpec

    torch.manual_seed(0)
    fam = families.get(args.kind)
    comps = fam.components(args.pretrained, False, 0, tempfile.mkdtemp(), None)
    unet = comps.unet.to(args.device)
    if args.mode == "lora":
        lo = LoraSpec(enabled=True, rank=args.rank)
        params = add_lora(unet, lo, fam.lora_layers(lo), 0)
    else:
        params = list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)
    lat = args.size // 8
    g = torch.Generator().manual_seed(0)
    b = args.batch
    if "num_frames" in unet.config:             # a spatio-temporal UNet: (B, frames, C, h, w)
        frames = 4
        x = torch.randn(b, frames, unet.config.in_channels, lat, lat, generator=g)
        ctx = torch.randn(b, 1, unet.config.cross_attention_dim, generator=g)
        call = dict(added_time_ids=torch.randn(b, 3, generator=g).to(args.device))
        t = torch.rand(b, generator=g)
    else:
        x = torch.randn(b, unet.config.in_channels, lat, lat, generator=g)
        ctx = torch.randn(b, 77, unet.config.cross_attention_dim, generator=g)
        call = {}
        if unet.config.addition_embed_type == "text_time":
            pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
            call = dict(added_cond_kwargs={"text_embeds": torch.randn(b, pooled, generator=g).to(args.device),
                                           "time_ids": torch.randn(b, 6, generator=g).to(args.device)})
        t = torch.randint(0, 1000, (b,), generator=g)
    x, ctx, t = x.to(args.device), ctx.to(args.device), t.to(args.device)
    target = torch.randn(x.shape[:1] + x.shape[1:-3] + (unet.config.out_channels,) + x.shape[-2:], generator=g).to(
        args.device
    )
    times = []
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.steps):
        if args.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = unet(x, t, ctx, **call).sample
        loss = torch.nn.functional.mse_loss(out, target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    trainable = sum(p.numel() for p in params)
    state = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    peak = (torch.cuda.max_memory_allocated() if args.device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {
        "mode": args.mode,
        "ms_per_step": 1000 * sum(times[2:]) / len(times[2:]),
        "peak_mb": peak / 2**20,
        "trainable": trainable,
        "unet_params": sum(p.numel() for n, p in unet.named_parameters() if ".lora_" not in n),
        "trainable_state_mb": (trainable * 4 * 2 + state) / 2**20,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", default="sd")
    ap.add_argument("--pretrained", default=None, help="a diffusers pipeline folder (default: the tiny preset)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(one(args)))
        return
    rows = {}
    for mode in ("full", "lora"):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--mode", mode]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows[mode] = json.loads(out)
    full, lora = rows["full"], rows["lora"]
    print(f"{args.kind} at {args.size}px, batch {args.batch}, {args.steps} steps ({args.steps - 2} timed), "
          f"rank {args.rank}, {args.device}")
    print(f"  {'mode':<5} {'ms/step':>9} {'peak MB':>9} {'trainable':>11} {'grad+AdamW+weights MB':>22}")
    for r in (full, lora):
        print(f"  {r['mode']:<5} {r['ms_per_step']:>9.1f} {r['peak_mb']:>9.0f} {r['trainable']:>11,} "
              f"{r['trainable_state_mb']:>22.2f}")
    print(f"  lora / full: step time {lora['ms_per_step'] / full['ms_per_step']:.2f}x, peak memory "
          f"{lora['peak_mb'] / full['peak_mb']:.2f}x, trainable {lora['trainable'] / full['trainable']:.4f}x")


if __name__ == "__main__":
    main()
