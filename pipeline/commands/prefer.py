"""``winnow prefer``: people compare two runs' samples for the same prompt and seed in a browser;
their votes rank the runs (``pipeline/ranking.py``: Davidson / Bradley-Terry with bootstrap
intervals).

    winnow prefer STUDY                     (a `winnow study` output: its cells' samples; votes in STUDY/prefer/)
    winnow prefer STUDY --rank [--json]     (also writes study.md's Preference section and a plot)
    winnow prefer --runs RUN_A/eval/final RUN_B/eval/final RUN_C/eval/final --out prefer/
    winnow prefer --runs ... --out prefer/ --rank [--json]
    winnow prefer STUDY --judge clip --votes 200 [--clip-model M --clip-pretrained W]   (no server)
    winnow prefer STUDY --judge imagereward|pickscore|hpsv2 --votes 200 [--judge-weights W]

The page binds 127.0.0.1 unless ``--host`` says otherwise; on any other address it asks for a key
(printed once, carried in the URL). It serves the page and, under a pair's random token, the two
sample files of that pair: no path in a request reaches the filesystem. Votes go to
``OUT/votes.jsonl``, fsynced before the next pair is shown.
"""
from __future__ import annotations

import dataclasses
import hmac
import http.server
import json
import mimetypes
import os
import re
import secrets
import sys
import threading
from http.cookies import SimpleCookie
from urllib.parse import parse_qs, urlsplit

import numpy as np

from pipeline import prefer, ranking
from pipeline.contract.config import ConfigError
from pipeline.models import reward

NAME = "prefer"
DESCRIPTION = __doc__
MAX_BODY = 4096
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
MEDIA_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
               ".webp": "image/webp", ".mp4": "video/mp4", ".webm": "video/webm"}
VIDEO_EXT = (".mp4", ".webm")


@dataclasses.dataclass
class PreferSpec:
    runs: dict[str, str]
    out: str
    study: str | None = None
    rank: bool = False
    json: bool = False
    host: str = "127.0.0.1"
    port: int = 8765
    voter: str | None = None
    replicates: int = 1000
    seed: int = 0
    judge: str | None = None
    votes: int = 0
    judge_model: str | None = None
    judge_weights: str | None = None
    judge_processor: str | None = None


def arguments(p) -> None:
    p.add_argument("study", nargs="?", help="a `winnow study` output folder (or give --runs and --out)")
    p.add_argument("--runs", nargs="+", metavar="FOLDER",
                   help="sample folders of `winnow eval` (files + prompts.jsonl), one per run to compare")
    p.add_argument("--names", nargs="+", metavar="NAME",
                   help="a name per run (default: the folders' distinct path ends)")
    p.add_argument("--out", help="folder for votes.jsonl (and issued.jsonl); default with a study: STUDY/prefer")
    p.add_argument("--rank", action="store_true", help="print the ranking of the votes so far instead of serving")
    p.add_argument("--json", action="store_true", help="with --rank: one JSON line")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (another than 127.0.0.1 needs the printed key)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--voter", help="the voter id to record (default: one per browser, from a cookie)")
    p.add_argument("--replicates", type=int, default=1000, help="bootstrap replicates of the ranking's intervals")
    p.add_argument("--judge", choices=JUDGES, help="vote with a model instead of people (no server): it votes for the "
                   "sample it scores higher against the prompt (per frame, averaged, for video): clip (cosine), "
                   "imagereward, pickscore or hpsv2 (open preference models)")
    p.add_argument("--votes", type=int, default=0, help="with --judge: how many votes it casts")
    p.add_argument("--judge-weights", "--clip-pretrained", dest="judge_weights",
                   help="the judge's weights: a file, a folder, or a hub id in the local Hugging Face cache "
                        f"(defaults: {', '.join(f'{k} {v[0]}' for k, v in reward.HUB.items())}; clip: an open_clip "
                        "tag in the cache, a file or a folder, default the tiny random CLIP)")
    p.add_argument("--judge-model", "--clip-model", dest="judge_model",
                   help=f"clip / hpsv2: the open_clip architecture (clip: the tiny CLIP; hpsv2: {reward.HPS_MODEL})")
    p.add_argument("--judge-processor", help="pickscore: its CLIP processor (default: the weights' folder, else "
                   f"{reward.PROCESSOR['pickscore']}); imagereward: BERT's tokenizer (default: the weights' folder, "
                   f"else {reward.PROCESSOR['imagereward']}); a folder or a hub id in the cache")


