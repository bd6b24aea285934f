"""The web demo, served by ``magicanimate demo`` on 127.0.0.1 with the tiny random-weight tree.

One server (a subprocess, models loaded once, DensePose extraction by the scripted stand-in model) serves the tests
here: the ``/animate`` API through ``gradio_client``, then a real browser (Debian's Chromium driven by Playwright;
never a downloaded browser), then a clean shutdown. A second, in-process server without models answers the checks
that never reach one (settings, errors). ``GRADIO_ANALYTICS_ENABLED=False``: nothing leaves the machine.
"""

import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image
from test_densepose import save_stand_in, walking_video
from tiny_models import make_motion, make_reference

from magicanimate import InputError
from magicanimate.cli import build_parser
from magicanimate.demo.runner import RAW_VIDEO_MESSAGE, Animator, Cancelled, Limits, read_driving, request_settings
from magicanimate.densepose import load_extractor, looks_like_densepose
from magicanimate.io import read_video, write_video
from magicanimate.settings import BY_NAME, load_config

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--disable-dev-shm-usage",
]
SHARED = Path(__file__).resolve().parents[2] / "shared"
SAMPLES = SHARED / "samples"
CLIP_FRAMES, FRAME_LIMIT = 12, 10  # the uploaded clip is longer than the server's --max-frames
# The settings both servers start with (the server's flags: --steps 2 --size 64 ...).
SERVER_SETTINGS = {"steps": 2, "size": 64, "context_frames": 8, "context_overlap": 2}


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    scratch: Path  # the server's TMPDIR: its own scratch folder lives here
    files: Path  # inputs for the tests
    log: Path  # what the server printed (stdout and stderr)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        return self.process.returncode


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def make_files(folder: Path) -> Path:
    """The uploads: a reference photo, a DensePose clip, a video of a "person" and a file that is no video."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(make_reference(64)).save(folder / "reference.png")
    write_video(folder / "driving.mp4", make_motion(CLIP_FRAMES, 64), fps=25)
    walking_video(folder / "person.mp4", frames=CLIP_FRAMES, fps=25.0)
    (folder / "broken.mp4").write_bytes(b"not a video at all")
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    return make_files(tmp_path_factory.mktemp("uploads"))


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory) -> Path:
    return save_stand_in(tmp_path_factory.mktemp("densepose") / "stand_in.torchscript")


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_tree, files, stand_in):
    root = tmp_path_factory.mktemp("demo")
    scratch, examples = root / "tmp", root / "examples"
    for folder in (scratch, examples):
        folder.mkdir()
    Image.fromarray(make_reference(64, seed=2)).save(examples / "wave.png")
    write_video(examples / "wave.mp4", make_motion(8, 64, seed=2), fps=25)

    port = free_port()
    # One thread: the tiny models gain nothing from more, and lose a lot to contention on a loaded 2-core runner.
    env = {
        **os.environ,
        "GRADIO_ANALYTICS_ENABLED": "False",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TMPDIR": str(scratch),
        "GRADIO_TEMP_DIR": str(root / "gradio"),
        "NO_PROXY": "127.0.0.1,localhost",
    }
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in SERVER_SETTINGS.items()]
    command = [sys.executable, "-m", "magicanimate.cli", "demo", "--pretrained", str(tiny_tree), "--host",
               "127.0.0.1", "--port", str(port), "--examples", str(examples), "--max-frames", str(FRAME_LIMIT),
               "--densepose-model", str(stand_in), "--device", "cpu", *flags]  # fmt: skip
    log_path = root / "server.log"
    log = open(log_path, "w")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    handle = Server(f"http://127.0.0.1:{port}/", process, scratch, files, log_path)
    deadline = time.monotonic() + 180
    while True:
        if process.poll() is not None:
            pytest.fail(f"the demo server exited: {log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(handle.url, timeout=5) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            handle.stop()
            pytest.fail(f"the demo server did not answer in time: {log_path.read_text()[-3000:]}")
        time.sleep(0.5)
    yield handle
    handle.stop()
    log.close()


class Records(logging.Handler):
    """Every record of the demo's logger (its own handler: the CLI's logger may not propagate to pytest's)."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture(scope="module")
