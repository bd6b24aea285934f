"""The Gradio 6 web demo: ``build_demo(pipeline)`` makes the UI, :func:`launch` serves it.

The models are loaded once, before the server starts; requests queue and run one at a time (one GPU). The Animate
button is also the scripting endpoint ``/animate`` (see demo/README.md for a ``gradio_client`` example). The request
logic itself (limits, scratch files, cancellation) is in :mod:`magicanimate.demo.runner`.
"""

import logging
import os
import threading
from pathlib import Path

import gradio as gr
from omegaconf import DictConfig

from ..errors import InputError, MagicAnimateError, as_user_error
from ..settings import BY_NAME, SettingError, load_config
from .runner import Animator, Cancelled, Limits, densepose_extractor, request_settings

log = logging.getLogger("magicanimate.demo")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".gif")
DRIVING_KINDS = [("Detect from its colours", "auto"), ("DensePose", "densepose"), ("Video of a person", "raw")]
# The controls' labels, by the setting (and API parameter) they set: a refused value's message names both.
LABELS = {
    "steps": "Steps",
    "guidance_scale": "Guidance",
    "seed": "Seed",
    "size": "Size (shorter side)",
    "context_frames": "Window frames",
    "context_overlap": "Window overlap",
    "context_schedule": "Window schedule",
    "max_frames": "Frames to use",
    "prompt": "Or describe the person (instead of a photo)",
    "negative_prompt": "The generated photo should not show",
    "refine_size": "Refine pass: larger size (0 = off)",
    "refine_strength": "Refine strength",
    "frame_stride": "Animate every k-th frame, interpolate the rest (1 = all)",
    "noise_prior": "Noise prior (steadier layout; 0 = off)",
    "keyframe_blend": "Blend towards the end photo",
}
OUT_OF_MEMORY = "Out of memory: try a smaller size, fewer frames or fewer window frames."
BUG = "Something went wrong inside the demo (a bug, not your input); the server's log has the details."


def unchecked(component: gr.components.Component) -> gr.components.Component:
    """Make ``component`` hand its value on as sent, for the settings schema to check (one message that names the
    setting, the same rules as the CLI's) instead of Gradio: its bounds and choices checks do not say which control
    they mean and log a traceback, and its integer rounding fails on ``nan`` with a bare "Error".

    Done on the instance: a subclass of a Gradio component makes Gradio write a ``.pyi`` stub next to this module.
    """
    component.preprocess = lambda payload: payload
    return component


def setting_slider(name: str, value, *, high: float | None = None, step: float = 1, **kwargs) -> gr.Slider:
    """A slider over the range the settings schema allows for ``name`` (capped at ``high``, a server limit)."""
    setting = BY_NAME[name]
    top = setting.high if high is None else min(setting.high, high)
    return unchecked(gr.Slider(setting.low, top, value=value, step=step, label=LABELS[name], **kwargs))


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


class _Sessions:
    """Per browser session: the Stop flag of its run (so Stop only ever cancels the presser's own run) and the
    message of its last failed run (shown in the result column, where Gradio leaves a bare "Error")."""

    MAX_FAILURES = 256  # scripts' sessions never collect theirs; the oldest are dropped

    def __init__(self):
        self._events: dict[str, threading.Event] = {}
        self._failures: dict[str, str] = {}

    def start(self, session: str) -> threading.Event:
        self._failures.pop(session, None)
        self._events[session] = event = threading.Event()
        return event

    def stop(self, session: str) -> None:
        if session in self._events:
            self._events[session].set()

    def finish(self, session: str, event: threading.Event) -> None:
        if self._events.get(session) is event:  # a newer run of the same session keeps its own flag
            del self._events[session]

    def failed(self, session: str, message: str) -> None:
        self._failures[session] = message
        while len(self._failures) > self.MAX_FAILURES:
            del self._failures[next(iter(self._failures))]

    def failure(self, session: str) -> str | None:
        return self._failures.pop(session, None)


def shown_error(err: Exception) -> gr.Error:
    """The message a failed request shows; it stays on screen until closed. A user error (a bad file or value, out
    of memory) is logged as one line, a bug with its traceback (call this inside the ``except`` block)."""
    error = as_user_error(err)
    if error is None:
        log.exception("a request failed")
        return gr.Error(BUG, duration=None, print_exception=False)
    if error is not err:  # out of memory: give the cached GPU memory back, so a smaller request can succeed
        _free_memory()
        message = OUT_OF_MEMORY
    elif isinstance(error, SettingError) and error.key in LABELS:
        message = f"{LABELS[error.key]}: {error}"
    else:
        message = str(error)
    log.warning(f"request refused: {message}")
    return gr.Error(message, duration=None, print_exception=False)


