"""Temporary alias of :mod:`magicanimate.settings` while imports move over (removed before landing)."""

from .settings import default_config, load_config  # noqa: F401
