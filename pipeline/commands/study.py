"""``winnow study``: a sweep meets evaluation. For each chosen cell of a `winnow sweep`, train a short
run on the cell's samples (``data.selection`` = its manifest), evaluate it (``winnow eval --run``:
CLIP score on a prompt set, FID against a reference), and write a table and plots of the scores
against the data each cell kept: the SVD paper's way of choosing filter thresholds (Blattmann et
al., 2023, section 3: train small models on each filtered subset, keep the filter whose model
scores best), end to end.

Outputs: ``OUTPUT/cells/cell_NNN/`` (each cell's train run, with its eval/ samples),
``OUTPUT/study.csv``, ``study.md``, ``study.json`` and ``plots/scores_vs_kept.png``. Re-running
resumes: a cell whose run finished with this spec is not trained again, and its scores are reused
when the eval settings are the same.
"""
from __future__ import annotations

import csv
import json
import sys
import time
from dataclasses import dataclass, field

from pipeline.contract import storage
from pipeline.contract.config import ConfigError, apply_overrides, build, load_yaml, option, take_kind
from pipeline.contract.layout import TrainRun, atomic_write

NAME = "study"
DESCRIPTION = """\
Train and evaluate a short run on each cell of a sweep; a table and plot of score vs data kept.

  winnow study SPEC.yaml [--set dotted.key=value ...]

SPEC names the sweep (a `winnow sweep` output), which cells, the train spec each cell's run starts
from (its data.selection becomes the cell's manifest) and the eval settings. See
jobs/sweep_train_eval.yaml.
"""
SPEC_FILE = "study_spec.yaml"
ENTRIES = [SPEC_FILE, "cells", "study.csv", "study.md", "study.json", "plots"]


@dataclass
class StudyEval:
    prompts: str = option(help="text file of prompts (one per line) or a `winnow curate` output (its kept captions; "
                               "use a held-out shard set)")
    reference: str | None = option(None, "folder of images or a shard set for FID (null: no FID)")
    fid_weights: str | None = option(None, "Inception-v3 weights file, or 'random' (tests and demos only)")
    num: int = option(64, "prompts sampled per cell", min=1)
    steps: int = option(20, "sampler steps", min=1)
    guidance: float = option(7.5, "classifier-free guidance scale", min=0.0)
    size: int | None = option(None, "image side (default: the run's data.resolution, at most 512)", min=8)
    clip_model: str | None = option(None, "open_clip model for the CLIP score (null: the tiny random CLIP)")
    clip_pretrained: str | None = option(None, "its weights, resolved as curation resolves them")
    seed: int = option(0, "seed of the samples")


@dataclass
class StudySpec:
    sweep: str = option(help="a `winnow sweep` output folder (cells.csv, selections/)")
    output: str = option(help="study folder: cells/, study.csv, study.md, plots/")
    train: str | dict = option(help="the train spec each cell's run starts from: a YAML path or a mapping")
    eval: StudyEval = option(help="how each cell's run is scored")
    train_set: list[str] = option(factory=list, help="overrides of the train spec (dotted.key=value), e.g. "
                                                    "train.max_steps=200 or lora.enabled=true")
    cells: list[str] | None = option(None, "cells to study (cell_000 ...); null: every cell keeping min_kept samples")
    min_kept: int = option(16, "cells keeping fewer samples are left out (null cells only)", min=1)
    overwrite: bool = option(False, "replace a study made by a different spec in output (only its files)", runtime=True)
    doc: dict = field(default_factory=dict, metadata={"internal": True, "help": "", "min": None, "max": None,
                                                      "runtime": True})


def _cells_table(sweep: str) -> list[dict]:
    import io

    path = storage.join(sweep, "cells.csv")
    try:
        found = storage.isfile(path) and storage.isfile(storage.join(sweep, "sweep.json"))
    except OSError as exc:
        raise ConfigError(f"sweep {sweep!r}: {storage.redact(str(exc)).splitlines()[0]}") from None
    if not found:
        raise ConfigError(f"sweep: {sweep!r} has no cells.csv / sweep.json; give a `winnow sweep` output folder")
    with io.StringIO(storage.read_text(path), newline="") as fh:
        return [{**r, "count": int(r["count"]), "fraction": float(r["fraction"])} for r in csv.DictReader(fh)]


def _runs(sweep: str) -> list[str]:
    """The curate runs the sweep read (the folders of its annotations)."""
    found = json.loads(storage.read_text(storage.join(sweep, "sweep.json")))["annotations"]
    return [storage.parent(p) if p.endswith(".parquet") else p for p in found]


