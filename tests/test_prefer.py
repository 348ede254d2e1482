"""The preference study below the page (pipeline/prefer.py): samples paired by prompt and seed,
hostile prompt lists, the votes file (fsynced, resumed, a token once, a torn tail), pairs handed
out and voted on across a restart, and a killed writer."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from pipeline import prefer


def _run(folder, rows, make=True):
    os.makedirs(folder, exist_ok=True)
    lines = []
    for row in rows:
        if isinstance(row, str):
            lines.append(row)
            continue
        name, prompt, seed = row
        if make and "/" not in name and name not in ("", ".", ".."):
            with open(os.path.join(folder, name), "wb") as fh:
                fh.write(b"\x89PNG fake")
        lines.append(json.dumps({"file": name, "prompt": prompt, "seed": seed}))
    with open(os.path.join(folder, prefer.PROMPTS_FILE), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return str(folder)


def test_samples_pair_up_by_prompt_and_seed(tmp_path):
    a = _run(tmp_path / "a", [("0.png", "a cat", 1), ("1.png", "a dog", 2), ("2.png", "only a", 3)])
    b = _run(tmp_path / "b", [("x.png", "a dog", 2), ("y.png", "a cat", 1), ("z.png", "a cat", 9)])
    c = _run(tmp_path / "c", [("0.png", "a cat", 1)])
    s = prefer.SampleSet.load({"A": a, "B": b, "C": c})
    assert s.cells == ("A", "B", "C")
    assert [(it.prompt, it.seed, sorted(it.files)) for it in s.items] == [("a cat", 1, ["A", "B", "C"]),
                                                                         ("a dog", 2, ["A", "B"])]
    assert s.items[0].files["B"] == os.path.realpath(tmp_path / "b" / "y.png")
    with pytest.raises(prefer.PreferError, match="at least two runs"):
        prefer.SampleSet.load({"A": a})
    with pytest.raises(prefer.PreferError, match="same prompts file and seed"):
        prefer.SampleSet.load({"A": _run(tmp_path / "d", [("0.png", "p", 1)]),
                               "B": _run(tmp_path / "e", [("0.png", "q", 1)])})
    with pytest.raises(prefer.PreferError, match="no readable prompts.jsonl"):
        prefer.SampleSet.load({"A": a, "B": str(tmp_path)})


def test_image_to_video_samples_pair_only_on_the_same_conditioning_frame(tmp_path):
    from PIL import Image

    from pipeline.commands.eval import write_cond

    frames = [Image.new("RGB", (64, 48), (90, 20 * k, 10)) for k in range(2)]
    big = Image.new("RGB", (1600, 900), (5, 6, 7))

    def run(name, conds, extra=()):
        folder = tmp_path / name
        folder.mkdir()
        lines = []
        for k, frame in enumerate(conds):
            (folder / f"{k}.gif").write_bytes(b"GIF89a fake")
            cond, digest = write_cond(frame, str(folder), f"{k}.cond.png")
            lines.append(json.dumps({"file": f"{k}.gif", "prompt": "", "seed": k, "cond": cond, "cond_sha256": digest}))
        (folder / prefer.PROMPTS_FILE).write_text("\n".join([*lines, *extra]) + "\n")
        return str(folder)

    outside = tmp_path / "elsewhere.png"
    outside.write_bytes(b"x")
    hostile = [json.dumps({"file": "0.gif", "prompt": "", "seed": 5, "cond": "../elsewhere.png",
                           "cond_sha256": "0" * 64}),
               json.dumps({"file": "0.gif", "prompt": "", "seed": 6, "cond": "0.cond.png"}),        # no digest
               json.dumps({"file": "0.gif", "prompt": "", "seed": 7, "cond": "0.cond.png", "cond_sha256": "<b>"})]
    a = run("a", frames, hostile)
    b = run("b", frames)
    c = run("c", [frames[0], big])        # the same seeds, but its second video started from another frame
    s = prefer.SampleSet.load({"A": a, "B": b, "C": c})
    assert s.skipped["A"] == {"conditioning frame outside the folder or missing": 1, "bad line": 2}
    assert [(it.seed, sorted(it.files)) for it in s.items] == [(0, ["A", "B", "C"]), (1, ["A", "B"])]
    assert s.items[0].cond == os.path.realpath(tmp_path / "a" / "0.cond.png") and s.items[0].cond in s.files()
    assert str(outside) not in s.files()
    with Image.open(tmp_path / "c" / "1.cond.png") as im:
        assert im.size == (512, 288)          # kept small for the page; the digest is of the frame as given
    assert prefer.read_listing(c)[0][1].cond_sha256 != prefer.read_listing(a)[0][1].cond_sha256


def test_a_prompt_list_cannot_reach_files_outside_its_folder(tmp_path):
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"secret")
    folder = tmp_path / "run"
    folder.mkdir()
    os.symlink(outside, folder / "link.png")                  # a link out of the folder
    os.mkfifo(folder / "fifo.png")                            # not a regular file
    (folder / "sub").mkdir()
    (folder / "sub" / "in.png").write_bytes(b"x")
    (folder / "inner.png").write_bytes(b"x")
    os.symlink(folder / "inner.png", folder / "inner_link.png")   # a link that stays inside: fine
    rows = [("../secret.png", "p", 1), (str(outside), "p", 2), ("sub/in.png", "p", 3), ("link.png", "p", 4),
            ("fifo.png", "p", 5), ("missing.png", "p", 6), ("..", "p", 7), ("inner.png", "p", 8),
            ("inner_link.png", "p", 9), "{not json", json.dumps({"file": "inner.png", "prompt": "p", "seed": True}),
            json.dumps({"file": "inner.png", "prompt": 3, "seed": 1}), json.dumps(["inner.png"])]
    _run(folder, rows, make=False)
    got, skipped = prefer.read_listing(str(folder))
    inner = os.path.realpath(folder / "inner.png")
    assert [(r.prompt, r.seed, r.path, r.cond) for r in got] == [("p", 8, inner, None), ("p", 9, inner, None)]
    assert skipped == {"file outside the folder or missing": 7, "bad line": 4}
    big = tmp_path / "big"
    big.mkdir()
    with open(big / prefer.PROMPTS_FILE, "wb") as fh:
        fh.truncate(prefer.MAX_LISTING_BYTES + 1)
    with pytest.raises(prefer.PreferError, match="over the"):
        prefer.read_listing(str(big))


def _vote(token, choice="left", left="A", right="B"):
    return {"token": token, "left": left, "right": right, "choice": choice, "voter": "v"}


def test_the_vote_log_keeps_every_vote_once_and_cuts_a_torn_tail(tmp_path):
    path = str(tmp_path / "prefer" / "votes.jsonl")
    log = prefer.VoteLog(path)
    assert log.add(_vote("t1")) and log.add(_vote("t2", "tie"))
    assert not log.add(_vote("t1", "right"))                  # a replayed token counts once
    with open(path, "ab") as fh:
        fh.write(b'{"token": "t3", "left": "A", "ri')          # killed while writing: never acknowledged
    again = prefer.VoteLog(path)
    assert [v["token"] for v in again.votes] == ["t1", "t2"] and again.triples()[1] == ("A", "B", "tie")
    assert open(path, "rb").read().endswith(b"\n") and len(open(path).read().splitlines()) == 2
    assert again.add(_vote("t3"))
    assert [json.loads(x)["token"] for x in open(path).read().splitlines()] == ["t1", "t2", "t3"]
    for bad in ({"token": "x"}, _vote("t9", "maybe"), _vote("t9", left="A", right="A"), _vote(5)):
        with pytest.raises(prefer.PreferError):
            again.add(bad)


def test_votes_from_many_threads_are_all_kept(tmp_path):
    log = prefer.VoteLog(str(tmp_path / "votes.jsonl"))
    results = []

    def voter(k):
        for n in range(25):
            results.append(log.add(_vote(f"{k}-{n}")))
            results.append(log.add(_vote(f"{k}-{n}")))       # a double submit

    threads = [threading.Thread(target=voter, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 200 and results.count(False) == 200
    tokens = [json.loads(x)["token"] for x in open(tmp_path / "votes.jsonl").read().splitlines()]
    assert len(tokens) == 200 and len(set(tokens)) == 200


def test_pairs_are_issued_voted_on_and_survive_a_restart(tmp_path):
    runs = {c: _run(tmp_path / c, [(f"{k}.png", f"prompt {k}", k) for k in range(4)]) for c in ("A", "B", "C")}
    samples = prefer.SampleSet.load(runs)
    study = str(tmp_path / "study")
    os.makedirs(study)
    pairs = prefer.Pairs(samples, study, seed=0)
    seen = set()
    for _ in range(3):                                        # every pair once first
        d = pairs.issue()
        assert d["left"] != d["right"] and {d["left"], d["right"]} <= set(samples.cells)
        seen.add(frozenset((d["left"], d["right"])))
        assert pairs.vote(d["token"], "left", "me") == "ok"
    assert len(seen) == 3
    pending = pairs.issue()
    restarted = prefer.Pairs(samples, study, seed=1)          # a page open across the restart still votes
    assert restarted.vote(pending["token"], "both_bad", "me") == "ok"
    assert restarted.vote(pending["token"], "left", "me") == "duplicate"
    with pytest.raises(prefer.PreferError, match="unknown pair token"):
        restarted.vote("forged", "left", "me")
    with pytest.raises(prefer.PreferError, match="choice must be"):
        restarted.vote(pending["token"], "<script>", "me")
    assert restarted.counts().total == 4
    vote = restarted.log.votes[-1]
    item = samples.items[pending["item"]]
    assert (vote["prompt"], vote["seed"], vote["choice"]) == (item.prompt, item.seed, "both_bad")


WRITER = """
import sys
from pipeline import prefer
log = prefer.VoteLog(sys.argv[1])
n = 0
while True:
    log.add({"token": f"t{n}", "left": "A", "right": "B", "choice": "left", "voter": "v"})
    n += 1
    print(n, flush=True)
