"""The library notices megamdm's command-line tools hide, for the length of a command.

megatron-core announces its torch fallbacks at import on machines without TE / apex (megamdm
reports the backend it chose itself), and warns about its own use of deprecated torch APIs:
nothing a user can act on. Library users see them as the libraries print them."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

NOTICES = (
    r".*(Transformer Engine and Apex|Apex) (are|is) not installed.*",
    r".*(deprecating ShardedTensor|`load_state_dict` is deprecated|full scope is deprecated"
    r"|`torch.distributed.(reduce_scatter|all_gather_into)_tensor` is deprecated).*",
)


@contextlib.contextmanager
def library_notices_hidden() -> Iterator[None]:
    with warnings.catch_warnings():
        for pattern in NOTICES:
            warnings.filterwarnings("ignore", message=pattern)
        yield
