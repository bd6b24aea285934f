"""Image and video input/output: everything that touches files on disk goes through here.

Readers ask :func:`~magicanimate.io.files.check_readable` first, writers go through
:func:`~magicanimate.io.output.atomic_output`: one place each for "why can this file not be read" and for
"write it whole or not at all".
"""

from .image import load_image
from .video import (
    VideoWriter,
    has_audio,
    iter_frames,
    open_video,
    probe_fps,
    read_video,
    write_gif,
    write_png_frames,
    write_video,
)

__all__ = [
    "VideoWriter",
    "has_audio",
    "iter_frames",
    "load_image",
    "open_video",
    "probe_fps",
    "read_video",
    "write_gif",
    "write_png_frames",
    "write_video",
]
