"""`winnow prefer`'s web server on a real socket (127.0.0.1): the page, pairs, votes, a restart,
hostile requests, the key on a non-local address, and `--rank --json`."""
import http.client
import json
import os
import threading

import pytest

from pipeline import cli, prefer
from pipeline.commands import prefer as cmd
from pipeline.models import reward

PROMPTS = ["a red cube", "<script>alert(1)</script> on a table", "a dog"]


def _runs(tmp_path, n=3, broken=()):
    """``n`` runs' sample folders; the runs in ``broken`` hold bytes that are not an image."""
    from PIL import Image

    runs = {}
    for c in range(n):
        folder = tmp_path / f"run{c}" / "eval" / "final"
        folder.mkdir(parents=True)
        lines = []
        for k, prompt in enumerate(PROMPTS):
            if c in broken:
                (folder / f"{k:05d}.png").write_bytes(b"\x89PNG run%d sample%d" % (c, k))
            else:
                Image.new("RGB", (48, 48), (40 + 70 * c, 30 * k, 200 - 60 * c)).save(folder / f"{k:05d}.png")
            lines.append(json.dumps({"file": f"{k:05d}.png", "prompt": prompt, "seed": k}))
        (folder / "prompts.jsonl").write_text("\n".join(lines) + "\n")
        runs[f"run{c}"] = str(folder)
    return runs


