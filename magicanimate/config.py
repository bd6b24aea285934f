"""Settings shared by the CLI and the Python API, with the original's defaults from ``configs/animation.yaml``."""

from importlib.resources import files
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .errors import InputError


def default_config() -> DictConfig:
    """The packaged ``configs/animation.yaml``."""
    return OmegaConf.create((files("magicanimate.configs") / "animation.yaml").read_text())


def load_config(path: str | Path | None = None, **overrides) -> DictConfig:
    """Defaults, then the YAML file at ``path`` (if any), then ``overrides`` (``None`` values are ignored).

    Unknown keys are an error, so a typo never silently falls back to a default.
    """
    config = default_config()
    layers = []
    if path is not None:
        if not Path(path).is_file():
            raise InputError(f"config file not found: {path}")
        layers.append(OmegaConf.load(path))
    layers.append(OmegaConf.create({k: v for k, v in overrides.items() if v is not None}))
    for layer in layers:
        unknown = sorted(set(layer) - set(config))
        if unknown:
            raise InputError(f"unknown setting(s) {', '.join(unknown)}; see configs/animation.yaml for the names")
        config = OmegaConf.merge(config, layer)
    return config
