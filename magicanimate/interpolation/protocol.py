"""The plug-in point for frame interpolators, and :func:`load_interpolator`, which finds one from a setting.

An interpolator is any object (or function) that makes the frame at time ``t`` between two frames::

    interpolator(frame0, frame1, t) -> frame

``frame0``, ``frame1`` and the result are ``(H, W, 3)`` uint8 RGB arrays of one size, ``t`` is a float in (0, 1)
(0 would be ``frame0``, 1 ``frame1``). That is all a learned model (RIFE, FILM, ...) needs to wrap; its weights are
the user's business (loaded in the object's ``__init__``, from wherever its author says).

Optionally, the batch form, called instead of ``__call__`` when present (all the frames of one gap at once, so a
model can run them as one batch, or reuse work shared by the gap)::

    interpolator.interpolate(frame0, frame1, times, motion=None) -> frames  # (len(times), H, W, 3) uint8

``motion`` is ``None`` or the DensePose frames of the whole gap at the frames' size, ``frame0``'s to ``frame1``'s
inclusive (``len(times) + 2`` frames): the pose of every in-between frame is known even though its picture is not,
which the built-in :class:`~magicanimate.interpolation.flow.FlowInterpolator` uses to find the motion.

The ``interpolator`` setting names one: ``"flow"`` (the built-in), the name of an entry point of the
``magicanimate.interpolators`` group (what a package installs, e.g. in its ``pyproject.toml``:
``[project.entry-points."magicanimate.interpolators"] rife = "my_rife:RIFEInterpolator"``), or a dotted path
``package.module:object``. A class is instantiated without arguments; any other object is used as it is.
"""

import importlib
import importlib.metadata
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from ..settings import SettingError

ENTRY_POINT_GROUP = "magicanimate.interpolators"
BUILT_IN = "flow"


@runtime_checkable
class Interpolator(Protocol):
    """Two frames and a time in (0, 1) -> the frame at that time (uint8 ``(H, W, 3)`` RGB arrays)."""

    def __call__(self, frame0: np.ndarray, frame1: np.ndarray, t: float) -> np.ndarray: ...


@runtime_checkable
class BatchInterpolator(Protocol):
    """The optional batch form: every in-between frame of one gap in one call (see the module's docstring)."""

    def interpolate(
        self, frame0: np.ndarray, frame1: np.ndarray, times: Sequence[float], motion: np.ndarray | None = None
    ) -> np.ndarray: ...


def load_interpolator(spec) -> Interpolator:
    """The interpolator that ``spec`` names: an interpolator object (returned as it is; a class is instantiated
    without arguments), ``"flow"``, an entry point name of the ``magicanimate.interpolators`` group, or
    ``"package.module:object"``.

    Raises:
        SettingError: (an :class:`~magicanimate.errors.InputError`, ``key="interpolator"``) in one line, when the
            name cannot be found or imported, creating it fails, or what it names is not an interpolator.
    """
    name = spec.strip() if isinstance(spec, str) else repr(spec)
    found = find_interpolator(spec)
    if isinstance(found, type):
        try:
            found = found()
        except Exception as err:  # noqa: BLE001 - e.g. its weights are missing: the plug-in's message, one line
            raise SettingError("interpolator", f"interpolator {name}: creating it failed: {_said(err)}") from None
    if not callable(found) and not callable(getattr(found, "interpolate", None)):
        raise SettingError(
            "interpolator",
            f"interpolator {name} ({type(found).__name__}) is not an interpolator: it must be callable as "
            "f(frame0, frame1, t) -> frame or have interpolate(frame0, frame1, times, motion=None)",
        )
    return found


def find_interpolator(spec):
    """What ``spec`` names, imported but not created (a class stays a class): how batch checks every job's
    ``interpolator`` before any model loads, without loading a plug-in's weights once per job. Raises as
    :func:`load_interpolator`."""
    if not isinstance(spec, str):
        return spec
    name = spec.strip()
    if name == BUILT_IN:
        from .flow import FlowInterpolator

        return FlowInterpolator
    if ":" in name:
        return _import_object(name)
    if not name or not name.replace("_", "").replace("-", "").replace(".", "").isalnum():
        raise SettingError("interpolator", f"setting interpolator must be {_WHAT}, got {spec!r}")
    found = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP, name=name)
    if not found:
        installed = sorted({point.name for point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)})
        listing = f"installed: {', '.join(installed)}" if installed else "none is installed"
        raise SettingError(
            "interpolator",
            f"interpolator {name!r} is not {BUILT_IN!r}, an entry point of the {ENTRY_POINT_GROUP} group ({listing}) "
            "or a dotted path package.module:object",
        )
    point = next(iter(found))
    try:
        return point.load()
    except Exception as err:  # noqa: BLE001 - whatever the plug-in's import raises, the user gets one line
        raise SettingError(
            "interpolator", f"interpolator {name!r} (entry point {point.value}) cannot be loaded: {_said(err)}"
        ) from None


_WHAT = f"{BUILT_IN!r}, an entry point name of the {ENTRY_POINT_GROUP} group, or a dotted path package.module:object"


def _import_object(path: str):
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise SettingError("interpolator", f"setting interpolator must be {_WHAT}, got {path!r}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and (module_name == err.name or module_name.startswith(err.name + ".")):
            message = f"no module named {module_name!r} on the Python path"  # the module (or its package) itself
        else:
            message = f"importing {module_name} failed: {_said(err)}"
        raise SettingError("interpolator", f"interpolator {path!r}: {message}") from None
    except Exception as err:  # noqa: BLE001 - a plug-in module that fails to import is the user's to fix
        message = f"interpolator {path!r}: importing {module_name} failed: {_said(err)}"
        raise SettingError("interpolator", message) from None
    found = module
    for part in attribute.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            raise SettingError("interpolator", f"interpolator {path!r}: {module_name} has no {attribute!r}") from None
    return found


def interpolator_name(interpolator) -> str:
    """A short name for messages: a function's or class's own name, else the object's class name."""
    return getattr(interpolator, "__name__", None) or type(interpolator).__name__


def _said(err: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    message = str(err).strip().splitlines()
    return f"{type(err).__name__}: {message[0]}" if message else type(err).__name__
