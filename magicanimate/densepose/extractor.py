"""DensePose backends: a frame in, the persons in it out (:class:`~magicanimate.densepose.person.Person`).

Two backends produce the same intermediate:

* :class:`TorchScriptExtractor` (default): the public TorchScript export of DensePose R-CNN
  (``densepose_r50_fpn_dl.torchscript`` / ``densepose_r101_fpn_dl.torchscript`` in the hub repo
  ``LayerNorm/DensePose-TorchScript-with-hint-image``), no detectron2 needed. Its graph calls torchvision ops, so
  loading the real file needs a torchvision build matching torch (``pip install magicanimate[densepose]``).
* :class:`Detectron2Extractor`: detectron2 + its DensePose project (built from source), a config and ``.pkl``.

Both turn each detection's chart output into labels the way detectron2's ``DensePoseResultExtractor`` does: coarse
(2 channels) and fine (25 channels) segmentation resized bilinearly (``align_corners=False``) to the box, then
``label = argmax(fine) * (argmax(coarse) > 0)``.
"""

import logging
import os
import sys
import textwrap
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import CheckpointError, InputError
from ..io.files import check_readable
from .person import Person

MODEL_ENV = "MAGICANIMATE_DENSEPOSE_MODEL"
HUB_REPO = "LayerNorm/DensePose-TorchScript-with-hint-image"
HUB_FILE = "densepose_r50_fpn_dl.torchscript"


class Extractor(Protocol):
    """Anything that finds persons in RGB frames; both backends (and test stand-ins) are one."""

    def extract(self, frames: Iterable[np.ndarray]) -> Iterator[list[Person]]: ...


def chart_to_labels(coarse_segm, fine_segm, box, max_side: int | None = None) -> np.ndarray:
    """Part labels (uint8) covering `box` from one detection's chart output (torch tensors ``(2|25, h, w)``).

    Resized to the box's size in pixels (as detectron2 does), or smaller when `max_side` caps its longer side;
    the cap loses nothing visible when it is at least the box's size in the final frame.
    """
    import torch
    import torch.nn.functional as F

    width, height = max(int(box[2] - box[0]), 1), max(int(box[3] - box[1]), 1)
    if max_side is not None and max(width, height) > max_side:
        factor = max_side / max(width, height)
        width, height = max(round(width * factor), 1), max(round(height * factor), 1)
    size = (height, width)
    coarse = F.interpolate(coarse_segm[None].float(), size, mode="bilinear", align_corners=False)[0].argmax(0)
    fine = F.interpolate(fine_segm[None].float(), size, mode="bilinear", align_corners=False)[0].argmax(0)
    return (fine * (coarse > 0)).to(torch.uint8).cpu().numpy()


def resolve_device(device: str = "auto") -> str:
    """The device the DensePose model runs on, by the same rule as the animation models (:mod:`magicanimate.devices`):
    ``auto`` is CUDA when usable, else the CPU; an unavailable device is an InputError."""
    from ..devices import resolve_device as resolve

    return str(resolve(device)[0])


