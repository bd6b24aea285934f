"""``magicanimate demo --pretrained DIR [--host 127.0.0.1] [--port 7860] [--examples DIR] [--share]``."""

import argparse
import errno
import os
import signal
import socket
from collections.abc import Callable

from ..errors import InputError
from ..settings import load_config, settings_from_args


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
    demo.add_argument(
        "--share",
        action="store_true",
        help="also serve through a temporary public gradio.live link (anyone with the link can use your GPU)",
    )
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


def check_port(host: str, port: int) -> None:
    """Fail at once when ``host:port`` cannot be listened on (most often: another demo runs there), instead of
    after minutes of model loading.

    The probe sets ``SO_REUSEADDR`` like the server does, so connections of a demo that just exited do not count
    as a listener.

    Raises:
        InputError: the port is out of range or taken, or the host is not an address of this machine.
    """
    if not 1 <= port <= 65535:
        raise InputError(f"--port must be from 1 to 65535, got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror:
        raise InputError(f"--host {host} is not a known address; use 127.0.0.1 or 0.0.0.0 (every address)") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise InputError(
                    f"port {port} on {host} is already in use (another demo?); choose a free one with --port, e.g. "
                    f"--port {port + 1 if port < 65535 else 7860}"
                ) from None
            raise InputError(
                f"cannot listen on {host}:{port} ({err.strerror}); choose another --host or --port"
            ) from None


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM stops the server like Ctrl-C, so the scratch files are removed


def demo_command(args) -> int:
    """Check the flags and the port, then load the models and serve until Ctrl-C (or SIGTERM)."""
    config = load_config(args.config, **settings_from_args(args))
    if args.max_upload_mb < 1:
        raise InputError(f"--max-upload-mb must be at least 1, got {args.max_upload_mb}")
    check_port(args.host, args.port)
    try:
        from .app import launch
        from .runner import Limits
    except ImportError as err:
        raise InputError(f"the demo needs Gradio ({err.name} is missing): pip install 'magicanimate[demo]'") from None
    signal.signal(signal.SIGTERM, _interrupt)
    limits = Limits(max_upload_mb=args.max_upload_mb, max_frames=config.max_frames or Limits.max_frames)
    launch(
        config,
        host=args.host,
        port=args.port,
        share=args.share,
        examples=args.examples,
        limits=limits,
        densepose_model=args.densepose_model,
    )
    return 0
