"""The preference page in a real browser (Debian's chromium through chromedriver and Selenium):
votes with the mouse and with the keyboard, a server restarted mid-session, two browsers at once,
and a screenshot kept in ``.artifacts/`` (or ``$WINNOW_ARTIFACTS``)."""
import json
import os
import shutil
import tempfile
import threading
import time

import pytest

from pipeline import prefer
from pipeline.commands import prefer as cmd

pytestmark = pytest.mark.slow

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _runs(tmp_path):
    from PIL import Image, ImageDraw

    runs = {}
    for c, colour in enumerate(((200, 60, 60), (60, 160, 60), (60, 90, 200))):
        folder = tmp_path / f"run{c}"
        folder.mkdir()
        lines = []
        for k, prompt in enumerate(["a red cube", "<script>alert('x')</script> a cat", "a dog on a beach"]):
            im = Image.new("RGB", (256, 256), colour)
            ImageDraw.Draw(im).text((20, 120), f"run {c} / prompt {k}", fill=(255, 255, 255))
            im.save(folder / f"{k:05d}.png")
            lines.append(json.dumps({"file": f"{k:05d}.png", "prompt": prompt, "seed": k}))
        (folder / "prompts.jsonl").write_text("\n".join(lines) + "\n")
        runs[f"run{c}"] = str(folder)
    return runs


class Served:
    def __init__(self, samples, out, port=0):
        self.server = cmd.Server(samples, out, "127.0.0.1", port)
        self.port = self.server.httpd.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.close()
        self.thread.join(5)


def _browser(scratch):
    """A headless chromium whose profile and temporary files live in ``scratch``: a short path, since
    chromium's profile lock is a UNIX socket inside it (108 bytes at most; pytest's tmp_path is longer)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.makedirs(scratch, exist_ok=True)
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    opts.add_argument(f"--user-data-dir={scratch}/profile")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900",
                "--no-first-run", "--disable-extensions"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(DRIVER, env={**os.environ, "TMPDIR": str(scratch)}), options=opts)


def _votes(driver, which="mine") -> int:
    """The votes this page made (``mine``) or everyone's (``votes``), as the page shows them."""
    return int(driver.find_element("tag name", "body").get_attribute(f"data-{which}") or 0)


