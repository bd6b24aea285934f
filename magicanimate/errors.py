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


OUT_OF_MEMORY = (
    "out of memory; to use less: dtype float16 (on a GPU), context_batch_size 1, decode_chunk_size 4, a smaller size "
    "(e.g. 384), fewer frames (max_frames), or close other programs using the GPU"
)


def is_out_of_memory(err: BaseException) -> bool:
    """An allocation failure: torch's ``OutOfMemoryError`` (CUDA, XPU, MPS), ``MemoryError``, or the plain
    ``RuntimeError`` older torch builds, cuDNN and the CPU allocator raise."""
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(
        phrase in text for phrase in ("out of memory", "failed to allocate memory", "can't allocate memory")
    )


def as_user_error(err: BaseException) -> MagicAnimateError | None:
    """The user-facing form of ``err`` (ours as they are, out-of-memory as a :class:`ResourceError`), or ``None``
    for a bug, which keeps its traceback."""
    if isinstance(err, MagicAnimateError):
        return err
    if is_out_of_memory(err):
        return ResourceError(OUT_OF_MEMORY)
    return None
