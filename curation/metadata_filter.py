"""Cheap filters on metadata: size, aspect ratio and thresholds on any column (e.g. LAION's).

Placed before ``decode`` it reads LAION's ``WIDTH``/``HEIGHT`` and saves decoding rejected
images; placed after, it reads the decoded ``width``/``height``. The SD 1.x recipe is
``min_side: 512`` plus rules ``AESTHETIC_SCORE >= 5`` and ``pwatermark < 0.5``.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Literal

from pipeline.contract.config import ConfigError, option
from pipeline.contract.schema import HEIGHT, WIDTH
from pipeline.contract.stage import Stage, active, as_optional_float, reject

OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt,
       "==": operator.eq, "!=": operator.ne}


@dataclass
class Rule:
    column: str = option(help="column to test, e.g. AESTHETIC_SCORE, pwatermark, punsafe, similarity")
    op: Literal[">=", ">", "<=", "<", "==", "!="] = option(
        help="comparison; a row passes when `value(column) op value` holds"
    )
    value: Any = option(help="number (or string for == / !=) to compare with")
    missing: Literal["reject", "keep"] = option("reject", "what to do with a row whose column is missing or null")

    def __post_init__(self):
        if self.op not in ("==", "!=") and as_optional_float(self.value) is None:
            raise ConfigError(f"rule on {self.column!r}: value {self.value!r} must be a number for {self.op!r}")


@dataclass
class MetadataFilterConfig:
    min_width: int = option(0, "reject images narrower than this (pixels)", min=0)
    min_height: int = option(0, "reject images shorter than this (pixels)", min=0)
    min_side: int = option(0, "reject images whose shorter side is below this (SD 1.x used 512)", min=0)
    max_aspect_ratio: float = option(0.0, "reject images with max(w/h, h/w) above this; 0 disables", min=0)
    rules: list[Rule] = option(help="thresholds on any column, all must pass", factory=list)
    unknown_size: Literal["keep", "reject"] = option("keep", "rows with no known size (before decode, no WIDTH/HEIGHT)")


def _size(batch, i) -> tuple[float | None, float | None]:
    for wc, hc in ((WIDTH, HEIGHT), ("WIDTH", "HEIGHT")):
        if wc in batch and hc in batch:
            w, h = as_optional_float(batch[wc][i]), as_optional_float(batch[hc][i])
            if w is not None and h is not None:
                return w, h
    return None, None


def _fmt(x: float) -> str:
    return f"{x:g}"


class MetadataFilter(Stage):
    """Reject rows by size, aspect ratio and column thresholds, naming the failed test."""

    name = "metadata_filter"
    Config = MetadataFilterConfig
    num_cpus = 1.0      # same as decode, so Ray fuses the stages into one task
    batch_size = 16

    def __init__(self, config: MetadataFilterConfig | None = None):
        super().__init__(config or MetadataFilterConfig())

    def check(self, batch, i) -> str | None:
        cfg = self.config
        w, h = _size(batch, i)
        if w is None:
            if cfg.unknown_size == "reject" and (
                cfg.min_width or cfg.min_height or cfg.min_side or cfg.max_aspect_ratio
            ):
                return "size_unknown"
        else:
            if w < cfg.min_width:
                return f"too_small: width {_fmt(w)} < {cfg.min_width}"
            if h < cfg.min_height:
                return f"too_small: height {_fmt(h)} < {cfg.min_height}"
            if min(w, h) < cfg.min_side:
                return f"too_small: shorter side {_fmt(min(w, h))} < {cfg.min_side}"
            if cfg.max_aspect_ratio and max(w / h, h / w) > cfg.max_aspect_ratio:
                return f"aspect_ratio: {max(w / h, h / w):.2f} > {cfg.max_aspect_ratio:g}"
        for rule in cfg.rules:
            raw = batch[rule.column][i] if rule.column in batch else None
            if rule.op in ("==", "!="):
                value, target = raw, rule.value
                missing = raw is None
            else:
                value, target = as_optional_float(raw), float(rule.value)
                missing = value is None
            if missing:
                if rule.missing == "reject":
                    return f"metadata: {rule.column} missing"
                continue
            if not OPS[rule.op](value, target):
                return f"metadata: {rule.column} {rule.op} {rule.value} failed ({value!r})"
        return None

    def __call__(self, batch):
        keep = active(batch)
        for i in range(len(keep)):
            if keep[i]:
                reason = self.check(batch, i)
                if reason:
                    reject(batch, i, reason)
        return batch
