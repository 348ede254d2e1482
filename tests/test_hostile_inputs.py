"""Hostile inputs become rejected rows with their reason; the run finishes; nothing outside changes.

Every input is built here in a temp dir: special files, names that are not UTF-8, formats found by
content, parquet rows naming URLs or files elsewhere, memory bombs, broken video clocks.
"""
from __future__ import annotations

import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import readers
from pipeline.contract.inputs import fs_path
from pipeline.readers import InputSpec, LoadConfig, LoadSource
from tests.helpers import annotations, run_curate


def _tree(root: str) -> dict[str, tuple[int, int]]:
    out = {}
    for d, _, fs in os.walk(root):
        for f in fs:
            p = os.path.join(d, f)
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns)
    return out


def _photo(path, size=(96, 64), seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _hostile_folder(root):
    """A camera folder as found: formats by content, a FIFO, a name that is not UTF-8, a symlink out."""
    photos = os.path.join(root, "photos")
    os.makedirs(photos)
    _photo(os.path.join(photos, "a_good.jpg"), seed=1)
    open(os.path.join(photos, "a_good.txt"), "w").write("a caption")                       # a sidecar
    first = Image.fromarray(np.full((64, 96, 3), 90, np.uint8))
    first.save(os.path.join(photos, "b_camera.mpo"), format="MPO", save_all=True,
               append_images=[Image.fromarray(np.full((64, 96, 3), 160, np.uint8))])
    _photo(os.path.join(photos, "c_phone.avif"), seed=2)
    Image.open(os.path.join(photos, "c_phone.avif")).load()
    _photo(os.path.join(photos, "d_scan.jp2"), seed=3)
    import curation.decode  # noqa: F401 - registers the HEIF opener
    _photo(os.path.join(photos, "d_iphone.heic"), seed=6)
    os.mkfifo(os.path.join(photos, "e_pipe.jpg"))
    _photo(os.fsencode(os.path.join(photos, "f_caf")) + b"\xe9.png", seed=4)          # latin-1 name
    secret = os.path.join(root, "secret.png")
    _photo(secret, seed=5)
    os.symlink(secret, os.path.join(photos, "g_link.png"))
    open(os.path.join(photos, "h_readme.md"), "w").write("# notes")
    return photos, secret


def test_a_hostile_folder_is_all_rows_and_the_run_finishes(ray_local, tmp_path):
    photos, secret = _hostile_folder(str(tmp_path))
    before = _tree(str(tmp_path))
    res = run_curate(photos, str(tmp_path / "out"), samples_per_shard=4)
    ann = annotations(str(tmp_path / "out")).sort_values("key")
    got = dict(zip(ann["source"], ann["reject_reason"].where(ann["status"] == "rejected", "kept"), strict=True))
    assert got == {
        "a_good.jpg": "kept",
        "b_camera.mpo": "kept",
        "c_phone.avif": "kept",
        "d_scan.jp2": "kept",
        "d_iphone.heic": "kept",
        "e_pipe.jpg": "not_a_regular_file: a FIFO",
        "f_caf\\xe9.png": "kept",
        "g_link.png": f"outside_base: {os.path.realpath(secret)} is outside {os.path.realpath(photos)} "
                      f"(set input.allow_outside_base: true to read it)",
        "h_readme.md": "unsupported_format: .md is not an image Pillow reads",
    }
    assert (res.inputs, res.kept, res.rejected, res.sidecars) == (9, 6, 3, 1)
    import base64
    raw = ann.set_index("source")["source_bytes_b64"]
    assert base64.b64decode(raw["f_caf\\xe9.png"]) == b"f_caf\xe9.png" and raw.drop("f_caf\\xe9.png").isna().all()
    assert ann.loc[ann["source"] == "a_good.jpg", "caption"].item() == "a caption"
    assert ann.loc[ann["source"] == "b_camera.mpo", ["width", "height"]].values.tolist() == [[96, 64]]
    after = _tree(str(tmp_path))
    assert {k: v for k, v in after.items() if not k.startswith("out" + os.sep)} == before
    # a re-run (the FIFO still there) resumes at once instead of hanging
    again = run_curate(photos, str(tmp_path / "out"), samples_per_shard=4)
    assert (again.inputs, again.kept) == (9, 6)


def test_parquet_rows_naming_urls_or_files_elsewhere_are_rejected_rows(tmp_path):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    _photo(str(data / "sub" / "ok.jpg"))
    _photo(str(tmp_path / "secret.png"))
    refs = ["sub/ok.jpg", "../secret.png", "/etc/hostname", "/dev/zero", "sub/../sub/ok.jpg",
            "simplecache::http://example.com/a.jpg", "ftp://example.com/a.jpg", "HTTPS://example.com/a.jpg",
            "s3://bucket/a.jpg", "memory://a.jpg", "file:///etc/passwd", "sub/\x00ok.jpg"]
    pq.write_table(pa.table({"path": refs, "caption": [str(i) for i in range(len(refs))]}), data / "rows.parquet")
    spec = InputSpec(path=str(data / "rows.parquet"))
    plan = readers.plan(spec, samples_per_shard=100)
    batch = {c: np.asarray(plan.table.column(c).to_pylist(), dtype=object) for c in plan.table.column_names}
    out = LoadSource(LoadConfig(policy=spec.policy()))(batch)
    root = os.path.realpath(data)
    outside = "outside_base: {} is outside " + root + " (set input.allow_outside_base: true to read it)"
    hint = "download with img2dataset and give winnow its output folder"
    assert list(zip(refs, out["reject_reason"], strict=True)) == [
        ("sub/ok.jpg", None),
        ("../secret.png", outside.format(os.path.realpath(tmp_path / "secret.png"))),
        ("/etc/hostname", outside.format(os.path.realpath("/etc/hostname"))),
        ("/dev/zero", outside.format("/dev/zero")),
        ("sub/../sub/ok.jpg", None),
        (
            "simplecache::http://example.com/a.jpg",
            f"not_downloaded: a chained fsspec URL is not read by winnow; {hint}",
        ),
        ("ftp://example.com/a.jpg", f"not_downloaded: a ftp URL is not read by winnow; {hint}"),
        ("HTTPS://example.com/a.jpg", f"not_downloaded: a https URL is not read by winnow; {hint}"),
        ("s3://bucket/a.jpg", "protocol_not_allowed: s3:// (add s3 to input.protocols to read it)"),
        ("memory://a.jpg", "protocol_not_allowed: memory:// (add memory to input.protocols to read it)"),
        ("file:///etc/passwd", outside.format("/etc/passwd")),
        ("sub/\x00ok.jpg", "missing_file: the path holds a NUL character"),
    ]
    # allowed outside the base: special files are still refused, and every read is bounded
    big = tmp_path / "big.bin"
    big.write_bytes(b"\xff" * 5000)
    refs2 = ["/dev/zero", str(big), "sub/ok.jpg"]
    pq.write_table(pa.table({"path": refs2}), data / "rows.parquet")
    spec = InputSpec(path=str(data / "rows.parquet"), allow_outside_base=True, max_file_bytes=4500)
    plan = readers.plan(spec, samples_per_shard=100)
    batch = {c: np.asarray(plan.table.column(c).to_pylist(), dtype=object) for c in plan.table.column_names}
    out = LoadSource(LoadConfig(policy=spec.policy()))(batch)
    assert out["reject_reason"].tolist() == ["not_a_regular_file: a character device",
                                             "too_large: 5000 bytes > input.max_file_bytes 4500", None]


def test_web_protocols_can_never_be_allowed():
    from pipeline.contract.config import ConfigError, build

    with pytest.raises(ConfigError, match="input.protocols: 'https' is not allowed"):
        build(InputSpec, {"path": "x", "protocols": ["s3", "https"]}, "input")
    assert build(InputSpec, {"path": "x", "protocols": ["S3", "gcs"]}, "input").protocols == ["s3", "gcs"]


def test_non_utf8_names_round_trip_losslessly(tmp_path):
    raw = os.fsencode(str(tmp_path)) + b"/x\xff\xfe.jpg"
    _photo(raw)
    plan = readers.plan(InputSpec(path=str(tmp_path)), samples_per_shard=10)
    text = plan.table.column("ref_path").to_pylist()[0]
    assert os.fsencode(fs_path(text)) == raw and "\x00" in text
    assert plan.table.column("source").to_pylist() == ["x\\xff\\xfe.jpg"]
    out = LoadSource(LoadConfig(policy=InputSpec(path=str(tmp_path)).policy()))(
        {c: np.asarray(plan.table.column(c).to_pylist(), dtype=object) for c in plan.table.column_names})
    assert out["raw_bytes"][0] == open(raw, "rb").read()


# ---- memory: decoded bytes, not pixels ----

def test_16bit_png_converts_without_float64_and_the_decoded_byte_cap_holds():
    from curation.decode import DecodeConfig, DecodeError, decode_image, decoded_bytes

    ramp = (np.arange(300 * 200, dtype=np.uint32).reshape(200, 300) * 65535 // (300 * 200 - 1)).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, "PNG")
    img, w, h = decode_image(buf.getvalue(), DecodeConfig(max_side=1024))
    arr = np.asarray(img)
    assert (w, h) == (300, 200) and img.mode == "RGB"
    want = np.clip(ramp.astype(np.float64) / 65535 * 255 + 0.5, 0, 255).astype(np.uint8)
    assert np.abs(arr[..., 0].astype(int) - want).max() <= 1 and (arr[..., 0] == arr[..., 2]).all()
    assert decoded_bytes(300, 200, "I;16") == 120_000
    with pytest.raises(DecodeError, match=r"decompression_bomb: 300x200 I;16 decodes to 120000 bytes > "
                                          r"max_decoded_bytes=100000"):
        decode_image(buf.getvalue(), DecodeConfig(max_decoded_bytes=100_000))
    # the same cap passes an 8-bit grey image of the same size (one byte a pixel)
    buf8 = io.BytesIO()
    Image.fromarray((ramp >> 8).astype(np.uint8), "L").save(buf8, "PNG")
    assert decode_image(buf8.getvalue(), DecodeConfig(max_decoded_bytes=100_000))[0].size == (300, 200)


# ---- videos: size, duration and clock checked at probe ----

def _video(path, pts, size=(64, 48), rate=25):
    from fractions import Fraction

    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=rate)
        s.width, s.height, s.pix_fmt = size[0], size[1], "yuv420p"
        s.time_base = Fraction(1, rate)
        s.codec_context.time_base = Fraction(1, rate)
        for i, p in enumerate(pts):
            frame = av.VideoFrame.from_ndarray(np.full((size[1], size[0], 3), (i * 20) % 255, np.uint8), format="rgb24")
            frame.pts = p
            frame.time_base = Fraction(1, rate)
            for packet in s.encode(frame):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)


