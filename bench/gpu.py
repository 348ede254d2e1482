"""The GPU bench in one command: real-size models with random weights (nothing downloads), each
measured for a fixed number of timed steps after warm-up, written as one JSON file and a table.

    python bench/gpu.py [--out bench/gpu.json] [--steps 10]     # on a GPU machine (a few minutes)
    python bench/gpu.py --smoke                                  # tiny sizes, any machine: the script runs

Measures (bf16 autocast on GPU, fp32 on CPU):
* SD 1.x UNet training step at 512 px (64x64 latents) and SDXL's at 1024 px (128x128), with and
  without gradient checkpointing: samples/s, peak memory, and MFU from the FLOPs one step counts
  (torch.utils.flop_counter) against the card's dense bf16 peak;
* SVD's spatio-temporal UNet, 14 frames at 320x576 (40x72 latents): samples/s, peak memory, MFU;
* CLIP ViT-L/14 image embedding (open_clip, random weights): images/s;
* the summary captioner at a real small size (a 0.5B Llama, KV cache): new tokens/s;
* video decode: PyAV on the CPU, frames/s (and torchcodec on the GPU when it is installed).
Peaks it knows: H100 and H200 989 TFLOP/s dense bf16, A100 312, L4 121; others leave MFU empty.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0}


def device_info():
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        return "cuda", name, peak
    return "cpu", platform.processor() or platform.machine(), None


def sd_unet(kind: str, smoke: bool):
    """SD 1.x (cross-attention 768) or SDXL (text_time, 2048) UNet configs from their papers' releases."""
    from diffusers import UNet2DConditionModel

    if smoke:
        return UNet2DConditionModel(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D",
                                    "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                    layers_per_block=1, cross_attention_dim=32, attention_head_dim=4,
                                    sample_size=8), 32, 8
    if kind == "sd":
        return UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, sample_size=64), 768, 64
    return UNet2DConditionModel(
        sample_size=128, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816), 2048, 128


