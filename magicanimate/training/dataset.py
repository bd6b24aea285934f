"""Training samples from a prepared data folder, and the order they are drawn in.

Every random choice of a sample (which frames, the crop and flip, the timestep, the noise, whether the reference is
dropped) comes from one seed that depends only on the run's seed and the sample's number in the run
(:class:`SampleStream`). So a run gives the same samples however many processes share it, whatever the loader's
worker count, and after a resume: sample ``g`` is the same wherever and whenever it is drawn.

Stage 1 draws (reference frame, target frame) pairs of one clip, at least ``min_frame_gap`` frames apart; stage 2 and
lora draw ``clip_frames``-frame clips (every ``clip_stride``-th frame) with a reference frame from the same clip, and
with probability ``image_probability`` a single frame instead (image-video joint training). Still images of the
manifest are always single frames, their own reference.

With ``cached_latents`` a sample carries the cached latent distribution (mean and std, :mod:`.latents`) of its target
frames and the mean of its reference instead of their pixels, so neither ``frames.mp4`` is decoded nor the VAE
encoder runs; its random draws are the same as without, so it is the same sample up to the cache's float16 rounding.
"""

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..densepose.palette import nearest_labels
from ..errors import InputError
from ..settings import SettingError
from .augment import CropFlip, region_mask, render_control
from .manifest import ManifestEntry, read_manifest


@dataclass
class TrainingSample:
    """What one forward pass of training needs, on the CPU.

    ``reference`` ``(H, W, 3)`` uint8; ``frames`` (targets) and ``control`` (their DensePose rendering) ``(F, H, W,
    3)`` uint8; ``weights`` ``(F, H, W)`` float32 loss weights or ``None``; ``timestep`` and ``noise_seed`` fix the
    diffusion noise; ``drop_reference`` trains the unconditional branch; ``number`` is the sample's place in the run.
    With cached latents, ``reference`` and ``frames`` are ``None`` and ``latent_mean``/``latent_std`` ``(F, 4, h, w)``
    (the targets' latent distribution) and ``reference_mean`` ``(4, h, w)`` float16 stand for them.
    """

    reference: np.ndarray | None
    frames: np.ndarray | None
    control: np.ndarray
    weights: np.ndarray | None
    timestep: int
    noise_seed: int
    drop_reference: bool
    number: int
    latent_mean: np.ndarray | None = None
    latent_std: np.ndarray | None = None
    reference_mean: np.ndarray | None = None


def keep_sample(sample):
    """The loader's collate function: samples are used one at a time, as they are (no stacking)."""
    return sample


def sample_seed(seed: int, number: int) -> int:
    """The seed of sample ``number`` of a run seeded ``seed`` (independent streams, as numpy's SeedSequence makes
    them)."""
    return int(np.random.SeedSequence([seed, number]).generate_state(1, np.uint64)[0] >> 1)


class SampleStream:
    """The run's samples as ``(entry index, seed, number)``, in order, for one process.

    Optimizer step ``s`` uses the ``world_size * per_step`` samples numbered ``s * world_size * per_step ...``;
    process ``rank`` takes the ``per_step`` of them starting at ``rank * per_step`` (``per_step`` = batch size x
    accumulation). One process with batch 2 therefore sees the same samples in one step as two processes with
    batch 1 together. Entries are visited in a shuffled order, reshuffled every pass over the data.
    """

    def __init__(self, count: int, seed: int, per_step: int, rank: int = 0, world_size: int = 1, start_step: int = 0):
        self.count, self.seed, self.per_step = count, seed, per_step
        self.rank, self.world_size, self.start_step = rank, world_size, start_step
        self._orders: dict[int, np.ndarray] = {}

    def spec(self, number: int) -> tuple[int, int, int]:
        epoch, position = divmod(number, self.count)
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.count)}
        return int(self._orders[epoch][position]), sample_seed(self.seed, number), number

    def __iter__(self):
        step = self.start_step
        while True:
            first = (step * self.world_size + self.rank) * self.per_step
            for number in range(first, first + self.per_step):
                yield self.spec(number)
            step += 1


def read_frames(path: Path, indices: list[int]) -> dict[int, np.ndarray]:
    """The frames ``indices`` of a video (or the one frame of a PNG), decoded up to the last one needed."""
    from ..io import iter_frames, load_image

    if path.suffix == ".png":
        return dict.fromkeys(indices, np.asarray(load_image(path)))
    wanted, found = set(indices), {}
    for index, frame in enumerate(iter_frames(path, max(indices) + 1)):
        if index in wanted:
            found[index] = frame
    missing = wanted - set(found)
    if missing:
        raise InputError(f"{path} has fewer frames than its manifest entry says (frame {min(missing)} is missing)")
    return found