def test_video_clock_jumps_sizes_and_durations_are_rejected_at_probe(tmp_path):
    from video.probe import ProbeError, ProbeLimits, probe

    _video(tmp_path / "jump.mp4", list(range(10)) + [8 * 3600 * 25 + i for i in range(10)])
    with pytest.raises(ProbeError, match=r"bad_timestamps: 28799\.6 s between frames 9 and 10"):
        probe(str(tmp_path / "jump.mp4"))
    _video(tmp_path / "ok.mp4", list(range(50)))
    assert probe(str(tmp_path / "ok.mp4")).num_frames == 50
    with pytest.raises(ProbeError, match=r"too_large: 64x48 frames exceed max_frame_pixels=3000"):
        probe(str(tmp_path / "ok.mp4"), ProbeLimits(max_pixels=3000))
    with pytest.raises(ProbeError, match=r"too_long: 2 s of timestamps > max_duration_s=1"):
        probe(str(tmp_path / "ok.mp4"), ProbeLimits(max_duration_s=1))


def test_a_video_run_rejects_the_broken_clock_as_one_row(ray_local, tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    _video(videos / "jump.mp4", list(range(10)) + [8 * 3600 * 25 + i for i in range(10)])
    os.mkfifo(videos / "pipe.mp4")
    Image.new("RGB", (8, 8)).save(videos / "thumb.jpg")
    res = run_curate(str(videos), str(tmp_path / "out"), stages=[{"name": "clips"}], input={"format": "videos"})
    ann = annotations(str(tmp_path / "out")).sort_values("key")
    assert ann["reject_reason"].str.split(":").str[0].tolist() == ["bad_timestamps", "not_a_regular_file",
                                                                   "unsupported_format"]
    assert res.videos["inputs"] == 3 and res.inputs == 3


def test_a_remote_parquet_names_files_under_its_own_folder_only():
    base = "s3://bucket/laion/part0"
    assert readers.classify_ref("img/a.jpg", base, []) == ("s3://bucket/laion/part0/img/a.jpg", None)
    assert readers.classify_ref("/etc/passwd", base, [])[1] == \
        "outside_base: /etc/passwd is a local path; s3://bucket/laion/part0 is remote"
    assert readers.classify_ref("../../other/a.jpg", base, [])[1].startswith(
        "outside_base: ../../other/a.jpg is outside"
    )
    assert readers.classify_ref("../../other/a.jpg", base, [], allow_outside=True) == \
        ("s3://bucket/other/a.jpg", None)


def test_a_parquet_whose_paths_all_lie_elsewhere_fails_before_ray(tmp_path):
    """LAION metadata in one folder, images in a sibling: a config mistake, said before Ray starts."""
    from pipeline.contract.config import ConfigError

    (tmp_path / "meta").mkdir()
    (tmp_path / "images").mkdir()
    _photo(str(tmp_path / "images" / "a.jpg"))
    pq.write_table(pa.table({"path": ["../images/a.jpg", str(tmp_path / "images" / "a.jpg")]}),
                   tmp_path / "meta" / "part.parquet")
    with pytest.raises(
        ConfigError, match=r"all 2 local paths in .* lie outside \S*meta \(first: .*\); set input.base_dir"
    ):
        readers.plan(InputSpec(path=str(tmp_path / "meta" / "part.parquet")), 10)
    plan = readers.plan(InputSpec(path=str(tmp_path / "meta" / "part.parquet"), base_dir=str(tmp_path)), 10)
    assert plan.num_inputs == 2


def test_a_decode_that_runs_too_long_becomes_a_rejected_row():
    """Time per sample is bounded: the decode is interrupted between Pillow's 64 KB chunks."""
    from curation.decode import DecodeConfig, DecodeImages

    rng = np.random.default_rng(0)
    noise = io.BytesIO()
    Image.fromarray(rng.integers(0, 65535, (3000, 3000), dtype=np.uint16)).save(noise, "PNG", compress_level=1)
    small = io.BytesIO()
    Image.new("RGB", (32, 32), (9, 9, 9)).save(small, "PNG")

    def batch(data):
        return {"raw_bytes": np.array([data], dtype=object), "status": np.array(["kept"], dtype=object),
                "reject_reason": np.array([None], dtype=object)}

    out = DecodeImages(DecodeConfig(max_seconds=0.02))(batch(noise.getvalue()))   # that decode takes 0.14-0.28 s
    assert out["reject_reason"][0] == "decode_timeout: more than max_seconds=0.02 s"
    out = DecodeImages(DecodeConfig())(batch(small.getvalue()))                    # the default: 60 s
    assert out["status"][0] == "kept" and out["stored_width"][0] == 32
    import signal
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)         # no timer left behind


