"""megamdm: masked discrete diffusion text-to-image training at cluster scale.

``from megamdm import MDMSampler, load_config, Config`` gives the public API; the names are imported on
first use, so ``import megamdm.gce`` (say) does not load the sampler, the config or their dependencies.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("megamdm")  # one source: pyproject.toml
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

_EXPORTS = {
    "MDMSampler": "megamdm.sampling.pipeline",
    "SampleSettings": "megamdm.sampling.settings",
    "Config": "megamdm.config",
    "load_config": "megamdm.config",
    "load_single": "megamdm.formats.single",
    "finetune": "megamdm.finetune",
    "finetune_config": "megamdm.finetune",
    "MegamdmError": "megamdm.errors",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'megamdm' has no attribute {name!r}")