def parse(data: dict) -> StudySpec:
    data = dict(take_kind(data, "study"))
    spec = build(StudySpec, data)
    spec.doc = data
    storage.check_writable(spec.output, "output")
    rows = {r["cell"]: r for r in _cells_table(spec.sweep)}
    if spec.cells is None:
        spec.cells = [c for c, r in rows.items() if r["count"] >= spec.min_kept]
    missing = [c for c in spec.cells if c not in rows]
    if missing:
        raise ConfigError(f"cells: {missing} are not cells of {spec.sweep} (it has {', '.join(rows)})")
    if not spec.cells:
        raise ConfigError(f"cells: no cell of {spec.sweep} keeps min_kept {spec.min_kept} samples; lower min_kept")
    e = spec.eval
    if not (storage.isfile(e.prompts) or storage.isdir(storage.join(e.prompts, "shards"))):
        raise ConfigError(f"eval.prompts: {e.prompts!r} is neither a text file nor a `winnow curate` output folder")
    if e.reference and not e.fid_weights:
        raise ConfigError("eval.fid_weights: required with eval.reference (a weights file, or 'random' for demos)")
    if e.reference and not storage.isdir(e.reference):
        raise ConfigError(f"eval.reference: {e.reference!r} is not a folder of images or a shard set")
    if e.fid_weights and e.fid_weights != "random" and not storage.isfile(e.fid_weights):
        raise ConfigError(f"eval.fid_weights: {e.fid_weights!r} is not a file")
    for cell in spec.cells:                       # every cell's run must be a valid train spec, before Ray starts
        _train_spec(spec, cell)
    return spec


def _train_spec(spec: StudySpec, cell: str):
    from training import train_spec

    doc = load_yaml(spec.train) if isinstance(spec.train, str) else json.loads(json.dumps(spec.train))
    doc.pop("fingerprint", None)
    doc = apply_overrides(doc, spec.train_set)
    doc.setdefault("data", {})
    doc["data"]["shards"] = _runs(spec.sweep)
    doc["data"]["selection"] = storage.join(spec.sweep, "selections", f"{cell}.parquet")
    doc["output"] = {"path": storage.join(spec.output, "cells", cell), "overwrite": spec.overwrite}
    try:
        return train_spec.parse(doc)
    except ConfigError as exc:
        raise ConfigError(f"train ({cell}): {exc}") from None


def load(path: str | None, overrides: list[str] | None = None) -> StudySpec:
    return parse(apply_overrides(load_yaml(path) if path else {}, overrides or []))


def plan(spec: StudySpec) -> list[dict]:
    rows = {r["cell"]: r for r in _cells_table(spec.sweep)}
    return [{**rows[c], "run": storage.join(spec.output, "cells", c)} for c in spec.cells]


def _finished(ts) -> bool:
    """The cell's run finished, made by this same train spec."""
    import yaml

    run = TrainRun(ts.output.path)
    path, spec_file = run.summary, run.spec
    if not storage.isfile(path) or not storage.isfile(spec_file):
        return False
    steps = json.loads(storage.read_text(path)).get("steps")
    return steps == ts.train.max_steps and (yaml.safe_load(storage.read_text(spec_file)) or {}).get("fingerprint") \
        == ts.fingerprint()


@dataclass
class StudyResult:
    output: str
    rows: list[dict]
    wall_s: float
    warnings: list = field(default_factory=list)


def _eval_spec(spec: StudySpec, run: str):
    from pipeline.commands.eval import EvalSpec

    e = spec.eval
    return EvalSpec(reference=e.reference, fid_weights=e.fid_weights, run=run, prompts=e.prompts, num=e.num,
                    steps=e.steps, guidance=e.guidance, size=e.size, clip_model=e.clip_model,
                    clip_pretrained=e.clip_pretrained, seed=e.seed)


def _read_cache(path: str) -> dict:
    """A cell's cached scores, or {} when there are none or the file is not what winnow writes
    (the cell is then evaluated again)."""
    try:
        scored = json.loads(storage.read_text(path))
    except (UnicodeDecodeError, ValueError):
        return {}
    except OSError as exc:
        if storage.transient(exc):
            raise
        return {}
    return scored if isinstance(scored, dict) and isinstance(scored.get("result"), dict) else {}


