"""One exception type per failure a user can cause. The CLI prints them as one line and exits with 2."""


class VmapSweepError(Exception):
    """Base of every error caused by input: a path, a file, a range, a config. Never a bug."""


class CheckpointError(VmapSweepError):
    """A model source that can't be read: not a checkpoint, missing/extra keys, wrong shapes."""


class TokenizerError(VmapSweepError):
    """A tokenizer file that can't be read safely or doesn't match the model."""


class DataError(VmapSweepError):
    """A dataset that can't be rendered: missing `messages`, roles out of order, empty."""


class ConfigError(VmapSweepError):
    """A bad option or range: unknown axis, min >= max, resolution < 2, ..."""


class StoreError(VmapSweepError):
    """A study database that can't be used: corrupt, foreign, or made by a different config."""


class OutOfMemoryForOneModel(VmapSweepError):
    """Not even one model per batch fits in device memory."""
