"""The library's dependencies point down the layer list of docs/ARCHITECTURE.md.

Every `import` of a `zoo` module in the library's source (lazy ones inside functions included) is
read with `ast`; a module may import its own layer or a lower one. The few upward imports that
remain are listed below, each with its reason, so a new one fails here and a fixed one must be
struck from the list. The module import graph has no cycle, and the MoE core and the kernels
import nothing from `zoo.models` or above.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"zoo": ROOT / "zoo", "zoo.encoders": ROOT / "encoders", "zoo.kernels": ROOT / "kernels"}

# Bottom first; a module belongs to the layer of its longest matching prefix.
LAYERS = [
    ("base", ["zoo.config", "zoo.registry", "zoo.errors", "zoo.resources", "zoo.progress", "zoo.tokenizer",
              "zoo.moe.activations"]),
    ("kernels", ["zoo.kernels"]),
    ("moe", ["zoo.moe"]),
    ("encoders", ["zoo.encoders"]),
    ("models", ["zoo.models"]),
    ("transforms", ["zoo.transforms"]),
    ("io", ["zoo.io"]),
    ("catalog", ["zoo.catalog"]),
    ("inference", ["zoo.inference"]),
    ("top", ["zoo.processor", "zoo.cli", "zoo"]),
]

# Upward imports that remain: (importer, imported) -> why.
KNOWN_UPWARD = {
    ("zoo.models.builders", "zoo.transforms.adapters"): "build_model composes transforms (a builder, above its parts)",
    ("zoo.models.builders", "zoo.transforms.quantize"): "build_model composes transforms",
    ("zoo.models.builders", "zoo.transforms.upcycle"): "build_model composes transforms",
    ("zoo.models.config", "zoo.transforms.adapters"): "ModelConfig checks adapter names against ADAPTERS",
    ("zoo.models.config", "zoo.transforms.upcycle"): "ModelConfig checks upcycler names against UPCYCLERS",
    ("zoo.models.pretrained", "zoo.io.sources"): "a pretrained LM is read from a packaged source",
    ("zoo.encoders.audio", "zoo.io.sources"): "the Whisper tower is read from a packaged source",
    ("zoo.transforms.esft", "zoo.io.checkpoint"): "ESFT writes its expert adapter",
    ("zoo.transforms.esft", "zoo.io.expert_adapter"): "ESFT writes its expert adapter",
    ("zoo.io.export.llava", "zoo"): "the export records zoo.__version__",
    ("zoo.io.export.multimodal", "zoo"): "the export records zoo.__version__",
    ("zoo.catalog.load", "zoo.processor"): "zoo.load returns the model's processor",
}


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg, base in SOURCES.items():
        for path in base.rglob("*.py"):
            parts = [p for p in path.relative_to(base).with_suffix("").parts if p != "__init__"]
            mods[".".join([pkg, *parts])] = path
    return mods


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, imported names) of every absolute import in the file, nested ones included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module, [a.name for a in node.names]))
    return out


def _rank(mod: str) -> int:
    best = None
    for r, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (mod == p or mod.startswith(p + ".")) and (best is None or len(p) > best[1]):
                best = (r, len(p))
    assert best is not None, f"{mod} is in no layer"
    return best[0]


def _zoo(name: str) -> bool:
    return (name == "zoo" or name.startswith("zoo.")) and not name.startswith("zoo.pipelines")


def test_dependencies_point_down_the_layer_list():
    upward, where = set(), {}
    for mod, path in _modules().items():
        for line, name, _ in _imports(path):
            if _zoo(name) and _rank(name) > _rank(mod):
                upward.add((mod, name))
                where.setdefault((mod, name), f"{path.relative_to(ROOT)}:{line}")
    new = sorted(upward - set(KNOWN_UPWARD))
    assert not new, "upward imports (a lower layer importing a higher one): " + "; ".join(
        f"{where[e]} {e[0]} ({LAYERS[_rank(e[0])][0]}) imports {e[1]} ({LAYERS[_rank(e[1])][0]})" for e in new)
    gone = sorted(set(KNOWN_UPWARD) - upward)
    assert not gone, f"no longer imported, strike from KNOWN_UPWARD: {gone}"


def test_the_moe_core_and_the_kernels_import_nothing_from_models_or_above():
    bad = []
    for mod, path in _modules().items():
        if _rank(mod) > _rank("zoo.moe"):
            continue
        for line, name, _ in _imports(path):
            if _zoo(name) and _rank(name) > _rank("zoo.moe"):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not bad, bad


def test_the_library_has_no_import_cycle_lazy_imports_included():
    mods = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        for _, name, names in _imports(path):
            for target in [name, *(f"{name}.{n}" for n in names)]:
                t = resolve(target) if _zoo(target) else None
                if t and t != mod and not mod.startswith(t + "."):  # a package's own __init__ is not an edge
                    graph[mod].add(t)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(mods):
        if m not in state and (cycle := visit(m)):
            raise AssertionError("import cycle: " + " -> ".join(cycle))