def cell_names(folders: list[str]) -> list[str]:
    """The shortest ends of the folders' paths that tell them apart: ``runs/a/eval/final`` and
    ``runs/b/eval/final`` are ``a/eval/final`` and ``b/eval/final``."""
    parts = [os.path.normpath(os.path.abspath(f)).split(os.sep) for f in folders]
    for n in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-n:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    raise ConfigError("--runs: the same folder is given twice")


def study_runs(study: str) -> dict[str, str]:
    """A study's cells -> their eval sample folders (``cells/cell_NNN/eval/final``, or ``lora``)."""
    from pipeline.contract import storage

    if storage.is_url(study):
        raise ConfigError(f"{study!r}: the page serves local files; copy the study down first "
                          f"(e.g. `aws s3 sync {study} ./study`)")
    path = os.path.join(study, "study.json")
    try:
        with open(path, "rb") as fh:
            rows = json.loads(fh.read(MAX_STUDY_BYTES))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{study!r} has no readable study.json ({e}); give a `winnow study` output folder, "
                          f"or --runs and --out") from None
    runs = {}
    for row in rows if isinstance(rows, list) else []:
        if not isinstance(row, dict) or not isinstance(row.get("cell"), str) or not isinstance(row.get("run"), str):
            continue
        for name in ("final", "lora"):
            folder = os.path.join(row["run"], "eval", name)
            if os.path.isfile(os.path.join(folder, prefer.PROMPTS_FILE)):
                runs[row["cell"]] = folder
                break
    if len(runs) < 2:
        raise ConfigError(f"{study!r}: {len(runs)} cells have eval samples (cells/*/eval/final/prompts.jsonl); "
                          f"at least two are needed: finish the study first")
    return runs


MAX_STUDY_BYTES = 64 * 2 ** 20


def from_args(args) -> PreferSpec:
    if bool(args.study) == bool(args.runs):
        raise ConfigError("give a study folder, or --runs FOLDER ... with --out DIR (not both)")
    if args.study:
        if args.names:
            raise ConfigError("--names: a study's runs are named by their cells")
        runs = study_runs(args.study)
        args.runs, args.names = list(runs.values()), list(runs)
        args.out = args.out or os.path.join(args.study, "prefer")
    elif not args.out:
        raise ConfigError("--out: required with --runs (the folder for votes.jsonl)")
    if args.names and len(args.names) != len(args.runs):
        raise ConfigError(f"--names: {len(args.names)} names for {len(args.runs)} runs")
    names = args.names or cell_names(args.runs)
    if len(set(names)) != len(names):
        raise ConfigError("--names: each run needs a name of its own")
    if args.json and not args.rank:
        raise ConfigError("--json only changes what --rank prints; add --rank")
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port: {args.port} is not a TCP port")
    if args.replicates < 100:
        raise ConfigError("--replicates: at least 100 for a 95 % interval")
    if args.judge and args.votes < 1:
        raise ConfigError("--votes: give how many votes the judge casts (at least 1)")
    if not args.judge and (args.votes or args.judge_model or args.judge_weights or args.judge_processor):
        raise ConfigError("--votes, --judge-model, --judge-weights and --judge-processor go with --judge")
    if args.judge and args.rank:
        raise ConfigError("--judge votes, --rank reports: run them one after the other")
    if args.judge_model and args.judge not in ("clip", "hpsv2"):
        raise ConfigError(f"--judge-model: only clip and hpsv2 are open_clip models; {args.judge} has one architecture")
    if args.judge_processor and args.judge not in ("imagereward", "pickscore"):
        raise ConfigError(f"--judge-processor: {args.judge} has no processor to choose; drop it")
    if args.judge:
        reward.resolve(judge_spec(args.judge, args.judge_model, args.judge_weights, args.judge_processor))
    return PreferSpec(dict(zip(names, args.runs, strict=True)), args.out, args.study, args.rank, args.json, args.host,
                      args.port, args.voter, args.replicates, 0, args.judge, args.votes, args.judge_model,
                      args.judge_weights, args.judge_processor)


