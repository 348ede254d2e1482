"""Object storage against local disk: curate and the training loader on a loopback S3 server.

    python bench/object_storage.py [--images 200]

A real S3 API (moto's server, a separate process on 127.0.0.1, its request log kept) stands in for
the bucket. Measured in this one run, on the same generated inputs:
  * curate (decode + pHash dedup) from local disk to local disk, then to the bucket, then from the
    bucket to the bucket: wall time (Ray start-up excluded: one warm-up run first), the ratio to
    the local run, and the bytes written (local files vs objects);
  * the training loader (BucketLoader, 2 decode threads, base 256) reading the local shards and the
    same shards on the bucket: samples/s and the ratio;
  * requests per kept sample (LIST / GET / HEAD / PUT / POST / DELETE, from the server's log) for
    curate at N and 2N images and for one pass of the loader, to show how they grow.
The loopback server has no network latency; a real store adds ~10-50 ms per request, which the
loader hides with its threads and curate with its parallel tasks.
"""
from __future__ import annotations

import argparse
import collections
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
sys.path.insert(0, ROOT)

STAGES = [{"name": "decode", "max_side": 512}, {"name": "phash_dedup"}]
LINE = re.compile(r'"(GET|PUT|POST|HEAD|DELETE) (\S+) HTTP')


class Server:
    """moto's S3 server as its own process; its log is the request count."""

    def __init__(self, folder: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.log = os.path.join(folder, "requests.log")
        exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
        self.proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(self.port)], stdout=open(self.log, "wb"),
                                     stderr=subprocess.STDOUT)
        os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}", "AWS_ACCESS_KEY_ID": "bench",
                           "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_DEFAULT_REGION": "us-east-1",
                           "AWS_EC2_METADATA_DISABLED": "true"})
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("moto_server did not start")

    def mark(self) -> int:
        return os.path.getsize(self.log)

    def requests(self, since: int) -> collections.Counter:
        with open(self.log, "rb") as fh:
            fh.seek(since)
            text = re.sub(r"\x1b\[[0-9;]*m", "", fh.read().decode("utf-8", "replace"))   # werkzeug colours lines
        c: collections.Counter = collections.Counter()
        for method, target in LINE.findall(text):
            kind = "LIST" if method == "GET" and ("list-type" in target or "?uploads" in target or
                                                   target.rstrip("/").count("/") == 1 and "?" in target) else method
            c[kind] += 1
        return c

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def bucket_bytes(bucket: str, prefix: str) -> int:
    import boto3

    c = boto3.client("s3")
    total, token = 0, None
    while True:
        page = c.list_objects_v2(Bucket=bucket, Prefix=prefix, **({"ContinuationToken": token} if token else {}))
        total += sum(o["Size"] for o in page.get("Contents", []) if "/.winnow/" not in o["Key"])
        if not page.get("IsTruncated"):
            return total
        token = page["NextContinuationToken"]


def local_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs
               if ".winnow" not in d)


def curate(inp: str, out: str):
    from pipeline.commands import curate as cmd
    from pipeline.commands import curate_spec

    spec = curate_spec.parse({"input": {"path": inp}, "output": {"path": out, "samples_per_shard": 100,
                                                                  "report": False}, "stages": STAGES})
    t = time.perf_counter()
    r = cmd.run(spec, log=None)
    return r, time.perf_counter() - t


def loader_rate(run: str, samples: int, copy_bytes: int = 0) -> dict:
    """Samples/s of the loader over ``samples`` samples (several passes over the run): overall, over
    the first pass (cold: shards not yet copied) and over the passes after it."""
    from training.index import bucket_ids, build_index
    from training.loader import BucketLoader
    from training.schedule import Cursor

    with tempfile.TemporaryDirectory() as d:
        index, _ = build_index(run, d)
    table, bucket_of = bucket_ids(index, 256, 64, 2.0)
    loader = BucketLoader(index, table, bucket_of, Cursor(), batch_size=8, workers=2, prefetch=4, seed=0,
                          shard_copy_bytes=copy_bytes)
    n, t = 0, time.perf_counter()
    first = None
    for batch in loader:
        n += len(batch.ids)
        if first is None and n >= index.num_rows:
            first = (n, time.perf_counter() - t)
        if n >= samples:
            break
    wall = time.perf_counter() - t
    loader.close()
    return {"all": n / wall, "first": first[0] / first[1], "later": (n - first[0]) / max(wall - first[1], 1e-9)}