def train_step_bench(name: str, model, make_inputs, batch: int, steps: int, device: str, peak, checkpointing: bool):
    """Seconds per optimiser step (forward, MSE, backward, AdamW), peak memory and MFU."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model = model.to(device).train()
    if checkpointing:
        model.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device == "cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu",
                                                                                                    enabled=False)

    def one():
        inputs, target = make_inputs(batch)
        with autocast:
            out = model(**inputs).sample
        loss = torch.nn.functional.mse_loss(out.float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    one()                                        # warm-up: kernels, allocator, optimiser state
    with FlopCounterMode(display=False) as counter:
        one()
    flops = counter.get_total_flops()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(steps):
        one()
    if device == "cuda":
        torch.cuda.synchronize()
    sec = (time.perf_counter() - t) / steps
    mem = torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else None
    tflops = flops / sec / 1e12
    model.to("cpu")
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"bench": name, "batch": batch, "gradient_checkpointing": checkpointing, "samples_per_s": batch / sec,
            "step_s": sec, "peak_memory_gib": mem, "tflops_per_step": flops / 1e12, "achieved_tflops": tflops,
            "mfu": tflops / peak if peak else None}


def unet_inputs(unet, ctx_dim: int, side: int, device: str, sdxl: bool):
    import torch

    def make(batch):
        x = torch.randn(batch, 4, side, side, device=device)
        inputs = {"sample": x, "timestep": torch.randint(0, 1000, (batch,), device=device),
                  "encoder_hidden_states": torch.randn(batch, 77, ctx_dim, device=device)}
        if sdxl:
            inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 1280, device=device),
                                           "time_ids": torch.randn(batch, 6, device=device)}
        return inputs, torch.randn_like(x)
    return make


def svd_bench(smoke: bool, device: str, peak, steps: int, batch: int):
    import torch
    from diffusers import UNetSpatioTemporalConditionModel

    if smoke:
        unet = UNetSpatioTemporalConditionModel(block_out_channels=(32, 64), down_block_types=(
            "CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"), up_block_types=(
            "UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"), layers_per_block=1, cross_attention_dim=32,
            num_attention_heads=(2, 4), projection_class_embeddings_input_dim=96, addition_time_embed_dim=32,
            sample_size=8)
        frames, h, w, ctx = 4, 8, 8, 32
    else:
        unet = UNetSpatioTemporalConditionModel()           # the released SVD UNet's configuration
        frames, h, w, ctx = 14, 40, 72, 1024

    def make(b):
        x = torch.randn(b, frames, 8, h, w, device=device)
        inputs = {"sample": x, "timestep": torch.rand(b, device=device),
                  "encoder_hidden_states": torch.randn(b, 1, ctx, device=device),
                  "added_time_ids": torch.randn(b, 3, device=device)}
        return inputs, torch.randn(b, frames, 4, h, w, device=device)
    return train_step_bench(f"svd unet {frames}x{h * 8}x{w * 8}", unet, make, batch, steps, device, peak, True)


def clip_bench(smoke: bool, device: str, steps: int) -> dict:
    import torch

    from pipeline.models.clip import ClipModel

    clip = ClipModel("winnow-tiny-clip" if smoke else "ViT-L-14", None if smoke else "random", device=device)
    x = torch.randn(64 if not smoke else 4, 3, clip.image_size, clip.image_size)
    clip.embed_images(list(x))
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        clip.embed_images(list(x))
    if device == "cuda":
        torch.cuda.synchronize()
    return {"bench": f"clip {clip.name} image embedding", "batch": len(x),
            "images_per_s": len(x) * steps / (time.perf_counter() - t), "precision": str(clip.dtype)}


def caption_bench(smoke: bool, device: str) -> dict:
    from pipeline.models.textgen import SMALL_DIMS, Summarizer, _Generator, tiny_summary

    cap = Summarizer(max_new_tokens=32, device=device)
    if not smoke:
        net, cap.tokenizer = tiny_summary(0, SMALL_DIMS)
        if device == "cuda":
            import torch

            net = net.to(torch.bfloat16)
        cap.gen = _Generator(net, cap.tokenizer, device, 32, 1)
    rows = [cap.prepare({"caption": f"clip {i}", "caption_coca": "a car on a road at night",
                         "caption_vlm": "cars pass shops; the camera pans left"}) for i in range(32)]
    cap.caption(rows[:4])
    start, t = cap.gen.tokens_out, time.perf_counter()
    cap.caption(rows)
    sec = time.perf_counter() - t
    return {"bench": f"summary captioner ({'tiny' if smoke else 'Llama 0.5B shape'}, batch 32, 32 new tokens)",
            "tokens_per_s": (cap.gen.tokens_out - start) / sec, "captions_per_s": len(rows) / sec,
            "size": "tiny" if smoke else "0.5B Llama (Qwen2.5-0.5B's shape), bf16 on GPU"}


def decode_bench(smoke: bool) -> list[dict]:
    import av

    from pipeline.synth import shot, write_video

    side = (96, 64) if smoke else (1280, 720)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "v.mp4")
        write_video(path, shot(48 if smoke else 240, side[0], side[1], 0, motion=2.0), fps=24.0, crf=23)
        out = []
        t = time.perf_counter()
        with av.open(path) as c:
            n = sum(1 for _ in c.decode(video=0))
        out.append({"bench": f"video decode {side[0]}x{side[1]} H.264, PyAV on CPU (1 thread)",
                    "frames_per_s": n / (time.perf_counter() - t)})
        try:
            from torchcodec.decoders import VideoDecoder
        except ImportError:
            out.append({"bench": "video decode on GPU", "skipped": "torchcodec is not installed"})
            return out
        import torch

        dev = "cuda" if torch.cuda.is_available() else "cpu"
        t = time.perf_counter()
        dec = VideoDecoder(path, device=dev)
        n = len(dec[:])
        out.append({"bench": f"video decode {side[0]}x{side[1]} H.264, torchcodec on {dev}",
                    "frames_per_s": n / (time.perf_counter() - t)})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "gpu.json"))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, 1 timed step each: check the script runs")
    args = ap.parse_args()
    import torch

    device, name, peak = device_info()
    steps = 1 if args.smoke else args.steps
    if device == "cpu" and not args.smoke:
        print("no GPU here: run with --smoke to check the script, or on a GPU machine", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    results: list[dict] = []

    def attempt(label: str, fn) -> None:
        """One measurement; running out of memory is a recorded result, not the end of the bench."""
        try:
            got = fn()
        except torch.cuda.OutOfMemoryError as exc:
            got = {"bench": label, "skipped": f"out of memory: {str(exc).splitlines()[0][:160]}"}
            torch.cuda.empty_cache()
        for r in got if isinstance(got, list) else [got]:
            results.append(r)
            print(json.dumps(r), flush=True)

    for kind, batch in (("sd", 1 if args.smoke else 16), ("sdxl", 1 if args.smoke else 4)):
        for ckpt in (False, True):
            def run(kind=kind, batch=batch, ckpt=ckpt):
                unet, ctx, side = sd_unet(kind, args.smoke)
                label = f"{kind} unet {side * 8}px" if not args.smoke else f"{kind} unet (smoke)"
                make = unet_inputs(unet, ctx, side, device, kind == "sdxl" and not args.smoke)
                return train_step_bench(label, unet, make, batch, steps, device, peak, ckpt)
            attempt(f"{kind} unet, batch {batch}, checkpointing {ckpt}", run)
    attempt("svd unet", lambda: svd_bench(args.smoke, device, peak, steps, 1))
    attempt("clip", lambda: clip_bench(args.smoke, device, steps))
    attempt("captioner", lambda: caption_bench(args.smoke, device))
    attempt("video decode", lambda: decode_bench(args.smoke))
    doc = {"device": name, "peak_bf16_tflops": peak, "torch": torch.__version__, "smoke": args.smoke,
           "results": results}
    with open(args.out, "w") as fh:
        json.dump(doc, fh, indent=2)
    print(f"\n{name} (peak bf16 {peak or '?'} TFLOP/s); written to {args.out}")
    for r in results:
        vals = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()
                         if k != "bench" and v is not None)
        print(f"  {r['bench']:<48} {vals}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
