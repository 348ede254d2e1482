"""``winnow stages``: the stages a curate spec's ``stages:`` may name, with every option (from the typed configs)."""
from __future__ import annotations

NAME = "stages"
DESCRIPTION = "List the stages a curate spec's `stages:` may name, with every option."


def describe_stages(only: str | None = None) -> str:
    """Every registered stage with its options, types, defaults and help (from the typed configs)."""
    from pipeline import registry
    from pipeline.contract.config import describe

    lines = []
    for name in plan(only):
        cls = registry.get(name)
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        lines.append(f"{name}: {doc}")
        lines += describe(cls.Config, "    ")
        lines.append("")
    return "\n".join(lines).rstrip()


def arguments(parser) -> None:
    parser.add_argument("name", nargs="?", help="one stage (default: all)")


def from_args(args) -> str | None:
    from pipeline import registry

    if args.name and args.name not in registry.STAGES:
        registry.get(args.name)                           # raises with a suggestion
    return args.name


def plan(name: str | None) -> list[str]:
    from pipeline import registry

    return [name] if name else sorted(registry.STAGES)


def run(name: str | None, log=None) -> str:
    return describe_stages(name)


def format_summary(text: str) -> str:
    return text
