"""Slices of any in-plane size <-> the network's square size, reversibly from (rows, cols).

``fit="resize"`` stretches (the original study's choice); ``fit="pad"`` zero-pads to a centred
square first, keeping the aspect ratio. PrepareSettings checks ``fit``.
"""

from __future__ import annotations

import cv2
import numpy as np

FIT_MODES = ("resize", "pad")


def _square_padding(rows: int, cols: int) -> tuple[int, int, int]:
    side = max(rows, cols)
    return side, (side - rows) // 2, (side - cols) // 2


def fit_slice(image: np.ndarray, size: int, fit: str, nearest: bool = False) -> np.ndarray:
    """(rows, cols[, C]) -> (size, size[, C]); masks use nearest-neighbour interpolation."""
    if fit == "pad":
        rows, cols = image.shape[:2]
        side, top, left = _square_padding(rows, cols)
        padded = np.zeros((side, side) + image.shape[2:], dtype=image.dtype)
        padded[top : top + rows, left : left + cols] = image
        image = padded
    if image.shape[:2] == (size, size):
        return image.copy()
    if nearest:  # sampled at pixel centres: INTER_NEAREST is shifted by up to half a pixel
        interpolation = cv2.INTER_NEAREST_EXACT
    else:
        interpolation = cv2.INTER_AREA if image.shape[0] > size else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interpolation)


def unfit_slice(output: np.ndarray, rows: int, cols: int, fit: str) -> np.ndarray:
    """Inverse of :func:`fit_slice` for a float map (probabilities): back to (rows, cols)."""
    output = np.asarray(output, dtype=np.float32)
    if fit == "resize":
        return cv2.resize(output, (cols, rows), interpolation=cv2.INTER_LINEAR)
    side, top, left = _square_padding(rows, cols)
    square = cv2.resize(output, (side, side), interpolation=cv2.INTER_LINEAR)
    return square[top : top + rows, left : left + cols]