def judge_spec(name: str, model: str | None, weights: str | None, processor: str | None,
               seed: int = 0) -> reward.JudgeSpec:
    return reward.JudgeSpec(name, weights, processor, model, seed)


@dataclasses.dataclass
class PreferResult:
    ranking: dict | None
    json: bool
    url: str | None = None
    judged: int = 0


JUDGES = reward.JUDGES


class Judging:
    """Votes with a reward model (``pipeline.models.reward``): the sample it scores higher against
    the prompt wins (a video's frames averaged), a tie only when the two are equal. Each sample is
    scored once. A sample that cannot be decoded loses, as it would to a person who sees a broken
    image; two such are "both bad"."""

    def __init__(self, judge: reward.Judge):
        self.judge = judge
        self._cache: dict[str, float | None] = {}

    def score(self, path: str, prompt: str) -> float | None:
        key = path + "\0" + prompt
        if key not in self._cache:
            frames = _frames(path)
            self._cache[key] = float(np.mean(self.judge.scores(frames, prompt))) if frames else None
        return self._cache[key]

    def choose(self, left: str, right: str, prompt: str) -> str:
        a, b = self.score(left, prompt), self.score(right, prompt)
        if a is None or b is None:
            return "both_bad" if a is None and b is None else ("right" if a is None else "left")
        return "tie" if a == b else ("left" if a > b else "right")


def _frames(path: str) -> list:
    """A sample's RGB frames (one for an image), decoded with winnow's bounded decoders."""
    from curation.decode import DecodeConfig, DecodeError, decode_image
    from pipeline.contract.inputs import InputRejected
    from pipeline.contract.media import gif_frames

    if path.lower().endswith(".gif"):
        try:
            return gif_frames(path)
        except (OSError, ValueError):
            return []
    try:
        with open(path, "rb") as fh:
            data = fh.read(64 * 2 ** 20 + 1)
        return [decode_image(data, DecodeConfig(max_side=1024))[0]] if len(data) <= 64 * 2 ** 20 else []
    except (DecodeError, InputRejected, OSError, ValueError):
        return []


def judge_votes(samples: prefer.SampleSet, spec: PreferSpec, log) -> int:
    """``spec.votes`` votes by the judge, on pairs chosen as the page chooses them, recorded as the
    page records them with ``voter: judge:<name>``. Returns the votes cast."""
    from tqdm.auto import tqdm

    model = reward.load(judge_spec(spec.judge, spec.judge_model, spec.judge_weights, spec.judge_processor, spec.seed))
    judge = Judging(model)
    if model.random and log is not None:
        print(f"warning: the {spec.judge} judge runs {model.label}: its votes mean nothing beyond this demo; "
              f"give --judge-model and --judge-weights", file=log)
    pairs = prefer.Pairs(samples, spec.out, spec.seed)
    cast = 0
    for _ in tqdm(range(spec.votes), desc=f"judge: {spec.judge}", unit="vote", file=log, disable=log is None):
        d = pairs.issue()
        item = samples.items[d["item"]]
        choice = judge.choose(item.files[d["left"]], item.files[d["right"]], item.prompt)
        cast += pairs.vote(d["token"], choice, "judge:" + spec.judge) == "ok"
    return cast


