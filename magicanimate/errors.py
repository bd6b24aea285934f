"""Errors a user can act on.

Every failure caused by what the user gave us (a bad file, a missing checkpoint, not enough memory) is raised as
a subclass of :class:`MagicAnimateError` with a one-line message that says what is wrong and how to fix it. The
CLI prints that line and exits with :attr:`MagicAnimateError.exit_code`; the Python API lets it propagate.
"""


class MagicAnimateError(Exception):
    """Base class of errors caused by inputs, checkpoints or resources, not by a bug in magicanimate."""

    exit_code = 1


class InputError(MagicAnimateError, ValueError):
    """An input file or argument is unusable (unreadable image, empty video, bad setting)."""

    exit_code = 2


class CheckpointError(MagicAnimateError):
    """Model weights are missing, incomplete or in an unexpected layout."""

    exit_code = 3


class ResourceError(MagicAnimateError):
    """The machine ran out of something (memory, disk)."""

    exit_code = 4
