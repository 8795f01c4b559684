"""The layering of docs/design.md §2, read from the import statements (module-level and local)."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "megamdm"


def _imports(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports, relative imports resolved."""
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            mod = ".".join([*base, node.module] if node.module else base)
            names.add(mod)
            names.update(f"{mod}.{a.name}" for a in node.names)
    return names


def _modules(*globs: str) -> dict[str, set[str]]:
    files = sorted({p for g in globs for p in PKG.glob(g)})
    assert files, globs
    return {str(p.relative_to(PKG)): _imports(p) for p in files}


def _offenders(modules: dict[str, set[str]], prefixes: tuple[str, ...]) -> dict[str, list[str]]:
    bad = {m: sorted(n for n in names if n.startswith(prefixes)) for m, names in modules.items()}
    return {m: n for m, n in bad.items() if n}


def test_the_math_knows_nothing_of_megatron_or_the_trainer():
    math = _modules(
        "gce/*.py",
        "diffusion.py",
        "sampling.py",
        "objective.py",
        "models/standalone.py",
        "models/rope.py",
        "pretrained.py",
        "text.py",
        "vq/*.py",
    )
    assert _offenders(math, ("megatron", "megamdm.training", "megamdm.models.mcore", "megamdm.compat")) == {}


def test_only_models_mcore_builds_megatron_modules():
    rest = {m: n for m, n in _modules("**/*.py").items() if not m.startswith("models/mcore/")}
    builders = ("megatron.core.transformer", "megatron.core.models", "megatron.core.tensor_parallel.layers")
    assert _offenders(rest, builders) == {}


def test_only_training_owns_the_loop_and_conversion_does_not_reach_into_it():
    outside = {m: n for m, n in _modules("**/*.py").items() if not m.startswith("training/")}
    loop = ("megatron.core.pipeline_parallel", "megatron.core.optimizer", "megatron.core.distributed")
    assert _offenders(outside, loop) == {}
    assert _offenders(_modules("convert.py", "pretrained.py", "cli/*.py"), ("megamdm.training",)) == {}


def test_the_library_core_does_not_import_the_demo():
    core = {m: n for m, n in _modules("**/*.py").items() if not m.startswith("demo/")}
    assert _offenders(core, ("megamdm.demo",)) == {}
