"""`magicanimate evaluate` and the metric API (issue 14).

Weight-free metrics are checked against independent computations (scikit-image, direct formulas) and on constructed
cases with known values. The metrics with pretrained networks run with small injected networks (random weights:
they test the machinery, not the numbers a real Inception or I3D gives); the real architectures are checked for
their parameter names and shapes, so the published checkpoints load into them.
"""

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from torch import nn

from magicanimate import cli
from magicanimate.errors import CheckpointError, InputError
from magicanimate.evaluation import (
    LPIPS,
    METRICS,
    FeatureStats,
    compare_videos,
    disco_l1,
    disco_psnr,
    disco_ssim,
    evaluate_videos,
    frechet_distance,
    l1,
    lpips,
    psnr,
    ssim,
)
from magicanimate.evaluation import networks as nets
from magicanimate.evaluation.evaluate import ClipBuffer
from magicanimate.evaluation.frechet import FrechetDistance
from magicanimate.evaluation.perceptual import linear_weights_path
from magicanimate.evaluation.protocol import ClipNetwork, get_protocol, gif_palette, pil_bicubic_float, with_sizes
from magicanimate.io import write_png_frames, write_video

# torchmetrics' SSIM (11x11 Gaussian, float32) against scikit-image's with the same window (float64): measured at
# most 2.9e-4 apart on random 40x48 frames (the two treat the borders differently).
SSIM_ATOL = 1e-3
# Fréchet distances from scipy's sqrtm and from torchmetrics' eigenvalue route, both in float64: measured within
# 2e-9 relative on 300 x 6 features; the stated bound leaves room for other BLAS builds.
FRECHET_RTOL = 1e-6


def random_clip(frames=4, height=40, width=48, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)


