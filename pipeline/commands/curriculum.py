"""``winnow curriculum``: staged training, the SVD recipe (Blattmann et al., 2023): image
pretraining, then low-resolution video, then image-to-video, each stage a full ``winnow train`` run
that starts from the stage before it.

A stage is a train spec (data, model, objective, optim, ema, train, video) plus ``name`` and
``init``. ``init: previous`` starts the stage from the previous stage's final weights: the same
family loads them as they are; an image stage followed by a video stage is inflated
(``training/inflate.py``: text-to-video ``svd_t2v`` takes the image model's text encoder too);
a text-to-video stage followed by image-to-video (``svd``) has its UNet's ``conv_in`` widened to
the concatenated frame. The parts not carried over (CLIP image encoder, scheduler, the UNet's
frame count and time-embedding width) come from the stage's own ``model.pretrained`` (null: the
tiny preset); the VAE is ``model.pretrained``'s when given, else the source's (inflated from an
image VAE when it can be). ``output.path`` holds ``stages/NN_name/`` (each a
train run folder), ``init/NN_<fingerprint>/`` (the pipelines stages start from) and ``final/``.

Fingerprints chain: a stage's init folder is named by the fingerprint of the stage before it,
and that path is part of the stage's own spec, so changing stage 1 changes every later stage's
fingerprint (they are retrained; ``output.overwrite`` lets them be replaced) while changing stage
3 leaves stages 1 and 2 as they are. Re-running resumes: a finished stage is skipped, an
unfinished one continues from its last checkpoint (``winnow train``'s own resume).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass, field

from pipeline.contract import layout, storage
from pipeline.contract.config import ConfigError, apply_overrides, load_yaml, take_kind
from pipeline.contract.layout import CurriculumRun, TrainRun

NAME = "curriculum"
DESCRIPTION = """\
Train a staged curriculum (image -> low-res video -> image-to-video), each stage from the last.

  winnow curriculum SPEC.yaml [--set dotted.key=value ...]

