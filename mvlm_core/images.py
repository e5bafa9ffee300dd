"""An image a command is given (bench --image, verify --image, quantize --image), checked before any work."""

from __future__ import annotations

from pathlib import Path

from mvlm_core.errors import MvlmError


def check_image_file(path: Path | str, option: str = "--image") -> None:
    """An image a command was given, checked before any work: a file PIL reads as an image, of at most PIL's
    decompression-bomb limit of pixels (a 60000x60000 PNG is a few KB and would take gigabytes to decode)."""
    from PIL import Image  # only when an image is given: the command line starts without it

    p = Path(path)
    try:
        ok = p.is_file()
    except OSError as e:
        raise MvlmError(f"{option} {str(p)[:80]}: cannot be read ({e.strerror or e}); give a PNG or JPEG image") from None
    if not ok:
        raise MvlmError(f"{option} {p} does not exist or is not a file: give a PNG or JPEG image")
    try:
        with Image.open(p) as im:
            w, h = im.size
            im.verify()
    except Image.DecompressionBombError:
        raise MvlmError(f"{option} {p} declares more pixels than an image to embed can have (a decompression bomb?): "
                        "give a photo-sized PNG or JPEG") from None
    except Exception as e:  # PIL raises many types for a non-image  # noqa: BLE001
        raise MvlmError(f"{option} {p} is not an image PIL can read ({type(e).__name__}): give a PNG or JPEG") from None
    if Image.MAX_IMAGE_PIXELS and w * h > Image.MAX_IMAGE_PIXELS:
        raise MvlmError(f"{option} {p} is {w}x{h} pixels, more than an image to embed can have "
                        f"({Image.MAX_IMAGE_PIXELS}): give a photo-sized PNG or JPEG")