def noisy(clip: np.ndarray, amount: int, seed: int = 1) -> np.ndarray:
    noise = np.random.default_rng(seed).integers(-amount, amount + 1, clip.shape)
    return np.clip(clip.astype(int) + noise, 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------- weight-free metrics


def test_identical_frames_give_the_known_extremes():
    clip = random_clip()
    assert l1(clip, clip) == 0 and psnr(clip, clip) == math.inf and ssim(clip, clip) == pytest.approx(1, abs=1e-6)
    assert disco_l1(clip, clip) == 0 and disco_psnr(clip, clip) == 100 and disco_ssim(clip, clip) == 1


def test_a_uniform_offset_gives_its_psnr_and_l1():
    gt = np.random.default_rng(0).integers(40, 200, (3, 32, 32, 3), dtype=np.uint8)
    pred = gt + np.uint8(10)  # no clipping: every value moves by exactly 10 levels
    assert psnr(pred, gt) == pytest.approx(20 * math.log10(255 / 10), abs=1e-4)  # float32 frames
    assert l1(pred, gt) == pytest.approx(10 / 255, rel=1e-6)
    assert disco_l1(pred, gt) == pytest.approx(10 / (32 * 32))
    assert disco_psnr(pred, gt) == pytest.approx(20 * math.log10(255 / 10))  # 100 < 256: no wrap-around yet
    # 20 levels: 20**2 = 400 wraps to 144 in uint8 (either sign), so DisCo's formula reads 20 log10(255 / 12).
    assert disco_psnr(gt + np.uint8(20), gt) == pytest.approx(20 * math.log10(255 / 12))
    assert disco_psnr(gt - np.uint8(20), gt) == pytest.approx(20 * math.log10(255 / 12))
    assert psnr(gt + np.uint8(20), gt) == pytest.approx(20 * math.log10(255 / 20), abs=1e-4)


def test_weight_free_metrics_agree_with_independent_computations():
    gt = random_clip()
    pred = noisy(gt, 30)
    a, b = pred / 255.0, gt / 255.0
    np.testing.assert_allclose(
        psnr(pred, gt, reduction="none"),
        [peak_signal_noise_ratio(b[i], a[i], data_range=1) for i in range(len(gt))],
        atol=1e-4,
    )
    np.testing.assert_allclose(l1(pred, gt, reduction="none"), np.abs(a - b).mean(axis=(1, 2, 3)), rtol=1e-6)
    expected_ssim = [
        structural_similarity(
            a[i], b[i], gaussian_weights=True, sigma=1.5, use_sample_covariance=False, channel_axis=-1, data_range=1
        )
        for i in range(len(gt))
    ]
    np.testing.assert_allclose(ssim(pred, gt, reduction="none"), expected_ssim, atol=SSIM_ATOL)
    # DisCo's: the wrap-around mse written with explicit modular arithmetic, and the grey of OpenCV's weights.
    diff = pred.astype(np.int64) - gt.astype(np.int64)
    mse = (((diff % 256) ** 2) % 256).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(disco_psnr(pred, gt, reduction="none"), 20 * np.log10(255 / np.sqrt(mse)))
    np.testing.assert_allclose(disco_l1(pred, gt, reduction="none"), np.abs(diff).mean(axis=(1, 2, 3)) / (40 * 48))

    def grey(x):
        return np.round(x @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)

    expected = [structural_similarity(grey(pred[i]), grey(gt[i])) for i in range(len(gt))]
    np.testing.assert_allclose(disco_ssim(pred, gt, reduction="none"), expected, atol=2e-3)  # grey rounding


def test_plain_psnr_of_many_frames_is_that_of_their_mean_squared_error():
    gt = random_clip(frames=2)
    pred = np.stack([gt[0], noisy(gt[1], 30)])  # one identical frame, one not
    per_frame = psnr(pred, gt, reduction="none")
    assert per_frame[0] == math.inf and math.isfinite(per_frame[1])
    mse = ((pred / 255.0 - gt / 255.0) ** 2).mean()
    assert psnr(pred, gt) == pytest.approx(10 * math.log10(1 / mse), abs=1e-4)
    assert get_protocol("disco").average("psnr", np.array([100.0, 30.0])) == 65.0  # DisCo: the plain mean


def test_metrics_refuse_frames_of_different_shapes():
    with pytest.raises(InputError, match="differ in shape"):
        psnr(random_clip(height=32), random_clip(height=40))
    with pytest.raises(InputError, match="shape"):
        l1(np.zeros((4, 4)), np.zeros((4, 4)))


# ------------------------------------------------------------------------------------------------------ LPIPS


@pytest.fixture(scope="module")
def random_lpips() -> LPIPS:
    torch.manual_seed(0)
    return LPIPS("alex")  # random backbone, the real (packaged) linear layers


def test_lpips_uses_the_packaged_linear_layers_and_is_a_distance(random_lpips):
    packaged = torch.load(linear_weights_path("alex"), map_location="cpu", weights_only=True)
    assert torch.equal(random_lpips.lins[2].weight, packaged["lin2.model.1.weight"])
    clip = random_clip(frames=3, height=64, width=64)
    other = noisy(clip, 60)
    assert lpips(clip, clip, random_lpips) == 0
    forward, backward = lpips(clip, other, random_lpips), lpips(other, clip, random_lpips)
    assert forward > 0 and forward == pytest.approx(backward, rel=1e-5)
    assert lpips(clip, noisy(clip, 120), random_lpips) > forward


def test_lpips_matches_its_formula_on_the_backbone_features(random_lpips):
    clip, other = random_clip(frames=2, height=64, width=64), random_clip(frames=2, height=64, width=64, seed=5)
    x = torch.from_numpy(clip).permute(0, 3, 1, 2).float() / 127.5 - 1
    y = torch.from_numpy(other).permute(0, 3, 1, 2).float() / 127.5 - 1
    shift, scale = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), torch.tensor([0.458, 0.448, 0.450])
    fx, fy = (
        random_lpips.backbone((x - shift) / scale.view(1, 3, 1, 1)),
        random_lpips.backbone((y - shift) / scale.view(1, 3, 1, 1)),
    )
    expected = 0
    for layer, (a, b) in enumerate(zip(fx, fy, strict=True)):
        a, b = a / (a.norm(dim=1, keepdim=True) + 1e-10), b / (b.norm(dim=1, keepdim=True) + 1e-10)
        weights = random_lpips.lins[layer].weight.view(1, -1, 1, 1)
        expected = expected + ((a - b) ** 2 * weights).sum(1).mean(dim=(1, 2))
    np.testing.assert_allclose(lpips(clip, other, random_lpips, reduction="none"), expected.numpy(), rtol=1e-5)


