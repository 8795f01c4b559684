"""megamdm: masked discrete diffusion text-to-image training at cluster scale."""

import warnings

# megatron-core announces its torch fallbacks at import on machines without TE / apex; megamdm
# reports the backend it chose itself, so these notices are only noise.
warnings.filterwarnings("ignore", message=r".*(Transformer Engine and Apex|Apex) (are|is) not installed.*")
# deprecations inside megatron-core 0.16's own use of torch APIs: nothing a user can act on
warnings.filterwarnings("ignore", message=r".*(deprecating ShardedTensor|`load_state_dict` is deprecated|full scope is "
                                          r"deprecated|`torch.distributed.(reduce_scatter|all_gather_into)_tensor` is deprecated).*")

__version__ = "0.1.0"