HUGE_VIDEO = "import sys; from pipeline.synth import write_huge_video; write_huge_video(sys.argv[1])"

PREVIEW_CHILD = r"""
import json, sys
def kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
from pipeline.commands import report, sheets
from pipeline.contract import media
base = kb("VmRSS")
path = sys.argv[1]
row = {"source": path, "reject_reason": "too_large: 16000x16000", "start_s": 0.0}
thumb = report.source_thumbnail(None, row)
try:
    media.video_frame(path)
    refused = ""
except media.MediaError as exc:
    refused = str(exc)
frames = sheets.clip_frames(open(path, "rb").read())
print(json.dumps({"mb": (kb("VmHWM") - base) / 1024, "thumb": thumb is None, "refused": refused,
                  "frames": [f.size for f in frames]}))
"""


def test_a_16000_pixel_video_adds_under_512_mb_to_a_report(tmp_path):
    """The hostile battery's 16000x16000 H.264 file: the report's thumbnail, a frame for a sheet
    and the bounded opener refuse it from the header (the report decoded it whole: 3.6 GB)."""
    import json
    import subprocess
    import sys

    path = str(tmp_path / "huge.mp4")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", HUGE_VIDEO, path], check=True, timeout=300, cwd=root)
    out = subprocess.run([sys.executable, "-c", PREVIEW_CHILD, path], capture_output=True, text=True, timeout=300,
                         cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["thumb"] and got["refused"].startswith("too_large: 16000x16000") and got["frames"] == [[16, 16]]
    assert got["mb"] < 512, got


def test_the_bounded_image_opener_refuses_from_the_header(tmp_path):
    from pipeline.contract.media import MediaError, MediaLimits, open_image

    buf = io.BytesIO()
    Image.new("L", (400, 300)).save(buf, "PNG")
    with pytest.raises(MediaError, match=r"decompression_bomb: 400x300 exceeds max_pixels=1000"):
        open_image(buf.getvalue(), MediaLimits(max_pixels=1000))
    with pytest.raises(MediaError, match=r"decodes to 120000 bytes > max_decoded_bytes=100000"):
        open_image(buf.getvalue(), MediaLimits(max_decoded_bytes=100_000))
    jpg = io.BytesIO()
    Image.new("RGB", (800, 800)).save(jpg, "JPEG")     # 2.56 MB decoded, 40 kB after an 1/8 draft
    with open_image(jpg.getvalue(), MediaLimits(max_decoded_bytes=100_000), draft=(100, 100)) as im:
        assert im.size == (100, 100)
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "big.png").write_bytes(buf.getvalue())
    with pytest.raises(MediaError, match="not a regular file"):
        open_image(str(tmp_path / "fifo"))
    with pytest.raises(MediaError, match=r"too_large: \d+ bytes > 10"):
        open_image(str(tmp_path / "big.png"), MediaLimits(max_file_bytes=10))
    with pytest.raises(MediaError, match="decode_error: empty file"):
        open_image(b"")
    with pytest.raises(MediaError, match="decode_error: not an image"):
        open_image(b"hello")