def raw_get_rate(run: str, n: int, threads: int = 16) -> float:
    """Ranged GETs per second the server answers with nothing else to do: the loader's ceiling here."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.contract import storage

    tar = storage.files_in(storage.join(run, "shards"), ".tar")[0]

    def one(k: int) -> int:
        with storage.open_read(tar, ranged=True) as fh:
            fh.seek(512 * (k % 64))
            return len(fh.read(65536))

    t = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(n)))
    return n / (time.perf_counter() - t)


def per_kept(c: collections.Counter, kept: int) -> str:
    return (
        ", ".join(f"{k} {v / max(1, kept):.3f}" for k, v in sorted(c.items()))
        + f" (total {sum(c.values()) / max(1, kept):.3f})"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=200)
    args = ap.parse_args()
    import boto3
    import ray

    from pipeline.corpus import make_corpus

    work = tempfile.mkdtemp(prefix="winnow-bench-s3-")
    server = Server(work)
    try:
        boto3.client("s3").create_bucket(Bucket="bench")
        inp = os.path.join(work, "in")
        make_corpus(inp, n_images=args.images, seed=0, bad=False, max_side=1600)
        inp2 = os.path.join(work, "in2")
        make_corpus(inp2, n_images=2 * args.images, seed=1, bad=False, max_side=1600)
        c = boto3.client("s3")
        for d, _, names in os.walk(inp):
            for n in names:
                c.upload_file(os.path.join(d, n), "bench", "in/" + os.path.relpath(os.path.join(d, n), inp))
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        curate(inp, os.path.join(work, "warm"))                     # Ray and the workers warm up
        rows = []
        for label, i, o in (("local -> local", inp, os.path.join(work, "local")),
                            ("local -> s3", inp, "s3://bench/out1"),
                            ("s3 -> s3", "s3://bench/in", "s3://bench/out2"),
                            ("local -> local", inp, os.path.join(work, "local_b")),
                            *((label, inp, f"{o}_{k}") for k in range(2, 5)
                              for label, o in (("local -> local", os.path.join(work, "local")),
                                               ("local -> s3", "s3://bench/out1")))):
            mark = server.mark()
            r, wall = curate(i, o)
            written = bucket_bytes("bench", o[len("s3://bench/"):] + "/") if o.startswith("s3://") else local_bytes(o)
            rows.append((label, r.inputs, r.kept, wall, written, server.requests(mark)))
        walls_2n = {"local": [], "s3": []}
        for k in range(2):
            _, w = curate(inp2, os.path.join(work, f"local_2n_{k}"))
            walls_2n["local"].append(w)
            mark = server.mark()
            r2, w = curate(inp2, f"s3://bench/out_2n_{k}")
            walls_2n["s3"].append(w)
            req_2n = server.requests(mark)
        wall2 = min(walls_2n["s3"])
        local_rate = loader_rate(os.path.join(work, "local"), 4 * args.images)
        mark = server.mark()
        s3_rate = loader_rate("s3://bench/out1", 4 * args.images)
        loader_req = server.requests(mark)
        mark = server.mark()
        s3_copy = loader_rate("s3://bench/out1", 4 * args.images, copy_bytes=8 << 30)
        copy_req = server.requests(mark)
        ceiling = raw_get_rate("s3://bench/out1", 400)
        from pipeline.contract import storage

        rates = storage.measure_rates("s3://bench/probe", mb=32)     # the server alone: PUT and GET of 32 MB
        ray.shutdown()
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; S3: moto_server on loopback")
    print(f"curate, {args.images} generated photos (decode to <= 512 px, pHash dedup), {STAGES}")
    base = {}
    for label, n, kept, wall, written, req in rows:
        base.setdefault(label, []).append(wall)
        print(f"  {label:<15} {n:>5} inputs  {kept:>5} kept  {wall:7.2f} s  {written / 1e6:8.2f} MB written"
              + (f"  requests per kept sample: {per_kept(req, kept)}" if sum(req.values()) else ""))
    loc, med = min(base["local -> local"]), statistics.median(base["local -> local"])
    reps = len(base["local -> local"])
    print(
        f"  wall time ratio, best of {reps} runs each (alternating): "
        f"local -> s3 {min(base['local -> s3']) / loc:.2f}x; "
        f"median of {reps}: {statistics.median(base['local -> s3']) / med:.2f}x; "
        f"s3 -> s3 {base['s3 -> s3'][0] / loc:.2f}x the best local run"
    )
    floor = rows[1][4] / 1e6 / rates["write_mb_s"]
    print(
        f"  the server alone takes {rates['write_mb_s']:.1f} MB/s (PUT, streamed; {rates['read_mb_s']:.1f} MB/s GET): "
        f"{floor:.2f} s just to receive the output's bytes; local -> s3 less that floor: "
        f"{(min(base['local -> s3']) - floor) / loc:.2f}x the best local run"
    )
    print(
        f"  bytes written: local {rows[0][4]:,}, bucket {rows[1][4]:,} "
        f"({'equal' if rows[0][4] == rows[1][4] else 'differ'})"
    )
    print(
        f"  at 2N = {r2.inputs} inputs ({r2.kept} kept): local -> s3 {wall2:.2f} s vs local "
        f"{min(walls_2n['local']):.2f} s, "
        f"{wall2 / min(walls_2n['local']):.2f}x (best of 2 each); requests per kept sample {per_kept(req_2n, r2.kept)}"
    )
    lr = local_rate["all"]
    print(f"loader (BucketLoader, 2 threads, base 256, {4 * args.images} samples, several passes): local "
          f"{lr:.1f} samples/s")
    print(f"  s3, one range request per sample (data.shard_copy_gb: 0): {s3_rate['all']:.1f} samples/s "
          f"({s3_rate['all'] / lr:.2f}x); requests per sample read: {per_kept(loader_req, 4 * args.images)}")
    print(f"  s3, shards copied whole to scratch in the background (data.shard_copy_gb: 8, the default): "
          f"{s3_copy['all']:.1f} samples/s ({s3_copy['all'] / lr:.2f}x); first pass {s3_copy['first']:.1f} "
          f"({s3_copy['first'] / local_rate['first']:.2f}x the local first pass), later passes {s3_copy['later']:.1f} "
          f"({s3_copy['later'] / local_rate['later']:.2f}x); requests per sample read: "
          f"{per_kept(copy_req, 4 * args.images)}")
    print(f"  the server's own ceiling here: {ceiling:.1f} ranged GETs/s (16 threads, 64 KB, nothing decoded; each GET "
          f"also opens the object, one HEAD)")


if __name__ == "__main__":
    main()