def test_lpips_backbone_loads_torchvision_names_from_the_weights_folder(tmp_path, random_lpips):
    state = {f"features.{k}": v for k, v in random_lpips.backbone.features.state_dict().items()}
    state["classifier.1.weight"] = torch.zeros(2, 2)  # torchvision's file has the classifier too: ignored
    torch.save(state, tmp_path / "alexnet-owt-7be5be79.pth")
    from magicanimate.evaluation import load_lpips

    loaded = load_lpips("alex", weights_dir=tmp_path, download=False)
    clip, other = random_clip(frames=2, height=64, width=64), random_clip(frames=2, height=64, width=64, seed=3)
    assert lpips(clip, other, loaded) == lpips(clip, other, random_lpips)
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "vgg16-397923af.pth")
    with pytest.raises(CheckpointError, match="does not fit the vgg backbone"):
        load_lpips("vgg", weights_dir=tmp_path, download=False)


# ------------------------------------------------------------------------------------------- Fréchet distance


def test_frechet_distance_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    features = np.random.default_rng(0).normal(size=(300, 6))
    stats = FeatureStats()
    stats.add(features[:100])
    stats.add(torch.from_numpy(features[100:]))  # streamed in parts, numpy and torch
    np.testing.assert_allclose(stats.covariance(), np.cov(features, rowvar=False), atol=1e-12)
    mu, sigma = stats.mean(), stats.covariance()
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8
    distances = [frechet_distance(mu + shift, sigma, mu, sigma) for shift in (0.1, 0.5, 1.0)]
    np.testing.assert_allclose(distances, [6 * s**2 for s in (0.1, 0.5, 1.0)], rtol=1e-6)  # |shift|^2, same cov


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    var1, var2 = np.array([1.0, 4.0, 0.25]), np.array([2.0, 1.0, 1.0])
    expected = 1.0 + np.sum(var1 + var2 - 2 * np.sqrt(var1 * var2))
    assert frechet_distance([0, 0, 1], np.diag(var1), [0, 0, 0], np.diag(var2)) == pytest.approx(expected)


def test_frechet_distance_agrees_with_torchmetrics_fid_on_the_same_features():
    from torchmetrics.image.fid import FrechetInceptionDistance

    class Features(nn.Module):  # torchmetrics calls the module on the "images": here they are the features
        num_features = 6

        def forward(self, x):
            return x

    rng = np.random.default_rng(1)
    real = rng.normal(size=(300, 6))
    fake = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6)) * 0.5 + 0.3
    reference = FrechetInceptionDistance(feature=Features())
    reference.update(torch.from_numpy(real), real=True)
    reference.update(torch.from_numpy(fake), real=False)
    fd = FrechetDistance(nn.Identity(), lambda items: torch.from_numpy(np.asarray(items)))
    fd.update(fake, real)
    assert fd.compute() == pytest.approx(float(reference.compute()), rel=FRECHET_RTOL)


# ------------------------------------------------------------------------------------------ networks, weights


def test_i3d_has_the_published_parameter_names_and_tf_same_padding():
    model = nets.I3D().eval()
    state = model.state_dict()
    for key, shape in {
        "Conv3d_1a_7x7.conv3d.weight": (64, 3, 7, 7, 7),
        "Mixed_3b.b1b.conv3d.weight": (128, 96, 3, 3, 3),
        "Mixed_5c.b3b.bn.running_var": (128,),
        "logits.conv3d.bias": (400,),
    }.items():
        assert tuple(state[key].shape) == shape
    for size in (15, 16, 17, 224):
        for kernel, stride in ((7, 2), (3, 2), (3, 1), (2, 2)):
            before, after = nets.same_padding(size, kernel, stride)
            assert (size + before + after - kernel) // stride + 1 == math.ceil(size / stride) and after - before in (
                0,
                1,
            )
    with torch.no_grad():
        assert model(torch.rand(2, 3, 16, 32, 32) * 2 - 1).shape == (2, 400)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script / save: the Inception file's format
