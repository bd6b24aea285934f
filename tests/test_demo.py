"""The web demo, served by ``magicanimate demo`` on 127.0.0.1 with the tiny random-weight tree.

One server (a subprocess, models loaded once, DensePose extraction by the scripted stand-in model) serves the tests
here: the ``/animate`` API through ``gradio_client``, then a real browser (Debian's Chromium driven by Playwright;
never a downloaded browser), then a clean shutdown. ``GRADIO_ANALYTICS_ENABLED=False``: nothing leaves the machine.
"""

import os
import signal
import socket
import subprocess
import sys
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
from magicanimate.api import looks_like_densepose
from magicanimate.demo.runner import RAW_VIDEO_MESSAGE, Animator
from magicanimate.io import read_video, write_video

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


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    scratch: Path  # the server's TMPDIR: its own scratch folder lives here
    files: Path  # inputs for the tests

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


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_tree):
    root = tmp_path_factory.mktemp("demo")
    files, scratch, examples = root / "files", root / "tmp", root / "examples"
    for folder in (files, scratch, examples):
        folder.mkdir()
    Image.fromarray(make_reference(64)).save(files / "reference.png")
    write_video(files / "driving.mp4", make_motion(CLIP_FRAMES, 64), fps=25)
    walking_video(files / "person.mp4", frames=CLIP_FRAMES, fps=25.0)  # a raw video of a "person"
    (files / "broken.mp4").write_bytes(b"not a video at all")
    stand_in = save_stand_in(root / "stand_in.torchscript")
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
    command = [sys.executable, "-m", "magicanimate.cli", "demo", "--pretrained", str(tiny_tree), "--host",
               "127.0.0.1", "--port", str(port), "--examples", str(examples), "--max-frames", str(FRAME_LIMIT),
               "--densepose-model", str(stand_in), "--device", "cpu",
               "--steps", "2", "--size", "64", "--context-frames", "8", "--context-overlap", "2"]  # fmt: skip
    log = open(root / "server.log", "w")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    handle = Server(f"http://127.0.0.1:{port}/", process, scratch, files)
    deadline = time.monotonic() + 180
    while True:
        if process.poll() is not None:
            pytest.fail(f"the demo server exited: {(root / 'server.log').read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(handle.url, timeout=5) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            handle.stop()
            pytest.fail(f"the demo server did not answer in time: {(root / 'server.log').read_text()[-3000:]}")
        time.sleep(0.5)
    yield handle
    handle.stop()
    log.close()


def probe(path: str | Path) -> tuple[str, int, tuple[int, int], float]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        return stream.codec_context.name, frames, (stream.width, stream.height), float(stream.average_rate)


def test_api_endpoint_animates_densepose_and_raw_videos(server, request):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(server.url, verbose=False)
    request.addfinalizer(client.close)  # its heartbeat connection would hold up the server's shutdown
    endpoint = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/animate"]
    names = [parameter["parameter_name"] for parameter in endpoint["parameters"]]
    assert names[:6] == ["reference_image", "driving_video", "steps", "guidance_scale", "seed", "size"]
    assert all(parameter["parameter_has_default"] for parameter in endpoint["parameters"][2:])
    assert len(endpoint["returns"]) == 1  # just the animation

    def submit(driving: str, **options):
        return client.submit(
            reference_image=handle_file(server.files / "reference.png"),
            driving_video=handle_file(server.files / driving),
            steps=options.pop("steps", 2),
            guidance_scale=7.5,
            seed=3,
            size=64,
            api_name="/animate",
            **options,
        )

    job = submit("driving.mp4")
    progress = set()
    deadline = time.monotonic() + 180
    while not job.done():
        assert time.monotonic() < deadline, "the animation did not finish in time"
        status = job.status()
        progress.update((unit.desc, unit.index, unit.length) for unit in status.progress_data or [])
        time.sleep(0.02)
    codec, frames, size, fps = probe(job.result())
    assert (codec, frames, size, fps) == ("h264", FRAME_LIMIT, (64, 64), 25.0)  # cut to the server's limit
    # Progress follows the denoising steps (polling may miss a step: any denoising update of the 2 steps counts).
    assert any(desc == "denoising" and length == 2 and index >= 1 for desc, index, length in progress), progress

    # A video of a person is detected by its colours and goes through DensePose extraction first.
    assert probe(submit("person.mp4", steps=1).result(timeout=180))[:3] == ("h264", FRAME_LIMIT, (64, 64))
    with pytest.raises(AppError, match="could not be read"):
        submit("broken.mp4").result(timeout=60)


def test_raw_video_without_a_densepose_model_is_explained(tmp_path):
    raw = np.stack([np.roll(make_reference(64, seed=5), shift, axis=1) for shift in range(6)])
    animator = Animator(pipeline=None)  # refused before the pipeline would be needed
    try:
        with pytest.raises(InputError) as refused:
            animator.run(make_reference(64), write_video(tmp_path / "raw.mp4", raw), {"steps": 1, "size": 64})
    finally:
        animator.close()
    assert str(refused.value) == RAW_VIDEO_MESSAGE and "--densepose-model" in RAW_VIDEO_MESSAGE
    assert not animator.workdir.exists()


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
                assert probe(quick.result(timeout=90))[1] == FRAME_LIMIT  # not stuck behind the stopped run
            finally:
                client.close()
            print(f"queue free again {time.monotonic() - stopped:.1f} s after Stop")
            page.screenshot(path=str(tmp_path / "after-stop.png"), full_page=True)
        finally:
            browser.close()


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