"""


def test_a_killed_writer_loses_no_acknowledged_vote(tmp_path):
    path = str(tmp_path / "votes.jsonl")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-c", WRITER, path], stdout=subprocess.PIPE, text=True, cwd=root,
                            env={**os.environ, "PYTHONPATH": root})
    acked = 0
    deadline = time.time() + 60
    try:
        while acked < 50 and time.time() < deadline:
            acked = int(proc.stdout.readline() or acked)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    assert acked >= 50
    tokens = [v["token"] for v in prefer.VoteLog(path).votes]
    assert tokens[:acked] == [f"t{n}" for n in range(acked)] and len(tokens) == len(set(tokens))


def test_judges_agreement_with_people_on_the_same_samples():
    def v(voter, left, right, choice, prompt="p", seed=0):
        return {"voter": voter, "left": left, "right": right, "choice": choice, "prompt": prompt, "seed": seed}

    votes = [
        v("judge:clip", "A", "B", "left"),                 # the judge: A over B on (p, 0)
        v("judge:clip", "B", "A", "left"),                 # a later judge vote on the same samples: not used
        v("alice", "B", "A", "right"),                     # A (sides swapped): agrees
        v("bob", "A", "B", "right"),                       # B: disagrees
        v("carol", "A", "B", "both_bad"),                  # a tie: disagrees
        v("judge:clip", "A", "C", "tie", "q", 1),
        v("alice", "C", "A", "tie", "q", 1),               # tie against tie: agrees
        v("alice", "A", "C", "left", "q", 2),              # a seed the judge never saw: not compared
    ]
    got = prefer.agreement(votes)
    assert got == {"judge:clip": {"agree": 0.5, "votes": 4, "pairs": {"A vs B": {"agree": 0.3333, "votes": 3},
                                                                     "A vs C": {"agree": 1.0, "votes": 1}}}}
    assert prefer.agreement([v("alice", "A", "B", "left")]) == {}
    assert prefer.agreement([v("judge:clip", "A", "B", "left")]) == {}
