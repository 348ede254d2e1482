"""``winnow camera-loras``: one temporal LoRA per camera move on the same base, the clips of each
chosen by curation's own ``camera_move`` (SVD, Blattmann et al. 2023, sec. 4.3: "horizontal pan,
zoom, static" LoRAs on the temporal attention).

For each move in ``moves`` the command writes a selection manifest of the run's kept clips with
that ``camera_move`` (``OUTPUT/selections/<move>.parquet``, the format of ``winnow sweep``'s, with
the move in its metadata) and, when the move has at least ``min_clips`` clips, trains
``OUTPUT/moves/<move>/`` with ``winnow train``: the ``train`` template with ``data.selection`` set
and ``lora.layers: temporal``. A move with fewer clips is reported and not trained. Re-running
resumes: a finished move is skipped, an unfinished one continues from its last checkpoint.
``OUTPUT/camera_loras.json`` lists every move, its clips and its adapter.
"""
from __future__ import annotations

import copy
import json
import sys
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.contract import layout, storage
from pipeline.contract.config import ConfigError, apply_overrides, load_yaml, take_kind
from pipeline.contract.layout import TrainRun
from pipeline.contract.schema import CAMERA_MOVE, KEPT, KEY, STATUS

NAME = "camera-loras"
DESCRIPTION = """\
Train one temporal LoRA per camera move on the same base, each on the clips curation labelled
with that camera_move (the motion stage's affine fit).

  winnow camera-loras SPEC.yaml [--set dotted.key=value ...]

SPEC has clips (a curated video run), output.path, moves, min_clips, ray and train (a train spec
without data.shards or output: model, video, lora, optim, train ...). Re-running resumes. See
jobs/svd_camera_loras.yaml.
"""
DEFAULT_MOVES = ["static", "pan_left", "pan_right", "tilt_up", "tilt_down", "zoom_in", "zoom_out"]
MOVE_META = "winnow_camera_move"       # the move a manifest selects (winnow eval reads it back)
SUMMARY = "camera_loras.json"
SPEC_FILE = "spec.yaml"
ENTRIES = [SPEC_FILE, "selections", "moves", SUMMARY]      # all output.overwrite may delete


@dataclass
class CameraLorasSpec:
    clip_run: str                  # the spec's `clips`: a curated video run
    output: str
    overwrite: bool = False
    moves: list[str] = field(default_factory=lambda: list(DEFAULT_MOVES))
    min_clips: int = 16
    ray: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)


def parse(data: dict) -> CameraLorasSpec:
    from video.motion import MOVES

    data = take_kind(dict(data), NAME)
    known = {"clips", "output", "moves", "min_clips", "ray", "train"}
    extra = sorted(set(data) - known)
    if extra:
        raise ConfigError(f"{extra[0]}: not a camera-loras key; the keys are {', '.join(sorted(known))}")
    if not isinstance(data.get("clips"), str) or not data["clips"]:
        raise ConfigError("clips: give the curated video run whose clips carry camera_move (winnow curate with the "
                          "motion stage)")
    out = data.get("output")
    out = {"path": out} if isinstance(out, str) else out
    if not isinstance(out, dict) or not isinstance(out.get("path"), str):
        raise ConfigError("output.path: required (the folder for the selections and one train run per move)")
    moves = data.get("moves", list(DEFAULT_MOVES))
    if not isinstance(moves, list) or not moves or len(set(moves)) != len(moves):
        raise ConfigError("moves: a list of distinct camera moves")
    for m in moves:
        if m not in MOVES:
            raise ConfigError(f"moves: {m!r} is not a camera_move; one of {', '.join(MOVES)}")
    min_clips = data.get("min_clips", 16)
    if isinstance(min_clips, bool) or not isinstance(min_clips, int) or min_clips < 1:
        raise ConfigError("min_clips: a whole number of clips, at least 1")
    train = data.get("train") or {}
    if not isinstance(train, dict):
        raise ConfigError("train: the train spec every move's run is made from (model, video, lora, train ...)")
    for key in ("output", "ray", "kind"):
        if key in train:
            raise ConfigError(f"train.{key}: set at the top of the spec (output, ray), not per run")
    data_doc = train.get("data") or {}
    for key in ("shards", "selection"):
        if key in data_doc:
            raise ConfigError(f"train.data.{key}: each move's run trains on `clips`, selected by its camera_move; "
                              f"drop it")
    lora = train.get("lora") or {}
    if lora.get("enabled") is False or lora.get("layers", "temporal") not in ("temporal", "auto"):
        raise ConfigError("train.lora: camera-move LoRAs adapt the temporal attention (enabled: true, layers: "
                          "temporal); drop the other setting")
    spec = CameraLorasSpec(data["clips"], out["path"], bool(out.get("overwrite", False)), list(moves), min_clips,
                           data.get("ray") or {}, train)
    for m in spec.moves:         # every run's spec is checked now, before Ray starts
        train_spec_of(spec, m, check_paths=False)
    return spec


