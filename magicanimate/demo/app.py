"""The Gradio 6 web demo: ``build_demo(pipeline)`` makes the UI, :func:`launch` serves it.

The models are loaded once, before the server starts; requests queue and run one at a time (one GPU). The Animate
button is also the scripting endpoint ``/animate`` (see demo/README.md for a ``gradio_client`` example). The request
logic itself (limits, scratch files, cancellation) is in :mod:`magicanimate.demo.runner`.
"""

import os
import threading
from pathlib import Path

import gradio as gr
from omegaconf import DictConfig

from ..config import load_config
from ..errors import MagicAnimateError
from .runner import Animator, Cancelled, Extractor, Limits, densepose_extractor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".gif")
DRIVING_KINDS = [("Detect from its colours", "auto"), ("DensePose", "densepose"), ("Video of a person", "raw")]


def find_examples(folder: str | Path | None) -> list[list[str]]:
    """``[image, video]`` pairs from ``folder``: an image and a video with the same name (``anna.png`` +
    ``anna.mp4``) form one example."""
    if folder is None:
        return []
    folder = Path(folder)
    if not folder.is_dir():
        raise MagicAnimateError(f"examples folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file())
    videos = {p.stem: p for p in files if p.suffix.lower() in VIDEO_SUFFIXES}
    return [[str(p), str(videos[p.stem])] for p in files if p.suffix.lower() in IMAGE_SUFFIXES and p.stem in videos]


class _Stops:
    """One Stop flag per browser session, so Stop only ever cancels the presser's own run."""

    def __init__(self):
        self._events: dict[str, threading.Event] = {}

    def start(self, session: str) -> threading.Event:
        self._events[session] = event = threading.Event()
        return event

    def stop(self, session: str) -> None:
        if session in self._events:
            self._events[session].set()

    def finish(self, session: str, event: threading.Event) -> None:
        if self._events.get(session) is event:  # a newer run of the same session keeps its own flag
            del self._events[session]


def build_demo(
    pipeline,
    defaults: DictConfig | None = None,
    *,
    examples: str | Path | None = None,
    limits: Limits | None = None,
    extractor: Extractor | None = None,
) -> tuple[gr.Blocks, Animator]:
    """The demo's UI around a loaded ``pipeline``; ``defaults`` (animation.yaml settings) fill the controls.

    Returns the Blocks and its :class:`Animator`, whose ``close()`` deletes the demo's scratch files.
    """
    config = defaults if defaults is not None else load_config()
    animator = Animator(pipeline, limits, extractor)
    limits = animator.limits
    stops = _Stops()
    pairs = find_examples(examples)

    def animate(
        reference_image,
        driving_video,
        steps,
        guidance_scale,
        seed,
        size,
        context_frames=int(config.context_frames),
        context_overlap=int(config.context_overlap),
        context_schedule=str(config.context_schedule),
        max_frames=0,
        driving_kind="auto",
        grid=False,
        densepose_preview=False,
        request: gr.Request = None,
        progress=gr.Progress(),  # noqa: B008 - how Gradio injects its progress tracker
    ):
        """Animate the reference image with the driving video; returns the animation (H.264 mp4)."""
        session = request.session_hash if request is not None else "api"
        cancel = stops.start(session)
        settings = {
            "steps": int(steps),
            "guidance_scale": float(guidance_scale),
            "seed": int(seed),
            "size": min(int(size), limits.max_size),
            "context_frames": int(context_frames),
            "context_overlap": int(context_overlap),
            "context_schedule": str(context_schedule),
        }

        def report(desc, done, total):
            progress((done, total), desc=desc, unit="steps")

        try:
            result = animator.run(
                reference_image,
                driving_video,
                settings,
                driving_kind=driving_kind,
                max_frames=int(max_frames or 0),
                grid=bool(grid),
                preview=bool(densepose_preview),
                progress=report,
                warn=gr.Warning,
                cancel=cancel,
            )
        except Cancelled:
            raise gr.Error("Stopped.") from None
        except MagicAnimateError as err:
            raise gr.Error(str(err)) from None
        except Exception as err:
            if type(err).__name__ == "OutOfMemoryError" or isinstance(err, MemoryError):
                _free_memory()
                raise gr.Error("Out of memory: try a smaller size or fewer frames.") from None
            raise
        finally:
            stops.finish(session, cancel)
        extras = {"grid": _path(result.grid), "preview": _path(result.preview)}
        return str(result.animation), extras

    def show_extras(extras):
        extras = extras or {}
        return (
            gr.update(value=extras.get("grid"), visible=bool(extras.get("grid"))),
            gr.update(value=extras.get("preview"), visible=bool(extras.get("preview"))),
        )

    def stop(request: gr.Request):
        stops.stop(request.session_hash)

    with gr.Blocks(title="MagicAnimate", analytics_enabled=False, delete_cache=(600, 3600)) as demo:
        driving_hint = "a DensePose video or a video of a person" if extractor else "a DensePose video"
        gr.Markdown(
            f"# MagicAnimate\nAnimate a photo of a person with a motion: upload a reference image and {driving_hint}, "
            "then press **Animate**."
        )
        with gr.Row():
            with gr.Column():
                reference = gr.Image(label="Reference image", type="pil", image_mode="RGB", sources=["upload"])
                driving = gr.Video(label="Driving video", sources=["upload"], include_audio=True)
                kind = gr.Radio(DRIVING_KINDS, value="auto", label="Driving video is")
                with gr.Row():
                    steps = gr.Slider(1, 100, value=int(config.steps), step=1, label="Steps")
                    guidance = gr.Slider(1.0, 15.0, value=float(config.guidance_scale), step=0.5, label="Guidance")
                with gr.Row():
                    seed = gr.Number(value=int(config.seed), precision=0, label="Seed")
                    size = gr.Slider(64, limits.max_size, value=min(int(config.size), limits.max_size), step=8,
                                     label="Size (shorter side)")  # fmt: skip
                with gr.Accordion("Advanced: sliding windows", open=False):
                    context_frames = gr.Slider(4, 32, value=int(config.context_frames), step=1, label="Window frames")
                    context_overlap = gr.Slider(0, 16, value=int(config.context_overlap), step=1,
                                                label="Window overlap")  # fmt: skip
                    schedule = gr.Radio(["uniform", "sliding"], value=str(config.context_schedule),
                                        label="Window schedule")  # fmt: skip
                    max_frames = gr.Slider(0, limits.max_frames, value=0, step=1,
                                           label=f"Frames to use (0 = all, at most {limits.max_frames})")  # fmt: skip
                with gr.Row():
                    want_grid = gr.Checkbox(False, label="Also make the 3-panel grid")
                    want_preview = gr.Checkbox(False, label="Show the DensePose used")
                with gr.Row():
                    run_button = gr.Button("Animate", variant="primary")
                    stop_button = gr.Button("Stop", variant="stop")
            with gr.Column():
                animation = gr.Video(label="Animation", format="mp4", interactive=False, autoplay=True, loop=True)
                grid_video = gr.Video(label="Reference | DensePose | animation", format="mp4", interactive=False,
                                      visible=False)  # fmt: skip
                preview_video = gr.Video(label="DensePose", format="mp4", interactive=False, visible=False)
        if pairs:
            gr.Examples(pairs, inputs=[reference, driving], label="Examples")
        extras = gr.State()
        inputs = [reference, driving, steps, guidance, seed, size, context_frames, context_overlap, schedule,
                  max_frames, kind, want_grid, want_preview]  # fmt: skip
        run = run_button.click(
            animate, inputs, [animation, extras], api_name="animate", concurrency_limit=1, concurrency_id="pipeline"
        )
        run.then(show_extras, extras, [grid_video, preview_video], queue=False, api_visibility="private")
        stop_button.click(stop, None, None, cancels=[run], queue=False, api_visibility="private")
    return demo, animator


def _free_memory() -> None:
    """Give the cached GPU memory of a failed run back, so the next (smaller) request can succeed."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _path(path: Path | None) -> str | None:
    return None if path is None else str(path)


def launch(
    config: DictConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 7860,
    examples: str | Path | None = None,
    limits: Limits | None = None,
    densepose_model: str | Path | None = None,
) -> None:
    """Load the models once, then serve the demo until Ctrl-C (or SIGTERM); scratch files are removed on exit.

    With ``densepose_model`` (a DensePose TorchScript file), videos of people are turned into DensePose first;
    without it they are refused with a message saying how to get one.
    """
    from ..api import load_pipeline

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    limits = limits or Limits()
    pipeline = load_pipeline(config)
    extractor = densepose_extractor(densepose_model, device=config.device) if densepose_model else None
    demo, animator = build_demo(pipeline, config, examples=examples, limits=limits, extractor=extractor)
    try:
        demo.queue(max_size=16, default_concurrency_limit=1).launch(
            server_name=host,
            server_port=port,
            max_file_size=f"{limits.max_upload_mb}mb",
            allowed_paths=[str(Path(examples).resolve())] if examples else None,
            show_error=False,
            ssr_mode=False,
            mcp_server=False,
            footer_links=["api"],
        )
    finally:
        demo.close()
        animator.close()
