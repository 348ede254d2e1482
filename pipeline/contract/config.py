"""Typed configs: nested dataclasses built from YAML/dicts, validated before Ray starts.

Every field carries its help text in ``field(metadata={"help": ...})``. ``build(cls, data)``
checks unknown keys (with a suggestion), types, literals and ranges, and raises ``ConfigError``
naming the dotted key, what was wrong and what is allowed.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Union

import yaml

from pipeline.contract.errors import ConfigError

# the commands a spec file can be for
SPEC_KINDS = ("curate", "train", "sweep", "select", "curriculum", "study", "camera-loras")


def take_kind(data: dict, kind: str) -> dict:
    """A spec's ``kind:`` names its command (``jobs/run.py`` dispatches on it); return the spec
    without it. A spec of another kind fails here with the command to use instead."""
    if "kind" not in data:
        return data
    data = dict(data)
    found = data.pop("kind")
    if found != kind:
        if found in SPEC_KINDS:
            raise ConfigError(f"kind: this is a {found} spec, not a {kind} spec; run it with `winnow {found}`")
        raise ConfigError(f"kind: {found!r} is not a winnow command; use one of {', '.join(SPEC_KINDS)}")
    return data


def option(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = None,
           min: float | None = None, max: float | None = None, runtime: bool = False, internal: bool = False) -> Any:
    """A config field. ``runtime`` fields (batch size, device, pool size) change how a job runs,
    not what it produces, so they are left out of the spec fingerprint and a resumed run may
    change them. ``internal`` fields are filled in by winnow, not the user: ``describe`` omits them."""
    meta = {"help": help, "min": min, "max": max, "runtime": runtime, "internal": internal}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: got {value!r}; expected {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            allowed = ", ".join(repr(a) for a in args)
            hint = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(f"{key}: {value!r} is not allowed{extra}; allowed values: {allowed}")
        return value
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return build(tp, value, key)
    if origin in (list, tuple):
        if value is None:
            return []
        if not isinstance(value, (list, tuple)):
            value = [value]
        inner = args[0] if args else Any
        return [_convert(inner, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        inner = args[1] if len(args) > 1 else Any
        return {str(k): _convert(inner, v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):          # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def build(cls: type, data: dict[str, Any] | None, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, validating every key."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        k = unknown[0]
        hint = difflib.get_close_matches(str(k), list(fields), n=1)
        extra = f" Did you mean {hint[0]!r}?" if hint else ""
        where = f"{prefix}.{k}" if prefix else str(k)
        raise ConfigError(f"unknown key {where!r}.{extra} Known keys here: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"missing required key {key!r}: {f.metadata.get('help', '')}".rstrip(": "))
            continue
        value = _convert(hints[name], data[name], key)
        lo, hi = f.metadata.get("min"), f.metadata.get("max")
        if value is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
            if lo is not None and value < lo:
                raise ConfigError(f"{key}: {value} is below the minimum {lo}")
            if hi is not None and value > hi:
                raise ConfigError(f"{key}: {value} is above the maximum {hi}")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{prefix}: {exc}" if prefix else str(exc)) from None


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def result_dict(obj: Any) -> Any:
    """``to_dict`` without runtime fields: what determines a job's output."""
    if dataclasses.is_dataclass(obj):
        return {f.name: result_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if not f.metadata.get("runtime")}
    if isinstance(obj, (list, tuple)):
        return [result_dict(v) for v in obj]
    return obj


def describe(cls: type, indent: str = "  ", prefix: str = "") -> list[str]:
    """One line per field (``name: type = default``, nested configs dotted) with its help on the next,
    for ``winnow stages`` and docs; internal fields are left out."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            lines += describe(hints[f.name], indent, f"{prefix}{f.name}.")
            continue
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = repr(f.default_factory())
        else:
            default = "(required)"
        lines.append(f"{indent}{prefix}{f.name}: {_type_name(hints[f.name])} = {default}")
        if f.metadata.get("help"):
            lines.append(f"{indent}    {f.metadata['help']}")
    return lines


# ---- YAML and --set overrides ----

def load_yaml(path: str) -> dict[str, Any]:
    """A spec file's mapping: a local file or an object on a store (``s3://...``)."""
    from pipeline.contract import storage

    try:
        data = yaml.safe_load(storage.read_text(path))
    except FileNotFoundError:
        raise ConfigError(f"spec file {path!r} does not exist") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"spec file {path!r} is not UTF-8 text: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"spec file {path!r}: {storage.redact(str(exc)).splitlines()[0]}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"spec file {path!r} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"spec file {path!r} must hold a mapping at top level, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides; values are parsed as YAML scalars.

    List items are addressed by index (``stages.0.max_side``) or, for lists of mappings with a
    ``name``, by that name (``stages.decode.max_side``).
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected dotted.key=value, e.g. output.samples_per_shard=500")
        dotted, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as exc:
            problem = str(exc).splitlines()[0]
            raise ConfigError(f"--set {item!r}: the value {raw!r} is not valid YAML ({problem}); quote it for a "
                              f"string (--set '{dotted}=\"{raw}\"'), or write a list as [a, b]") from None
        parts = dotted.strip().split(".")
        if not all(parts):
            raise ConfigError(
                f"--set {item!r}: {dotted!r} is not a dotted key; write e.g. output.samples_per_shard=500"
            )
        node: Any = data
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                idx = _list_index(node, part, dotted)
                if last:
                    node[idx] = value
                else:
                    node = node[idx]
                continue
            if not isinstance(node, dict):
                raise ConfigError(f"--set {dotted}: {'.'.join(parts[:i])!r} is not a mapping")
            if last:
                node[part] = value
            else:
                if node.get(part) is None:          # an empty section in the YAML (``ray:``)
                    node[part] = {}
                node = node[part]
    return data


def _list_index(node: list, part: str, dotted: str) -> int:
    if part.isdigit():
        idx = int(part)
        if idx >= len(node):
            raise ConfigError(f"--set {dotted}: index {idx} out of range (list has {len(node)} items)")
        return idx
    matches = [i for i, v in enumerate(node) if isinstance(v, dict) and v.get("name") == part]
    if not matches:
        names = [v.get("name") for v in node if isinstance(v, dict)]
        hint = ""
        if dotted.startswith("stages."):
            listed = ", ".join([*names, f"{{name: {part}}}"])
            hint = (f". To add a stage, give the whole list in order: --set 'stages=[{listed}]' (options go in "
                    f"its braces; `winnow stages {part}` lists them), or copy a spec from jobs/")
        raise ConfigError(f"--set {dotted}: no item named {part!r}; items: {names}{hint}")
    return matches[0]


@dataclasses.dataclass
class RaySettings:
    """Where a command's Ray runs; every command's ``ray:`` section starts with these (and adds its own)."""

    address: str | None = option(None, "Ray cluster address; null uses RAY_ADDRESS or starts a local Ray sized to "
                                       "this machine", runtime=True)
    num_cpus: int | None = option(None, "CPUs for a local Ray (default: all cores)", min=1, runtime=True)


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 step``, ``2 steps``: a count with its noun in the right number (for messages and summaries)."""
    return f"{n:,} {word if n == 1 else (many or word + 's')}"
