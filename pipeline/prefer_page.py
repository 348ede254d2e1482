"""The voting page of ``winnow prefer``: plain HTML and JavaScript, no build step. Every text from the
study (prompts) is set with ``textContent``, never parsed as HTML."""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>winnow prefer</title>
<style>
 body { font: 16px/1.4 system-ui, sans-serif; margin: 0 auto; max-width: 1400px; padding: 12px 20px; color: #222; }
 #prompt { font-size: 1.15em; margin: 8px 0 12px; min-height: 1.4em; }
 #pair { display: flex; gap: 16px; }
 .side { flex: 1; text-align: center; }
 .side img, .side video { width: 100%; max-height: 62vh; object-fit: contain; background: #eee;
                         border: 3px solid transparent; box-sizing: border-box; }
 .side.chosen img, .side.chosen video { border-color: #2a7; }
 #buttons { display: flex; gap: 10px; justify-content: center; margin: 14px 0; flex-wrap: wrap; }
 button { font-size: 1em; padding: 8px 18px; cursor: pointer; }
 kbd { border: 1px solid #aaa; border-radius: 3px; padding: 0 4px; font-size: .85em; }
 #progress { color: #555; text-align: center; }
 #error { color: #b00; text-align: center; min-height: 1.2em; }
 #cond { text-align: center; } #cond img { max-height: 18vh; }
</style></head>
<body>
<div id="prompt" aria-live="polite"></div>
<div id="cond" hidden><div>conditioning frame</div><img id="condimg" alt="conditioning frame"></div>
<div id="pair">
 <div class="side" id="left"></div>
 <div class="side" id="right"></div>
</div>
<div id="buttons">
 <button id="b-left" data-choice="left"><kbd>&larr;</kbd> / <kbd>1</kbd> left is better</button>
 <button id="b-tie" data-choice="tie"><kbd>&darr;</kbd> / <kbd>3</kbd> tie</button>
 <button id="b-right" data-choice="right">right is better <kbd>&rarr;</kbd> / <kbd>2</kbd></button>
 <button id="b-both_bad" data-choice="both_bad"><kbd>b</kbd> / <kbd>4</kbd> both bad</button>
</div>
<div id="error" role="alert"></div>
<div id="progress"></div>
<script>
"use strict";
const KEY = new URLSearchParams(location.search).get("key") || "";
let current = null, busy = false, mine = 0;
function media(url, video) {
  const el = document.createElement(video ? "video" : "img");
  el.src = url + (KEY ? "?key=" + encodeURIComponent(KEY) : "");
  if (video) { el.muted = true; el.loop = true; el.playsInline = true; el.preload = "auto"; }
  else { el.alt = "sample"; }
  return el;
}
async function api(path, body) {
  const r = await fetch(path, {method: "POST", headers: {"Content-Type": "application/json", "X-Winnow-Key": KEY},
                                body: JSON.stringify(body || {})});
  const data = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(data.error || ("HTTP " + r.status));
  return data;
}
const STEP_S = 0.08;   // the most two playing samples may drift apart before the right one is moved
let stepper = null;
function keepInStep(a, b) {   // the left sample leads; drift is measured around the loop (0.05 s and 1.98 s
  clearInterval(stepper);      // of a 2 s loop are 0.07 s apart)
  stepper = setInterval(() => {
    if (!a.isConnected || !b.isConnected) { clearInterval(stepper); return; }
    const loop = a.duration, d = a.currentTime - b.currentTime;
    const drift = isFinite(loop) && loop > 0 ? ((d % loop) + 1.5 * loop) % loop - loop / 2 : d;
    if (Math.abs(drift) > STEP_S) b.currentTime = Math.min(a.currentTime, (b.duration || a.currentTime));
  }, 200);
}
function loaded(el, video) {   // resolves when the sample can be shown (or has failed: a broken one is shown too)
  return new Promise((done) => {
    setTimeout(done, 10000);
    if (video) { el.addEventListener("canplay", done, {once: true}); el.addEventListener("error", done, {once: true}); }
    else el.decode().then(done, done);
  });
}
function show(p) {
  current = p;
  busy = true;                       // no vote until both samples are on screen
  document.body.dataset.ready = "";
  document.getElementById("prompt").textContent = p.prompt;
  const cond = document.getElementById("cond");
  cond.hidden = !p.cond;
  if (p.cond) document.getElementById("condimg").src = p.cond + (KEY ? "?key=" + encodeURIComponent(KEY) : "");
  const els = [media(p.left, p.video), media(p.right, p.video)];
  const boxes = ["left", "right"].map((side) => document.getElementById(side));
  for (const box of boxes) { box.classList.remove("chosen"); box.replaceChildren(); }
  Promise.all(els.map((el) => loaded(el, p.video))).then(() => {
    if (current !== p) return;
    // both go on screen in the same task, so animated GIFs start on the same frame; videos start
    // together from 0 and are kept in step
    boxes[0].appendChild(els[0]);
    boxes[1].appendChild(els[1]);
    if (p.video) {
      for (const v of els) { v.currentTime = 0; v.play().catch(() => {}); }
      keepInStep(els[0], els[1]);
    }
    busy = false;
    document.body.dataset.ready = p.token;
  });
  document.getElementById("progress").textContent = p.progress;
}
async function next() {
  try { show(await api("/api/next")); document.getElementById("error").textContent = ""; }
  catch (e) { document.getElementById("error").textContent = e.message; busy = false; }
}
async function vote(choice) {
  if (!current || busy) return;
  busy = true;
  if (choice === "left" || choice === "right") document.getElementById(choice).classList.add("chosen");
  try {
    const r = await api("/api/vote", {token: current.token, choice: choice});
    document.body.dataset.votes = r.votes;               // everyone's
    if (r.status === "ok") document.body.dataset.mine = ++mine;   // this page's, counted once each
    show(r.next);
  } catch (e) { document.getElementById("error").textContent = e.message; next(); }
}
for (const b of document.querySelectorAll("button[data-choice]")) {
  b.addEventListener("click", () => vote(b.dataset.choice));
}
document.addEventListener("keydown", (e) => {
  const k = {ArrowLeft: "left", "1": "left", ArrowRight: "right", "2": "right", ArrowDown: "tie", "3": "tie",
             t: "tie", b: "both_bad", "4": "both_bad"}[e.key];
  if (k) { e.preventDefault(); vote(k); }
});
next();
</script>
</body></html>
"""
