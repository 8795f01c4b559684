"""megamdm: masked discrete diffusion text-to-image training at cluster scale."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("megamdm")  # one source: pyproject.toml
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
