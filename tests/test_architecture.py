"""What docs/architecture.md claims of the package's structure, checked on the source: the files
it names exist, imports form no circle, no private name is taken from a public module, Beam's
private names appear only in ``_beam/internals.py``, the runtime never imports the benchmarks,
and the runtime has at most six DoFn classes."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "python" / "beam_turbo"
ARCHITECTURE = ROOT / "docs" / "architecture.md"
#: Where a file name in the docs' prose may live.
SEARCHED = [
    ROOT,
    PACKAGE,
    ROOT / "rust" / "core" / "src",
    ROOT / "rust" / "py" / "src",
    ROOT / "docs",
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}
#: Modules without Python source: the Rust extension.
EXTENSIONS = {"beam_turbo._native"}


def is_runtime(module: str) -> bool:
    return not (module.startswith("beam_turbo.bench") or module == "beam_turbo.cli")


def imported(module: str) -> list[tuple[str, str | None, ast.stmt]]:
    """``(module, name or None, node)`` for each beam_turbo import in ``module``, at any depth
    (imports inside functions count: they run too)."""
    tree = ast.parse(MODULES[module].read_text())
    found: list[tuple[str, str | None, ast.stmt]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                if submodule in MODULES or submodule in EXTENSIONS:
                    found.append((submodule, None, node))
                else:
                    found.append((node.module, alias.name, node))
    return [entry for entry in found if entry[0].split(".")[0] == "beam_turbo"]


def missing_in(text: str) -> list[str]:
    """The files and modules a page in the form of docs/architecture.md names that do not
    exist: each line of its layout block (nested by two-space indents), each backticked file
    name and ``beam_turbo.`` module in its prose."""
    missing = []
    layout = re.search(r"## Layout.*?```\n(.*?)```", text, re.S)
    assert layout, "no layout block"
    folders: list[Path] = []
    for line in layout.group(1).splitlines():
        if not line.strip() or line.startswith(" " * 20):
            continue  # a description's continuation
        depth = (len(line) - len(line.lstrip())) // 2
        name = line.split()[0]
        folders = folders[:depth]
        path = (folders[-1] if folders else ROOT) / name.rstrip("/")
        if not path.exists():
            missing.append(str(path.relative_to(ROOT)))
        if name.endswith("/"):
            folders.append(path)
    prose = text[: layout.start()] + text[layout.end() :]
    for name in re.findall(r"`([\w/.]+\.(?:py|rs|md|sh|toml))`", prose):
        if not any((where / name).exists() for where in SEARCHED):
            missing.append(name)
    for dotted in re.findall(r"`(beam_turbo(?:\.\w+)+)`", prose):
        if not names_something(dotted):
            missing.append(dotted)
    return missing


def names_something(dotted: str) -> bool:
    """Whether ``dotted`` is a module of the package, or a name defined at the top of one."""
    if dotted in MODULES or dotted in EXTENSIONS:
        return True
    module, _, name = dotted.rpartition(".")
    if module not in MODULES:
        return False
    tree = ast.parse(MODULES[module].read_text())
    defined = set()
    for node in tree.body:
        if isinstance(node, ast.ClassDef | ast.FunctionDef):
            defined.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            defined |= {t.id for t in targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.ImportFrom | ast.Import):
            defined |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return name in defined


def test_the_architecture_page_names_only_files_that_exist() -> None:
    missing = missing_in(ARCHITECTURE.read_text())
    assert not missing, f"docs/architecture.md names what does not exist: {missing}"


def test_a_page_naming_a_file_that_does_not_exist_is_caught() -> None:
    page = (
        "## Layout\n```\npython/beam_turbo/\n  _gathering/\n    gatherer.py   the rule\n"
        "    sizer.py      gone\n```\nSee `_sizing.py` and `beam_turbo._fused`.\n"
    )
    assert missing_in(page) == [
        "python/beam_turbo/_gathering/sizer.py",
        "_sizing.py",
        "beam_turbo._fused",
    ]


def test_imports_form_no_circle() -> None:
    graph = {
        module: {t for t, _, _ in imported(module) if t in MODULES and t != module}
        for module in MODULES
    }
    for module in graph:  # a submodule's import of its own package's __init__ is implied
        graph[module].discard("beam_turbo")
    seen: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(module: str, path: list[str]) -> None:
        seen[module] = 1
        for target in sorted(graph[module]):
            assert seen.get(target) != 1, f"import circle: {' -> '.join([*path, target])}"
            if target not in seen:
                visit(target, [*path, target])
        seen[module] = 2

    for module in sorted(graph):
        if module not in seen:
            visit(module, [module])


def test_no_private_name_is_taken_from_a_public_module() -> None:
    taken = [
        f"{module} takes {name} from {source}"
        for module in MODULES
        for source, name, _ in imported(module)
        if name is not None
        and name.startswith("_")
        and not any(part.startswith("_") for part in source.split(".")[1:])
    ]
    assert not taken, taken


def test_beams_private_names_are_only_in_the_internals_module() -> None:
    used = []
    for module, path in MODULES.items():
        if module == "beam_turbo._beam.internals":
            continue
        tree = ast.parse(path.read_text())
        beam_aliases = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("apache_beam"):
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        used.append(f"{module}: from {node.module} import {alias.name}")
                    beam_aliases.add(alias.asname or alias.name)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("apache_beam"):
                        beam_aliases.add((alias.asname or alias.name).split(".")[0])
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in beam_aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                used.append(f"{module}: {node.value.id}.{node.attr}")
    assert not used, used


def test_the_runtime_never_imports_the_benchmarks() -> None:
    reached = [
        f"{module} imports {target}"
        for module in MODULES
        if is_runtime(module)
        for target, _, _ in imported(module)
        if target.startswith("beam_turbo.bench") or target == "beam_turbo.cli"
    ]
    assert not reached, reached


def test_the_runtime_has_at_most_six_dofn_classes() -> None:
    dofns = []
    for module, path in MODULES.items():
        if not is_runtime(module):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                ast.unparse(base) in ("beam.DoFn", "internals.RunInferenceDoFn", "GatheringDoFn")
                for base in node.bases
            ):
                dofns.append(f"{module}.{node.name}")
    assert dofns, "no DoFn found: the check no longer recognises them"
    assert len(dofns) <= 6, dofns