def test_weight_files_load_through_their_loaders(tmp_path):
    torch.manual_seed(0)
    source = nets.I3D().eval()
    # DisCo's ResNet checkpoint layout: {"state_dict": {"module.<name>": ...}}; the I3D file is a bare state dict.
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "i3d_pretrained_400.pt"
    )
    loaded = nets.load_i3d(weights_dir=tmp_path, download=False)
    clip = torch.rand(1, 3, 16, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded(clip), source(clip))
    torch.save({"Conv3d_1a_7x7.conv3d.weight": torch.zeros(1)}, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match="does not fit I3D"):
        nets.load_i3d(tmp_path / "broken.pt")

    class Scripted(nn.Module):  # the calling convention of inception-2015-12-05.pt
        def forward(self, x, return_features: bool = False):
            return x.mean(dim=(2, 3)) if return_features else x.sum()

    torch.jit.save(torch.jit.script(Scripted()), tmp_path / "inception-2015-12-05.pt")
    inception = nets.load_inception(weights_dir=tmp_path, download=False)
    assert inception(torch.ones(2, 3, 8, 8)).shape == (2, 3)
    with pytest.raises(CheckpointError, match="TorchScript"):
        nets.load_inception(tmp_path / "broken.pt")


def test_resnet3d_has_the_published_parameter_names():
    model = nets.ResNet3D50().eval()
    state = model.state_dict()
    for key, shape in {
        "conv1.weight": (64, 3, 7, 7, 7),
        "layer1.0.downsample.0.weight": (256, 64, 1, 1, 1),
        "layer4.2.conv3.weight": (2048, 512, 1, 1, 1),
        "fc.weight": (400, 2048),
    }.items():
        assert tuple(state[key].shape) == shape
    with torch.no_grad():
        assert model(torch.rand(1, 3, 16, 32, 32)).shape == (1, 2048)