def rank_of(samples: prefer.SampleSet, out: str, replicates: int, seed: int = 0) -> ranking.Ranking:
    log = prefer.VoteLog(os.path.join(out, "votes.jsonl"))
    cells = set(samples.cells)
    return ranking.rank(ranking.count_votes(samples.cells, [t for t in log.triples() if t[0] in cells
                                                           and t[1] in cells]), replicates, seed)


def ranked_doc(samples: prefer.SampleSet, out: str, replicates: int, seed: int = 0) -> dict:
    """The ranking as ``--rank --json`` prints it, with the judges' agreement with people."""
    doc = rank_of(samples, out, replicates, seed).as_dict()
    doc["judge_agreement"] = prefer.agreement(prefer.VoteLog(os.path.join(out, "votes.jsonl")).votes)
    return doc


def plan(spec: PreferSpec) -> dict:
    """What would be compared, without serving or voting: the runs, the prompts they share, and the
    listed samples left out (by run and reason)."""
    try:
        samples = prefer.SampleSet.load(spec.runs)
    except prefer.PreferError as e:
        raise ConfigError(f"--runs: {e}") from None
    mode = "rank" if spec.rank else (f"judge {spec.judge}, {spec.votes} votes" if spec.judge else
                                     f"serve on {spec.host}:{spec.port}")
    return {"runs": dict(spec.runs), "prompts": len(samples.items), "left_out": samples.skipped, "out": spec.out,
            "mode": mode}


