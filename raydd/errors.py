"""raydd's own errors: what a user can fix (bad input, missing or ill-fitting files, an unreachable cluster).

The CLIs print a RayddError as one line, `raydd: error: ...`, and exit 2; any other exception is a bug
(or an environment failure raydd cannot explain) and keeps its traceback, exit 1. The other subclasses
live beside the code that raises them: ConfigError (raydd.config), DataError (raydd.data), SpaceError
(raydd.tune_space), TrackingError (raydd.tracking), GuidanceError (raydd.sampling), VEError
(raydd.objectives.information).
"""


class RayddError(Exception):
    """Bad input or a condition the user can fix; the message names the problem and the allowed values."""


class CheckpointError(RayddError, ValueError):
    """A checkpoint, model directory or pretrained weight that is missing, unreadable or does not fit."""


class ClusterError(RayddError, RuntimeError):
    """The Ray cluster asked for cannot be reached or cannot fit the job."""