class TorchScriptExtractor:
    """The DensePose TorchScript export, one frame per call (its graph takes a single image).

    Contract of the export: input a uint8 tensor ``(3, H, W)``; output ``(pred_boxes [N, 4] xyxy in input pixels,
    coarse_segm [N, 2, 112, 112], fine_segm [N, 25, 112, 112], u, v)``. The dict output of the upstream exporter
    (dajes/DensePose-TorchScript: ``pred_boxes``, ``scores``, ``pred_densepose_*``) is accepted too.

    Channel order: the export wraps detectron2's ``DefaultPredictor``, which takes **BGR** (cv2.imread order) and
    only converts when the config's ``INPUT.FORMAT`` is RGB; the DensePose configs use ``INPUT.FORMAT=BGR``, so the
    network sees the channels exactly as given and was trained on BGR. We therefore pass BGR by default. The
    comfyui_controlnet_aux wrapper passes RGB, which the detector tolerates but was not trained on;
    ``channel_order="RGB"`` reproduces that wrapper. (Derived from the exporter's source; not measured on the real
    weights here.)

    Scores: the 5-tuple export returns none. detectron2 returns detections after NMS in decreasing score order, so
    the rank stands in for the score (``1, (N-1)/N, ...``): only the order matters downstream.

    The model resizes internally (shorter side 800, detectron2's test size), so frames are passed at their own size.
    """

    def __init__(self, path, device: str = "auto", channel_order: str = "BGR", label_cap: int | None = None):
        if channel_order not in ("BGR", "RGB"):
            raise InputError(f"channel_order must be BGR or RGB, got {channel_order!r}")
        self.path, self.device, self.channel_order, self.label_cap = (
            Path(path),
            resolve_device(device),
            channel_order,
            label_cap,
        )
        self.model = load_torchscript(self.path, self.device)

    def __call__(self, frame: np.ndarray) -> list[Person]:
        """Persons in one RGB uint8 frame ``(H, W, 3)``, boxes in its pixels."""
        import torch

        image = frame[..., ::-1] if self.channel_order == "BGR" else frame
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous().to(self.device)
        with torch.no_grad():
            boxes, scores, coarse, fine = _unpack(self.model(tensor), self.path)
            persons = []
            for i in range(boxes.shape[0]):
                box = boxes[i].float().cpu().numpy()
                if box[2] - box[0] < 1 or box[3] - box[1] < 1:
                    continue
                labels = chart_to_labels(coarse[i], fine[i], box, self.label_cap)
                persons.append(Person(box, float(scores[i]), labels))
        return persons

    def extract(self, frames: Iterable[np.ndarray]) -> Iterator[list[Person]]:
        for frame in frames:
            yield self(frame)


def _unpack(output, path):
    """``(boxes, scores, coarse, fine)`` from the export's tuple (or its upstream dict) output, checked."""
    import torch

    if isinstance(output, dict):
        try:
            boxes, coarse, fine = (
                output[k] for k in ("pred_boxes", "pred_densepose_coarse_segm", "pred_densepose_fine_segm")
            )
        except KeyError as err:
            raise CheckpointError(f"{path} is not a DensePose chart model: its output has no {err}") from None
        scores = output.get("scores")
    elif isinstance(output, (tuple, list)) and len(output) >= 3:
        boxes, coarse, fine, scores = output[0], output[1], output[2], None
    else:
        raise CheckpointError(f"{path} does not follow the DensePose TorchScript contract (boxes, coarse, fine, u, v)")
    n = boxes.shape[0]
    if boxes.shape != (n, 4) or coarse.shape[:2] != (n, 2) or fine.shape[:2] != (n, 25):
        raise CheckpointError(
            f"{path} returned boxes {tuple(boxes.shape)}, coarse {tuple(coarse.shape)}, fine {tuple(fine.shape)}; "
            "expected [N,4], [N,2,h,w], [N,25,h,w] (a DensePose chart model)"
        )
    if scores is None:
        scores = (n - torch.arange(n, dtype=torch.float32)) / max(n, 1)
    return boxes, scores.float().cpu(), coarse, fine


def load_torchscript(path: Path, device: str):
    """``torch.jit.load`` with one-line errors: a missing file, not TorchScript, or torchvision ops unavailable."""
    import torch

    if not path.is_file():
        raise CheckpointError(f"DensePose model not found: {path}; {_howto()}")
    try:
        import torchvision  # noqa: F401  (registers torchvision::nms & co. that the real export's graph calls)
    except Exception:  # noqa: BLE001 - absent or built for another torch: only the real export needs it
        pass
    try:
        with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript; the published export is TorchScript
            warnings.simplefilter("ignore", DeprecationWarning)
            model = torch.jit.load(str(path), map_location=device)
    except (RuntimeError, ValueError, OSError) as err:
        if "torchvision" in str(err):
            raise CheckpointError(
                f"{path.name} calls torchvision ops, which are not available; install a torchvision build that "
                "matches your torch (pip install 'magicanimate[densepose]')"
            ) from None
        raise CheckpointError(f"cannot load {path}: not a TorchScript DensePose model; {_howto()}") from None
    model.eval()
    # fp16 exports run on GPUs; CPUs lack half kernels for many of their ops (the upstream runner does the same).
    return model.float() if device == "cpu" else model


