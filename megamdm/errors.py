"""The base of every error megamdm raises for bad input: one line naming the problem and what is allowed.

Command-line tools print these as one ``error: ...`` line and exit 2;
library users catch it (or one of its subclasses: ``ConfigError``, ``CheckpointError``,
``ShardError``, ``ConversionError``) to tell a user's mistake from a bug."""


class MegamdmError(ValueError):
    """Bad input to megamdm: a config, a checkpoint, a dataset or a conversion that does not fit."""


class ConversionError(MegamdmError):
    """The inputs of a checkpoint conversion do not fit together, or a checkpoint read for one is damaged."""


class CheckpointError(MegamdmError):
    """A single-GPU-format directory (or a safetensors file in it) is missing, incomplete or inconsistent."""