def run(spec: PreferSpec, log="stderr") -> PreferResult:
    """``log``: where the URL, warnings and progress go (None: nowhere; default: the stderr of the call)."""
    log = sys.stderr if log == "stderr" else log
    try:
        samples = prefer.SampleSet.load(spec.runs)
    except prefer.PreferError as e:
        raise ConfigError(f"--runs: {e}") from None
    os.makedirs(spec.out, exist_ok=True)
    if spec.rank:
        ranked = ranked_doc(samples, spec.out, spec.replicates, spec.seed)
        if spec.study:
            write_study_section(spec.study, ranked)
        return PreferResult(ranked, spec.json)
    if spec.judge:
        cast = judge_votes(samples, spec, log)
        ranked = ranked_doc(samples, spec.out, spec.replicates, spec.seed)
        if spec.study:
            write_study_section(spec.study, ranked)
        return PreferResult(ranked, spec.json, judged=cast)
    server = Server(samples, spec.out, spec.host, spec.port, spec.voter)
    print(f"winnow prefer: {len(samples.items)} prompts, {len(samples.cells)} runs; open {server.url}",
          file=log or sys.stderr)
    print("Ctrl-C stops it; votes are kept in " + os.path.join(spec.out, "votes.jsonl"), file=log or sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return PreferResult(ranked_doc(samples, spec.out, spec.replicates, spec.seed), False, server.url)


PREFERENCE_HEADING = "## Preference"


def write_study_section(study: str, ranked: dict) -> None:
    """``prefer/ranking.json``, the "Preference" section of ``study.md`` (replaced, the rest kept) and
    ``plots/preference_vs_kept.png``: each cell's strength and interval against the data it kept."""
    from pipeline.contract.layout import atomic_write

    atomic_write(os.path.join(study, "prefer", "ranking.json"), json.dumps(ranked, indent=1).encode())
    with open(os.path.join(study, "study.json"), "rb") as fh:
        kept = {r["cell"]: r.get("fraction") for r in json.loads(fh.read(MAX_STUDY_BYTES)) if isinstance(r, dict)}
    md = os.path.join(study, "study.md")
    text = open(md, encoding="utf-8").read() if os.path.isfile(md) else ""
    text = text.split("\n" + PREFERENCE_HEADING + "\n")[0].rstrip("\n")
    lines = ["", PREFERENCE_HEADING, "",
             f"{ranked['votes']} votes ({ranked['model']}); strengths are centred log-strengths with 95 % "
             f"bootstrap intervals ({ranked['bootstrap_replicates']} replicates); `winnow prefer STUDY` collects more.",
             "", "| rank | cell | kept % | strength | 95 % interval | votes | both bad |",
             "| ---: | --- | ---: | ---: | --- | ---: | ---: |"]
    for c in ranked["cells"]:
        frac = kept.get(c["cell"])
        lines.append(f"| {c['rank']} | {c['cell']} | {'' if frac is None else f'{100 * frac:.1f}'} | "
                     f"{c['strength']:.3f} | [{c['ci95'][0]:.3f}, {c['ci95'][1]:.3f}] | {c['votes']} | "
                     f"{c['both_bad']} |")
    lines += ["", "The top cell is separated from the rest." if ranked["top_separated"] else
              "The top cell is not separated from the rest yet: more votes are needed."]
    atomic_write(md, (text + "\n" + "\n".join(lines) + "\n").encode())
    _plot_preference(study, ranked, kept)


def _plot_preference(study: str, ranked: dict, kept: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.contract import storage

    pts = [(100 * kept[c["cell"]], c) for c in ranked["cells"] if kept.get(c["cell"]) is not None]
    if not pts:
        return
    fig, ax = plt.subplots(figsize=(4.6, 3.4))
    for x, c in pts:
        ax.errorbar([x], [c["strength"]], yerr=[[c["strength"] - c["ci95"][0]], [c["ci95"][1] - c["strength"]]],
                    fmt="o", color="C0", capsize=3)
        ax.annotate(c["cell"].replace("cell_", ""), (x, c["strength"]), textcoords="offset points", xytext=(5, 4),
                    fontsize=8)
    ax.axhline(0, color="grey", lw=0.6)
    ax.set_xlabel("data kept (%)")
    ax.set_ylabel("preference strength (log)")
    ax.set_title(f"preference vs data kept ({ranked['votes']} votes)", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.join(study, "plots"), exist_ok=True)
    with storage.local_target(os.path.join(study, "plots", "preference_vs_kept.png")) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def format_summary(result: PreferResult) -> str:
    r = result.ranking
    if result.json:
        return json.dumps(r, sort_keys=True)
    lines = [f"{r['votes']} votes; {r['model']}; tie propensity nu = {r['tie_nu']}"]
    if result.judged:
        lines.insert(0, f"the judge cast {result.judged} votes")
    lines.append(f"{'rank':>4}  {'strength':>8}  {'95 % interval':>17}  {'votes':>5}  cell")
    for c in r["cells"]:
        lines.append(f"{c['rank']:>4}  {c['strength']:>8.3f}  [{c['ci95'][0]:>6.3f}, {c['ci95'][1]:>6.3f}]  "
                     f"{c['votes']:>5}  {c['cell']}")
    lines.append("the top run is separated from the rest" if r["top_separated"] else
                 "the top run is not separated yet: more votes needed")
    for judge, a in r.get("judge_agreement", {}).items():
        lines.append(f"{judge} agrees with people on {100 * a['agree']:.0f} % of {a['votes']} votes on the same "
                     "samples")
    return "\n".join(lines)


class Server:
    """The page's HTTP server (the standard library's, one thread per request)."""

    def __init__(self, samples: prefer.SampleSet, out: str, host: str, port: int, voter: str | None = None,
                 seed: int | None = None):
        self.pairs = prefer.Pairs(samples, out, seed)
        self.voter = voter
        self.key = None if host in LOCAL_HOSTS else secrets.token_urlsafe(18)
        self.files = samples.files()
        self._progress_lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"app": self})
        cls = http.server.ThreadingHTTPServer
        if ":" in host:
            cls = type("Server6", (cls,), {"address_family": __import__("socket").AF_INET6})
        self.httpd = cls((host, port), handler)
        self.httpd.daemon_threads = True
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{self.httpd.server_address[1]}/" + (f"?key={self.key}" if self.key else "")

    def serve_forever(self) -> None:
        self._serving = True
        try:
            self.httpd.serve_forever(poll_interval=0.2)
        finally:
            self._serving = False

    def close(self) -> None:
        """Stop serving (from another thread than the one serving) and free the port."""
        if getattr(self, "_serving", False):
            self.httpd.shutdown()
        self.httpd.server_close()

    def progress(self) -> str:
        with self._progress_lock:
            counts = self.pairs.counts()
            k = len(counts.cells)
            if counts.total == 0:
                return f"0 votes; {k} runs to rank"
            r = ranking.rank(counts, replicates=200, seed=counts.total)
            top = "; the top run is separated from the rest" if r.top_separated else ""
            return f"{counts.total} votes, ranking settled for {r.settled()} of {k} runs{top}"

    def pair_json(self, d: dict) -> dict:
        item = self.pairs.samples.items[d["item"]]
        video = os.path.splitext(item.files[d["left"]])[1].lower() in VIDEO_EXT
        return {"token": d["token"], "prompt": item.prompt, "seed": item.seed, "video": video,
                "left": f"/media/{d['token']}/left", "right": f"/media/{d['token']}/right",
                "cond": f"/media/{d['token']}/cond" if item.cond else None,
                "progress": self.progress()}