def _wait_votes(driver, n, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if _votes(driver) >= n:
            return
        time.sleep(0.02)
    raise AssertionError(f"the page shows {_votes(driver)} votes, expected {n}; "
                         f"error line: {driver.find_element('id', 'error').text!r}")


def _wait_pair(driver, timeout=30):
    """Until both samples of a pair are on screen (the page takes no vote before)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if driver.find_element("tag name", "body").get_attribute("data-ready"):
            return
        time.sleep(0.02)
    raise AssertionError(f"no pair shown; error line: {driver.find_element('id', 'error').text!r}")


def _vote_keys(driver, start, n):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    keys = [Keys.ARROW_LEFT, Keys.ARROW_RIGHT, Keys.ARROW_DOWN, "b", "1", "2", "3", "4"]
    for k in range(n):
        _wait_pair(driver)
        ActionChains(driver).send_keys(keys[k % len(keys)]).perform()
        _wait_votes(driver, start + k + 1)


@pytest.mark.skipif(not (CHROMIUM and DRIVER),
                    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")
def test_people_vote_in_a_browser_through_a_restart_and_two_at_once(tmp_path):
    pytest.importorskip("selenium")
    samples = prefer.SampleSet.load(_runs(tmp_path))
    scratch = tempfile.TemporaryDirectory(prefix="wp-")
    out = str(tmp_path / "votes")
    os.makedirs(out)
    served = Served(samples, out)
    port = served.port
    drivers = []
    try:
        a = _browser(os.path.join(scratch.name, "a"))
        drivers.append(a)
        a.get(f"http://127.0.0.1:{port}/")
        _wait_pair(a)
        # a prompt with markup shows as text
        seen = set()
        for k in range(40):                               # the mouse
            seen.add(a.find_element("id", "prompt").text)
            _wait_pair(a)
            button = ("b-left", "b-right", "b-tie", "b-both_bad")[k % 4]
            a.find_element("id", button).click()
            _wait_votes(a, k + 1)
        assert "<script>alert('x')</script> a cat" in seen
        assert a.execute_script("return window.__xss === undefined && document.querySelectorAll('script').length") == 1
        _vote_keys(a, 40, 20)                             # the keyboard
        served.close()                                    # the server restarts mid-session, on the same port
        served = Served(samples, out, port)
        _vote_keys(a, 60, 20)                             # the pair on screen was issued before the restart
        os.makedirs(artifacts := os.environ.get("WINNOW_ARTIFACTS", os.path.join(ROOT, ".artifacts")), exist_ok=True)
        a.save_screenshot(os.path.join(artifacts, "prefer_page.png"))
        b = _browser(os.path.join(scratch.name, "b"))      # two browsers at once
        drivers.append(b)
        b.get(f"http://127.0.0.1:{port}/")
        _wait_pair(b)
        errors = []

        def run(driver, start):
            try:
                _vote_keys(driver, start, 20)
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=run, args=(a, 80)), threading.Thread(target=run, args=(b, 0))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        assert _votes(a) == 100 and _votes(b) == 20
        assert max(_votes(a, "votes"), _votes(b, "votes")) == 120         # the last to vote saw everyone's
    finally:
        for d in drivers:
            d.quit()
        served.close()
        scratch.cleanup()
    lines = [json.loads(x) for x in open(os.path.join(out, "votes.jsonl")).read().splitlines()]
    assert len(lines) == 120 and len({v["token"] for v in lines}) == 120
    voters = {v["voter"] for v in lines}
    assert len(voters) == 2 and "anonymous" not in voters            # one cookie per browser
    assert {v["choice"] for v in lines} == set(prefer.CHOICES)
    assert all(v["left"] != v["right"] and v["prompt"] for v in lines)
    assert os.path.getsize(os.path.join(artifacts, "prefer_page.png")) > 1000


def _video_runs(tmp_path):
    """Three runs of image-to-video samples: 2 s WebM (VP8) clips with a bar that moves one step a
    frame, the run's colour, and a conditioning frame per prompt written as `winnow eval` writes it."""
    import av
    import numpy as np
    from PIL import Image

    from pipeline.commands.eval import write_cond

    runs = {}
    conds = [Image.new("RGB", (160, 120), (30 + 100 * k, 140, 200 - 80 * k)) for k in range(2)]
    for c in range(3):
        folder = tmp_path / f"video{c}"
        folder.mkdir()
        lines = []
        for k, frame in enumerate(conds):
            with av.open(str(folder / f"{k}.webm"), "w") as box:
                stream = box.add_stream("libvpx", rate=12)
                stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
                for t in range(24):
                    img = np.zeros((120, 160, 3), np.uint8)
                    img[:] = (60 + 60 * c, 40, 90)
                    img[:, 6 * t:6 * t + 8] = 255
                    box.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
                box.mux(stream.encode())
            cond, digest = write_cond(frame, str(folder), f"{k}.cond.png")
            lines.append(json.dumps({"file": f"{k}.webm", "prompt": f"clip {k}", "seed": k, "cond": cond,
                                     "cond_sha256": digest}))
        (folder / "prompts.jsonl").write_text("\n".join(lines) + "\n")
        runs[f"video{c}"] = str(folder)
    gifs = {}
    for c in range(2):                        # what `winnow eval` writes for a video model: animated GIFs
        folder = tmp_path / f"gif{c}"
        folder.mkdir()
        frames = [Image.new("RGB", (96, 64), (40 * t, 100 + 60 * c, 50)) for t in range(6)]
        frames[0].save(folder / "0.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
        (folder / "prompts.jsonl").write_text(json.dumps({"file": "0.gif", "prompt": "a gif", "seed": 0}) + "\n")
        gifs[f"gif{c}"] = str(folder)
    return runs, gifs


@pytest.mark.skipif(not (CHROMIUM and DRIVER),
                    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")
def test_video_samples_play_in_step_beside_their_conditioning_frame(tmp_path):
    pytest.importorskip("selenium")
    runs, gifs = _video_runs(tmp_path)
    scratch = tempfile.TemporaryDirectory(prefix="wp-")
    served, driver = None, None
    state = ("const v = document.querySelectorAll('#pair video'); const c = document.getElementById('condimg');"
             "return [v.length, v[0].currentTime, v[1].currentTime, v[0].paused, v[1].paused, v[0].loop && v[1].loop,"
             "v[0].muted && v[1].muted, !document.getElementById('cond').hidden && c.complete && c.naturalWidth,"
             "v[0].duration];")
    try:
        served = Served(prefer.SampleSet.load(runs), str(tmp_path / "votes"))
        driver = _browser(os.path.join(scratch.name, "v"))
        driver.get(f"http://127.0.0.1:{served.port}/")
        for k in range(3):
            _wait_pair(driver)
            time.sleep(0.8)
            n, ta, tb, pa, pb, loop, muted, cond_w, duration = driver.execute_script(state)
            assert (n, pa, pb, loop, muted, cond_w) == (2, False, False, True, True, 160)
            assert ta > 0.2 and abs(ta - tb) < 0.15 and abs(duration - 2.0) < 0.1, (ta, tb, duration)
            if k == 1:                        # pushed out of step, the right sample is brought back
                driver.execute_script("const v = document.querySelectorAll('#pair video');"
                                      "v[1].currentTime = (v[0].currentTime + 0.6) % v[0].duration;")
                time.sleep(0.8)
                n, ta, tb = driver.execute_script(state)[:3]
                assert abs(ta - tb) < 0.15, (ta, tb)
            if k == 2:
                artifacts = os.environ.get("WINNOW_ARTIFACTS", os.path.join(ROOT, ".artifacts"))
                os.makedirs(artifacts, exist_ok=True)
                driver.save_screenshot(os.path.join(artifacts, "prefer_page_video.png"))
            _vote_keys(driver, k, 1)
        served.close()
        served = Served(prefer.SampleSet.load(gifs), str(tmp_path / "gif-votes"))
        driver.get(f"http://127.0.0.1:{served.port}/")
        _wait_pair(driver)
        shown = driver.execute_script("return [...document.querySelectorAll('#pair img')].map("
                                      "i => i.complete && i.naturalWidth)")
        assert shown == [96, 96] and driver.find_element("id", "cond").get_attribute("hidden") is not None
        _vote_keys(driver, 0, 2)
    finally:
        if driver is not None:
            driver.quit()
        if served is not None:
            served.close()
        scratch.cleanup()
    votes = [json.loads(x) for x in open(tmp_path / "votes" / "votes.jsonl").read().splitlines()]
    assert len(votes) == 3 and {v["prompt"] for v in votes} <= {"clip 0", "clip 1"}
    assert len(open(tmp_path / "gif-votes" / "votes.jsonl").read().splitlines()) == 2