class Detectron2Extractor:
    """detectron2 + DensePose project (e.g. ``densepose_rcnn_R_50_FPN_s1x.yaml`` with ``model_final_162be9.pkl``).

    Used only when ``detectron2`` and ``densepose`` import (they are built from source; neither is on PyPI). Frames
    go through the model in batches of `batch_size`, preprocessed as detectron2's ``DefaultPredictor`` does
    (shortest-edge resize, the config's channel order).
    """

    def __init__(
        self,
        config_file,
        weights,
        device: str = "auto",
        score_threshold: float = 0.8,
        label_cap: int | None = None,
        batch_size: int = 4,
    ):
        try:
            import detectron2.data.transforms as T
            from densepose import add_densepose_config
            from detectron2.checkpoint import DetectionCheckpointer
            from detectron2.config import get_cfg
            from detectron2.modeling import build_model
        except ImportError as err:
            raise CheckpointError(
                f"the detectron2 backend needs detectron2 and its DensePose project ({err}); build them from source, "
                "or use the TorchScript model (--model FILE.torchscript)"
            ) from None
        for what, path in (("config", config_file), ("weights", weights)):
            if not Path(path).is_file():
                raise CheckpointError(f"detectron2 DensePose {what} not found: {path}")
        cfg = get_cfg()
        add_densepose_config(cfg)
        cfg.merge_from_file(str(config_file))
        cfg.MODEL.WEIGHTS, cfg.MODEL.DEVICE = str(weights), resolve_device(device)
        cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = score_threshold
        cfg.freeze()
        self.model = build_model(cfg).eval()
        DetectionCheckpointer(self.model).load(cfg.MODEL.WEIGHTS)
        self.resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
        self.bgr = cfg.INPUT.FORMAT == "BGR"
        self.label_cap, self.batch_size = label_cap, batch_size

    def _batch(self, frames: list[np.ndarray]) -> list[list[Person]]:
        import torch

        inputs = []
        for frame in frames:
            image = frame[..., ::-1] if self.bgr else frame
            resized = self.resize.get_transform(image).apply_image(np.ascontiguousarray(image))
            tensor = torch.as_tensor(resized.astype("float32").transpose(2, 0, 1))
            inputs.append({"image": tensor, "height": frame.shape[0], "width": frame.shape[1]})
        with torch.no_grad():
            outputs = self.model(inputs)
        return [persons_from_instances(out["instances"], self.label_cap) for out in outputs]

    def extract(self, frames: Iterable[np.ndarray]) -> Iterator[list[Person]]:
        batch = []
        for frame in frames:
            batch.append(frame)
            if len(batch) == self.batch_size:
                yield from self._batch(batch)
                batch = []
        if batch:
            yield from self._batch(batch)

    def __call__(self, frame: np.ndarray) -> list[Person]:
        return self._batch([frame])[0]


def persons_from_instances(instances, label_cap: int | None = None) -> list[Person]:
    """detectron2 ``Instances`` with ``pred_densepose`` (a chart predictor output) -> persons."""
    if not instances.has("pred_densepose") or not hasattr(instances.pred_densepose, "fine_segm"):
        raise CheckpointError("the detectron2 model gives no DensePose chart output (use an R-CNN DensePose config)")
    boxes = instances.pred_boxes.tensor.float().cpu().numpy()
    scores = instances.scores.float().cpu().numpy()
    dp = instances.pred_densepose
    return [
        Person(boxes[i], float(scores[i]), chart_to_labels(dp.coarse_segm[i], dp.fine_segm[i], boxes[i], label_cap))
        for i in range(len(boxes))
        if boxes[i, 2] - boxes[i, 0] >= 1 and boxes[i, 3] - boxes[i, 1] >= 1
    ]


