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
        "sampling/*.py",
        "objective.py",
        "models/standalone.py",
        "models/layers.py",
        "models/rope.py",
        "formats/*.py",
        "text.py",
        "vq/*.py",
        "options.py",
        "config.py",
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
    assert _offenders(_modules("convert/*.py", "formats/*.py", "cli/*.py"), ("megamdm.training",)) == {}


def test_the_models_import_neither_each_other_nor_the_features_built_on_them():
    """The standalone and megatron-core models share models/layers.py; neither imports the other, and no
    model imports sampling, conversion, formats or a loop (the state-dict adapter alone knows both models)."""
    models = _modules("models/*.py", "models/mcore/*.py")
    above = ("megamdm.sampling", "megamdm.convert", "megamdm.formats", "megamdm.training", "megamdm.finetune")
    assert _offenders(models, above) == {}
    mcore = {m: n for m, n in _modules("models/mcore/*.py").items() if m != "models/mcore/state_dict_adapter.py"}
    assert _offenders(mcore, ("megamdm.models.standalone",)) == {}
    assert _offenders(_modules("models/standalone.py", "models/layers.py"), ("megamdm.models.mcore",)) == {}


def test_on_disk_formats_stand_below_the_features_that_read_them():
    """formats/ (single-GPU format, run layout, torch_dist reading) is read by training, sampling and
    conversion, and imports none of them (the sampler's settings schema aside: config.json holds it)."""
    formats = _modules("formats/*.py")
    features = ("megamdm.training", "megamdm.convert", "megamdm.finetune", "megamdm.sampling")
    offenders = _offenders(formats, features).items()
    bad = {m: [n for n in names if not n.startswith("megamdm.sampling.settings")] for m, names in offenders}
    assert {m: n for m, n in bad.items() if n} == {}
    assert _offenders(_modules("training/*.py"), ("megamdm.convert", "megamdm.finetune")) == {}
    assert _offenders(_modules("sampling/*.py"), ("megamdm.training", "megamdm.convert", "megamdm.finetune")) == {}


def test_fine_tuning_needs_no_megatron():
    """Fine-tuning uses the trainer's pieces that stand without megatron-core (processes, metrics, logging)."""
    finetune = _modules("finetune/*.py")
    assert _offenders(finetune, ("megatron", "megamdm.models.mcore", "megamdm.training.trainer")) == {}
    used = {n for names in finetune.values() for n in names if n.startswith("megamdm.training.")}
    for module in {".".join(n.split(".")[:3]) for n in used}:
        path = PKG / (module.split(".", 1)[1].replace(".", "/") + ".py")
        top = _top_level_imports(path)
        assert not any(n.startswith("megatron") for n in top), (module, sorted(top))


def _top_level_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names.add(node.module or "")
    return names


def test_the_library_core_does_not_import_the_demo():
    core = {m: n for m, n in _modules("**/*.py").items() if not m.startswith("demo/")}
    assert _offenders(core, ("megamdm.demo",)) == {}


def test_megamdm_modules_are_imported_at_the_top():
    """A function-local import of megamdm's own modules only where the module pulls in an optional heavy
    dependency, each listed here with it (docs/design.md §2)."""
    allowed = {
        ("gce/__init__.py", "megamdm.gce.triton_kernels"),  # triton (the gpu extra)
        ("train.py", "megamdm.training.trainer"),  # megatron-core, once the config has been read
    }
    local = set()
    for path in sorted(PKG.rglob("*.py")):
        rel = str(path.relative_to(PKG))
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        package = parts[:-1]
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom):
                    base = package[: len(package) - node.level + 1] if node.level else []
                    mod = ".".join([*base, node.module] if node.module else base)
                    if mod.startswith("megamdm"):
                        local.add((rel, mod))
                elif isinstance(node, ast.Import):
                    local.update((rel, a.name) for a in node.names if a.name.startswith("megamdm"))
    assert local == allowed