def build_demo(
    pipeline,
    defaults: DictConfig | None = None,
    *,
    examples: str | Path | None = None,
    limits: Limits | None = None,
    extractor=None,
) -> tuple[gr.Blocks, Animator]:
    """The demo's UI around a loaded ``pipeline``; ``defaults`` (validated settings) fill the controls, and every
    request is checked against them and the server's ``limits``. ``extractor`` is a loaded DensePose model
    (:func:`~magicanimate.demo.runner.densepose_extractor`) for videos of people.

    Returns the Blocks and its :class:`Animator`, whose ``close()`` deletes the demo's scratch files.

    Raises:
        SettingError: a default is beyond the server's limits (``--steps 500`` with the 100-step limit).
    """
    limits = limits or Limits()
    config = request_settings(defaults if defaults is not None else load_config(), limits)
    # A server's --prompt is the prompt box's starting text, not a default under every request (an upload would
    # then come with a prompt too).
    server_prompt, config.prompt = config.prompt, None
    pairs = find_examples(examples)
    animator = Animator(pipeline, limits, extractor)
    sessions = _Sessions()

    def animate_stages(
        reference_image,
        prompt,
        driving_video,
        steps,
        guidance_scale,
        seed,
        size,
        context_frames=config.context_frames,
        context_overlap=config.context_overlap,
        context_schedule=config.context_schedule,
        max_frames=0,
        driving_kind="auto",
        negative_prompt="",
        refine_size=0,
        refine_strength=config.refine_strength,
        reference_end=None,
        frame_stride=config.frame_stride,
        noise_prior=config.noise_prior,
        keyframe_blend=config.keyframe_blend,
        grid=False,
        densepose_preview=False,
        request: gr.Request = None,
        progress=gr.Progress(),  # noqa: B008 - how Gradio injects its progress tracker
    ):
        """Animate the reference image, or a photo generated from ``prompt`` (give one of them), with the driving
        video; ``refine_size`` above 0 adds the refine pass at that size; a ``reference_end`` photo is the look the clip
        ends at (keyframes, blended by ``keyframe_blend``); ``frame_stride`` k animates every k-th frame and
        interpolates the others; ``noise_prior`` moves the start towards the photo's latent. Returns the animation
        (H.264 mp4), the 3-panel grid and the DensePose used when ``grid`` and ``densepose_preview`` ask for them
        (else None), and the photo generated from the prompt (else None)."""
        session = request.session_hash if request is not None else "api"
        cancel = sessions.start(session)
        try:
            settings = request_settings(
                config,
                limits,
                steps=steps,
                guidance_scale=guidance_scale,
                seed=seed,
                size=size,
                context_frames=context_frames,
                context_overlap=context_overlap,
                context_schedule=context_schedule,
                max_frames=None if max_frames == 0 else max_frames,  # the slider's 0 means all frames
                prompt=_text(prompt),  # an empty box: no prompt
                negative_prompt=_text(negative_prompt),
                refine_size=None if refine_size in (0, None) else refine_size,  # the slider's 0: no refine pass
                refine_strength=refine_strength,
                frame_stride=frame_stride,
                noise_prior=noise_prior,
                keyframe_blend=keyframe_blend,
            )
            if not isinstance(grid, bool) or not isinstance(densepose_preview, bool):
                raise InputError("grid and densepose_preview must be true or false")
            result = animator.run(
                reference_image,
                driving_video,
                settings,
                driving_kind=driving_kind,
                grid=grid,
                preview=densepose_preview,
                progress=lambda stage, done, total, unit: progress((done, total), desc=stage, unit=unit),
                warn=gr.Warning,
                cancel=cancel,
                reference_end=reference_end,
            )
        except Cancelled:
            log.info("a run was stopped")
            sessions.failed(session, "Stopped.")
            raise gr.Error("Stopped.", print_exception=False) from None
        except Exception as err:
            error = shown_error(err)
            sessions.failed(session, error.message)
            raise error from None
        finally:
            sessions.finish(session, cancel)
        photo = gr.update(value=_path(result.reference), visible=result.reference is not None)
        return str(result.animation), _path(result.grid), _path(result.preview), photo

    def animate(
        reference_image,
        driving_video,
        steps,
        guidance_scale,
        seed,
        size,
        context_frames=config.context_frames,
        context_overlap=config.context_overlap,
        context_schedule=config.context_schedule,
        max_frames=0,
        driving_kind="auto",
        grid=False,
        densepose_preview=False,
        request: gr.Request = None,
        progress=gr.Progress(),  # noqa: B008 - how Gradio injects its progress tracker
    ):
        """Animate the reference image with the driving video. Returns the animation (H.264 mp4), then the
        3-panel grid and the DensePose used when ``grid`` and ``densepose_preview`` ask for them (else None)."""
        return animate_stages(
            reference_image, None, driving_video, steps, guidance_scale, seed, size, context_frames, context_overlap,
            context_schedule, max_frames, driving_kind, grid=grid, densepose_preview=densepose_preview,
            request=request, progress=progress,
        )[:3]  # fmt: skip

    def stop(request: gr.Request):
        sessions.stop(request.session_hash)

    def show_failure(request: gr.Request):
        message = sessions.failure(request.session_hash)
        return gr.update(value=f"**Not animated.** {message}" if message else "", visible=bool(message))

    with gr.Blocks(title="MagicAnimate", analytics_enabled=False, delete_cache=(600, 3600)) as demo:
        driving_hint = "a DensePose video or a video of a person" if extractor else "a DensePose video"
        gr.Markdown(
            f"# MagicAnimate\nAnimate a photo of a person with a motion: upload a reference image and {driving_hint}, "
            "then press **Animate**."
        )
        with gr.Row():
            with gr.Column():
                reference = gr.Image(label="Reference image", type="pil", image_mode="RGB", sources=["upload"])
                prompt = gr.Textbox(
                    label=LABELS["prompt"],
                    value=server_prompt or "",
                    lines=2,
                    placeholder="a woman in a red dress, full body, studio photo",
                )
                driving = gr.Video(label="Driving video", sources=["upload"], include_audio=True)
                kind = unchecked(gr.Radio(DRIVING_KINDS, value="auto", label="Driving video is"))
                with gr.Row():
                    steps = setting_slider("steps", config.steps, high=limits.max_steps)
                    guidance = setting_slider("guidance_scale", config.guidance_scale, step=0.5)
                with gr.Row():
                    seed = unchecked(gr.Number(value=config.seed, precision=0, label=LABELS["seed"]))
                    size = setting_slider("size", config.size, high=limits.max_size, step=8)
                with gr.Accordion("Advanced: sliding windows", open=False):
                    context_frames = setting_slider("context_frames", config.context_frames)
                    context_overlap = setting_slider("context_overlap", config.context_overlap)
                    choices = list(BY_NAME["context_schedule"].choices)
                    schedule = unchecked(
                        gr.Radio(choices, value=config.context_schedule, label=LABELS["context_schedule"])
                    )
                    max_frames = unchecked(gr.Slider(
                        0, limits.max_frames, value=0, step=1,
                        label=f"{LABELS['max_frames']} (0 = all, at most {limits.max_frames})",
                    ))  # fmt: skip
                with gr.Accordion("Advanced: the generated photo and the refine pass", open=False):
                    negative_prompt = gr.Textbox(label=LABELS["negative_prompt"], placeholder="blurry, cropped")
                    refine_size = unchecked(gr.Slider(
                        0, min(BY_NAME["refine_size"].high, limits.max_size), value=config.refine_size or 0, step=8,
                        label=LABELS["refine_size"],
                    ))  # fmt: skip
                    refine_strength = setting_slider("refine_strength", config.refine_strength, step=0.05)
                with gr.Accordion("Optional: a second photo the clip ends at", open=False):
                    reference_end = gr.Image(
                        label="End photo (another outfit, the back, ...): the look changes along the clip; about "
                        "twice the work",
                        type="pil",
                        image_mode="RGB",
                        sources=["upload"],
                    )
                    blend = unchecked(gr.Radio(list(BY_NAME["keyframe_blend"].choices), value=config.keyframe_blend,
                                               label=LABELS["keyframe_blend"]))  # fmt: skip
                with gr.Accordion("Advanced: faster and steadier", open=False):
                    frame_stride = setting_slider("frame_stride", config.frame_stride)
                    noise_prior = setting_slider("noise_prior", config.noise_prior, step=0.05)
                with gr.Row():
                    want_grid = gr.Checkbox(False, label="Also make the 3-panel grid")
                    want_preview = gr.Checkbox(False, label="Show the DensePose used")
                with gr.Row():
                    run_button = gr.Button("Animate", variant="primary")
                    stop_button = gr.Button("Stop", variant="stop")
            with gr.Column():
                status = gr.Markdown(visible=False, elem_id="status")
                animation = gr.Video(label="Animation", format="mp4", interactive=False, autoplay=True, loop=True)
                grid_video = gr.Video(label="Reference | DensePose | animation", format="mp4", interactive=False,
                                      visible=False)  # fmt: skip
                preview_video = gr.Video(label="DensePose", format="mp4", interactive=False, visible=False)
                photo = gr.Image(label="Generated reference photo", type="filepath", interactive=False, visible=False)
        if pairs:
            gr.Examples(pairs, inputs=[reference, driving], label="Examples")
        # The optional outputs show where they will appear as soon as they are asked for.
        for box, video in ((want_grid, grid_video), (want_preview, preview_video)):
            box.change(lambda wanted: gr.update(visible=wanted), box, video, queue=False, api_visibility="private")
        settings = [steps, guidance, seed, size, context_frames, context_overlap, schedule, max_frames, kind]
        stages = [negative_prompt, refine_size, refine_strength, reference_end, frame_stride, noise_prior, blend]
        run_button.click(lambda: gr.update(visible=False), None, status, queue=False, api_visibility="private")
        # The button runs every stage (a photo or a prompt, the refine pass): /animate_stages. /animate keeps its
        # photo-only signature for existing scripts, on a button that is never shown.
        run = run_button.click(
            animate_stages,
            [reference, prompt, driving, *settings, *stages, want_grid, want_preview],
            [animation, grid_video, preview_video, photo],
            api_name="animate_stages",
            concurrency_limit=1,
            concurrency_id="pipeline",
        )
        gr.Button(visible=False).click(
            animate,
            [reference, driving, *settings, want_grid, want_preview],
            [animation, grid_video, preview_video],
            api_name="animate",
            concurrency_limit=1,
            concurrency_id="pipeline",
        )
        run.failure(show_failure, None, status, queue=False, api_visibility="private")
        stop_button.click(stop, None, None, cancels=[run], queue=False, api_visibility="private")
    return demo, animator