def resolve_model_path(model=None, flag: str = "--model") -> Path:
    """The TorchScript file to use: `model`, else ``$MAGICANIMATE_DENSEPOSE_MODEL``, else the hub file.

    The hub file goes through huggingface_hub's cache (a cached copy is used offline). Offline (``HF_HUB_OFFLINE``)
    or without a network this fails at once: huggingface_hub would otherwise retry the download for about 24 s,
    logging a line per try, before failing with the same answer. `flag` is how the caller's front end spells the
    option that passes the file (``--model``, ``--densepose-model``), for the error message.

    Raises:
        CheckpointError: one line saying which file is needed, where to get it and how to pass it.
    """
    howto = _howto(flag)
    for given, origin in ((model, flag), (os.environ.get(MODEL_ENV), f"${MODEL_ENV}")):
        if given:
            path = Path(given).expanduser()
            if not os.path.lexists(path):
                raise CheckpointError(f"DensePose model not found: {path} (from {origin}); {howto}")
            return check_readable(path, f"DensePose model (from {origin})", CheckpointError)
    import huggingface_hub

    from ..weights import fetch_errors, is_offline

    with _quiet_hub():
        try:  # a copy cached earlier works offline too
            return Path(huggingface_hub.hf_hub_download(HUB_REPO, HUB_FILE, local_files_only=True))
        except fetch_errors():
            pass
        if is_offline():
            raise CheckpointError(f"no DensePose model given and offline (HF_HUB_OFFLINE is set); {howto}")
        try:  # one request without retries: no network fails here in a second, not after ~24 s of retries
            huggingface_hub.get_hf_file_metadata(huggingface_hub.hf_hub_url(HUB_REPO, HUB_FILE), timeout=10)
        except fetch_errors() as err:
            raise CheckpointError(
                f"no DensePose model given and the Hugging Face hub cannot be reached ({_reason(err)}); {howto}"
            ) from None
    print(f"magicanimate: fetching {HUB_FILE} from {HUB_REPO}", file=sys.stderr, flush=True)
    try:
        with _quiet_hub():
            return Path(huggingface_hub.hf_hub_download(HUB_REPO, HUB_FILE))
    except fetch_errors() as err:
        raise CheckpointError(f"cannot fetch {HUB_FILE} ({_reason(err)}); {howto}") from None


def _howto(flag: str = "--model") -> str:
    return f"download {HUB_FILE} from https://huggingface.co/{HUB_REPO} and pass {flag} PATH (or set ${MODEL_ENV})"


@contextmanager
def _quiet_hub():
    """No huggingface_hub log lines ("Retrying in 1s", "... thrown while requesting HEAD ..."): our own error
    says what failed, in one line."""
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _reason(err: BaseException, limit: int = 120) -> str:
    """The first line of an error, shortened at a word boundary (never mid-word) with "..."."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
    return textwrap.shorten(text, limit, placeholder=" ...")


def load_extractor(
    model=None,
    *,
    device: str = "auto",
    channel_order: str = "BGR",
    label_cap: int | None = None,
    detectron2_config=None,
) -> Extractor:
    """An extractor for `model`: an extractor object as is; with `detectron2_config`, the detectron2 backend on
    the weights `model`; otherwise the TorchScript file :func:`resolve_model_path` finds."""
    if model is not None and not isinstance(model, (str, os.PathLike)):
        return model
    if detectron2_config is not None:
        if model is None:
            raise CheckpointError("the detectron2 backend needs its weights: pass --model MODEL.pkl")
        return Detectron2Extractor(detectron2_config, model, device=device, label_cap=label_cap)
    return TorchScriptExtractor(resolve_model_path(model), device, channel_order, label_cap)