def modelless(tmp_path_factory):
    """The demo served in this process around a "pipeline" that is none: everything before the models runs for
    real, and a request that gets as far as the models fails the way a bug does. Yields ``(url, records)``."""
    from magicanimate.demo.app import build_demo

    demo, animator = build_demo(object(), load_config(None, **SERVER_SETTINGS), limits=Limits(max_frames=FRAME_LIMIT))
    logger, records = logging.getLogger("magicanimate.demo"), Records()
    logger.addHandler(records)
    demo.queue().launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        yield demo.local_url, records
    finally:
        logger.removeHandler(records)
        demo.close()
        animator.close()


def probe(path: str | Path) -> tuple[str, int, tuple[int, int], float]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        return stream.codec_context.name, frames, (stream.width, stream.height), float(stream.average_rate)


def submit(client, files: Path, driving: str, **options):
    from gradio_client import handle_file

    values = {"steps": 2, "guidance_scale": 7.5, "seed": 3, "size": 64} | options
    return client.submit(
        reference_image=handle_file(files / "reference.png"),
        driving_video=handle_file(files / driving),
        api_name="/animate",
        **values,
    )


def test_api_endpoint_animates_densepose_and_raw_videos(server, request):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(server.url, verbose=False)
    request.addfinalizer(client.close)  # its heartbeat connection would hold up the server's shutdown
    endpoint = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/animate"]
    names = [parameter["parameter_name"] for parameter in endpoint["parameters"]]
    assert names[:6] == ["reference_image", "driving_video", "steps", "guidance_scale", "seed", "size"]
    assert names[-2:] == ["grid", "densepose_preview"]
    assert all(parameter["parameter_has_default"] for parameter in endpoint["parameters"][2:])
    assert [output["label"] for output in endpoint["returns"]] == [
        "Animation",
        "Reference | DensePose | animation",
        "DensePose",
    ]

    job = submit(client, server.files, "driving.mp4", grid=True, densepose_preview=True)
    progress = set()
    deadline = time.monotonic() + 180
    while not job.done():
        assert time.monotonic() < deadline, "the animation did not finish in time"
        status = job.status()
        progress.update((unit.desc, unit.index, unit.length) for unit in status.progress_data or [])
        time.sleep(0.02)
    animation, grid, preview = job.result()
    assert probe(animation) == ("h264", FRAME_LIMIT, (64, 64), 25.0)  # cut to the server's limit
    assert probe(grid)[1:3] == (FRAME_LIMIT, (3 * 64, 64))  # reference | DensePose | animation
    assert probe(preview)[1:3] == (FRAME_LIMIT, (64, 64))
    # Progress follows the denoising steps (polling may miss a step: any denoising update of the 2 steps counts).
    assert any(desc == "denoising" and length == 2 and index >= 1 for desc, index, length in progress), progress

    # A video of a person is detected by its colours and goes through DensePose extraction first; nothing extra
    # was asked for, so the grid and the preview are None.
    animation, grid, preview = submit(client, server.files, "person.mp4", steps=1).result(timeout=180)
    assert probe(animation)[:3] == ("h264", FRAME_LIMIT, (64, 64)) and grid is None and preview is None
    with pytest.raises(AppError, match="could not be read"):
        submit(client, server.files, "broken.mp4").result(timeout=60)


