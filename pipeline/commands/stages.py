"""``winnow stages``: the stages a curate spec's ``stages:`` may name, with every option (from the typed configs)."""
from __future__ import annotations

NAME = "stages"
DESCRIPTION = "List the stages a curate spec's `stages:` may name, with every option."


def _plain(text: str) -> str:
    """Docstrings' reStructuredText literals (``x``) as a terminal shows them (`x`)."""
    return text.replace("``", "`")


def describe_stages(only: str | None = None, options: bool = True) -> str:
    """The registered stages, one line each; with ``options`` also every option, its type, default
    and help (from the typed configs)."""
    from pipeline import registry
    from pipeline.contract.config import describe

    lines = []
    names = plan(only)
    width = max(len(n) for n in names)
    for name in names:
        cls = registry.get(name)
        doc = _plain((cls.__doc__ or "").strip().splitlines()[0]) if cls.__doc__ else ""
        if not options:
            lines.append(f"{name:<{width}}  {doc}")
            continue
        lines.append(f"{name}: {doc}")
        lines += [_plain(line) for line in describe(cls.Config, "    ")]
        lines.append("")
    if not options:
        lines += ["", "winnow stages NAME shows one stage's options; winnow stages --all shows every stage's"]
    return "\n".join(lines).rstrip()


def arguments(parser) -> None:
    parser.add_argument("name", nargs="?", help="one stage, with its options (default: the list of stages)")
    parser.add_argument("--all", action="store_true", help="every stage with its options")


def from_args(args) -> tuple[str | None, bool]:
    from pipeline import registry

    if args.name and args.name not in registry.STAGES:
        registry.get(args.name)                           # raises with a suggestion
    return args.name, bool(args.name or args.all)


def plan(name: str | None) -> list[str]:
    from pipeline import registry

    return [name] if name else sorted(registry.STAGES)


def run(what: tuple[str | None, bool], log=None) -> str:
    name, options = what
    return describe_stages(name, options)


def format_summary(text: str) -> str:
    return text
