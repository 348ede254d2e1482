"""The house's import rules, read from every module's imports (``ast``): the peers ``curation/``,
``video/`` and ``training/`` import nothing of one another and only the two floors of ``pipeline/``
(``contract/``, and ``models/`` above it); the contract imports nothing above it, the model floor
nothing but the contract; only the adapter imports ``ray.data``; no two modules import each other.

``DEBT`` lists imports that break a rule and are accepted for now (none today); the test fails on any
new break and on any entry that no longer exists (so the list only shrinks).
"""
from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("pipeline", "curation", "video", "training", "jobs")
STAGE_PACKAGES = ("curation", "video", "training")

FLOORS = ("pipeline.contract", "pipeline.models")   # what a peer package may import of pipeline/
MODELS_DIR = os.path.join("pipeline", "models")

# the top floor: the commands, the CLI table, the demo and the stage registry may import the stage packages
COMMANDS = ("pipeline/cli.py", "pipeline/demo.py", "pipeline/registry.py")
COMMANDS_DIR = os.path.join("pipeline", "commands")

# imports that break a rule and are accepted for now (empty: the house stands as docs/ARCHITECTURE.md draws it)
DEBT: set[tuple[str, str, str]] = set()


def module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def imports() -> dict[str, set[str]]:
    """module file (relative) -> the modules it imports (a ``from X import Y`` counts X and X.Y)."""
    out: dict[str, set[str]] = {}
    for pkg in PACKAGES:
        for d, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if not f.endswith(".py"):
                    continue
                path = os.path.join(d, f)
                names: set[str] = set()
                for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
                    if isinstance(node, ast.Import):
                        names.update(a.name for a in node.names)
                    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                        names.add(node.module)
                        names.update(f"{node.module}.{a.name}" for a in node.names)
                out[os.path.relpath(path, ROOT)] = names
    return out


def breaks() -> set[tuple[str, str, str]]:
    found = set()
    graph = imports()
    modules = {module_name(os.path.join(ROOT, p)): p for p in graph}
    packages = {m for m, p in modules.items() if p.endswith("__init__.py")}

    def resolve(names: set[str]) -> set[str]:
        """Module names among the imported names (``from pkg import module`` names the module)."""
        out = set()
        for n in names:
            m = n if n in modules else n.rpartition(".")[0]
            if m in modules and m not in packages:
                out.add(m)
        return out

    for path, names in graph.items():
        top = path.split(os.sep)[0]
        contract = path.startswith(os.path.join("pipeline", "contract"))
        if any(n == "ray.data" or n.startswith("ray.data.") for n in names) and path != "pipeline/adapter.py":
            found.add(("ray.data outside the adapter", path, "ray.data"))
        for real in resolve(names):
            first = real.split(".")[0]
            if top in STAGE_PACKAGES and first == "pipeline" and not real.startswith(FLOORS):
                found.add(("stage package imports the engine", path, real))
            if top in STAGE_PACKAGES and first in STAGE_PACKAGES and first != top:
                found.add(("peer packages import each other", path, real))
            if path.startswith(MODELS_DIR) and not real.startswith(FLOORS):
                found.add(("the model floor imports above itself", path, real))
            if contract and not real.startswith("pipeline.contract"):
                found.add(("the contract imports above itself", path, real))
            if top == "pipeline" and not contract and path not in COMMANDS and not path.startswith(COMMANDS_DIR) \
                    and first in STAGE_PACKAGES:
                found.add(("the engine imports a stage package", path, real))
            other = modules[real]
            if other != path and module_name(os.path.join(ROOT, path)) in resolve(graph[other]):
                a, b = sorted([path, other])
                found.add(("modules import each other", a, module_name(os.path.join(ROOT, b))))
    return found


def test_the_import_rules_hold_except_for_the_listed_debt():
    found = breaks()
    assert sorted(found - DEBT) == [], "new imports that break the house's rules"
    assert sorted(DEBT - found) == [], "debt paid: remove these entries from DEBT"


def test_the_rules_see_a_peer_import_and_a_model_floor_that_climbs(tmp_path, monkeypatch):
    """The scan itself: a training module importing curation, and a model-floor module importing
    the engine, are both found."""
    import sys

    real = imports()
    fake = dict(real)
    fake["training/evaluate.py"] = real["training/evaluate.py"] | {"curation.clip"}
    fake["pipeline/models/clip.py"] = real["pipeline/models/clip.py"] | {"pipeline.readers"}
    monkeypatch.setattr(sys.modules[__name__], "imports", lambda: fake)
    assert breaks() == {("peer packages import each other", "training/evaluate.py", "curation.clip"),
                        ("the model floor imports above itself", "pipeline/models/clip.py", "pipeline.readers")}


