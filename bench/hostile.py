"""What the hostile-input checks cost and what they save (issue 13).

    python bench/hostile.py [--images 200]

Measured in this one run, each memory figure in a fresh child process (its peak RSS, VmHWM, minus
its RSS after imports):
  * a 13000x13000 16-bit PNG: the previous decode (a float64 copy of the whole image, then RGB,
    then resize) vs ``decode_image`` now (strips, resize before widening to RGB);
  * a 16000x16000 H.264 video: the previous probe (demux, then decode one frame for the rotation)
    vs ``probe`` now (the frame size is refused from the stream header); and the report's thumbnail
    of that rejected video as it was (open, decode the first frame) vs now (the bounded opener of
    ``pipeline/contract/media.py`` refuses it from the header);
  * the image path's per-sample cost of the input policy: planning a folder (every file a row,
    sidecars split off) and reading each file through ``read_local`` (realpath, root check, stat,
    non-blocking open, fstat), against the previous extension filter and plain ``open().read()``,
    as a share of the per-sample load + decode time.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

CHILD = r"""
import json, os, sys, time
sys.path.insert(0, {root!r})
import numpy as np
from PIL import Image
Image.MAX_IMAGE_PIXELS = None
from curation.decode import DecodeConfig, DecodeError, capped_size, decode_image
from video.probe import ProbeError, ProbeLimits, probe
def status_kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
# resident now; the peak is this process's own VmHWM (ru_maxrss would carry the imports' high-water
# mark, and on Linux the parent's, inherited at fork)
base = status_kb("VmRSS")
what, path = sys.argv[1], sys.argv[2]
t = time.perf_counter()
out = ""
if what == "png_before":          # the decode of issue 5-6 for 16-bit images, as it was
    img = Image.open(path)
    img.load()
    arr = np.asarray(img, dtype=np.float64)
    arr = np.clip(arr / 65535.0 * 255.0 + 0.5, 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "L").convert("RGB")
    img = img.resize(capped_size(img.width, img.height, 1024), Image.Resampling.BICUBIC, reducing_gap=3.0)
    out = f"{{img.size}}"
elif what == "png_after":
    img, w, h = decode_image(open(path, "rb").read(), DecodeConfig())
    out = f"{{img.size}}"
elif what == "video_before":      # the probe as it was: demux, then decode one frame for the rotation
    out = str(probe(path, ProbeLimits(max_pixels=10 ** 12)).width)
elif what == "video_after":
    try:
        probe(path)
    except ProbeError as exc:
        out = str(exc)
elif what == "thumb_before":      # the report's thumbnail of a rejected video as it was: open, decode a frame
    import av
    with av.open(path) as c:
        for frame in c.decode(video=0):
            out = str(frame.to_image().size)
            break
elif what == "thumb_after":       # the report's thumbnail now: the bounded opener refuses it from the header
    from pipeline.commands.report import source_thumbnail
    out = str(source_thumbnail(None, {{"source": path, "reject_reason": "too_large", "start_s": 0.0}}))