def load(path: str | None, overrides: list[str] | None = None) -> CameraLorasSpec:
    return parse(apply_overrides(load_yaml(path) if path else {}, overrides or []))


def manifest_path(spec: CameraLorasSpec, move: str) -> str:
    return storage.join(spec.output, "selections", f"{move}.parquet")


def run_path(spec: CameraLorasSpec, move: str) -> str:
    return storage.join(spec.output, "moves", move)


def train_spec_of(spec: CameraLorasSpec, move: str, check_paths: bool = False):
    from training import train_spec

    doc = copy.deepcopy(spec.train)
    doc["kind"] = "train"
    doc.setdefault("model", {}).setdefault("kind", "svd")
    doc["data"] = {**(doc.get("data") or {}), "shards": [spec.clip_run], "selection": manifest_path(spec, move)}
    doc["output"] = {"path": run_path(spec, move), "overwrite": spec.overwrite}
    doc["ray"] = spec.ray
    doc["lora"] = {**(doc.get("lora") or {}), "enabled": True, "layers": "temporal"}
    try:
        return train_spec.parse(doc, check_paths=check_paths)
    except ConfigError as exc:
        raise ConfigError(f"train (the run of {move}): {exc}") from None


def clip_moves(run: str) -> pa.Table:
    """(key, camera_move) of every kept clip of a curated video run."""
    if CAMERA_MOVE not in layout.annotation_columns(run):
        raise ConfigError(f"clips: {run!r} has no camera_move column; curate it with the motion stage (video runs: "
                          f"stages.motion) of this version of winnow")
    parts = []
    for file in layout.annotation_files(run):
        t = layout.read_table(file, columns=[KEY, STATUS, CAMERA_MOVE], present=True)
        if CAMERA_MOVE not in t.column_names:
            continue
        t = t.filter(pc.equal(t.column(STATUS), KEPT))
        parts.append(pa.table({KEY: t.column(KEY).cast(pa.string()),
                               CAMERA_MOVE: t.column(CAMERA_MOVE).cast(pa.string())}))
    return pa.concat_tables(parts) if parts else pa.table({KEY: pa.array([], pa.string()),
                                                          CAMERA_MOVE: pa.array([], pa.string())})


def plan(spec: CameraLorasSpec) -> list[dict]:
    """Per move: its clips, whether it is trained (enough clips), its run folder and whether that
    run is finished."""
    moves = clip_moves(spec.clip_run).column(CAMERA_MOVE).to_pylist()
    out = []
    for m in spec.moves:
        n = moves.count(m)
        ts = train_spec_of(spec, m)
        out.append({"move": m, "clips": n, "train": n >= spec.min_clips, "run": run_path(spec, m),
                    "done": n >= spec.min_clips and _finished(run_path(spec, m), ts)})
    return out


def _finished(run_dir: str, ts) -> bool:
    import yaml

    try:
        fp = (yaml.safe_load(storage.read_text(TrainRun(run_dir).spec)) or {}).get("fingerprint")
        steps = json.loads(storage.read_text(TrainRun(run_dir).summary)).get("steps")
    except OSError as exc:
        if storage.transient(exc):
            raise
        return False
    except (ValueError, yaml.YAMLError, AttributeError):
        return False
    return fp == ts.fingerprint() and steps == ts.train.max_steps and storage.isdir(TrainRun(run_dir).lora)