def test_missing_weights_are_one_line_that_says_where_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(CheckpointError, match="offline") as offline:
        nets.resolve_weight("i3d", weights_dir=tmp_path)
    assert "\n" not in str(offline.value) and nets.WEIGHT_FILES["i3d"].url in str(offline.value)
    with pytest.raises(CheckpointError, match="--resnet3d FILE"):
        nets.resolve_weight("resnet3d", weights_dir=tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        nets.resolve_weight("inception", tmp_path / "nowhere.pt")
    monkeypatch.setenv("MAGICANIMATE_EVAL_WEIGHTS", str(tmp_path))
    (tmp_path / "resnet-50-kinetics.pth").write_bytes(b"x")
    assert nets.resolve_weight("resnet3d") == tmp_path / "resnet-50-kinetics.pth"


# ------------------------------------------------------------------------------------------------ protocol


def test_clip_sampling_follows_each_protocol():
    disco, standard = get_protocol("disco"), get_protocol("standard")
    assert disco.clip_starts(20) == [0, 1, 2, 3]  # DisCo writes a GIF for each start in range(0, N - 16)
    assert disco.clip_starts(16) == []
    assert standard.clip_starts(32) == [0, 16] and standard.clip_starts(31) == [0]
    frames = random_clip(frames=21, height=8, width=8)
    for protocol in (disco, standard):
        same = replace(protocol, clip_gif_palette=False)
        buffer = ClipBuffer(same, ClipNetwork(8, 1.0, (0.0, 0.0, 0.0)))  # same size: the resize keeps the values
        clips = [clip for clip in map(buffer.add, frames) if clip is not None]
        expected = [frames[s : s + 16].astype(np.float32) for s in same.clip_starts(len(frames))]
        assert len(clips) == len(expected) and all(
            np.array_equal(np.stack(c), e) for c, e in zip(clips, expected, strict=True)
        )


def test_preprocessing_helpers():
    flat = np.full((30, 20, 3), 77, np.uint8)
    np.testing.assert_allclose(pil_bicubic_float(flat, 299), 77, atol=1e-3)
    few_colours = np.repeat(np.array([[[255, 0, 0]], [[0, 0, 255]]], np.uint8), 8, axis=1)
    assert np.array_equal(gif_palette(few_colours), few_colours)


# ---------------------------------------------------------------------------------------------- end to end


class TinyImageFeatures(nn.Module):
    """A 4-d feature per image (stands in for Inception)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, kernel_size=5, stride=4)

    def forward(self, x):
        return torch.tanh(self.conv(x / 255)).mean(dim=(2, 3))


class TinyClipFeatures(nn.Module):
    """A 3-d feature per clip (stands in for I3D and the 3D-ResNet-50)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv3d(3, 3, kernel_size=3, stride=2)

    def forward(self, x):
        return torch.tanh(self.conv(x / 100)).mean(dim=(2, 3, 4))


@pytest.fixture(scope="module")
def tiny_networks(random_lpips) -> dict:
    return {
        "lpips": random_lpips,
        "inception": TinyImageFeatures(),
        "resnet3d": TinyClipFeatures(),
        "i3d": TinyClipFeatures(),
    }


SMALL_DISCO = with_sizes(get_protocol("disco"), inception=32, resnet3d=16, i3d=16)


def test_evaluate_videos_end_to_end_with_injected_networks(tmp_path, tiny_networks):
    gt = {"a": random_clip(frames=20, height=64, width=64, seed=1), "b": random_clip(frames=18, height=64, width=64)}
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    for name, frames in gt.items():
        write_png_frames(tmp_path / "gt" / name, frames)
        write_png_frames(tmp_path / "pred" / name, noisy(frames, 40))
    report = evaluate_videos(tmp_path / "pred", tmp_path / "gt", protocol=SMALL_DISCO, progress=False, **tiny_networks)
    assert list(report.summary) == list(METRICS) and all(v is not None for v in report.summary.values())
    assert report.frames_compared == 38 and report.clips == 4 + 2  # starts range(0, N - 16) per video
    pred = np.concatenate([noisy(gt["a"], 40), noisy(gt["b"], 40)])
    truth = np.concatenate([gt["a"], gt["b"]])
    assert report.summary["psnr"] == pytest.approx(disco_psnr(pred, truth))  # the mean over all frames
    assert report.summary["ssim"] == pytest.approx(disco_ssim(pred, truth))
    assert report.summary["lpips"] == pytest.approx(lpips(pred, truth, tiny_networks["lpips"], zero_one_inputs=True))
    assert report.summary["fid"] > 0.0 and report.summary["fvd"] > 0.0
    same = evaluate_videos(tmp_path / "gt", tmp_path / "gt", protocol=SMALL_DISCO, progress=False, **tiny_networks)
    assert same.summary["psnr"] == 100 and same.summary["ssim"] == 1 and same.summary["l1"] == 0
    assert same.summary["lpips"] == 0
    for metric in ("fid", "fid_vid", "fvd"):
        assert abs(same.summary[metric]) < 1e-6


def test_mismatched_counts_sizes_and_rates_are_warned_and_reported(tmp_path):
    gt = random_clip(frames=10, height=32, width=32)
    write_video(tmp_path / "gt.mp4", gt, fps=25)
    write_video(tmp_path / "pred.mp4", random_clip(frames=12, height=48, width=48), fps=30)
    with pytest.warns(UserWarning) as caught:
        report = evaluate_videos(
            tmp_path / "pred.mp4", tmp_path / "gt.mp4", metrics="l1,psnr,ssim", protocol="standard", progress=False
        )
    text = " | ".join(str(w.message) for w in caught)
    assert "12 frames, the ground truth 10" in text and "48x48" in text and "30 fps" in text
    video = report.videos[0]
    assert (video.frames_compared, video.pred_frames, video.gt_frames) == (10, 12, 10)  # the longer side counted whole
    assert report.skipped["fvd"] == "not asked for" and report.summary["fvd"] is None


def test_inputs_that_do_not_match_are_one_line_errors(tmp_path):
    for side, names in (("pred", ["a", "b"]), ("gt", ["a", "c"])):
        for name in names:
            write_png_frames(tmp_path / side / name, random_clip(frames=2, height=16, width=16))
    with pytest.raises(InputError, match="do not hold the same videos: 1 ground-truth video") as err:
        evaluate_videos(tmp_path / "pred", tmp_path / "gt", metrics="l1", progress=False)
    assert "c" in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "broken.mp4").write_bytes(b"not a video at all")
    with pytest.raises(InputError, match="cannot read video"):
        evaluate_videos(tmp_path / "broken.mp4", tmp_path / "gt" / "a", metrics="l1", progress=False)
    with pytest.raises(InputError, match="one video but --gt is a folder of 2"):
        evaluate_videos(tmp_path / "gt" / "a", tmp_path / "gt", metrics="l1", progress=False)
    with pytest.raises(InputError, match="unknown metric"):
        evaluate_videos(tmp_path / "gt", tmp_path / "gt", metrics="psnr,fdv", progress=False)