def test_the_contract_is_self_contained():
    graph = imports()
    for path, names in graph.items():
        if path.startswith(os.path.join("pipeline", "contract")):
            assert not {n for n in names if n.split(".")[0] in PACKAGES and not n.startswith("pipeline.contract")}, path


def test_no_model_family_branches_outside_training_families():
    """``kind == "sdxl"`` and the like live in training/families/ only: a new family is a new file."""
    from training.families import FAMILIES

    found = []
    for pkg in PACKAGES:
        for d, _, files in os.walk(os.path.join(ROOT, pkg)):
            if os.path.relpath(d, ROOT).startswith(os.path.join("training", "families")):
                continue
            for f in (f for f in files if f.endswith(".py")):
                path = os.path.join(d, f)
                for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
                    if isinstance(node, ast.Compare):
                        consts = [c.value for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
                        if any(c in FAMILIES for c in consts):
                            found.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}")
    assert found == []


# what a family says of itself and only families/ reads: everything else calls the Family protocol
FAMILY_FLAGS = {"clips", "inflates", "follows"}


def _flag_reads(tree: ast.AST) -> list[tuple[int, str]]:
    return [(n.lineno, n.attr) for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr in FAMILY_FLAGS]


def test_no_family_flag_is_read_outside_training_families():
    """The driver, the worker, validation, eval and the curriculum call the family (``loader``,
    ``step_loss``, ``training_samples``, ``sample``, ``transition`` ...) and never ask what it is."""
    found = []
    for top in (*PACKAGES, "bench"):
        for d, _, files in os.walk(os.path.join(ROOT, top)):
            if os.path.relpath(d, ROOT).startswith(os.path.join("training", "families")):
                continue
            for f in (f for f in files if f.endswith(".py")):
                path = os.path.join(d, f)
                rel = os.path.relpath(path, ROOT)
                found += [f"{rel}:{n} .{a}" for n, a in _flag_reads(ast.parse(open(path, encoding="utf-8").read()))]
    assert found == []


def test_the_flag_scan_sees_a_read():
    found = _flag_reads(ast.parse("if fam.clips and x.inflates:\n    y = f().follows\n"))
    assert sorted(found) == [(1, "clips"), (1, "inflates"), (2, "follows")]


MEDIA = os.path.join("pipeline", "contract", "media.py")
# (module or alias, attribute) calls that open image or video bytes for reading
MEDIA_OPENS = {("Image", "open"), ("PIL.Image", "open"), ("av", "open"), ("cv2", "VideoCapture"), ("cv2", "imread"),
               ("cv2", "imdecode"), ("imageio", "imread"), ("imageio", "v3"), ("iio", "imread")}


def _media_opens(tree: ast.AST) -> list[int]:
    """Lines that call an image/video opener for reading (``av.open(x, "w")`` writes and is allowed)."""
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = ast.unparse(node.func.value)
        if (owner, node.func.attr) not in MEDIA_OPENS:
            continue
        mode = [a for a in node.args[1:2]] + [k.value for k in node.keywords if k.arg == "mode"]
        if owner == "av" and any(isinstance(m, ast.Constant) and str(m.value).startswith("w") for m in mode):
            continue
        lines.append(node.lineno)
    return lines


def test_only_the_media_module_opens_images_and_videos():
    """Every read of an image or a video goes through ``pipeline/contract/media.py``'s bounded
    openers (pixels and decoded bytes checked from the header), wherever it happens: curation,
    training, reports, sheets, eval."""
    found = []
    for pkg in PACKAGES:
        for d, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in (f for f in files if f.endswith(".py")):
                path = os.path.join(d, f)
                rel = os.path.relpath(path, ROOT)
                if rel == MEDIA:
                    continue
                found += [f"{rel}:{n}" for n in _media_opens(ast.parse(open(path, encoding="utf-8").read()))]
    assert found == []


def test_the_media_scan_sees_each_way_of_opening():
    src = "Image.open(p)\nav.open(p)\nav.open(p, 'w')\nav.open(p, mode='w')\ncv2.VideoCapture(p)\nPIL.Image.open(p)\n"
    assert _media_opens(ast.parse(src)) == [1, 2, 5, 6]