def write_manifest(spec: CameraLorasSpec, move: str, keys: list[str]) -> str:
    """The move's clips as a selection manifest (run, key), with the run and the move in its metadata."""
    import pyarrow.parquet as pq

    from pipeline.commands.sweep import run_dir

    path = manifest_path(spec, move)
    meta = {layout.MANIFEST_RUNS: json.dumps([run_dir(spec.clip_run)]), MOVE_META: move,
            "winnow_cell": f"camera_move = {move}"}
    schema = pa.schema([("run", pa.int32()), (KEY, pa.string())]).with_metadata(meta)
    storage.makedirs(storage.join(spec.output, "selections"))
    with layout.atomic_path(path) as tmp:
        pq.write_table(pa.table({"run": pa.array([0] * len(keys), pa.int32()), KEY: pa.array(keys, pa.string())},
                                schema=schema), tmp, compression="zstd")
    return path


@dataclass
class CameraLorasResult:
    output: str
    moves: list[dict]


def run(spec: CameraLorasSpec, log=sys.stderr) -> CameraLorasResult:
    from pipeline.commands import train as trainer

    table = clip_moves(spec.clip_run)
    moves = table.column(CAMERA_MOVE).to_pylist()
    keys = table.column(KEY).to_pylist()
    doc = {"clips": spec.clip_run, "moves": spec.moves, "min_clips": spec.min_clips, "train": spec.train}
    layout.claim_output(spec.output, storage.join(spec.output, SPEC_FILE), layout.fingerprint([spec.clip_run]), doc,
                        spec.overwrite, "camera-loras", "clips", ENTRIES, NAME, {"clips": spec.clip_run})
    rows = []
    for m in spec.moves:
        mine = sorted(k for k, v in zip(keys, moves, strict=True) if v == m)
        row = {"move": m, "clips": len(mine), "manifest": write_manifest(spec, m, mine), "adapter": None}
        if len(mine) < spec.min_clips:
            row["status"] = f"too few clips ({len(mine)} < min_clips {spec.min_clips})"
            rows.append(row)
            continue
        ts = train_spec_of(spec, m, check_paths=True)
        if _finished(run_path(spec, m), ts):
            row["status"] = "trained earlier"
        else:
            if log:
                print(f"camera-loras: {m}: {len(mine)} clips -> {run_path(spec, m)}", file=log, flush=True)
            trainer.run(ts, log=log)
            row["status"] = "trained"
        row["adapter"] = TrainRun(run_path(spec, m)).lora
        row["run"] = run_path(spec, m)
        rows.append(row)
    doc = {"clips": spec.clip_run, "min_clips": spec.min_clips, "moves": rows,
           "unlisted": {m: moves.count(m) for m in sorted({v for v in moves if v and v not in spec.moves})}}
    layout.atomic_write(storage.join(spec.output, SUMMARY), json.dumps(doc, indent=1).encode())
    return CameraLorasResult(spec.output, rows)


def format_summary(r: CameraLorasResult) -> str:
    lines = [f"winnow camera-loras: {r.output}", f"  {'move':10s} {'clips':>6s}  adapter / status"]
    for m in r.moves:
        lines.append(f"  {m['move']:10s} {m['clips']:6d}  "
                     + (f"{m['adapter']}  ({m['status']})" if m["adapter"] else m["status"]))
    trained = [m["move"] for m in r.moves if m["adapter"]]
    if trained:
        lines.append("  load one: training.lora.load_into(pipe, ADAPTER) on the base pipeline; "
                     "`winnow eval --run RUN` scores how often its samples move that way")
    return "\n".join(lines)


def arguments(parser) -> None:
    from pipeline.commands import add_set_argument

    parser.add_argument("spec", help="camera-loras spec (YAML), e.g. jobs/svd_camera_loras.yaml")
    add_set_argument(parser, "min_clips=32")


def from_args(args) -> CameraLorasSpec:
    return load(args.spec, args.set)


__all__ = ["CameraLorasSpec", "clip_moves", "parse", "plan", "run", "train_spec_of"]
