"""The one image reader of steel: grey uint8 (H, W) from JPEG/PNG/BMP files, whatever their extension says.

Truncated or corrupt files raise SteelError naming the file (OpenCV alone returns half-grey pixels for a
truncated JPEG, and libjpeg's warning names no file). ``image_size`` reads (H, W) from the header alone.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from steel.errors import SteelError

_SOI, _SOS, _EOI = b"\xff\xd8", b"\xff\xda", b"\xff\xd9"
_PNG = b"\x89PNG\r\n\x1a\n"


def _check_complete(data: bytes, path: str | os.PathLike) -> None:
    """SteelError if a JPEG or PNG byte string ends early (no end-of-image marker after the last scan)."""
    if data.startswith(_SOI):
        # the usual case, checked without scanning the file: it ends with an end-of-image marker (zero
        # padding aside) and has a start-of-scan; that EOI is then the last one, after every scan, which is
        # what the full check below asks (here a start-of-scan is found near the file's start)
        if data[-64:].rstrip(b"\0").endswith(_EOI) and data.find(_SOS, 2) >= 0:
            return
        # entropy-coded data never holds FF D9 (FF bytes are stuffed), so the real end marker is the last
        # one and follows the last start-of-scan; an embedded thumbnail's EOI comes before the main scans
        sos = data.rfind(_SOS)
        if sos < 0 or data.rfind(_EOI) < sos:
            raise SteelError(
                f"{path}: truncated or corrupt JPEG (no end-of-image marker after the last scan)"
            )
    elif data.startswith(_PNG) and b"IEND" not in data[-32:]:
        raise SteelError(f"{path}: truncated or corrupt PNG (no IEND chunk at the end)")


def read_grey(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as grey uint8 (H, W) (colour is converted as OpenCV's IMREAD_GRAYSCALE does).

    The format is taken from the content (a PNG named .jpg works). Raises SteelError naming the file if it
    is missing, empty, truncated or cannot be decoded.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise SteelError(f"{path}: image not found") from None
    except IsADirectoryError:
        raise SteelError(f"{path}: is a directory, not an image") from None
    except OSError as e:
        raise SteelError(f"{path}: cannot read image ({e.strerror})") from None
    if not data:
        raise SteelError(f"{path}: empty image file (0 bytes)")
    _check_complete(data, path)
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise SteelError(f"{path}: not a readable image (corrupt, or not JPEG/PNG/BMP)")
    return img


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(H, W) of an image from its header, without decoding; SteelError naming the file if it is missing,
    unreadable or (JPEG/PNG) truncated."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as f, Image.open(f) as im:
            w, h = im.size
            f.seek(max(0, os.fstat(f.fileno()).st_size - 32))
            tail = f.read()
            if not tail.rstrip(b"\0").endswith((_EOI, b"IEND\xaeB`\x82")):  # rare: check the whole file
                f.seek(0)
                _check_complete(f.read(), path)
    except SteelError:
        raise
    except FileNotFoundError:
        raise SteelError(f"{path}: image not found") from None
    except IsADirectoryError:
        raise SteelError(f"{path}: is a directory, not an image") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise SteelError(f"{path}: not a readable image (corrupt, or not JPEG/PNG/BMP)") from None
    return int(h), int(w)