class Running:
    def __init__(self, tmp_path, host="127.0.0.1", out=None):
        self.samples = prefer.SampleSet.load(_runs(tmp_path) if out is None else out[0])
        self.out = str(tmp_path / "votes") if out is None else out[1]
        os.makedirs(self.out, exist_ok=True)
        self.server = cmd.Server(self.samples, self.out, host, 0, seed=0)
        self.port = self.server.httpd.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def request(self, method, path, body=None, headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            return r.status, dict(r.getheaders()), r.read()
        finally:
            conn.close()

    def post(self, path, doc, headers=None):
        status, _, body = self.request("POST", path, json.dumps(doc),
                                       {"Content-Type": "application/json", **(headers or {})})
        return status, json.loads(body)

    def close(self):
        self.server.close()
        self.thread.join(5)


@pytest.fixture
def running(tmp_path):
    r = Running(tmp_path)
    yield r
    r.close()


def test_page_pair_media_vote_and_replay(running):
    status, headers, page = running.request("GET", "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html") and b"textContent" in page
    assert "winnow_voter=" in headers["Set-Cookie"] and "HttpOnly" in headers["Set-Cookie"]
    assert b"<script>alert" not in page                       # prompts never reach the HTML
    status, pair = running.post("/api/next", {})
    assert status == 200 and set(pair) >= {"token", "prompt", "left", "right", "progress"}
    # cells stay hidden: the page gets a random token and which side, nothing else
    assert (pair["left"], pair["right"]) == (f"/media/{pair['token']}/left", f"/media/{pair['token']}/right")
    status, _, left = running.request("GET", pair["left"])
    issued = running.server.pairs.issued(pair["token"])
    item = running.samples.items[issued["item"]]
    assert status == 200 and left == open(item.files[issued["left"]], "rb").read()
    assert item.prompt == pair["prompt"]
    status, r = running.post("/api/vote", {"token": pair["token"], "choice": "left"},
                             {"Cookie": "winnow_voter=abc123"})
    assert status == 200 and r["status"] == "ok" and r["votes"] == 1 and r["next"]["token"] != pair["token"]
    status, r = running.post("/api/vote", {"token": pair["token"], "choice": "right"})
    assert status == 200 and r["status"] == "duplicate" and r["votes"] == 1
    vote = json.loads(open(os.path.join(running.out, "votes.jsonl")).read())
    assert (vote["voter"], vote["left"], vote["choice"], vote["prompt"]) == ("abc123", issued["left"], "left",
                                                                             item.prompt)
    status, _, body = running.request("GET", "/api/ranking")
    assert status == 200 and json.loads(body)["votes"] == 1


def test_media_answers_byte_ranges_so_a_browser_can_seek(running):
    status, pair = running.post("/api/next", {})
    issued = running.server.pairs.issued(pair["token"])
    data = open(running.samples.items[issued["item"]].files[issued["right"]], "rb").read()
    n = len(data)
    for header, code, want, content_range in [
            ("bytes=0-9", 206, data[:10], f"bytes 0-9/{n}"),
            ("bytes=10-", 206, data[10:], f"bytes 10-{n - 1}/{n}"),
            ("bytes=-7", 206, data[-7:], f"bytes {n - 7}-{n - 1}/{n}"),
            (f"bytes=5-{10 * n}", 206, data[5:], f"bytes 5-{n - 1}/{n}"),   # clipped to the file
            (f"bytes={n}-", 416, b"", f"bytes */{n}"),                      # past the end
            ("bytes=-0", 416, b"", f"bytes */{n}"),
            ("bytes=9-3", 200, data, None), ("bytes=0-1,4-5", 200, data, None),   # ignored: the whole file
            ("items=0-3", 200, data, None), ("bytes=" + "9" * 40 + "-", 200, data, None)]:
        status, headers, body = running.request("GET", pair["right"], headers={"Range": header})
        assert (status, body, headers.get("Content-Range")) == (code, want, content_range), header
        assert headers.get("Accept-Ranges") == "bytes" or code == 416


def test_an_image_to_video_pair_carries_its_conditioning_frame(tmp_path):
    from PIL import Image

    from pipeline.commands.eval import write_cond

    runs = {}
    for c in range(2):
        folder = tmp_path / f"v{c}"
        folder.mkdir()
        (folder / "0.gif").write_bytes(b"GIF89a run %d" % c)
        cond, digest = write_cond(Image.new("RGB", (32, 24), (9, 9, 9)), str(folder), "0.cond.png")
        (folder / "prompts.jsonl").write_text(json.dumps({"file": "0.gif", "prompt": "", "seed": 0, "cond": cond,
                                                          "cond_sha256": digest}) + "\n")
        runs[f"v{c}"] = str(folder)
    r = Running(tmp_path, out=(runs, str(tmp_path / "votes")))
    try:
        status, pair = r.post("/api/next", {})
        assert pair["cond"] == f"/media/{pair['token']}/cond"
        status, headers, body = r.request("GET", pair["cond"])
        assert status == 200 and headers["Content-Type"] == "image/png"
        assert body == (tmp_path / "v0" / "0.cond.png").read_bytes()
    finally:
        r.close()
    plain = Running(tmp_path / "plain")                # no conditioning frame: none sent, none served
    try:
        status, pair = plain.post("/api/next", {})
        assert pair["cond"] is None and plain.request("GET", f"/media/{pair['token']}/cond")[0] == 404
    finally:
        plain.close()


@pytest.mark.parametrize("path", ["/media/../../etc/passwd", "/media/%2e%2e/left", "/etc/passwd", "/media/x/left",
                                  "/media/abc/../../prompts.jsonl", "//etc/passwd", "/media/" + "a" * 500 + "/left"])
def test_paths_that_are_not_an_issued_pair_are_404(running, path):
    status, _, body = running.request("GET", path)
    assert status == 404 and b"passwd" not in body


def test_hostile_posts_are_refused(running):
    token = running.post("/api/next", {})[1]["token"]
    cases = [
        ("POST", "/api/vote", json.dumps({"token": token, "choice": "left"}), {"Content-Type": "text/plain"}, 415),
        ("POST", "/api/vote", "x" * 5000, {"Content-Type": "application/json"}, 413),
        ("POST", "/api/vote", "{not json", {"Content-Type": "application/json"}, 400),
        ("POST", "/api/vote", "[1, 2]", {"Content-Type": "application/json"}, 400),
        ("POST", "/api/vote", json.dumps({"token": token, "choice": "<b>"}), {"Content-Type": "application/json"}, 400),
        ("POST", "/api/vote", json.dumps({"token": "forged", "choice": "left"}), {"Content-Type": "application/json"},
         400),
        ("POST", "/api/vote", json.dumps({"token": token, "choice": "left"}),
         {"Content-Type": "application/json", "Origin": "http://evil.example"}, 403),
        ("POST", "/api/other", "{}", {"Content-Type": "application/json"}, 404),
        ("PUT", "/api/vote", "{}", {"Content-Type": "application/json"}, 405),
        ("DELETE", "/", "", {}, 405),
    ]
    for method, path, body, headers, want in cases:
        status, _, _ = running.request(method, path, body, headers)
        assert status == want, (method, path, headers, status)
    assert not os.path.exists(os.path.join(running.out, "votes.jsonl"))       # nothing was recorded
    assert running.post("/api/vote", {"token": token, "choice": "left"})[1]["status"] == "ok"


def test_a_restarted_server_keeps_the_votes_and_the_open_pairs(tmp_path):
    first = Running(tmp_path)
    runs, out = {c: first.samples.items[0].files[c].rsplit("/", 1)[0] for c in first.samples.cells}, first.out
    try:
        token = None
        for _ in range(6):
            token = first.post("/api/next", {})[1]["token"]
            assert first.post("/api/vote", {"token": token, "choice": "tie"})[1]["status"] == "ok"
        open_pair = first.post("/api/next", {})[1]["token"]
    finally:
        first.close()
    second = Running(tmp_path, out=(runs, out))
    try:
        assert second.post("/api/vote", {"token": open_pair, "choice": "both_bad"})[1]["votes"] == 7
        assert second.post("/api/vote", {"token": token, "choice": "left"})[1]["status"] == "duplicate"
    finally:
        second.close()
    lines = open(os.path.join(out, "votes.jsonl")).read().splitlines()
    assert len(lines) == 7 and len({json.loads(x)["token"] for x in lines}) == 7


def test_a_non_local_address_needs_the_key(tmp_path):
    r = Running(tmp_path, host="0.0.0.0")
    try:
        key = r.server.key
        assert key and r.server.url.endswith(f"?key={key}")
        assert r.request("GET", "/")[0] == 403
        assert r.request("GET", "/?key=wrong")[0] == 403
        assert r.request("GET", f"/?key={key}")[0] == 200
        assert r.post("/api/next", {})[0] == 403
        assert r.post("/api/next", {}, {"X-Winnow-Key": "wrong"})[0] == 403
        status, pair = r.post("/api/next", {}, {"X-Winnow-Key": key})
        assert status == 200
        assert r.request("GET", pair["left"])[0] == 403
        assert r.request("GET", pair["left"] + f"?key={key}")[0] == 200
    finally:
        r.close()


def test_rank_prints_every_run_with_its_interval(tmp_path, capsys):
    runs = _runs(tmp_path)
    out = str(tmp_path / "votes")
    os.makedirs(out)
    log = prefer.VoteLog(os.path.join(out, "votes.jsonl"))
    n = 0
    for winner, loser, times in (("run2", "run0", 12), ("run2", "run1", 10), ("run1", "run0", 9), ("run0", "run1", 3)):
        for _ in range(times):
            log.add({"token": f"t{n}", "left": winner, "right": loser, "choice": "left", "voter": "v"})
            n += 1
    assert cmd.cell_names(list(runs.values())) == ["run0/eval/final", "run1/eval/final", "run2/eval/final"]
    from pipeline import demo

    planned = cmd.plan(cmd.from_args(demo.prefer_args(["--runs", *runs.values(), "--out", out, "--rank"])))
    assert planned["prompts"] == 3 and planned["mode"] == "rank" and list(planned["runs"])[0] == "run0/eval/final"
    named = ["--runs", *runs.values(), "--names", *runs, "--out", out]
    assert cli.main(["prefer", *named, "--rank", "--json", "--replicates", "200"]) == 0
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert doc["votes"] == 34 and [c["cell"] for c in doc["cells"]] == ["run2", "run1", "run0"]
    for c in doc["cells"]:
        assert c["ci95"][0] <= c["strength"] <= c["ci95"][1]
    assert cli.main(["prefer", *named, "--rank"]) == 0
    assert "95 % interval" in capsys.readouterr().out
    assert cli.main(["prefer", *named[:-2], "--out", str(tmp_path / "none"), "--rank", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["votes"] == 0
    assert cli.main(["prefer", "--runs", runs["run0"], runs["run0"], "--out", out, "--rank"]) == 2
    assert cli.main(["prefer", "--runs", *runs.values(), "--out", out, "--json"]) == 2


def test_a_study_is_ranked_into_its_study_md_and_plot(tmp_path, capsys):
    study = tmp_path / "study"
    rows = []
    for k, run in enumerate(_runs(tmp_path, broken=(2,)).values()):
        cell_run = study / "cells" / f"cell_00{k}"
        os.makedirs(cell_run / "eval")
        os.rename(os.path.dirname(os.path.dirname(run)) + "/eval/final", cell_run / "eval" / "final")
        rows.append({"cell": f"cell_00{k}", "run": str(cell_run), "fraction": [0.9, 0.5, 0.2][k]})
    (study / "study.json").write_text(json.dumps(rows))
    (study / "study.md").write_text("| cell | clip_score |\n| --- | ---: |\n| cell_000 | 0.3 |\n")
    out = study / "prefer"
    os.makedirs(out)
    log = prefer.VoteLog(str(out / "votes.jsonl"))
    for n in range(30):
        log.add({"token": f"t{n}", "left": "cell_001", "right": ["cell_000", "cell_002"][n % 2], "choice": "left",
                 "voter": "v"})
    for _ in range(2):                                    # ranked twice: one Preference section
        assert cli.main(["prefer", str(study), "--rank", "--replicates", "200"]) == 0
    text = (study / "study.md").read_text()
    assert text.startswith("| cell | clip_score |") and text.count("## Preference") == 1
    assert "| 1 | cell_001 | 50.0 |" in text
    assert json.loads((out / "ranking.json").read_text())["cells"][0]["cell"] == "cell_001"
    assert (study / "plots" / "preference_vs_kept.png").stat().st_size > 1000
    # the demo's step: the judge votes on the study, and its ranking reaches study.md
    from pipeline import demo

    spec = cmd.from_args(demo.prefer_args([str(study), "--judge", "clip", "--votes", "12", "--replicates", "200"]))
    result = cmd.run(spec, log=None)
    assert result.judged == 12 and result.ranking["votes"] == 42
    judged = [json.loads(x) for x in (out / "votes.jsonl").read_text().splitlines()][30:]
    for v in judged:              # cell_002's samples are not images: they lose
        if "cell_002" in (v["left"], v["right"]):
            assert v["choice"] == ("right" if v["left"] == "cell_002" else "left")
    assert "42 votes" in (study / "study.md").read_text() and (study / "study.md").read_text().count("## Pref") == 1
    capsys.readouterr()
    assert cli.main(["prefer", str(tmp_path), "--rank"]) == 2                 # not a study
    assert "no readable study.json" in capsys.readouterr().err
    assert cli.main(["prefer", str(study), "--runs", "a", "b", "--rank"]) == 2
    assert cli.main(["prefer", "--runs", "a", "b", "--rank"]) == 2            # --out is needed with --runs


def test_the_clip_judge_votes_like_the_page_records_people(tmp_path, capfd):
    from PIL import Image

    runs = {}
    for c, colour in enumerate(((220, 40, 40), (40, 200, 40), (40, 40, 220))):
        folder = tmp_path / f"j{c}"
        folder.mkdir()
        lines = []
        for k, prompt in enumerate(["a red square", "a green field", "a blue sky"]):
            Image.new("RGB", (64, 64), tuple(min(255, v + 10 * k) for v in colour)).save(folder / f"{k}.png")
            lines.append(json.dumps({"file": f"{k}.png", "prompt": prompt, "seed": k}))
        (folder / "prompts.jsonl").write_text("\n".join(lines) + "\n")
        runs[f"j{c}"] = str(folder)
    out = tmp_path / "judged"
    args = ["prefer", "--runs", *runs.values(), "--names", *runs, "--out", str(out), "--judge", "clip", "--votes", "24"]
    assert cli.main(args) == 0
    printed = capfd.readouterr()
    assert "the judge cast 24 votes" in printed.out and "random weights" in printed.err
    votes = [json.loads(x) for x in (out / "votes.jsonl").read_text().splitlines()]
    assert len(votes) == 24 and {v["voter"] for v in votes} == {"judge:clip"}
    judge = cmd.Judging(reward.load(reward.JudgeSpec("clip")))   # the same seeded tiny CLIP: the same verdicts
    samples = prefer.SampleSet.load(runs)
    by_prompt = {it.prompt: it for it in samples.items}
    for v in votes:
        item = by_prompt[v["prompt"]]
        assert v["choice"] == judge.choose(item.files[v["left"]], item.files[v["right"]], v["prompt"])
    assert judge.choose(str(tmp_path / "nothing.png"), str(tmp_path / "none.png"), "x") == "both_bad"
    first = votes[0]                                        # a person votes on the judge's first samples
    prefer.VoteLog(str(out / "votes.jsonl")).add({**first, "token": "person-1", "voter": "alice"})
    assert cli.main([*args[:-4], "--rank", "--json", "--replicates", "200"]) == 0
    doc = json.loads(capfd.readouterr().out.strip().splitlines()[-1])
    assert doc["votes"] == 25 and doc["judge_agreement"]["judge:clip"]["votes"] == 1
    assert doc["judge_agreement"]["judge:clip"]["agree"] == 1.0
    assert cli.main([*args[:-2]]) == 2                                         # --judge without --votes
    assert cli.main([*args[:-4], "--votes", "3"]) == 2                         # --votes without --judge