class TrainingData:
    """The samples of one stage from the ``split`` entries of a prepared data folder (a map-style dataset whose
    keys are :class:`SampleStream` specs)."""

    def __init__(self, root: str | Path, config, split: str = "train"):
        self.root, self.config = Path(root), config
        entries = [entry for entry in read_manifest(self.root) if entry.split == split]
        self.clips = config.stage != "1"
        if self.clips and entries:
            span = (config.clip_frames - 1) * config.clip_stride + 1
            short = [e for e in entries if e.kind == "video" and e.frames < span]
            if short and config.image_probability < 1:
                warnings.warn(
                    f"{len(short)} of {len(entries)} clips are shorter than {span} frames (clip_frames x clip_stride) "
                    "and are left out",
                    stacklevel=2,
                )
                entries = [e for e in entries if e not in short]
        if not entries:
            raise InputError(f"{self.root} has no {split} clips usable for stage {config.stage}")
        self.entries: list[ManifestEntry] = entries
        self.cached = bool(config.get("cached_latents", False))
        self.vae_fingerprints = self.check_latents() if self.cached else {}

    def check_latents(self) -> dict[str, str]:
        """With ``cached_latents``: every entry has latents of its frames at the training resolution. Returns the
        fingerprint of the VAE that made each clip's latents (the trainer compares them with its own VAE's).

        Raises:
            SettingError: the resolution is not the clips' size, or a clip has no (complete) cached latents.
        """
        from .latents import LATENTS_FILE, latents_info

        fingerprints = {}
        for entry in self.entries:
            if entry.size != self.config.resolution:
                raise SettingError(
                    "resolution",
                    f"setting cached_latents needs resolution {entry.size} (the size of clip {entry.name}, whose "
                    f"latents are of the whole frame), got {self.config.resolution}; pass --resolution {entry.size}, "
                    "or --no-cached-latents",
                )
            path = self.root / entry.path / LATENTS_FILE
            info = latents_info(path)
            if info is None or info["shape"][0] != entry.frames or info.get("size") != str(entry.size):
                state = "has no cached latents" if info is None else "has cached latents of other frames"
                raise SettingError(
                    "cached_latents",
                    f"clip {entry.name} {state} ({path}); rerun prepare-data with --cache-latents --pretrained TREE "
                    f"on {self.root}, or use --no-cached-latents",
                )
            fingerprints[entry.name] = info.get("vae_fingerprint", "")
        return fingerprints

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, spec: tuple[int, int, int]) -> TrainingSample:
        index, seed, number = spec
        return self.sample(index, seed, number)

    def sample(self, index: int, seed: int, number: int = 0, evaluation: bool = False) -> TrainingSample:
        """Sample ``number`` of entry ``index`` from ``seed``; ``evaluation`` keeps the reference (no drop), for a
        fixed evaluation batch."""
        config, entry = self.config, self.entries[index]
        rng = np.random.default_rng(seed)
        count = entry.frames
        if entry.kind == "image":
            targets, reference = [0], 0
        elif not self.clips:
            target = int(rng.integers(count))
            gap = min(config.min_frame_gap, max(target, count - 1 - target))  # shorter clips: the farthest frame
            far = [frame for frame in range(count) if abs(frame - target) >= gap]
            targets, reference = [target], int(far[rng.integers(len(far))])
        else:
            if rng.random() < config.image_probability:
                targets = [int(rng.integers(count))]
            else:
                span = (config.clip_frames - 1) * config.clip_stride + 1
                start = int(rng.integers(count - span + 1))
                targets = list(range(start, start + span, config.clip_stride))
            reference = int(rng.integers(count))
        timestep = int(rng.integers(config.num_train_timesteps))
        noise_seed = int(rng.integers(2**62))
        drop = bool(rng.random() < config.reference_drop) and not evaluation
        images_path, densepose_path = entry.files(self.root)
        if self.cached:  # the whole frame at the clip's size (checked at start), no pixels needed
            images, height, width = None, entry.size, entry.size
        else:
            images = read_frames(images_path, sorted({*targets, reference}))
            height, width = images[reference].shape[:2]
        crop = CropFlip.draw(rng, height, width, config.resolution, config.crop_scale, config.flip_probability)
        dense = read_frames(densepose_path, targets)
        labels = crop.labels(np.stack([nearest_labels(dense[t])[0] for t in targets]))
        weights = None
        if config.face_hand_weight != 1:
            weights = np.where(region_mask(labels), np.float32(config.face_hand_weight), np.float32(1))
        sample = TrainingSample(
            reference=None,
            frames=None,
            control=render_control(labels),
            weights=weights,
            timestep=timestep,
            noise_seed=noise_seed,
            drop_reference=drop,
            number=number,
        )
        if self.cached:
            from .latents import LATENTS_FILE, read_latents

            latents = images_path.parent / LATENTS_FILE
            sample.latent_mean, sample.latent_std = read_latents(latents, targets)
            sample.reference_mean = read_latents(latents, [reference])[0][0]
        else:
            sample.reference = crop.images(images[reference])
            sample.frames = crop.images(np.stack([images[t] for t in targets]))
        return sample
