"""The curate job spec: input, output, stages and Ray settings, validated before Ray starts."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from pipeline import registry
from pipeline.contract import layout
from pipeline.contract.config import (
    ConfigError,
    RaySettings,
    apply_overrides,
    build,
    load_yaml,
    option,
    result_dict,
    take_kind,
    to_dict,
)
from pipeline.readers import InputSpec

DEFAULT_IMAGE_STAGES = [{"name": "decode"}, {"name": "phash_dedup"}]
DEFAULT_VIDEO_STAGES = [{"name": "clips"}, {"name": "motion"}]


@dataclass
class OutputSpec:
    path: str = option(help="output folder: shards/ (tars and their annotation tables), summary.json, spec.yaml")
    samples_per_shard: int = option(
        1000, "input samples per output shard (img2dataset's number_sample_per_shard)", min=1, max=1_000_000
    )
    videos_per_shard: int = option(
        16, "video runs: input videos per output shard (a shard holds all their clips)", min=1, max=100_000
    )
    caption: str = option("caption", "the column each shard's KEY.txt holds: caption (the source text) or a caption "
                          "stage's caption_coca / caption_vlm / caption_summary (where that is empty, the source "
                          "text); KEY.json carries all of them")
    overwrite: bool = option(False, "delete an existing output folder made by a different spec instead of failing")
    keep_work: bool = option(False, "keep the intermediate _work/ folder after a successful run")
    report: bool = option(
        True, "write report.html (funnel, scores, buckets, timing, examples) at the end", runtime=True
    )
    json: bool = option(
        False, "end the printed summary with one line holding it as a JSON object (--json)", runtime=True
    )


@dataclass
class RaySpec(RaySettings):
    block_rows: int = option(32, "at most this many samples per Ray Data block of the plan (smaller = finer load "
                             "balancing); the blocks are evened out so that their number is a multiple of the "
                             "tasks that run at once; a plan of more than 4096 blocks gets larger ones (4096 in all)",
                             min=1)
    no_progress_timeout_s: float = option(
        900.0, "fail instead of hanging when the dataset makes no progress this long", min=1
    )
    progress_bars: bool = option(False, "show Ray Data's per-operator progress bars as well as winnow's own")


@dataclass
class DryRunSpec:
    enabled: bool = option(False, "sample the input, run every stage on this cluster and print projections; "
                                  "write nothing into output.path (--dry-run)", runtime=True)
    sample: int = option(256, "inputs to sample, spread over the whole input (videos: a tenth of this)", min=8,
                         max=100_000, runtime=True)
    nodes: list[int] = option(
        factory=list,
        help="also project the wall time on clusters of these many nodes like this one's "
        "(default: 2x, 4x and 10x this one)",
        runtime=True,
    )


@dataclass
class StageEntry:
    name: str
    config: Any
    label: str


@dataclass
class CurateSpec:
    input: InputSpec
    output: OutputSpec
    stages: list[StageEntry] = field(default_factory=list)
    ray: RaySpec = field(default_factory=RaySpec)
    dry_run: DryRunSpec = field(default_factory=DryRunSpec)

    def fingerprint(self) -> str:
        """What determines the result: input, sharding and stages (not Ray settings)."""
        doc = {"input": to_dict(self.input), "samples_per_shard": self.output.samples_per_shard,
               "stages": [{"name": s.name, **result_dict(s.config)} for s in self.stages]}
        if self.is_video:
            doc["videos_per_shard"] = self.output.videos_per_shard
        return layout.fingerprint(doc)

    @property
    def fan_out(self):
        """The first stage's ``FanOut`` (one input row becomes many: a video becomes clips), or None."""
        return registry.get(self.stages[0].name).fan_out if self.stages else None

    @property
    def is_video(self) -> bool:
        return self.fan_out is not None

    def notices(self) -> list[str]:
        """The stages' warnings about their setup (models on random weights), in stage order."""
        out: list[str] = []
        for i, s in enumerate(self.stages):
            out += registry.get(s.name).notices(s.config, [(e.name, e.config) for e in self.stages[:i]])
        return out

    def to_dict(self) -> dict:
        return {"input": to_dict(self.input), "output": to_dict(self.output),
                "stages": [{"name": s.name, **to_dict(s.config)} for s in self.stages],
                "ray": to_dict(self.ray), "dry_run": to_dict(self.dry_run)}


