"""Training-step throughput and peak memory of the spatio-temporal UNet, with and without gradient
checkpointing (the baseline is the same UNet without it, measured in the same run), and the
per-worker state memory with ``train.fsdp``.

    python bench/svd_unet.py --size svd --device cuda            # SVD's UNet at 320x576 x 14 frames (a GPU)
    python bench/svd_unet.py --size small                        # the same geometry, narrow widths (CPU)
    python bench/svd_unet.py --size small --fsdp-workers 2       # + state bytes per worker, sharded or not

``--size svd`` is the released img2vid UNet's configuration (1.52 B parameters, random weights:
speed and memory do not depend on the values); ``small`` keeps its depth, frames and resolution
with a fifth of its widths (heads of 64 channels, as SVD). One step is SVD's: latents (B, F, 4, H/8, W/8) plus the 4
concatenated channels, one sigma per video, EDM v-loss, backward, AdamW. Each configuration runs
in a fresh process so its peak memory is its own (CUDA: ``max_memory_allocated``; CPU: peak RSS).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
sys.path.insert(0, ROOT)

SIZES = {
    # stabilityai/stable-video-diffusion-img2vid unet/config.json
    "svd": dict(
        block_out_channels=(320, 640, 1280, 1280),
        num_attention_heads=(5, 10, 20, 20),
        cross_attention_dim=1024,
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=768,
        layers_per_block=2,
    ),
    "small": dict(
        block_out_channels=(64, 128, 256, 256),
        num_attention_heads=(1, 2, 4, 4),
        cross_attention_dim=256,
        addition_time_embed_dim=64,
        projection_class_embeddings_input_dim=192,
        layers_per_block=2,
    ),
}


def build(size: str, frames: int):
    import torch
    from diffusers import UNetSpatioTemporalConditionModel

    torch.manual_seed(0)
    return UNetSpatioTemporalConditionModel(
        sample_size=96, in_channels=8, out_channels=4, num_frames=frames,
        down_block_types=("CrossAttnDownBlockSpatioTemporal",) * 3 + ("DownBlockSpatioTemporal",),
        up_block_types=("UpBlockSpatioTemporal",) + ("CrossAttnUpBlockSpatioTemporal",) * 3, **SIZES[size])


def step_fn(unet, args, device, dtype):
    import torch

    from training.objectives import EDM, sample_sigmas

    edm = EDM(1.0)
    g = torch.Generator().manual_seed(1)
    b, f, h, w = args.batch, args.frames, args.height // 8, args.width // 8
    latents = torch.randn(b, f, 4, h, w, generator=g).to(device)
    cond = torch.randn(b, 1, 4, h, w, generator=g).expand(b, f, 4, h, w).to(device)
    context = torch.randn(b, 1, unet.config.cross_attention_dim, generator=g).to(device)
    ids = torch.tensor([[6.0, 127.0, 0.02]] * b, device=device)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-5)

    def step():
        sigma = sample_sigmas(b, 0.7, 1.6, g).to(device)
        noisy = edm.noisy(latents, torch.randn(latents.shape, generator=g).to(device), sigma)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = unet(torch.cat([edm.model_input(noisy, sigma), cond], 2), edm.c_noise(sigma), context,
                       added_time_ids=ids).sample
        loss = edm.loss(noisy, out.float(), latents, sigma).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def one(args) -> dict:
    """Run one configuration in this process; print its JSON line."""
    import resource

    import torch

    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    unet = build(args.size, args.frames).to(device)
    if args.checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    step = step_fn(unet, args, device, dtype)
    for _ in range(args.warmup):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync()
    dt = (time.perf_counter() - t0) / args.steps
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"checkpointing": args.checkpointing, "s_per_step": dt, "videos_per_s": args.batch / dt,
            "frames_per_s": args.batch * args.frames / dt, "peak_gib": peak / 2 ** 30,
            "params_m": sum(p.numel() for p in unet.parameters()) / 1e6, "loss": float(loss.detach())}


def _fsdp_worker(rank: int, world: int, args, port: int, queue) -> None:
    import warnings

    import torch
    import torch.distributed as dist

    # FSDP2 warns that the blocks return views (diffusers' blocks never modify them in place)
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from training.sharding import shard_training

    unet = build(args.size, args.frames)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    if args.sharded:
        def make(m):
            o = torch.optim.AdamW(m.parameters(), lr=1e-5)
            return o, torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0)
        opt, sched = shard_training(unet, opt, sched, None, make)
    from training.objectives import EDM, sample_sigmas

    # state bytes do not depend on the input: a small one keeps the two steps quick
    b, frames, h, w = 1, 4, 8, 8
    edm, g = EDM(1.0), torch.Generator().manual_seed(1 + rank)
    latents = torch.randn(b, frames, 4, h, w, generator=g)
    context = torch.randn(b, 1, unet.config.cross_attention_dim, generator=g)
    ids = torch.tensor([[6.0, 127.0, 0.02]] * b)
    loss = None
    for _ in range(2):
        sigma = sample_sigmas(b, 0.7, 1.6, g)
        noisy = edm.noisy(latents, torch.randn(latents.shape, generator=g), sigma)
        x = torch.cat([edm.model_input(noisy, sigma), torch.zeros_like(latents)], 2)
        loss = edm.loss(noisy, unet(x, edm.c_noise(sigma), context, added_time_ids=ids).sample, latents, sigma).mean()
        loss.backward()
        opt.step()
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t       # noqa: E731
    params = sum(local(p).numel() * 4 for p in unet.parameters())
    grads = sum(local(p.grad).numel() * 4 for p in unet.parameters() if p.grad is not None)
    state = sum(local(v).numel() * v.element_size() for s in opt.state.values() for v in s.values()
                if torch.is_tensor(v) and v.ndim)
    if rank == 0:
        queue.put(
            {
                "sharded": args.sharded,
                "params_gib": params / 2**30,
                "grads_gib": grads / 2**30,
                "adam_gib": state / 2**30,
                "total_gib": (params + grads + state) / 2**30,
                "loss": float(loss.detach()),
            }
        )
    dist.destroy_process_group()


def fsdp_states(args) -> list[dict]:
    """Per-worker bytes of parameters, gradients and AdamW state after two steps on ``--fsdp-workers``
    CPU processes (gloo), unsharded (DDP-like: every worker holds all) and sharded."""
    import torch.multiprocessing as mp

    rows = []
    for sharded in (False, True):
        args.sharded = sharded
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        mp.start_processes(_fsdp_worker, args=(args.fsdp_workers, args, 29600 + sharded, queue),
                           nprocs=args.fsdp_workers, start_method="spawn")
        rows.append(queue.get())
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--height", type=int, default=320)
    ap.add_argument("--width", type=int, default=576)
    ap.add_argument("--frames", type=int, default=14)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--fsdp-workers", type=int, default=0, help="also measure per-worker state bytes on N CPU workers")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args)), flush=True)
        return 0
    base = [sys.executable, os.path.abspath(__file__), "--one", "--size", args.size, "--device", args.device,
            "--dtype", args.dtype, "--height", str(args.height), "--width", str(args.width), "--frames",
            str(args.frames), "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    print(f"SVD UNet ({args.size}) training step, {args.batch} x {args.frames} frames x {args.height}x{args.width}, "
          f"{args.dtype} on {args.device}")
    results = []
    for ckpt in (False, True):
        out = subprocess.run(base + (["--checkpointing"] if ckpt else []), capture_output=True, text=True)
        if out.returncode:
            print(
                f"  checkpointing={ckpt}: failed "
                f"({out.stderr.strip().splitlines()[-1] if out.stderr else out.returncode})"
            )
            results.append(None)
            continue
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"  {'':<24}{'params':>9}{'s/step':>9}{'videos/s':>10}{'frames/s':>10}{'peak GiB':>10}")
    for name, r in zip(("no checkpointing", "gradient checkpointing"), results, strict=True):
        if r:
            print(f"  {name:<24}{r['params_m']:>8.0f}M{r['s_per_step']:>9.2f}{r['videos_per_s']:>10.3f}"
                  f"{r['frames_per_s']:>10.2f}{r['peak_gib']:>10.2f}")
    if all(results):
        a, b = results
        print(f"  checkpointing: {b['s_per_step'] / a['s_per_step']:.2f}x the step time, "
              f"{b['peak_gib'] / a['peak_gib']:.2f}x the peak memory")
    if args.fsdp_workers:
        rows = fsdp_states(args)
        print(f"\n  per-worker state after 2 steps on {args.fsdp_workers} CPU workers (GiB)")
        print(f"  {'':<12}{'params':>9}{'grads':>9}{'AdamW':>9}{'total':>9}")
        for r in rows:
            print(f"  {'fsdp' if r['sharded'] else 'unsharded':<12}{r['params_gib']:>9.3f}{r['grads_gib']:>9.3f}"
                  f"{r['adam_gib']:>9.3f}{r['total_gib']:>9.3f}")
        print(f"  fsdp holds {rows[1]['total_gib'] / rows[0]['total_gib']:.2f}x the unsharded state per worker")
    return 0


if __name__ == "__main__":
    sys.exit(main())