def run(spec: StudySpec, log=sys.stderr) -> StudyResult:
    from pipeline.commands import eval as evaluation
    from pipeline.commands import train as trainer
    from pipeline.contract.layout import claim_output, fingerprint

    doc = {k: v for k, v in spec.doc.items() if k != "overwrite"}
    claim_output(spec.output, storage.join(spec.output, SPEC_FILE), fingerprint(doc), doc, spec.overwrite, "study",
                 "sweep, train, train_set or cells", ENTRIES, "study", {"sweep": spec.sweep})
    started, rows, warnings = time.time(), [], []
    for item in plan(spec):
        cell, ts = item["cell"], _train_spec(spec, item["cell"])
        if log:
            print(f"\nstudy: {cell} ({item['filters']}: {item['count']} samples, {100 * item['fraction']:.1f} %)",
                  file=log, flush=True)
        if _finished(ts):
            result = trainer.read_result(ts.output.path)
        else:
            result = trainer.run(ts, log=log)
        cache = storage.join(ts.output.path, "eval", "study_eval.json")
        es = _eval_spec(spec, ts.output.path)
        key = {k: v for k, v in es.__dict__.items() if k != "json"}
        scored = _read_cache(cache)
        if scored.get("spec") != key:
            scored = {"spec": key, "result": evaluation.run(es, log=log).to_dict()}
            atomic_write(cache, json.dumps(scored, indent=1).encode())  # a kill mid-write leaves the old cache or none
        r = scored["result"]
        warnings += [w for w in r["warnings"] if w not in warnings]
        val = result.validation[-1]["val_loss"] if result.validation else None
        rows.append(
            {
                "cell": cell,
                "filters": item["filters"],
                "kept": item["count"],
                "fraction": item["fraction"],
                "steps": result.summary.get("steps"),
                "last_loss": result.metrics[-1]["loss"] if result.metrics else None,
                "val_loss": val,
                "clip_score": r["clip_score"],
                "clip_cosine": r.get("clip_cosine"),
                "fid": r["fid"],
                "run": ts.output.path,
            }
        )
    _write(spec, rows)
    return StudyResult(spec.output, rows, round(time.time() - started, 1), warnings)


def _fmt(v, digits: int = 4) -> str:
    return "" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def _write(spec: StudySpec, rows: list[dict]) -> None:
    from pipeline.contract.layout import atomic_write

    cols = ["cell", "filters", "kept", "fraction", "steps", "last_loss", "val_loss", "clip_score", "clip_cosine", "fid"]
    lines = [
        "| " + " | ".join(cols) + " |",
        "| " + " | ".join("---" if c in ("cell", "filters") else "---:" for c in cols) + " |",
    ]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in cols) + " |" for r in rows]
    lines += ["", "val_loss is each cell's loss on its own held-out samples (train.eval_fraction of the cell), so it "
                  "compares how each run fits its own data; clip_score and fid score every cell on the same prompts "
                  "and reference."]
    import io

    atomic_write(storage.join(spec.output, "study.md"), ("\n".join(lines) + "\n").encode())
    with io.StringIO(newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols + ["run"])
        w.writeheader()
        w.writerows(rows)
        atomic_write(storage.join(spec.output, "study.csv"), fh.getvalue().encode())
    atomic_write(storage.join(spec.output, "study.json"), json.dumps(rows, indent=1).encode())
    _plot(spec, rows)
    ranked = storage.join(spec.output, "prefer", "ranking.json")
    if not storage.is_url(spec.output) and storage.isfile(ranked):     # people's votes (`winnow prefer`) stay
        from pipeline.commands import prefer

        prefer.write_study_section(spec.output, json.loads(storage.read_text(ranked)))


def _plot(spec: StudySpec, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # validation loss is left out: each cell holds out its own samples, so it is not a common yardstick
    metrics = [
        (k, label)
        for k, label in (("clip_score", "CLIP score (higher is better)"), ("fid", "FID (lower is better)"))
        if any(r[k] is not None for r in rows)
    ]
    if not metrics:
        return
    storage.makedirs(storage.join(spec.output, "plots"))
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    for ax, (k, label) in zip(axes[0], metrics, strict=True):
        pts = [(100 * r["fraction"], r[k], r["cell"]) for r in rows if r[k] is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o")
        for x, y, c in pts:
            ax.annotate(c.replace("cell_", ""), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.set_xlabel("data kept (%)")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{storage.name(spec.sweep)}: score vs data kept", fontsize=11)
    fig.tight_layout()
    with storage.local_target(storage.join(spec.output, "plots", "scores_vs_kept.png")) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def format_summary(r: StudyResult) -> str:
    lines = [f"winnow study: {r.output} ({len(r.rows)} cells, {r.wall_s:.0f} s)",
             f"  {'cell':<9} {'kept':>6} {'kept %':>7} {'val loss':>9} {'CLIP':>7} {'cosine':>8} {'FID':>9}  filters"]
    for row in r.rows:
        lines.append(
            f"  {row['cell']:<9} {row['kept']:>6} {100 * row['fraction']:>6.1f}% {_fmt(row['val_loss']):>9} "
            f"{_fmt(row['clip_score'], 2):>7} {_fmt(row['clip_cosine']):>8} {_fmt(row['fid'], 2):>9}  {row['filters']}"
        )
    lines += [f"  warning: {w}" for w in r.warnings]
    lines.append(f"  table {r.output}/study.md; plot {r.output}/plots/scores_vs_kept.png")
    return "\n".join(lines)


def arguments(parser) -> None:
    from pipeline.commands import add_set_argument

    parser.add_argument("spec", help="study spec YAML (see jobs/sweep_train_eval.yaml)")
    add_set_argument(parser, "train_set=[train.max_steps=50]")


def from_args(args) -> StudySpec:
    return load(args.spec, args.set)