def test_gif_frames_round_trip_and_a_many_frame_gif_is_refused_by_its_total():
    from pipeline.contract.media import MediaError, MediaLimits, gif_frames, write_gif

    frames = [Image.new("RGB", (40, 30), (50 * i, 0, 255 - 50 * i)) for i in range(5)]
    buf = io.BytesIO()
    write_gif(frames, buf, fps=8)
    back = gif_frames(buf.getvalue())
    assert [f.size for f in back] == [(40, 30)] * 5 and [f.mode for f in back] == ["RGB"] * 5
    assert [f.getpixel((0, 0)) for f in back] == [f.getpixel((0, 0)) for f in frames]   # 6 colours fit the palette
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        assert im.info["duration"] == 120 and im.info["loop"] == 0     # 1000 / 8 ms, in GIF's hundredths
    # each frame passes the per-image caps (40 x 30 x 4 = 4800 bytes); the five together do not
    with pytest.raises(MediaError, match=r"decompression_bomb: 3 frames decode to more than max_decoded_bytes=10000"):
        gif_frames(buf.getvalue(), MediaLimits(max_decoded_bytes=10_000))
    with pytest.raises(MediaError, match=r"more than max_frames=4 frames"):
        gif_frames(buf.getvalue(), max_frames=4)


def test_a_bounded_read_sized_by_fstat_still_reads_a_file_that_grew_and_refuses_past_the_limit(tmp_path):
    """``read_bounded`` reads the size fstat gave (+1) first; a file that grows between the fstat
    and the read is read to its end while within the limit and refused past it; so is
    ``storage.read_bytes``."""
    from pipeline.contract import storage
    from pipeline.contract.inputs import InputRejected, read_bounded

    path = tmp_path / "grows.bin"
    for grown, limit, want in ((0, 100, 40), (30, 100, 70), (61, 100, None), (0, 40, 40), (1, 40, None)):
        path.write_bytes(b"a" * 40)
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            with open(path, "ab") as w:
                w.write(b"b" * grown)
            if want is None:
                with pytest.raises(InputRejected, match=f"too_large: more than input.max_file_bytes {limit}"):
                    read_bounded(fh, limit, size)
            else:
                assert read_bounded(fh, limit, size) == b"a" * 40 + b"b" * grown
        if want is None:
            with pytest.raises(ValueError, match=f"more than {limit} bytes"):
                storage.read_bytes(str(path), limit=limit)
        else:
            assert len(storage.read_bytes(str(path), limit=limit)) == want