def test_progress_names_every_stage(tiny_pipe, files, stand_in):
    """Reading counts frames, DensePose extraction counts frames, then the denoising steps, then the files."""
    limits = Limits(max_frames=FRAME_LIMIT)
    animator = Animator(tiny_pipe, limits, load_extractor(stand_in, device="cpu"))
    config = request_settings(load_config(None, **SERVER_SETTINGS), limits)
    seen = []
    reference = Image.open(files / "reference.png")
    try:
        result = animator.run(
            reference, files / "person.mp4", config, grid=True, preview=True, progress=lambda *a: seen.append(a)
        )
        assert all(path.is_file() for path in (result.animation, result.grid, result.preview))

        stages = [stage for i, (stage, *_) in enumerate(seen) if i == 0 or seen[i - 1][0] != stage]
        assert stages == ["reading video", "DensePose", "denoising", "writing video"], seen
        by_stage = {
            stage: [(done, total, unit) for name, done, total, unit in seen if name == stage] for stage in stages
        }
        assert by_stage["reading video"][1:] == [(i, FRAME_LIMIT, "frames") for i in range(1, FRAME_LIMIT + 1)]
        # The stand-in sees every source frame that 10 frames at 25 fps need, plus one (extract_motion's rule).
        densepose_total = min(CLIP_FRAMES, math.ceil(FRAME_LIMIT * 25 / 25) + 1)
        assert by_stage["DensePose"] == [(i, densepose_total, "frames") for i in range(densepose_total + 1)]
        assert by_stage["denoising"] == [(1, 2, "steps"), (2, 2, "steps")]
        assert by_stage["writing video"] == [(i, 3, "videos") for i in range(4)]

        # Stop works during the extraction too: between two frames, before any denoising.
        cancel, seen = threading.Event(), []

        def stop_at_third_frame(stage, done, total, unit):
            seen.append(stage)
            if stage == "DensePose" and done == 3:
                cancel.set()

        with pytest.raises(Cancelled):
            animator.run(reference, files / "person.mp4", config, progress=stop_at_third_frame, cancel=cancel)
        assert "denoising" not in seen
    finally:
        animator.close()


