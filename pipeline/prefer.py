"""What a preference study is made of, below the web page: the samples that can be compared, the
votes file, and the pairs handed out.

* ``SampleSet``: runs' sample folders (``winnow eval`` output: files and ``prompts.jsonl``), paired
  by prompt and seed. A listed file is usable only if its name is a plain name inside its folder,
  it is a regular file there, and its real path (links followed) stays inside the folder: nothing
  a prompts.jsonl says reaches the filesystem outside the runs' folders.
* ``VoteLog``: ``votes.jsonl``, one JSON line per vote, appended, flushed and fsynced before the
  vote is acknowledged. A restarted log reads the lines back; a torn last line (a kill during the
  write, never acknowledged) is cut off. A pair token votes once.
* ``Pairs``: hands out the next pair (``ranking.next_pair``), its sides at random, under a random
  token; the token is recorded in ``issued.jsonl`` so that a page open across a restart can still
  vote, and only the token travels to the page: the cells stay hidden from the voter.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
import stat
import threading
import time

import numpy as np

from pipeline import ranking

PROMPTS_FILE = "prompts.jsonl"
MAX_LISTING_BYTES = 16 * 2 ** 20      # a prompts.jsonl larger than this is refused
MAX_LINE_BYTES = 64 * 2 ** 10         # a votes.jsonl line larger than this was not written by winnow
CHOICES = ranking.OUTCOMES


class PreferError(ValueError):
    """A study or a set of runs that cannot be voted on, with what to change."""


@dataclasses.dataclass(frozen=True)
class Item:
    """One prompt and seed (and, for image-to-video, one conditioning frame), with the file each cell
    made for it (cell -> absolute path)."""
    prompt: str
    seed: int
    files: dict
    cond: str | None = None       # the conditioning frame's file (from the first cell listing it)
    cond_sha256: str = ""         # its pixels' digest: cells pair only on the same frame


@dataclasses.dataclass(frozen=True)
class Row:
    """One usable line of a prompts.jsonl."""
    prompt: str
    seed: int
    path: str
    cond: str | None = None
    cond_sha256: str = ""


def _inside(folder: str, name: str) -> str | None:
    """``folder/name`` when ``name`` is a plain file name (no separator, not ``.``/``..``, no NUL) of a
    regular file whose real path is inside ``folder``; else None."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        return None
    path = os.path.join(folder, name)
    real_folder = os.path.realpath(folder)
    real = os.path.realpath(path)
    if os.path.dirname(real) != real_folder:
        return None
    try:
        st = os.stat(real)
    except OSError:
        return None
    return real if stat.S_ISREG(st.st_mode) else None


