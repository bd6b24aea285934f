"""Video output users expect: the driving video's sound and frame rate survive, and every output kind is atomic."""

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from tiny_models import make_motion, make_reference

from magicanimate import InputError
from magicanimate.api import Video, animate
from magicanimate.io import read_video

TONE_HZ = 440.0


def write_clip_with_tone(path: Path, frames: np.ndarray, fps: Fraction, sample_rate: int = 44100) -> Path:
    """An H.264 clip with a mono AAC sine track as long as the video, written with PyAV."""
    with av.open(str(path), "w", format="mp4") as container:
        video = container.add_stream("libx264", rate=fps)
        video.pix_fmt, video.height, video.width = "yuv420p", *frames.shape[1:3]
        audio = container.add_stream("aac", rate=sample_rate)
        audio.layout = "mono"
        for index, frame in enumerate(frames):
            picture = av.VideoFrame.from_ndarray(frame, format="rgb24")
            picture.pts, picture.time_base = index, 1 / fps
            container.mux(video.encode(picture))
        container.mux(video.encode(None))
        times = np.arange(int(sample_rate * len(frames) / fps)) / sample_rate
        tone = (0.5 * np.sin(2 * np.pi * TONE_HZ * times)).astype(np.float32)
        for start in range(0, len(tone), 1024):
            chunk = av.AudioFrame.from_ndarray(tone[None, start : start + 1024], format="fltp", layout="mono")
            chunk.sample_rate, chunk.pts, chunk.time_base = sample_rate, start, Fraction(1, sample_rate)
            container.mux(audio.encode(chunk))
        container.mux(audio.encode(None))
    return path


def probe(path: Path) -> dict:
    """Frame count, rate, size and the decoded audio (rate, seconds, dominant frequency) of an mp4."""
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        info = {
            "codec": video.codec_context.name,
            "fps": video.average_rate,
            "frames": sum(1 for _ in container.decode(video)),
            "audio": None,
        }
    with av.open(str(path)) as container:
        if container.streams.audio:
            stream = container.streams.audio[0]
            samples = np.concatenate([frame.to_ndarray()[0] for frame in container.decode(stream)])
            rate = stream.codec_context.sample_rate
            spectrum = np.abs(np.fft.rfft(samples))
            info["audio"] = {
                "codec": stream.codec_context.name,
                "rate": rate,
                "seconds": float(stream.duration * stream.time_base),
                "peak_hz": float(np.argmax(spectrum) * rate / len(samples)),
            }
    return info


@pytest.fixture(scope="module")
def clip_with_tone(tmp_path_factory) -> Path:
    """16 DensePose-like frames at NTSC 29.97 fps with a 440 Hz tone."""
    path = tmp_path_factory.mktemp("audio") / "driving.mp4"
    return write_clip_with_tone(path, make_motion(16, 64), Fraction(30000, 1001))


def test_audio_and_fps_survive_a_round_trip(clip_with_tone, tmp_path):
    frames, fps = read_video(clip_with_tone)
    out = Video(frames[:12], fps, audio=clip_with_tone).save(tmp_path / "out.mp4")
    info = probe(out)
    assert info["codec"] == "h264" and info["frames"] == 12
    assert info["fps"] == Fraction(30000, 1001)  # the exact NTSC rate, not 29.97 rounded
    audio = info["audio"]
    assert audio is not None and audio["codec"] == "aac" and audio["rate"] == 44100
    assert audio["seconds"] == pytest.approx(12 * 1001 / 30000, abs=0.03)  # cut to the (shorter) video
    assert audio["peak_hz"] == pytest.approx(TONE_HZ, abs=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]  # no temporary leftovers


def test_animate_carries_the_driving_audio(tiny_pipe, clip_with_tone, tmp_path):
    fast = {"pipeline": tiny_pipe, "steps": 1, "size": 64, "max_frames": 8, "context_frames": 8, "context_overlap": 2}
    video = animate(make_reference(64), clip_with_tone, **fast)
    assert video.audio == Path(clip_with_tone)
    info = probe(video.save(tmp_path / "animated.mp4"))
    assert info["frames"] == 8 and info["fps"] == Fraction(30000, 1001)
    assert info["audio"]["seconds"] == pytest.approx(8 * 1001 / 30000, abs=0.03)
    assert info["audio"]["peak_hz"] == pytest.approx(TONE_HZ, abs=5)

    # A different frame rate no longer lines up with the sound, so it is dropped rather than desynchronised.
    slowed = animate(make_reference(64), clip_with_tone, fps=12.5, **fast)
    assert slowed.audio is None
    assert probe(slowed.save(tmp_path / "slowed.mp4"))["audio"] is None


def test_silent_driving_video_gives_silent_output(tmp_path):
    frames = make_motion(4, 32)
    out = Video(frames, 25.0, audio=None).save(tmp_path / "silent.mp4")
    assert probe(out)["audio"] is None
    # A source without an audio track is accepted and adds none.
    assert probe(Video(frames, 25.0, audio=out).save(tmp_path / "again.mp4"))["audio"] is None


def test_gif_and_png_frames_are_written_whole(tmp_path):
    frames = make_motion(5, 32)
    gif = Video(frames, 10.0).save(tmp_path / "clip.gif")
    with av.open(str(gif)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 5
    folder = Video(frames, 10.0).save(tmp_path / "frames")
    assert sorted(p.name for p in folder.iterdir()) == [f"{i:05d}.png" for i in range(5)]
    Video(frames[:3], 10.0).save(folder)  # a rerun replaces an earlier frame folder completely
    assert len(list(folder.iterdir())) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.gif", "frames"]  # no temporary leftovers

    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="not a folder of PNG frames"):
        Video(frames, 10.0).save(precious)
    assert (precious / "notes.txt").read_text() == "keep me"