def test_values_are_checked_by_the_settings_schema(modelless, files):
    """Bad values from a script get the schema's message, naming the control and the setting, and one log line."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    url, records = modelless
    client = Client(url, verbose=False)
    start = len(records.records)
    integer = "an integer from 0 to 18446744073709551615"
    cases = [
        ({"seed": -1}, f"Seed: setting seed must be {integer}, got -1"),
        ({"seed": 1e30}, f"Seed: setting seed must be {integer}, got 1e+30"),
        ({"seed": 1.5}, f"Seed: setting seed must be {integer}, got 1.5"),
        ({"steps": 0}, "Steps: setting steps must be an integer from 1 to 1000, got 0"),
        ({"steps": 500}, "Steps: setting steps must be at most 100 on this demo, got 500"),  # a server limit
        ({"size": 2048}, "Size (shorter side): setting size must be at most 1024 on this demo, got 2048"),
        ({"max_frames": FRAME_LIMIT + 1}, f"Frames to use: setting max_frames must be at most {FRAME_LIMIT}"),
        ({"context_overlap": 8}, "Window overlap: setting context_overlap (8) must be smaller than context_frames (8)"),
        (
            {"context_schedule": "zigzag"},
            "Window schedule: setting context_schedule must be one of uniform, sliding, got 'zigzag'",
        ),
    ]
    try:
        for options, message in cases:
            with pytest.raises(AppError) as refused:
                submit(client, files, "driving.mp4", **options).result(timeout=60)
            assert str(refused.value).startswith(message), options
    finally:
        client.close()

    # NaN is not JSON, so gradio_client cannot send it; Python's json (and the server) read it all the same.
    for value in ("NaN", "Infinity"):
        body = f'{{"data": [null, null, 2, 7.5, {value}, 64, 8, 2, "uniform", 0, "auto", false, false]}}'
        call = urllib.request.Request(
            f"{url}gradio_api/call/animate", body.encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(call) as response:
            event = json.load(response)["event_id"]
        with urllib.request.urlopen(f"{url}gradio_api/call/animate/{event}") as response:
            answer = response.read().decode()
        assert "event: error" in answer and f"setting seed must be {integer}, got {value.lower()[:3]}" in answer

    refused = records.records[start:]
    assert [record.getMessage().startswith("request refused: ") for record in refused] == [True] * (len(cases) + 2)
    assert all(record.exc_info is None for record in refused)  # one line each, no traceback


def test_a_bug_logs_its_traceback_and_says_so(modelless, files):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    url, records = modelless
    start = len(records.records)
    client = Client(url, verbose=False)
    try:
        with pytest.raises(AppError, match=r"a bug, not your input.*server's log"):
            submit(client, files, "driving.mp4").result(timeout=60)  # the "pipeline" has no .device: a bug
    finally:
        client.close()
    (record,) = records.records[start:]
    assert record.levelno == logging.ERROR and record.exc_info[0] is AttributeError


def test_controls_take_their_ranges_from_the_settings_schema(modelless):
    url, _ = modelless
    with urllib.request.urlopen(f"{url}config") as response:
        props = {c["props"].get("label"): c["props"] for c in json.load(response)["components"]}
    limits = Limits()
    expected = {
        "Steps": ("steps", BY_NAME["steps"].low, limits.max_steps),
        "Guidance": ("guidance_scale", BY_NAME["guidance_scale"].low, BY_NAME["guidance_scale"].high),
        "Size (shorter side)": ("size", BY_NAME["size"].low, limits.max_size),
        "Window frames": ("context_frames", BY_NAME["context_frames"].low, BY_NAME["context_frames"].high),
        "Window overlap": ("context_overlap", BY_NAME["context_overlap"].low, BY_NAME["context_overlap"].high),
    }
    server = load_config(None, **SERVER_SETTINGS)
    for label, (name, low, high) in expected.items():
        assert (props[label]["minimum"], props[label]["maximum"]) == (low, high), label
        assert props[label]["value"] == server[name], label  # the server's settings are the defaults
    assert props["Window schedule"]["choices"] == [[c, c] for c in BY_NAME["context_schedule"].choices]
    assert props["Seed"]["value"] == server.seed


def test_raw_video_without_a_densepose_model_is_explained(tmp_path):
    raw = np.stack([np.roll(make_reference(64, seed=5), shift, axis=1) for shift in range(6)])
    animator = Animator(pipeline=None)  # refused before the pipeline would be needed
    config = request_settings(load_config(None, steps=1, size=64), animator.limits)
    try:
        with pytest.raises(InputError) as refused:
            animator.run(make_reference(64), write_video(tmp_path / "raw.mp4", raw), config)
    finally:
        animator.close()
    assert str(refused.value) == RAW_VIDEO_MESSAGE and "--densepose-model" in RAW_VIDEO_MESSAGE
    assert not animator.workdir.exists()


def test_phone_videos_are_read_upright(tmp_path):
    """A clip stored landscape with a 90-degree display rotation is read as the portrait it shows, at output size."""
    path = tmp_path / "rotated.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 128, 64, "yuv420p"
        stream.set_display_rotation(90)  # shown rotated 90 degrees counter-clockwise
        image = np.zeros((64, 128, 3), np.uint8)
        image[:32, :64] = 255  # top-left quadrant as stored: bottom-left as shown
        for t in range(3):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = t
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    clip = read_driving(path, size=32, max_frames=2)
    assert clip.frames.shape == (2, 64, 32, 3) and clip.cut and clip.frame_count == 3
    assert clip.frames[0][40:, :12].mean() > 200 and clip.frames[0][:24].mean() < 30


def test_busy_port_is_one_error_line_before_any_model_loads(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        start = time.monotonic()
        finished = subprocess.run(
            # No weights there: had the models started loading, this would fail with a checkpoint error instead.
            [sys.executable, "-m", "magicanimate.cli", "demo", "--pretrained", str(tmp_path / "none"),
             "--port", str(port)],
            capture_output=True, text=True, timeout=120, env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"},
        )  # fmt: skip
    assert finished.returncode == 2, finished.stderr
    assert finished.stderr.splitlines() == [
        f"error: port {port} on 127.0.0.1 is already in use (another demo?); choose a free one with --port, e.g. "
        f"--port {port + 1}"
    ]
    assert finished.stdout == "" and time.monotonic() - start < 60


def test_share_link_only_when_asked():
    assert build_parser().parse_args(["demo"]).share is False
    assert build_parser().parse_args(["demo", "--share"]).share is True


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's Chromium: apt-get install chromium")
def test_browser_upload_animate_and_stop(server, tmp_path):
    from gradio_client import Client, handle_file
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1200})
            page.set_default_timeout(60_000)
            page.goto(server.url)
            animate = page.get_by_role("button", name="Animate")
            animate.wait_for()
            page.locator("input[type=file]").first.set_input_files(server.files / "reference.png")
            page.locator("input[type=file]").last.set_input_files(server.files / "driving.mp4")
            page.locator("video").first.wait_for()  # the uploaded driving video shows

            # A refused value: its message stays in the result column (where Gradio only writes "Error").
            status = page.locator("#status")
            page.get_by_label("Seed").fill("-1")
            animate.click()
            status.get_by_text("Seed: setting seed must be an integer from 0").wait_for()
            assert status.inner_text().startswith("Not animated. Seed: setting seed must be")
            page.get_by_label("Seed").fill("1")

            page.get_by_label("Also make the 3-panel grid").check()
            page.get_by_label("Show the DensePose used").check()
            # Record every text the page shows from now on: progress bars and toasts come and go quickly.
            page.evaluate(
                """() => { window.seen = new Set();
                const shown = '.progress-text, .meta-text, .progress-level-inner, .toast-body';
                new MutationObserver(() => {
                    for (const el of document.querySelectorAll(shown)) window.seen.add(el.textContent.trim());
                }).observe(document.body, {subtree: true, childList: true, characterData: true}); }"""
            )
            animate.click()
            ready = """(name) => Array.from(document.querySelectorAll('video'))
                .some(v => v.src.endsWith(name) && v.readyState === 4)"""
            for name in ("animation.mp4", "grid.mp4", "densepose.mp4"):  # the animation, the grid, the DensePose
                page.wait_for_function(ready, arg=name, timeout=120_000)
            assert status.is_hidden()  # the next run cleared the old message
            seen = page.evaluate("Array.from(window.seen)")
            assert any(text.startswith("denoising") for text in seen), " | ".join(seen)
            assert any("longer than this demo's limit" in text for text in seen), seen
            playable = page.evaluate("document.createElement('video').canPlayType('video/mp4; codecs=\"avc1.42E01E\"')")
            assert playable == "probably"
            page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)

            # Stop: a 100-step run at 256 px (minutes even without guidance) is cancelled between two steps and frees
            # the pipeline at once; without cancelling, the next request would wait for all 100 steps.
            long_run = {"Steps": "100", "Size (shorter side)": "256", "Guidance": "1"}
            for label, value in long_run.items():
                field = page.get_by_label(f"number input for {label}")
                field.fill(value)
                field.press("Enter")
            page.evaluate("() => window.seen.clear()")
            animate.click()
            page.wait_for_function("Array.from(window.seen).some(t => t.startsWith('denoising'))", timeout=120_000)
            stopped = time.monotonic()
            page.get_by_role("button", name="Stop").click()
            client = Client(server.url, verbose=False)
            quick = client.submit(
                reference_image=handle_file(server.files / "reference.png"),
                driving_video=handle_file(server.files / "driving.mp4"),
                steps=1,
                guidance_scale=7.5,
                seed=1,
                size=64,
                api_name="/animate",
            )
            try:
                assert probe(quick.result(timeout=90)[0])[1] == FRAME_LIMIT  # not stuck behind the stopped run
            finally:
                client.close()
            print(f"queue free again {time.monotonic() - stopped:.1f} s after Stop")
            page.screenshot(path=str(tmp_path / "after-stop.png"), full_page=True)
        finally:
            browser.close()


def test_console_shows_one_line_per_refusal_and_no_share_hint(server):
    log = server.log.read_text()
    assert f"* Running on {server.url}" in log
    assert "share=True" not in log and "public link" not in log  # Gradio's hint, on every ordinary run
    assert "request refused: The driving video could not be read" in log
    assert "Traceback" not in log, log


def test_shutdown_removes_scratch_files(server):
    assert len(list(server.scratch.glob("magicanimate-demo-*"))) == 1  # the running server's scratch folder
    assert server.stop() == 0
    assert list(server.scratch.glob("magicanimate-demo-*")) == []


@pytest.mark.skipif(not SAMPLES.is_dir(), reason="../shared/samples not found: real-sample checks run in CI only")
def test_densepose_detection_on_real_samples():
    for clip in sorted((SAMPLES / "densepose").glob("*.mp4")):
        frames, _ = read_video(clip, max_frames=8)
        assert looks_like_densepose(frames), clip.name
    for photo in sorted((SAMPLES / "reference").iterdir()):
        frame = np.asarray(Image.open(photo).convert("RGB"))[None]
        assert not looks_like_densepose(frame), photo.name
