"""Loading reference images.

Every image that enters the pipeline goes through :func:`load_image`, so the rest of the code can rely on one
format: an 8-bit RGB :class:`PIL.Image.Image` that is upright as the camera meant it.
"""

import os
import warnings

import numpy as np
from PIL import Image, ImageOps

from ..errors import InputError
from .files import check_readable, permission_denied

ImageInput = str | os.PathLike | Image.Image | np.ndarray
MAX_SIDE = 4096  # longer sides are downscaled on load: the models work at 512, and a 50 MP photo only costs memory
MIN_SIDE = 8  # the VAE's factor: a smaller reference has no latent pixel (see ``min_side``)


def _from_array(array: np.ndarray) -> Image.Image:
    if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise InputError(
            f"image array has shape {array.shape} and dtype {array.dtype}; pass a uint8 array of shape (H, W), "
            "(H, W, 3) or (H, W, 4)"
        )
    mode = "L" if array.ndim == 2 else {3: "RGB", 4: "RGBA"}[array.shape[2]]
    return Image.fromarray(np.ascontiguousarray(array), mode)


def _to_rgb(image: Image.Image, name: str) -> Image.Image:
    # 16/32-bit integer grayscale: PIL's convert("L") clips instead of rescaling, so scale by hand.
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(image, dtype=np.int64)
        scale = 65535 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255
        image = Image.fromarray((np.clip(values, 0, scale) * 255 / scale).round().astype(np.uint8), "L")
    elif image.mode == "F":
        image = Image.fromarray((np.clip(np.asarray(image), 0, 1) * 255).round().astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        if rgba.getextrema()[3][0] < 255:  # an alpha channel that is fully opaque is not worth a warning
            # The models were trained on opaque photos; a white matte is the least surprising background.
            warnings.warn(f"{name} has transparency; compositing it over a white background", stacklevel=3)
            rgba = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        return rgba.convert("RGB")
    return image.convert("RGB")


def load_image(source: ImageInput, min_side: int = 1) -> Image.Image:
    """Load a path, PIL image or uint8 numpy array as an upright 8-bit RGB PIL image.

    EXIF orientation is applied (phones store portraits sideways), transparent pixels are composited over white
    (with a warning), and grayscale, palette, CMYK and 16-bit images are converted to 8-bit RGB. An image whose
    longer side exceeds :data:`MAX_SIDE` is downscaled (with a warning); one with a side under `min_side` pixels
    is refused (references need :data:`MIN_SIDE`).

    A path is checked by :func:`~magicanimate.io.files.check_readable` first, so a missing file, a folder, an empty
    file, a Git LFS pointer or a file without read permission is named as what it is, not as a damaged image.

    Raises:
        InputError: the file is missing or unreadable (see above), is not an image, or the image is empty or
            smaller than `min_side`.
    """
    if isinstance(source, np.ndarray):
        name, image = "image array", _from_array(source)
    elif isinstance(source, Image.Image):
        name, image = "image", source
    elif isinstance(source, (str, os.PathLike)):
        name = os.fspath(check_readable(source, "image file"))
        try:
            with Image.open(name) as opened:
                opened.load()
                # exif_transpose returns a detached copy, so the file can be closed right away.
                image = ImageOps.exif_transpose(opened)
        except PermissionError:  # before OSError: a file we may not read is not a corrupt one
            raise permission_denied(name, "image file") from None
        except Image.DecompressionBombError:
            raise InputError(f"{name} is too large to decode safely; pass an image under 100 megapixels") from None
        except (OSError, SyntaxError, ValueError):  # UnidentifiedImageError is an OSError
            message = f"cannot read image {name}: not an image or corrupted; pass a PNG, JPEG or WebP file"
            raise InputError(message) from None
    else:
        raise InputError(f"cannot load an image from {type(source).__name__}; pass a path, PIL image or numpy array")

    if image.width == 0 or image.height == 0:
        raise InputError(f"{name} has zero size ({image.width}x{image.height}); pass a non-empty image")
    if min(image.size) < min_side:
        raise InputError(
            f"{name} is too small ({image.width}x{image.height}); pass an image at least {min_side} pixels on each "
            "side (512 or more works best)"
        )
    if not isinstance(source, (str, os.PathLike)):
        image = ImageOps.exif_transpose(image)  # a copy: the caller's image is never modified
    image = _to_rgb(image, name)
    if max(image.size) > MAX_SIDE:
        scale = MAX_SIDE / max(image.size)
        size = (max(MIN_SIDE, round(image.width * scale)), max(MIN_SIDE, round(image.height * scale)))
        warnings.warn(
            f"{name} is {image.width}x{image.height}; downscaling it to {size[0]}x{size[1]} (longer side {MAX_SIDE})",
            stacklevel=2,
        )
        image = image.resize(size, Image.LANCZOS)
    return image