def read_listing(folder: str) -> tuple[list[Row], dict[str, int]]:
    """A ``Row`` for every usable line of ``folder``'s prompts.jsonl, and the count of lines left out
    by reason. An image-to-video line names its conditioning frame (``cond``, a file in the same
    folder, and ``cond_sha256``, the digest of its pixels as ``winnow eval`` wrote them)."""
    listing = os.path.join(folder, PROMPTS_FILE)
    try:
        size = os.stat(listing).st_size
    except OSError as e:
        raise PreferError(f"{folder!r} has no readable {PROMPTS_FILE} ({e.strerror}); give a `winnow eval` "
                          f"sample folder") from None
    if size > MAX_LISTING_BYTES:
        raise PreferError(f"{listing!r} is {size} bytes, over the {MAX_LISTING_BYTES} a prompt list may have")
    rows: list[Row] = []
    skipped: dict[str, int] = {}

    def skip(reason: str) -> None:
        skipped[reason] = skipped.get(reason, 0) + 1

    with open(listing, "rb") as fh:
        for raw in fh.read(MAX_LISTING_BYTES).splitlines():
            if not raw.strip():
                continue
            try:
                doc = json.loads(raw)
                prompt, seed, name = doc["prompt"], doc["seed"], doc["file"]
                cond_name, digest = doc.get("cond"), doc.get("cond_sha256", "")
                if not isinstance(prompt, str) or isinstance(seed, bool) or not isinstance(seed, int):
                    raise TypeError
                if cond_name is not None and not (isinstance(digest, str) and _SHA256.match(digest)):
                    raise TypeError
            except (ValueError, KeyError, TypeError, AttributeError):
                skip("bad line")
                continue
            path = _inside(folder, name)
            if path is None:
                skip("file outside the folder or missing")
                continue
            cond = None
            if cond_name is not None:
                cond = _inside(folder, cond_name)
                if cond is None:
                    skip("conditioning frame outside the folder or missing")
                    continue
            rows.append(Row(prompt, seed, path, cond, digest if cond else ""))
    return rows, skipped


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclasses.dataclass
class SampleSet:
    cells: tuple[str, ...]
    items: list[Item]
    skipped: dict[str, dict[str, int]]

    @classmethod
    def load(cls, runs: dict[str, str]) -> SampleSet:
        """``runs``: cell name -> sample folder. Items are the (prompt, seed, conditioning frame)
        at least two cells have a file for; one listed twice in one folder keeps its first file.
        Image-to-video samples pair only when their conditioning frames' pixels are the same."""
        if len(runs) < 2:
            raise PreferError(f"a preference study needs at least two runs to compare, got {len(runs)}")
        by_key: dict[tuple[str, int, str], dict[str, str]] = {}
        conds: dict[tuple[str, int, str], str] = {}
        skipped = {}
        for cell, folder in runs.items():
            rows, skipped[cell] = read_listing(folder)
            if not rows:
                raise PreferError(f"run {cell!r} ({folder!r}): no usable sample in {PROMPTS_FILE} "
                                  f"(left out: {skipped[cell] or 'none listed'})")
            for row in rows:
                key = (row.prompt, row.seed, row.cond_sha256)
                by_key.setdefault(key, {}).setdefault(cell, row.path)
                if row.cond:
                    conds.setdefault(key, row.cond)
        items = [Item(p, s, files, conds.get((p, s, c)), c) for (p, s, c), files in sorted(by_key.items())
                 if len(files) >= 2]
        if not items:
            raise PreferError("no prompt and seed has samples from two runs: make the runs' samples with the same "
                              "prompts file and seed (`winnow eval --prompts F --seed N`)")
        return cls(tuple(runs), items, skipped)

    def files(self) -> set[str]:
        """Every file the page may serve."""
        return {f for item in self.items for f in item.files.values()} | {i.cond for i in self.items if i.cond}