_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_RANGE = re.compile(r"^bytes=(\d{0,18})-(\d{0,18})$")


def byte_range(header: str | None, size: int):
    """``(first, last)`` for a single satisfiable ``bytes=`` range, ``"unsatisfiable"``, or None
    (no header, several ranges or a malformed one: the whole file is sent, as RFC 9110 allows)."""
    m = _RANGE.match((header or "").strip())
    if not m or not (m.group(1) or m.group(2)):
        return None
    if not m.group(1):                                   # bytes=-N: the last N bytes
        n = int(m.group(2))
        return (max(0, size - n), size - 1) if n > 0 and size > 0 else "unsatisfiable"
    first = int(m.group(1))
    last = int(m.group(2)) if m.group(2) else size - 1
    if m.group(2) and last < first:
        return None
    return (first, min(last, size - 1)) if first < size else "unsatisfiable"


class _Handler(http.server.BaseHTTPRequestHandler):
    app: Server
    server_version = "winnow-prefer"
    sys_version = ""

    def log_message(self, fmt, *args):      # quiet: the terminal shows the URL, not every request
        return

    # -- helpers
    def _send(self, code: int, body: bytes, ctype: str, extra: dict | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Content-Security-Policy", "default-src 'self'; script-src 'unsafe-inline'; "
                                                    "style-src 'unsafe-inline'; img-src 'self'; media-src 'self'")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_file(self, file: str) -> None:
        """A sample, whole or the one byte range asked for (RFC 9110 14): a browser seeks a video,
        and so keeps two in step, only where the server answers ranges."""
        ext = os.path.splitext(file)[1].lower()
        ctype = MEDIA_TYPES.get(ext) or mimetypes.guess_type(file)[0] or "application/octet-stream"
        try:
            fh = open(file, "rb")
        except OSError:
            return self._json(404, {"error": "not found"})
        with fh:
            size = os.fstat(fh.fileno()).st_size
            span = byte_range(self.headers.get("Range"), size)
            if span == "unsatisfiable":
                return self._send(416, b"", "text/plain", {"Content-Range": f"bytes */{size}"})
            start, end = span or (0, size - 1)
            fh.seek(start)
            body = fh.read(max(0, end - start + 1))
        extra = {"Accept-Ranges": "bytes"}
        if span:
            extra["Content-Range"] = f"bytes {start}-{end}/{size}"
        return self._send(206 if span else 200, body, ctype, extra)

    def _json(self, code: int, doc: dict) -> None:
        self._send(code, json.dumps(doc).encode(), "application/json")

    def _authorised(self, header: bool) -> bool:
        if self.app.key is None:
            return True
        given = self.headers.get("X-Winnow-Key", "") if header else \
            (parse_qs(urlsplit(self.path).query).get("key") or [""])[0]
        return hmac.compare_digest(given.encode(), self.app.key.encode())

    def _voter(self) -> str:
        if self.app.voter:
            return self.app.voter
        cookie = SimpleCookie(self.headers.get("Cookie", ""))
        v = cookie.get("winnow_voter")
        return v.value if v is not None and _TOKEN.match(v.value) else "anonymous"

    # -- GET: the page and the pair's files; nothing here changes state
    def do_GET(self):  # noqa: N802 - http.server's name
        path = urlsplit(self.path).path
        if not self._authorised(header=False):
            return self._json(403, {"error": "this page needs its key: use the URL `winnow prefer` printed"})
        if path == "/":
            extra = {}
            if "winnow_voter=" not in self.headers.get("Cookie", ""):
                extra["Set-Cookie"] = f"winnow_voter={secrets.token_urlsafe(12)}; Path=/; SameSite=Strict; HttpOnly"
            from pipeline.prefer_page import PAGE

            return self._send(200, PAGE.encode(), "text/html; charset=utf-8", extra)
        parts = path.split("/")
        if len(parts) == 4 and parts[1] == "media" and _TOKEN.match(parts[2]) and parts[3] in ("left", "right", "cond"):
            d = self.app.pairs.issued(parts[2])
            if d is not None:
                item = self.app.pairs.samples.items[d["item"]]
                file = item.cond if parts[3] == "cond" else item.files[d[parts[3]]]
                if file and file in self.app.files:
                    return self._send_file(file)
        if path == "/api/ranking":
            counts = self.app.pairs.counts()
            return self._json(200, ranking.rank(counts, replicates=200, seed=0).as_dict())
        return self._json(404, {"error": "not found"})

    do_HEAD = do_GET

    # -- POST: the next pair, a vote
    def _body(self) -> dict | None:
        if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/json":
            self._json(415, {"error": "send application/json"})
            return None
        origin = self.headers.get("Origin")
        if origin and urlsplit(origin).netloc != self.headers.get("Host"):
            self._json(403, {"error": "cross-origin request refused"})
            return None
        try:
            length = int(self.headers.get("Content-Length", "-1"))
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY:
            self._json(413, {"error": f"a request body is at most {MAX_BODY} bytes"})
            return None
        try:
            doc = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            self._json(400, {"error": "the body must be a JSON object"})
            return None
        return doc

    def do_POST(self):  # noqa: N802
        path = urlsplit(self.path).path
        if not self._authorised(header=True):
            return self._json(403, {"error": "wrong or missing key"})
        if path not in ("/api/next", "/api/vote"):
            return self._json(404, {"error": "not found"})
        doc = self._body()
        if doc is None:
            return None
        if path == "/api/next":
            return self._json(200, self.app.pair_json(self.app.pairs.issue()))
        token, choice = doc.get("token"), doc.get("choice")
        if not isinstance(token, str) or not _TOKEN.match(token) or not isinstance(choice, str):
            return self._json(400, {"error": "a vote is {token, choice}"})
        try:
            status = self.app.pairs.vote(token, choice, self._voter())
        except prefer.PreferError as e:
            return self._json(400, {"error": str(e)})
        return self._json(200, {"status": status, "votes": self.app.pairs.counts().total,
                                "next": self.app.pair_json(self.app.pairs.issue())})

    def do_PUT(self):  # noqa: N802
        self._json(405, {"error": "method not allowed"})

    do_DELETE = do_PATCH = do_PUT
