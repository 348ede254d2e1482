"""Benchmark the model stages on this machine: images/s per stage, OCR backends side by side.

    python bench/scorers.py [--images 48] [--threads 1] [--gpu]

Measured in one run on the same decoded images (the demo corpus's photos and posters):
  * CLIP image+caption embedding: the tiny preset and ViT-B-32 (random weights: speed only);
  * the aesthetic head on those embeddings;
  * OCR: EasyOCR and RapidOCR at several ``max_side`` downscales; RapidOCR / EasyOCR ratio;
    where ../shared/data/ocr/mmocr_icdar2015_toy is present, each backend's text-area fraction
    against its ground truth (mean absolute error);
  * semantic dedup on planted near-duplicates: k-means clustered vs exact (time and recall).
``--gpu`` adds ViT-L-14 at batch 256 in fp16 and bf16 vs the GPU's FLOP limit, and EasyOCR on GPU.
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from curation.aesthetic import AestheticConfig, AestheticScore  # noqa: E402
from curation.clip import ClipConfig, ClipEmbed  # noqa: E402
from curation.decode import DecodeConfig, DecodeImages  # noqa: E402
from curation.ocr import OcrConfig, OcrText  # noqa: E402
from curation.semantic_dedup import SemanticDedup, SemanticDedupConfig  # noqa: E402
from pipeline.corpus import make_corpus  # noqa: E402
from pipeline.shards import TableRows, embedding_array  # noqa: E402

ICDAR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "ocr", "mmocr_icdar2015_toy")
VIT_L14_GFLOPS = 81.0   # forward, 224 px, per image (issue 3)


def decoded_batch(n: int, root: str) -> dict:
    make_corpus(root, n_images=n - n // 8, seed=5, bad=False, duplicates=0, max_side=1600, text_images=n // 8)
    files = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(root) for f in fs if not f.endswith(".txt"))
    raw = [open(f, "rb").read() for f in files]  # noqa: SIM115
    batch = {"raw_bytes": np.array(raw, dtype=object), "caption": np.array(["a photo"] * len(raw), dtype=object)}
    return DecodeImages(DecodeConfig(max_side=1024))(batch)


def fresh(batch: dict) -> dict:
    n = len(batch["image"])
    return {"image": batch["image"], "caption": batch["caption"], "status": np.array(["kept"] * n, dtype=object),
            "reject_reason": np.array([None] * n, dtype=object)}


def rate(stage, batch: dict, chunk: int) -> tuple[float, dict]:
    n = len(batch["image"])
    stage({k: v[:2] for k, v in fresh(batch).items()})       # warm-up
    t = time.perf_counter()
    outs = [stage({k: v[i:i + chunk] for k, v in fresh(batch).items()}) for i in range(0, n, chunk)]
    dt = time.perf_counter() - t
    merged = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
    return n / dt, merged


def icdar_error(backend: str, max_side: int) -> tuple[float, int, float] | None:
    if not os.path.isdir(ICDAR):
        return None
    stage = OcrText(OcrConfig(backend=backend, max_side=max_side))
    errors, truths = [], []
    with open(os.path.join(ICDAR, "text_area_fraction.csv"), encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            path = os.path.join(ICDAR, "det_imgs", row["image"])
            if not os.path.exists(path):
                path = os.path.join(ICDAR, row["image"])
            if not os.path.exists(path):
                continue
            _, ratio = stage.read(open(path, "rb").read())  # noqa: SIM115
            truths.append(float(row["text_area_fraction_all"]))
            errors.append(abs(ratio - truths[-1]))
    return (float(np.mean(errors)), len(errors), float(np.mean(truths))) if errors else None


def planted(n: int, dups: int, dim: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, dim)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    src = rng.choice(n, dups, replace=False)
    noisy = base[src] + rng.normal(scale=0.15 / np.sqrt(dim), size=(dups, dim)).astype(np.float32)  # cosine ~0.99
    emb = np.concatenate([base, noisy / np.linalg.norm(noisy, axis=1, keepdims=True)])
    import pyarrow as pa
    keys = [f"{i:09d}" for i in range(len(emb))]
    table = pa.table({"key": keys, "status": ["kept"] * len(keys), "width": [100] * n + [50] * dups,
                      "height": [100] * len(keys), "clip_image_embedding": embedding_array(emb)})
    return table, {f"{n + j:09d}" for j in range(dups)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1, help="torch / onnxruntime threads (1 = per-core figures)")
    ap.add_argument("--dedup-rows", type=int, default=100_000)
    ap.add_argument("--gpu", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, threads {args.threads}")
    with tempfile.TemporaryDirectory() as tmp:
        batch = decoded_batch(args.images, tmp)
    n = len(batch["image"])
    print(f"{n} decoded images (longest side <= 1024; {args.images // 8} are text posters)\n")

    results = {}
    for label, cfg in [("clip tiny (winnow-tiny-clip)", ClipConfig(device="cpu", cpus_per_worker=args.threads)),
                       ("clip ViT-B-32 (random weights)", ClipConfig(model="ViT-B-32", pretrained="random",
                                                                     device="cpu", cpus_per_worker=args.threads))]:
        r, out = rate(ClipEmbed(cfg), batch, 16)
        results[label] = r
        print(f"{label:40s} {r:8.1f} img/s")
    emb_batch = {**fresh(batch), "clip_image_embedding": out["clip_image_embedding"]}
    head = AestheticScore(AestheticConfig())
    t = time.perf_counter()
    for _ in range(20):
        head({k: v.copy() if isinstance(v, np.ndarray) else v for k, v in emb_batch.items()})
    print(f"{'aesthetic head (LAION MLP, 512-d)':40s} {20 * n / (time.perf_counter() - t):8.0f} img/s")

    ocr_rates = {}
    for backend, sides in [("easyocr", (640, 512)), ("rapidocr", (640, 512, 384))]:
        for side in sides:
            stage = OcrText(OcrConfig(backend=backend, max_side=side, device="cpu", cpus_per_worker=args.threads))
            r, out = rate(stage, batch, 8)
            ocr_rates[(backend, side)] = r
            posters = int(sum(1 for t in out["ocr_text"][-(args.images // 8):] if t and len(t) > 20))
            err = icdar_error(backend, side)
            extra = (f"; ICDAR2015 toy: text-area MAE {err[0]:.4f} over {err[1]} images, mean true area "
                     f"{err[2]:.4f}") if err else ""
            print(f"{'ocr ' + backend + f' max_side {side}':40s} {r:8.2f} img/s  (posters read: {posters}/"
                  f"{args.images // 8}{extra})")
    for side in (640, 512):
        print(
            f"rapidocr / easyocr speed at max_side {side}: "
            f"{ocr_rates[('rapidocr', side)] / ocr_rates[('easyocr', side)]:.2f}x"
        )

    table, truth = planted(args.dedup_rows, args.dedup_rows // 100, 768)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        exact = SemanticDedup(SemanticDedupConfig(threshold=0.95, cluster_size=10 ** 9)).reduce(
            TableRows(table, scratch=os.path.join(tmp, "e")))
        t_exact = time.perf_counter() - t
        t = time.perf_counter()
        clustered = SemanticDedup(SemanticDedupConfig(threshold=0.95, cluster_size=5000)).reduce(
            TableRows(table, scratch=os.path.join(tmp, "c")))
        t_clustered = time.perf_counter() - t
    rows = table.num_rows
    print(f"\nsemantic dedup, {rows} x 768-d embeddings with {len(truth)} planted copies:")
    print(
        f"  exact (one cluster)      {t_exact:7.1f} s  ({rows / t_exact:9.0f} rows/s), "
        f"recall {len(set(exact) & truth) / len(truth):.3f}"
    )
    print(f"  k-means, ~5000 per cluster {t_clustered:5.1f} s  ({rows / t_clustered:9.0f} rows/s), recall "
          f"{len(set(clustered) & truth) / len(truth):.3f}, speed-up {t_exact / t_clustered:.1f}x")

    if args.gpu:
        if not torch.cuda.is_available():
            print("\n--gpu: no CUDA device here; GPU figures not measured")
        else:
            gpu_bench(batch)
    return 0


# dense fp16/bf16 tensor-core peak (no sparsity), from NVIDIA's data sheets
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}


def gpu_bench(batch: dict) -> None:
    """ViT-L-14 image tower at batch 256 in fp16/bf16 vs the GPU's FLOP limit; EasyOCR on GPU."""
    from curation.clip import resolve_weights
    from pipeline.models.clip import load_model
    model, _, _ = load_model(resolve_weights(ClipConfig(model="ViT-L-14", pretrained="random")), device="cuda")
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    for dtype in (torch.float16, torch.bfloat16):
        m = model.to(dtype)
        x = torch.randn(256, 3, 224, 224, device="cuda", dtype=dtype)
        with torch.inference_mode():
            for _ in range(3):
                m.encode_image(x)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(10):
                m.encode_image(x)
            torch.cuda.synchronize()
        ips = 2560 / (time.perf_counter() - t)
        frac = f", {ips * VIT_L14_GFLOPS * 1e9 / peak:.0%} of {peak / 1e12:.0f} TFLOP/s" if peak else ""
        print(f"ViT-L-14 {str(dtype).split('.')[-1]} batch 256 on {name}: {ips:.0f} img/s{frac}")
    for side in (640, 512):
        r, _ = rate(OcrText(OcrConfig(backend="easyocr", max_side=side, device="cuda")), batch, 8)
        print(f"EasyOCR on {name}, max_side {side}: {r:.1f} img/s")


if __name__ == "__main__":
    sys.exit(main())