def _default_stages(input_spec: InputSpec) -> list:
    from pipeline.readers import detect_format
    try:
        video = detect_format(input_spec) == "videos"
    except ConfigError:
        video = False            # planning reports the bad path with its own message
    return DEFAULT_VIDEO_STAGES if video else DEFAULT_IMAGE_STAGES


def _stages(items: Any, input_spec: InputSpec) -> list[StageEntry]:
    if items is None:
        items = _default_stages(input_spec)
    if not isinstance(items, list):
        raise ConfigError("stages: expected a list of {name: STAGE, ...options}")
    out, seen = [], {}
    for i, item in enumerate(items):
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict) or "name" not in item:
            raise ConfigError(f"stages[{i}]: expected a mapping with a 'name' key, got {item!r}")
        item = dict(item)
        name = item.pop("name")
        try:
            cls = registry.get(name)
        except KeyError as exc:
            raise ConfigError(f"stages[{i}].name: {exc.args[0]}") from None
        cfg = build(cls.Config, item, f"stages[{i}]({name})")
        cls.validate(cfg, f"stages[{i}]({name})", [(s.name, s.config) for s in out])
        seen[name] = seen.get(name, 0) + 1
        out.append(StageEntry(name, cfg, name if seen[name] == 1 else f"{name}_{seen[name]}"))
    return out


def _check_text_column(spec: CurateSpec) -> None:
    made = {f"caption_{b}" for s in spec.stages if s.name == "caption" for b in s.config.backends}
    if spec.output.caption != "caption" and spec.output.caption not in made:
        raise ConfigError(f"output.caption: {spec.output.caption!r} is not written by this run; give caption (the "
                          f"source text){' or ' + ', '.join(sorted(made)) if made else ''}, or add a caption stage "
                          f"whose backends make it")


def parse(data: dict[str, Any]) -> CurateSpec:
    data = take_kind(data, "curate")
    unknown = set(data) - {"input", "output", "stages", "ray", "dry_run"}
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {sorted(unknown)}; a curate spec has input, output, stages, ray, "
                          f"dry_run")
    for required in ("input", "output"):
        if not isinstance(data.get(required), dict):
            raise ConfigError(f"missing {required!r} section: a curate spec needs input.path and output.path")
    input_spec = build(InputSpec, data["input"], "input")
    spec = CurateSpec(input=input_spec,
                      output=build(OutputSpec, data["output"], "output"),
                      stages=_stages(data.get("stages"), input_spec),
                      ray=build(RaySpec, data.get("ray") or {}, "ray"),
                      dry_run=build(DryRunSpec, data.get("dry_run") or {}, "dry_run"))
    bad = [n for n in spec.dry_run.nodes if not isinstance(n, int) or isinstance(n, bool) or n < 1]
    if bad:
        raise ConfigError(f"dry_run.nodes: expected whole numbers of nodes >= 1, got {bad!r}")
    names = [s.name for s in spec.stages]
    _check_text_column(spec)
    if "decode" in names and "clips" in names:
        raise ConfigError("stages: 'decode' (images) and 'clips' (videos) cannot be in one run; a run curates "
                          "one kind of input")
    if "decode" not in names and "clips" not in names:
        raise ConfigError("stages: an image run needs a 'decode' stage (it verifies images and writes what the "
                          "shards store); a video run needs a 'clips' stage first (it cuts videos into clips)")
    return spec


def load(path: str | None = None, overrides: list[str] | None = None, base: dict | None = None) -> CurateSpec:
    data = load_yaml(path) if path else {}
    if base:
        for k, v in base.items():
            if isinstance(v, dict):
                data.setdefault(k, {}).update({kk: vv for kk, vv in v.items() if vv is not None})
            elif v is not None:
                data[k] = v
    overrides = list(overrides or [])
    stage_sets = [o for o in overrides if o.split("=", 1)[0].strip().split(".")[0] == "stages"]
    data = apply_overrides(data, [o for o in overrides if o not in stage_sets])
    if stage_sets and data.get("stages") is None and isinstance(data.get("input"), dict):
        # the short form has no stage list yet: --set stages.decode.max_side=512 edits the defaults
        data["stages"] = [dict(s) for s in _default_stages(build(InputSpec, data["input"], "input"))]
    data = apply_overrides(data, stage_sets)
    spec = parse(data)
    if spec.ray.address is None and os.environ.get("RAY_ADDRESS"):
        spec.ray.address = os.environ["RAY_ADDRESS"]
    return spec
