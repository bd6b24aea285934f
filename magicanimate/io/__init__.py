"""Image and video input/output: everything that touches files on disk goes through here."""

from .image import load_image
from .video import VideoWriter, iter_frames, probe_fps, read_video, write_gif, write_png_frames, write_video

__all__ = [
    "VideoWriter",
    "iter_frames",
    "load_image",
    "probe_fps",
    "read_video",
    "write_gif",
    "write_png_frames",
    "write_video",
]
