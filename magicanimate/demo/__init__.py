"""The web demo (``magicanimate demo``). Importing this package is cheap: Gradio loads only when the demo starts."""

from .command import add_parser, demo_command

__all__ = ["add_parser", "demo_command"]