def test_compare_reports_each_candidate_against_the_reference(random_lpips):
    reference = random_clip(frames=3, height=64, width=64)
    near, far = noisy(reference, 10), noisy(reference, 60)
    report = compare_videos(
        reference, {"near": near, "far": far, "same": reference}, lpips=random_lpips, progress=False
    )
    assert report.candidates["same"].summary["psnr"] == math.inf
    assert report.candidates["near"].summary["psnr"] > report.candidates["far"].summary["psnr"]
    assert report.candidates["near"].summary["lpips"] < report.candidates["far"].summary["lpips"]
    assert report.candidates["far"].summary["psnr"] == pytest.approx(psnr(far, reference))
    assert json.loads(json.dumps(report.to_dict()))["summary"]["same"]["psnr"] == "inf"


# ----------------------------------------------------------------------------------------------------- CLI


def test_cli_writes_the_report_and_compares(tmp_path, capsys):
    gt = random_clip(frames=6, height=32, width=32)
    write_png_frames(tmp_path / "gt", gt)
    write_png_frames(tmp_path / "pred", noisy(gt, 20))
    write_png_frames(tmp_path / "fast", noisy(gt, 40))
    report = tmp_path / "report.json"
    assert (
        cli.main(
            [
                "evaluate",
                "--pred",
                str(tmp_path / "pred"),
                "--gt",
                str(tmp_path / "gt"),
                "--metrics",
                "l1,psnr,ssim",
                "--report",
                str(report),
            ]
        )
        == 0
    )
    data = json.loads(report.read_text())
    assert set(data["summary"]) == set(METRICS) and data["frames_compared"] == 6 and data["protocol"] == "disco"
    assert data["summary"]["psnr"] == pytest.approx(disco_psnr(noisy(gt, 20), gt))
    assert "PSNR" in capsys.readouterr().out
    compared = tmp_path / "compare.json"
    assert (
        cli.main(
            [
                "evaluate",
                "--compare",
                str(tmp_path / "gt"),
                str(tmp_path / "pred"),
                str(tmp_path / "fast"),
                "--metrics",
                "psnr,ssim",
                "--report",
                str(compared),
            ]
        )
        == 0
    )
    summary = json.loads(compared.read_text())["summary"]
    assert summary["pred"]["psnr"] > summary["fast"]["psnr"]


def test_cli_compare_skips_lpips_without_its_backbone(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    reference = random_clip(frames=3, height=32, width=32)
    write_png_frames(tmp_path / "parity", reference)
    write_png_frames(tmp_path / "fast", noisy(reference, 20))
    arguments = ["evaluate", "--compare", str(tmp_path / "parity"), str(tmp_path / "fast")]
    with pytest.warns(UserWarning, match="lpips skipped: .*alexnet-owt-7be5be79.pth"):
        assert cli.main(arguments + ["--weights-dir", str(tmp_path / "w")]) == 0
    printed = capsys.readouterr().out
    assert "PSNR" in printed and "LPIPS" not in printed


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--pred", "{pred}"], "--pred needs --gt"),
        (["--pred", "{pred}", "--gt", "{tmp}/missing"], "not found"),
        (["--compare", "{pred}"], "needs a reference and at least one candidate"),
        (["--pred", "{pred}", "--gt", "{pred}", "--report", "{tmp}/exists.json"], "already exists"),
        (["--pred", "{pred}", "--gt", "{pred}", "--metrics", "fvd", "--weights-dir", "{tmp}/w"], "offline"),
    ],
)
def test_cli_errors_are_one_line_and_write_nothing(tmp_path, capsys, monkeypatch, arguments, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    write_png_frames(tmp_path / "pred", random_clip(frames=2, height=16, width=16))
    (tmp_path / "exists.json").write_text("{}")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code = cli.main(["evaluate"] + [a.format(pred=tmp_path / "pred", tmp=tmp_path) for a in arguments])
    err = capsys.readouterr().err.strip().splitlines()
    assert code in (2, 3) and err[-1].startswith("error: ") and message in err[-1]
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
