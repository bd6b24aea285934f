"""``magicanimate demo --pretrained DIR [--host 127.0.0.1] [--port 7860] [--examples DIR]``."""

import argparse
import os
import signal
from collections.abc import Callable

from ..config import default_config, load_config
from ..errors import InputError


def add_parser(commands, add_setting_flags: Callable[[argparse.ArgumentParser], None]) -> None:
    """Register ``magicanimate demo``; the setting flags (``--steps``, ``--size``, ...) become the UI's defaults and
    ``--max-frames`` the longest driving clip a request may use (default 300)."""
    demo = commands.add_parser(
        "demo",
        help="serve the web demo (Gradio)",
        description="Serve the web demo. Needs the demo extra: pip install 'magicanimate[demo]'.",
    )
    demo.add_argument("--pretrained", default=None, help="root of the weights tree (see pretrained/README.md)")
    demo.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 serves your network)")
    demo.add_argument("--port", type=int, default=7860, help="port to listen on (default: 7860)")
    demo.add_argument("--examples", default=None, help="folder of examples: NAME.png + NAME.mp4 pairs")
    demo.add_argument(
        "--densepose-model",
        default=os.environ.get("MAGICANIMATE_DENSEPOSE_MODEL") or None,
        help="DensePose TorchScript file: accept videos of people too (default: $MAGICANIMATE_DENSEPOSE_MODEL)",
    )
    demo.add_argument("--max-upload-mb", type=int, default=100, help="largest upload per file (default: 100)")
    demo.add_argument("--config", default=None, help="YAML file of settings (checkpoints, device, UI defaults)")
    demo.add_argument("--debug", action="store_true", help="show tracebacks")
    add_setting_flags(demo)
    demo.set_defaults(run=demo_command)


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM stops the server like Ctrl-C, so the scratch files are removed


def demo_command(args) -> int:
    try:
        from .app import launch
        from .runner import Limits
    except ImportError as err:
        raise InputError(f"the demo needs Gradio ({err.name} is missing): pip install 'magicanimate[demo]'") from None
    settings = {k: v for k, v in vars(args).items() if k in default_config() and v is not None}
    config = load_config(args.config, **settings)
    if args.max_upload_mb < 1 or (config.max_frames is not None and config.max_frames < 1):
        raise InputError("--max-upload-mb and --max-frames must be at least 1")
    signal.signal(signal.SIGTERM, _interrupt)
    limits = Limits(max_upload_mb=args.max_upload_mb, max_frames=config.max_frames or Limits.max_frames)
    launch(
        config,
        host=args.host,
        port=args.port,
        examples=args.examples,
        limits=limits,
        densepose_model=args.densepose_model,
    )
    return 0