def _free_memory() -> None:
    """Give the cached GPU memory of a failed run back, so the next (smaller) request can succeed."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _path(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _text(value):
    """A text box's value as a setting: an empty (or blank) box is no value; anything else goes to the schema."""
    return None if value is None or (isinstance(value, str) and not value.strip()) else value


def launch(
    config: DictConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 7860,
    share: bool = False,
    examples: str | Path | None = None,
    limits: Limits | None = None,
    densepose_model: str | Path | None = None,
) -> None:
    """Load the models once, then serve the demo until Ctrl-C (or SIGTERM); scratch files are removed on exit.

    With ``densepose_model`` (a DensePose TorchScript file), videos of people are turned into DensePose first;
    without it they are refused with a message saying how to get one. ``share`` also opens a temporary public
    gradio.live link (off by default: the demo has no login).
    """
    from ..loading import load_pipeline

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    limits = limits or Limits()
    request_settings(config, limits)  # defaults beyond the limits fail before minutes of loading
    pipeline = load_pipeline(config)
    extractor = densepose_extractor(densepose_model, device=config.device) if densepose_model else None
    demo, animator = build_demo(pipeline, config, examples=examples, limits=limits, extractor=extractor)
    try:
        try:
            demo.queue(max_size=16, default_concurrency_limit=1).launch(
                server_name=host,
                server_port=port,
                share=share,
                quiet=True,  # Gradio's banner would advise share=True on every ordinary run
                prevent_thread_lock=True,
                max_file_size=f"{limits.max_upload_mb}mb",
                allowed_paths=[str(Path(examples).resolve())] if examples else None,
                show_error=False,
                ssr_mode=False,
                mcp_server=False,
                footer_links=["api"],
            )
        except OSError as err:  # the port was taken between the check before loading and now
            if "empty port" not in str(err):
                raise
            message = f"port {port} on {host} is already in use (another demo?); choose a free one with --port"
            raise InputError(message) from None
        print(f"* Running on {demo.local_url} (Ctrl-C stops it)", flush=True)
        demo.block_thread()
    finally:
        demo.close()
        animator.close()