peak = status_kb("VmHWM")
print(json.dumps({{"mb": (peak - base) / 1024, "s": time.perf_counter() - t, "out": out}}))
"""


def child(what: str, path: str) -> dict:
    res = subprocess.run([sys.executable, "-c", CHILD.format(root=ROOT), what, path], capture_output=True, text=True,
                         timeout=900)
    if res.returncode:
        raise RuntimeError(res.stderr[-2000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def make_png16(path: str, side: int = 13000) -> int:
    ramp = (np.arange(side, dtype=np.uint32) * 65535 // (side - 1)).astype(np.uint16)
    Image.fromarray(np.broadcast_to(ramp, (side, side)).copy()).save(path, "PNG", compress_level=9)
    return os.path.getsize(path)


def make_huge_video(path: str, side: int = 16000) -> int:
    from pipeline.synth import write_huge_video

    return write_huge_video(path, side)


def policy_overhead(folder: str, n: int) -> dict:
    from curation.decode import DecodeConfig, decode_image
    from pipeline import readers
    from pipeline.contract.inputs import read_local
    from pipeline.readers import InputSpec

    rng = np.random.default_rng(0)
    for i in range(n):
        h, w = [(1500, 2000), (2000, 1500), (1800, 1800)][i % 3]
        small = rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC).save(os.path.join(folder, f"img_{i:05d}.jpg"),
                                                                             quality=90)
        if i % 2:
            open(os.path.join(folder, f"img_{i:05d}.txt"), "w").write(f"caption {i}")
    spec = InputSpec(path=folder)
    policy = spec.policy()

    def old_plan():
        """The folder planning this issue replaced: files kept by extension, sidecar looked up by
        name, rows numbered, one Arrow table (as ``readers.plan`` did)."""
        import pyarrow as pa

        files = []
        for d, dirs, names in os.walk(folder):
            dirs.sort()
            files += [os.path.join(d, x) for x in names]
        names = set(files)
        images = sorted(f for f in files if f.lower().endswith((".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif",
                                                                ".tif", ".tiff")))
        rows = []
        for i, f in enumerate(images):
            sidecar = os.path.splitext(f)[0] + ".txt"
            p, j = divmod(i, 1000)
            rows.append({"source": os.path.relpath(f, folder), "ref_path": f, "ref_offset": -1, "ref_size": -1,
                         "caption_ref": sidecar if sidecar in names else None, "partition": p,
                         "key": f"{p:05d}{j:04d}", "plan_error": None, "caption": None, "json_ref": None})
        pa.Table.from_pylist(rows)
        return images

    rounds = 10
    old_plan(), readers.plan(spec, 1000)   # warm both (imports, first-call costs, the directory cache)
    t = time.perf_counter()
    for _ in range(rounds):
        paths = old_plan()
    plan_old = (time.perf_counter() - t) / rounds / len(paths)
    t = time.perf_counter()
    for _ in range(rounds):
        plan = readers.plan(spec, 1000)
    plan_new = (time.perf_counter() - t) / rounds / plan.num_inputs
    t = time.perf_counter()
    for _ in range(rounds):
        for p in paths:
            with open(p, "rb") as fh:
                fh.read()
    read_old = (time.perf_counter() - t) / rounds / len(paths)
    t = time.perf_counter()
    for _ in range(rounds):
        for p in paths:
            read_local(p, policy)
    read_new = (time.perf_counter() - t) / rounds / len(paths)
    cfg = DecodeConfig()
    t = time.perf_counter()
    for p in paths:
        decode_image(open(p, "rb").read(), cfg)
    decode = (time.perf_counter() - t) / len(paths)
    total_new = plan_new + read_new + decode
    return {"files": len(paths), "plan_old_us": plan_old * 1e6, "plan_new_us": plan_new * 1e6,
            "read_old_us": read_old * 1e6, "read_new_us": read_new * 1e6, "decode_ms": decode * 1e3,
            "overhead_pct": 100 * ((plan_new - plan_old) + (read_new - read_old)) / total_new}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=200)
    args = ap.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as tmp:
        for kind, name, make, title in (
                ("png", "gray16.png", make_png16, "13000x13000 16-bit PNG ({} KB; decoded 338 MB as I;16)"),
                ("video", "huge.mp4", make_huge_video, "16000x16000 H.264 video ({} KB, 2 frames)")):
            path = os.path.join(tmp, name)
            print("\n" + title.format(round(make(path) / 1e3)))
            for what in (
                f"{kind}_before",
                f"{kind}_after",
                *(("thumb_before", "thumb_after") if kind == "video" else ()),
            ):
                r = child(what, path)
                print(f"  {what:<13} peak +{r['mb']:7.0f} MB  {r['s']:6.2f} s  -> {r['out'][:80]}")
        folder = os.path.join(tmp, "photos")
        os.makedirs(folder)
        r = policy_overhead(folder, args.images)
        print(f"\nimage path, {r['files']} camera-sized JPEGs (half with a caption sidecar), one core:")
        print(f"  plan per file    {r['plan_old_us']:7.1f} us before, {r['plan_new_us']:7.1f} us now")
        print(f"  read per file    {r['read_old_us']:7.1f} us before, {r['read_new_us']:7.1f} us now")
        print(f"  decode per image {r['decode_ms']:7.2f} ms")
        print(f"  the checks cost {r['overhead_pct']:.2f} % of plan + load + decode per sample (goal <= 3 %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