def _fsync_append(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        data = line.encode("utf-8")
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_lines(path: str) -> list[dict]:
    """The complete JSON lines of a file this module appends to; a torn last line (no newline: the
    process died while writing it, before acknowledging it) is cut off the file."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return []
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as fh:
            fh.truncate(end)
            fh.flush()
            os.fsync(fh.fileno())
    out = []
    for raw in data[:end].splitlines():
        if not raw.strip() or len(raw) > MAX_LINE_BYTES:
            continue
        try:
            doc = json.loads(raw)
        except ValueError:
            continue
        if isinstance(doc, dict):
            out.append(doc)
    return out


class VoteLog:
    """``votes.jsonl``: append-only, each line fsynced before ``add`` returns. Thread-safe."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.votes = [v for v in _read_lines(path) if _valid_vote(v)]
        self._tokens = {v["token"] for v in self.votes}

    def add(self, vote: dict) -> bool:
        """Append ``vote`` (its ``token`` not seen before); False when the token already voted."""
        if not _valid_vote(vote):
            raise PreferError(f"not a vote: {sorted(vote)}")
        line = json.dumps(vote, sort_keys=True, ensure_ascii=True) + "\n"
        with self._lock:
            if vote["token"] in self._tokens:
                return False
            _fsync_append(self.path, line)
            self._tokens.add(vote["token"])
            self.votes.append(vote)
        return True

    def triples(self) -> list[tuple[str, str, str]]:
        return [(v["left"], v["right"], v["choice"]) for v in self.votes]


def _valid_vote(v: dict) -> bool:
    return (isinstance(v, dict) and all(isinstance(v.get(k), str) for k in ("token", "left", "right", "choice"))
            and v["choice"] in CHOICES and v["left"] != v["right"])


class Pairs:
    """Hands out pairs of one ``SampleSet`` and turns a token and a choice into a vote."""

    def __init__(self, samples: SampleSet, folder: str, seed: int | None = None):
        self.samples = samples
        self.log = VoteLog(os.path.join(folder, "votes.jsonl"))
        self.issued_path = os.path.join(folder, "issued.jsonl")
        self._lock = threading.Lock()
        self._issued = {d["token"]: d for d in _read_lines(self.issued_path)
                        if isinstance(d.get("token"), str) and isinstance(d.get("item"), int)
                        and 0 <= d["item"] < len(samples.items)
                        and {d.get("left"), d.get("right")} <= set(samples.items[d["item"]].files)}
        self._rng = np.random.default_rng(seed)

    def counts(self) -> ranking.Counts:
        cells = set(self.samples.cells)
        return ranking.count_votes(self.samples.cells,
                                   [t for t in self.log.triples() if t[0] in cells and t[1] in cells])

    def issue(self) -> dict:
        """The next pair: ``{token, item, left, right}`` (cells), recorded before it is returned."""
        with self._lock:
            i, j = ranking.next_pair(self.counts(), self._rng)
            a, b = self.samples.cells[i], self.samples.cells[j]
            # an item both cells have a sample for, the least voted on first
            both = [k for k, it in enumerate(self.samples.items) if a in it.files and b in it.files]
            if not both:          # these two never share a prompt: any pair that does
                return self._issue_any()
            used: dict[int, int] = {}
            for d in self._issued.values():
                used[d["item"]] = used.get(d["item"], 0) + 1
            fewest = min(used.get(k, 0) for k in both)
            item = int(self._rng.choice([k for k in both if used.get(k, 0) == fewest]))
            return self._record(item, a, b)

    def _issue_any(self) -> dict:
        item = int(self._rng.integers(len(self.samples.items)))
        a, b = self._rng.choice(sorted(self.samples.items[item].files), 2, replace=False)
        return self._record(item, str(a), str(b))

    def _record(self, item: int, a: str, b: str) -> dict:
        left, right = (a, b) if self._rng.random() < 0.5 else (b, a)
        d = {"token": secrets.token_urlsafe(18), "item": item, "left": left, "right": right}
        _fsync_append(self.issued_path, json.dumps(d, sort_keys=True) + "\n")
        self._issued[d["token"]] = d
        return d

    def issued(self, token: str) -> dict | None:
        """The pair handed out under ``token``, or None."""
        return self._issued.get(token)

    def vote(self, token: str, choice: str, voter: str) -> str:
        """Record ``choice`` for the pair issued under ``token``: "ok", "duplicate" (the token voted
        already: counted once), or raises PreferError (unknown token, bad choice)."""
        if choice not in CHOICES:
            raise PreferError(f"choice must be one of {', '.join(CHOICES)}")
        d = self._issued.get(token)
        if d is None:
            raise PreferError("unknown pair token")
        item = self.samples.items[d["item"]]
        vote = {"token": token, "voter": str(voter)[:200], "left": d["left"], "right": d["right"],
                "choice": choice, "prompt": item.prompt, "seed": item.seed, "time": round(time.time(), 3)}
        return "ok" if self.log.add(vote) else "duplicate"


def _outcome(v: dict) -> str:
    """A vote as what it says of its two cells: the preferred cell, or "tie" (tie and both bad)."""
    return v["left"] if v["choice"] == "left" else v["right"] if v["choice"] == "right" else "tie"


def agreement(votes: list[dict]) -> dict:
    """How often each judge (voter ``judge:NAME``) agrees with people, on the samples both voted on
    (same prompt, seed and two cells, whatever the sides): per cell pair and overall. A person's vote
    is compared with the judge's first vote on those samples. {} when no judge or no person voted."""
    judged: dict[str, dict] = {}
    people: dict[tuple, list[str]] = {}
    for v in votes:
        key = (v.get("prompt"), v.get("seed"), frozenset((v["left"], v["right"])))
        if str(v.get("voter", "")).startswith("judge:"):
            judged.setdefault(v["voter"], {}).setdefault(key, _outcome(v))
        else:
            people.setdefault(key, []).append(_outcome(v))
    out = {}
    for judge, verdicts in sorted(judged.items()):
        pairs: dict[str, list[int]] = {}
        for key, outcomes in people.items():
            if key in verdicts:
                name = " vs ".join(sorted(key[2]))
                hits = pairs.setdefault(name, [0, 0])
                hits[0] += sum(o == verdicts[key] for o in outcomes)
                hits[1] += len(outcomes)
        if pairs:
            agree, total = sum(h[0] for h in pairs.values()), sum(h[1] for h in pairs.values())
            out[judge] = {"agree": round(agree / total, 4), "votes": total,
                          "pairs": {k: {"agree": round(a / n, 4), "votes": n} for k, (a, n) in sorted(pairs.items())}}
    return out
