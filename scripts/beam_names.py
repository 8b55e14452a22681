"""What changed, between the development Beam and another release, in the private Beam names
beam-turbo uses.

Run with the development environment (its Beam is the reference, and beam-turbo must import
there), naming a Python that has the other Beam installed (scripts/overlay.sh makes one)::

    .venv/bin/python scripts/beam_names.py --against .venv-beam-2.78.0/bin/python

The names are found, not listed by hand:

- every Beam object the internals module (the one that defines ``SUPPORTED_BEAM``) holds:
  what it imports from Beam, and what it imports on first use (``_LAZY_NAMES``);
- the Beam class attributes beam-turbo mirrors as constants, and the behaviour it was read to
  rely on (``READ``);
- for each beam-turbo class with a Beam class among its bases: each private attribute (and
  ``__init__``) of a Beam base that it overrides, and each private ``self._name`` it reads or
  sets that a Beam base defines (a method, a class attribute, or an attribute set on ``self``
  in the Beam class's code).

Each name's signature and source are read from Beam's source files with ``ast`` (no Beam
module runs but the packages ``importlib`` needs to find the files, and beam-turbo is not
imported on the other side, so its version gate does not matter). For an attribute set on
``self``, the "source" is every line of the Beam class that uses it, with its method. The
report gives, per name: ``unchanged``, ``changed`` (the signature before and after where it
moved, and a unified diff of the source), ``new`` (in the other release only), or
``missing``. Exit status 0 whatever changed: it is a reading aid; conformance
(scripts/conformance.py) is the test.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import difflib
import importlib.util
import inspect
import json
import os
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

#: Names found by reading beam-turbo, not by its imports or subclasses: module, class,
#: attribute, why.
READ: list[tuple[str, str, str, str]] = [
    (
        "apache_beam.transforms.util",
        "BatchElements",
        "_DEFAULT_BUCKET_BOUNDARIES",
        "mirrored as DEFAULT_BUCKET_BOUNDARIES by the internals module",
    ),
    (
        "apache_beam.transforms.util",
        "_WindowAwareBatchingDoFn",
        "_MAX_LIVE_WINDOWS",
        "mirrored as MAX_LIVE_WINDOWS by the internals module",
    ),
    (
        "apache_beam.ml.inference.base",
        "_ApplyToExample",
        "",
        "looked for by the internals module's applies_to_example (Beam 2.78 and later)",
    ),
    *(
        (
            "apache_beam.ml.inference.base",
            keyed,
            "batch_elements_kwargs",
            "what the fused DoFn's length function gets (_gathering.gatherer.unkeyed_length)",
        )
        for keyed in ("KeyedModelHandler", "MaybeKeyedModelHandler")
    ),
]

#: Beam's SDK classes every DoFn and PTransform derives from: their ``__init__`` is public API,
#: not worth a line per beam-turbo DoFn (their private attributes still count).
GENERIC = (
    "apache_beam.transforms.core",
    "apache_beam.transforms.ptransform",
    "apache_beam.typehints",
)

#: An entry: [module, qualified name, attribute or "", why beam-turbo uses it].
Entry = list[str]


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _from_beam(obj: Any) -> bool:
    return str(getattr(obj, "__module__", "")).startswith("apache_beam")


def _beam_turbo_modules() -> list[Any]:
    """Every beam-turbo module, imported (torch's triton before TensorFlow, as the tests do)."""
    for first in ("torch", "triton"):
        with contextlib.suppress(ImportError):
            __import__(first)
    import beam_turbo

    modules = [beam_turbo]
    for info in pkgutil.walk_packages(beam_turbo.__path__, "beam_turbo."):
        try:
            modules.append(importlib.import_module(info.name))
        except Exception as error:  # a framework not installed: its module has no subclasses
            print(f"note: {info.name} not imported ({error!r})", file=sys.stderr)
    return modules


def _self_attributes(cls: type) -> set[str]:
    """The private names read or set as ``self._name`` in ``cls``'s own code."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return set()
    return {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
        and _is_private(node.attr)
    }


def _sets_on_self(cls: type, name: str) -> bool:
    """Whether ``cls``'s own code (a Beam class) uses ``self.<name>``."""
    return name in _self_attributes(cls)


def discover() -> list[Entry]:
    """The Beam names beam-turbo uses (needs beam-turbo and the development Beam)."""
    entries: dict[tuple[str, str, str], set[str]] = {}

    def add(module: str, qualname: str, attribute: str, why: str) -> None:
        entries.setdefault((module, qualname, attribute), set()).add(why)

    modules = _beam_turbo_modules()
    internals = next(m for m in modules if hasattr(m, "SUPPORTED_BEAM"))
    held = {name: getattr(internals, name) for name in dir(internals)}
    for name in getattr(internals, "_LAZY_NAMES", {}):
        held[name] = getattr(internals, name)
    for value in held.values():
        if _from_beam(value) and hasattr(value, "__qualname__") and not inspect.ismodule(value):
            add(value.__module__, value.__qualname__, "", f"held by {internals.__name__}")
    for module, qualname, attribute, why in READ:
        add(module, qualname, attribute, why)
    for module in modules:
        for cls in vars(module).values():
            if not inspect.isclass(cls) or cls.__module__ != module.__name__:
                continue
            beam_bases = [k for k in cls.__mro__ if _from_beam(k)]
            if not beam_bases:
                continue
            ours = cls.__qualname__
            for own in (k for k in cls.__mro__ if k.__module__.startswith("beam_turbo")):
                for name in vars(own):
                    if not (_is_private(name) or name == "__init__"):
                        continue
                    base = next((b for b in beam_bases if name in vars(b)), None)
                    if base is None or (name == "__init__" and base.__module__.startswith(GENERIC)):
                        continue
                    add(base.__module__, base.__qualname__, name, f"overridden by {ours}")
                for name in _self_attributes(own):
                    base = next((b for b in beam_bases if name in vars(b)), None)
                    if base is None:
                        base = next((b for b in beam_bases if _sets_on_self(b, name)), None)
                    if base is not None:
                        add(base.__module__, base.__qualname__, name, f"used by {ours}")
    return [[m, q, a, "; ".join(sorted(why))] for (m, q, a), why in sorted(entries.items())]


def _module_source(module: str) -> tuple[str, ast.Module] | None:
    """The source of a Beam module, and its tree (the ``.py`` beside a compiled one)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    path = Path(spec.origin)
    if path.suffix != ".py":
        path = path.with_name(path.name.split(".")[0] + ".py")
    if not path.exists():
        return None
    source = path.read_text()
    return source, ast.parse(source)


Definition = ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Assign | ast.AnnAssign


def _defines(node: ast.stmt, name: str) -> bool:
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return node.name == name
    if isinstance(node, ast.Assign):
        return any(isinstance(t, ast.Name) and t.id == name for t in node.targets)
    if isinstance(node, ast.AnnAssign):
        return isinstance(node.target, ast.Name) and node.target.id == name
    return False


def _find(body: list[ast.stmt], name: str) -> Definition | None:
    """The last definition of ``name`` among ``body``'s statements (the one that stands)."""
    found = None
    for node in body:
        if _defines(node, name):
            found = node
    return found  # type: ignore[return-value]


def _signature(node: Definition) -> str:
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        returns = f" -> {ast.unparse(node.returns)}" if node.returns else ""
        return f"def {node.name}({ast.unparse(node.args)}){returns}"
    if isinstance(node, ast.ClassDef):
        bases = ", ".join(ast.unparse(b) for b in [*node.bases, *node.keywords])
        init = _find(node.body, "__init__")
        return f"class {node.name}({bases})" + (f"; {_signature(init)}" if init else "")
    return ast.unparse(node)


def describe(entry: Entry) -> dict[str, str]:
    """The signature and source of one entry in the installed Beam, or why it is missing."""
    module, qualname, attribute, _ = entry
    found = _module_source(module)
    if found is None:
        return {"missing": f"no module {module}"}
    source, tree = found
    body: list[ast.stmt] = tree.body
    node: Definition | None = None
    for part in qualname.split("."):
        node = _find(body, part)
        if node is None:
            # Re-exported (``from x import name``): look once in the module it comes from.
            for statement in tree.body:
                if (
                    isinstance(statement, ast.ImportFrom)
                    and statement.module
                    and any((a.asname or a.name) == part for a in statement.names)
                ):
                    return describe([statement.module, qualname, attribute, ""])
            return {"missing": f"no {part} in {module}"}
        body = node.body if isinstance(node, ast.ClassDef) else []
    assert node is not None
    if not attribute:
        return {"signature": _signature(node), "source": ast.get_source_segment(source, node) or ""}
    if not isinstance(node, ast.ClassDef):
        return {"missing": f"{qualname} is no longer a class"}
    member = _find(node.body, attribute)
    if member is not None:
        return {
            "signature": _signature(member),
            "source": ast.get_source_segment(source, member) or "",
        }
    # An attribute set on self: every line of the class that uses it, with its method.
    lines = source.splitlines()
    uses, sets = [], []
    for method in node.body:
        if not isinstance(method, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for sub in ast.walk(method):
            if (
                isinstance(sub, ast.Attribute)
                and sub.attr == attribute
                and isinstance(sub.value, ast.Name)
                and sub.value.id == "self"
            ):
                uses.append(f"{method.name}: {lines[sub.lineno - 1].strip()}")
                if isinstance(sub.ctx, ast.Store):
                    sets.append(method.name)
    if not uses:
        return {"missing": f"{qualname} no longer defines or uses self.{attribute}"}
    unique = list(dict.fromkeys(uses))
    where = ", ".join(dict.fromkeys(sets)) or "no method of this class"
    return {"signature": f"set on self in {where}", "source": "\n".join(unique)}


def _label(entry: Entry) -> str:
    module, qualname, attribute, _ = entry
    return f"{module}.{qualname}" + (f".{attribute}" if attribute else "")


def compare(
    entries: list[Entry],
    ours: list[dict[str, str]],
    theirs: list[dict[str, str]],
    versions: tuple[str, str],
) -> list[str]:
    """The report's lines: changed and missing names in full, then the unchanged ones."""
    dev, other = versions
    changed, missing, unchanged = [], [], []
    for entry, before, after in zip(entries, ours, theirs, strict=True):
        label, why = _label(entry), entry[3]
        if "missing" in before and "missing" in after:
            missing.append(f"missing   {label} ({why}): in both: {after['missing']}")
        elif "missing" in before:  # beam-turbo looks for it where Beam has it
            changed.append(f"new       {label} ({why}): {after['signature']}")
        elif "missing" in after:
            missing.append(f"missing   {label} ({why}): {after['missing']}")
        elif before == after:
            unchanged.append(f"unchanged {label} ({why})")
        else:
            lines = [f"changed   {label} ({why})"]
            if before["signature"] != after["signature"]:
                lines += [
                    f"    signature {dev}: {before['signature']}",
                    f"    signature {other}: {after['signature']}",
                ]
            else:
                lines.append(f"    signature unchanged: {before['signature']}")
            diff = difflib.unified_diff(
                before["source"].splitlines(),
                after["source"].splitlines(),
                f"{label} ({dev})",
                f"{label} ({other})",
                lineterm="",
                n=2,
            )
            lines += [f"    {line}" for line in diff]
            changed.append("\n".join(lines))
    return [
        f"Beam names beam-turbo uses: Beam {dev} (development) against {other}: "
        f"{len(changed)} changed, {len(missing)} missing, {len(unchanged)} unchanged",
        *missing,
        *changed,
        *unchanged,
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", help="a Python with the other Beam installed")
    parser.add_argument("--list", action="store_true", help="print the names found, and stop")
    parser.add_argument("--describe", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.describe:  # the other side: entries on stdin, descriptions on stdout
        import apache_beam

        entries = json.load(sys.stdin)
        json.dump(
            {"version": apache_beam.__version__, "names": [describe(e) for e in entries]},
            sys.stdout,
        )
        return 0
    entries = discover()
    if options.list:
        for entry in entries:
            print(f"{_label(entry)}  ({entry[3]})")
        return 0
    if not options.against:
        parser.error("--against PYTHON is needed (or --list)")
    import apache_beam

    ours = [describe(e) for e in entries]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # their Beam only
    done = subprocess.run(
        [options.against, __file__, "--describe"],
        input=json.dumps(entries),
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if done.returncode != 0:
        print(done.stderr, file=sys.stderr)
        raise SystemExit(f"beam_names: {options.against} could not describe the names")
    theirs = json.loads(done.stdout)
    versions = (apache_beam.__version__, theirs["version"])
    print("\n".join(compare(entries, ours, theirs["names"], versions)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