SPEC has output.path, ray (shared) and stages: a list of train specs (data, model, video, train
...) each with a name and `init: previous` to start from the stage before (an image stage is
inflated into SVD's video UNet). Re-running resumes: finished stages are skipped. See
jobs/svd_curriculum.yaml.
"""
OPTIMIZER_STATE = CurriculumRun.OPTIMIZER_STATE
STAGE_KEYS = ("data", "model", "objective", "optim", "ema", "train", "video", "lora")


@dataclass
class Stage:
    index: int
    name: str
    init: str | None
    doc: dict                      # the stage's train spec, before its init path is filled in
    optimizer: str = "reset"       # carry: start from the stage before's AdamW moments (same model only)


@dataclass
class CurriculumSpec:
    output: str
    overwrite: bool
    ray: dict
    stages: list[Stage] = field(default_factory=list)
    doc: dict = field(default_factory=dict)


def parse(data: dict) -> CurriculumSpec:
    data = take_kind(data, "curriculum")
    unknown = set(data) - {"output", "ray", "stages"}
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {sorted(unknown)}; a curriculum spec has output, ray, stages")
    out = data.get("output") or {}
    if not isinstance(out, dict) or not out.get("path"):
        raise ConfigError("output.path: give the folder the curriculum writes (stages/, init/, final/)")
    storage.check_writable(out["path"], "output.path")
    stages_doc = data.get("stages")
    if not isinstance(stages_doc, list) or not stages_doc:
        raise ConfigError("stages: give a list of stages, each a train spec with a name")
    spec = CurriculumSpec(out["path"], bool(out.get("overwrite", False)), dict(data.get("ray") or {}), doc=data)
    names = set()
    for i, st in enumerate(stages_doc):
        key = f"stages[{i}]"
        if not isinstance(st, dict) or not st.get("name"):
            raise ConfigError(f"{key}: each stage needs a name (and the sections of a train spec)")
        name = str(st["name"])
        if name in names or not name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"{key}.name {name!r}: names are unique and plain (letters, digits, _ and -)")
        names.add(name)
        extra = set(st) - {"name", "init", "optimizer", *STAGE_KEYS}
        if extra:
            raise ConfigError(f"{key} ({name}): unknown key(s) {sorted(extra)}; a stage has name, init, optimizer "
                              f"and {', '.join(STAGE_KEYS)} (output and ray are the curriculum's)")
        optimizer = st.get("optimizer", "reset")
        if optimizer not in ("reset", "carry") or (optimizer == "carry" and st.get("init") != "previous"):
            raise ConfigError(f"{key}.optimizer {optimizer!r}: use reset (fresh AdamW moments, the default) or carry "
                              f"(the previous stage's; needs init: previous)")
        init = st.get("init")
        if init not in (None, "previous"):
            raise ConfigError(f"{key}.init {init!r}: use previous (start from the stage before) or leave it out")
        if init and i == 0:
            raise ConfigError(f"{key}.init: the first stage has no previous stage")
        spec.stages.append(Stage(i, name, init, {k: st[k] for k in STAGE_KEYS if k in st}, optimizer))
    for st in spec.stages:                          # every stage must be a valid train spec, before Ray starts
        _train_spec(spec, st, init_path=None, check_paths=st.init is None)
    return spec


def _stage_dir(spec: CurriculumSpec, st: Stage) -> str:
    return CurriculumRun(spec.output).stage(st.index, st.name).root


def _train_spec(spec: CurriculumSpec, st: Stage, init_path: str | None, check_paths: bool = False):
    from training import train_spec

    doc = json.loads(json.dumps(st.doc))
    doc["output"] = {"path": _stage_dir(spec, st), "overwrite": spec.overwrite}
    doc["ray"] = spec.ray
    if (doc.get("lora") or {}).get("enabled"):  # a LoRA stage: the next stage and final/ start from its fused export
        doc["lora"] = {**doc["lora"], "export_fused": True}
    if init_path:
        doc.setdefault("model", {})["pretrained"] = init_path
        if st.optimizer == "carry":
            doc.setdefault("optim", {})["init_state"] = storage.join(init_path, OPTIMIZER_STATE)
    try:
        return train_spec.parse(doc, check_paths=check_paths)
    except ConfigError as exc:
        raise ConfigError(f"stages[{st.index}] ({st.name}): {exc}") from None


def plan(spec: CurriculumSpec) -> list[dict]:
    """Per stage: its train spec (init path filled in), fingerprint, init folder, and whether it is done."""
    from training import families

    out, prev = [], None
    for st in spec.stages:
        init_dir = None
        if st.init:
            init_dir = CurriculumRun(storage.absolute(spec.output)).init(st.index, prev["fingerprint"])
        ts = _train_spec(spec, st, init_dir)
        start = None
        if st.init:
            start = families.transition(families.get(prev["spec"].model.kind), families.get(ts.model.kind),
                                        f"stages[{st.index}] ({st.name})", st.optimizer == "carry")
        run_dir = _stage_dir(spec, st)
        done = _finished(run_dir, ts)
        out.append({"stage": st, "spec": ts, "fingerprint": ts.fingerprint(), "init": init_dir, "start": start,
                    "dir": run_dir, "done": done})
        prev = out[-1]
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
    return fp == ts.fingerprint() and steps == ts.train.max_steps and storage.isdir(TrainRun(run_dir).final)


def build_init(prev: dict, cur: dict, log) -> dict:
    """Write the pipeline folder the stage starts from (once; a finished one is reused). Locally it
    is built under a temporary name and renamed; on a store its files are written one by one,
    ``model_index.json`` (what marks it complete) last."""
    from training import families

    folder = cur["init"]
    if storage.isfile(storage.join(folder, "model_index.json")):
        return {"reused": folder}
    now = families.get(cur["spec"].model.kind)
    source = TrainRun(prev["dir"]).final
    on_store = storage.is_url(folder)
    tmp = folder if on_store else folder + ".tmp"
    if not on_store:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.dirname(folder), exist_ok=True)
    if cur["start"] == "same":
        report = {"copied": source}
        if cur["stage"].optimizer == "carry":
            last = _last_checkpoint(prev["dir"])
            for name in ("state.json", "state.safetensors"):
                storage.copy(storage.join(last, name), storage.join(tmp, OPTIMIZER_STATE, name))
            report["optimizer_from"] = last
        storage.copy_tree(source, tmp, last=("model_index.json",))   # the same model: its final pipeline as it is
    else:
        report = _transform(prev, cur, now, source, tmp)
    if not on_store:
        os.replace(tmp, folder)
    if log:
        print(f"curriculum: stage {cur['stage'].name} starts from {folder} ({json.dumps(report)})", file=log)
    return report


def _transform(prev: dict, cur: dict, now, source: str, target: str) -> dict:
    """The previous stage's final pipeline inflated (image -> video) or widened (text -> image-to-video)
    into ``target``, built in this node's scratch."""
    from training.inflate import inflate_source, widen_source, write_summary

    m = cur["spec"].model
    with storage.scratch("winnow-init-") as scratch, storage.local_copy(source) as local_source:
        built = os.path.join(scratch, "built") if storage.is_url(target) else target
        source = local_source
        base = cur["stage"].doc.get("model", {}).get("pretrained")   # where the parts not carried over come from
        comps = now.components(base, m.allow_download, m.seed, scratch, None)
        cfg = comps.unet.config
        if cur["start"] == "widen":              # text-to-video -> image-to-video: conv_in widened
            unet, vae, summary = widen_source(source, now.in_channels)
        else:  # image -> video: inflated (frames and time embedding as this stage's model)
            unet, vae, summary = inflate_source(source, now.in_channels, cfg.num_frames, cfg.addition_time_embed_dim)
            summary["inherited"] = now.inherit(comps, source)
        if unet.config.cross_attention_dim != cfg.cross_attention_dim:
            raise ConfigError(f"stages[{cur['stage'].index}] ({cur['stage'].name}): the stage before's UNet attends "
                              f"to {unet.config.cross_attention_dim}-wide context, this stage's conditioning is "
                              f"{cfg.cross_attention_dim} wide; use models of one width (SD 2.1 and SVD: 1024)")
        if base:                                 # a VAE the stage names wins (SVD's fine-tuned temporal decoder)
            summary.setdefault("vae", {})["using"] = f"model.pretrained's ({base})"
        elif vae is not None:                    # else the source's, inflated or as trained
            comps.vae = vae
        else:                                    # else the tiny preset's (the image VAE could not be inflated)
            summary.setdefault("vae", {})["using"] = "the video stage's preset VAE"
        now.export(comps, unet, built)
        summary["source"] = storage.absolute(TrainRun(prev["dir"]).final)   # not this node's copy of it
        write_summary(built, summary)
        if built != target:
            storage.copy_tree(built, target, last=("model_index.json",))
    return {"widened" if cur["start"] == "widen" else "inflated": TrainRun(prev["dir"]).final,
            "counts": summary["counts"]}


def _last_checkpoint(run_dir: str) -> str:
    """The newest checkpoint folder of a finished train run (its last step is always checkpointed)."""
    runs = TrainRun(run_dir).checkpoints
    found = sorted(n for n in storage.listdir(runs) if n.startswith("checkpoint_") and n[len("checkpoint_"):].isdigit())
    if not found:
        raise ConfigError(f"{run_dir}: no checkpoint to carry the optimizer from "
                          f"({TrainRun.RAY}/{TrainRun.RAY_RUN}/checkpoint_*)")
    return storage.join(runs, found[-1])


@dataclass
class CurriculumResult:
    output: str
    stages: list[dict]
    final: str


def run(spec: CurriculumSpec, log=sys.stderr) -> CurriculumResult:
    from pipeline.commands import train

    steps = plan(spec)
    fp = layout.fingerprint([s["stage"].name for s in steps])
    layout.claim_output(spec.output, CurriculumRun(spec.output).spec, fp, spec.doc, spec.overwrite,
                        "curriculum", "the stage names", list(CurriculumRun.ENTRIES), "curriculum",
                        {f"stages[{i}].data.shards[{j}]": p for i, s in enumerate(steps)
                         for j, p in enumerate(s["spec"].data.shards)})
    results = []
    for k, s in enumerate(steps):
        st = s["stage"]
        if s["done"]:
            if log:
                print(f"curriculum: stage {k + 1} {st.name} finished earlier; skipped", file=log)
            results.append({"name": st.name, "dir": s["dir"], "skipped": True})
            continue
        if st.init:
            build_init(steps[k - 1], s, log)
        if log:
            print(f"curriculum: stage {k + 1}/{len(steps)} {st.name} ({s['spec'].model.kind})", file=log, flush=True)
        r = train.run(s["spec"], log=log)
        results.append({"name": st.name, "dir": s["dir"], "skipped": False, "steps": r.summary["steps"],
                        "resumed_from": r.summary["resumed_from"],
                        "last_loss": r.metrics[-1]["loss"] if r.metrics else None})
    final = CurriculumRun(spec.output).final
    last = TrainRun(steps[-1]["dir"]).final
    if storage.is_url(final):                       # no rename on a store: replaced file by file, the index last
        storage.remove_tree(final)
        storage.copy_tree(last, final, last=("model_index.json",))
    else:
        shutil.rmtree(final + ".tmp", ignore_errors=True)
        shutil.copytree(last, final + ".tmp")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(final + ".tmp", final)
    return CurriculumResult(spec.output, results, final)


def format_summary(r: CurriculumResult) -> str:
    from pipeline.contract.config import plural

    lines = [f"winnow curriculum: {r.output}"]
    for i, s in enumerate(r.stages):
        what = "finished earlier (skipped)" if s["skipped"] else \
            plural(s['steps'], "step") + (f", resumed from {s['resumed_from']}" if s["resumed_from"] else "") + \
            (f", last loss {s['last_loss']:.4f}" if s.get("last_loss") is not None else "")
        lines.append(f"  stage {i + 1} {s['name']:<16} {what}   ({s['dir']})")
    lines.append(f"  final   {r.final}")
    return "\n".join(lines)


def arguments(parser) -> None:
    from pipeline.commands import add_set_argument

    parser.add_argument("spec", help="curriculum spec YAML (see jobs/svd_curriculum.yaml)")
    add_set_argument(parser, "stages.0.train.max_steps=100")


def from_args(args) -> CurriculumSpec:
    return parse(apply_overrides(load_yaml(args.spec), args.set))
