"""megamdm: masked discrete diffusion text-to-image training at cluster scale."""

import warnings

# megatron-core announces its torch fallbacks at import on machines without TE / apex; megamdm
# reports the backend it chose itself, so these notices are only noise.
warnings.filterwarnings("ignore", message=r".*(Transformer Engine and Apex|Apex) (are|is) not installed.*")

__version__ = "0.1.0"
