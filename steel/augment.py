"""Training augmentations: albumentations pipelines by name, crops/resize, and the defect blackout.

Images are grey uint8 (H, W); masks are uint8 (H, W, 4) (albumentations' channel-last layout).
``build_train_transform`` returns an ``A.Compose`` called as ``t(image=img, mask=masks)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import albumentations as A
import cv2
import numpy as np

from steel.errors import SteelError


def _light() -> list[A.BasicTransform]:
    """1st place recipe: flips and brightness/contrast."""
    return [
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5),
    ]


def _medium() -> list[A.BasicTransform]:
    """Light + small affine jitter, gamma and mild noise/blur."""
    return _light() + [
        A.Affine(
            scale=(0.9, 1.1),
            translate_percent=(-0.05, 0.05),
            rotate=(-5, 5),
            border_mode=cv2.BORDER_REFLECT_101,
            p=0.3,
        ),
        A.RandomGamma(gamma_limit=(85, 115), p=0.2),
        A.OneOf(
            [
                A.GaussNoise(std_range=(0.02, 0.06)),
                A.GaussianBlur(blur_limit=(3, 5)),
                A.MotionBlur(blur_limit=(3, 5)),
            ],
            p=0.2,
        ),
    ]


def _heavy() -> list[A.BasicTransform]:
    """Medium + distortions, local contrast and dropout holes (image only; masks keep their pixels)."""
    return _medium() + [
        A.GridDistortion(num_steps=5, distort_limit=0.2, border_mode=cv2.BORDER_REFLECT_101, p=0.2),
        A.CLAHE(clip_limit=2.0, p=0.2),
        A.Sharpen(p=0.1),
        A.CoarseDropout(
            num_holes_range=(1, 4), hole_height_range=(0.05, 0.15), hole_width_range=(0.02, 0.08), p=0.2
        ),
    ]


AUGMENTS: dict[str, Callable[[], list[A.BasicTransform]]] = {
    "none": list,
    "light": _light,
    "medium": _medium,
    "heavy": _heavy,
}


def _size(value: list[int] | tuple[int, int] | None, name: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if len(value) != 2 or any(int(v) <= 0 or int(v) % 32 for v in value):
        raise SteelError(f"{name} {list(value)}: need [height, width], positive multiples of 32")
    return int(value[0]), int(value[1])


def build_train_transform(
    augment: str = "light",
    crop: list[int] | tuple[int, int] | None = None,
    resize: list[int] | tuple[int, int] | None = None,
    defect_crop_p: float = 0.0,
) -> A.Compose:
    """Resize (optional), random crop (optional; with prob ``defect_crop_p`` a crop containing defect pixels)
    and the named augmentation list. Crop and resize sizes must be multiples of 32."""
    if augment not in AUGMENTS:
        raise SteelError(f"augment {augment!r}: choose one of {', '.join(AUGMENTS)}")
    if not 0.0 <= defect_crop_p <= 1.0:
        raise SteelError(f"defect_crop_p {defect_crop_p}: must be in [0, 1]")
    crop, resize = _size(crop, "train_crop"), _size(resize, "train_resize")
    steps: list[A.BasicTransform] = []
    if resize is not None:
        steps.append(A.Resize(*resize))
    if crop is not None:
        h, w = crop
        steps.append(A.PadIfNeeded(min_height=h, min_width=w, border_mode=cv2.BORDER_REFLECT_101))
        if defect_crop_p >= 1.0:
            steps.append(A.CropNonEmptyMaskIfExists(h, w))
        elif defect_crop_p > 0.0:
            steps.append(
                A.OneOf(
                    [
                        A.CropNonEmptyMaskIfExists(h, w, p=defect_crop_p),
                        A.RandomCrop(h, w, p=1.0 - defect_crop_p),
                    ],
                    p=1.0,
                )
            )
        else:
            steps.append(A.RandomCrop(h, w))
    steps += AUGMENTS[augment]()
    return A.Compose(steps)


class DefectBlackout:
    """With probability ``p`` erase all pixels of one present defect class: its (dilated) region is filled with the
    per-row median of the image's defect-free pixels plus noise of their spread, and that class's mask is cleared
    (so its label drops too). Works on image uint8 (H, W) and masks uint8 (H, W, C)."""

    def __init__(self, p: float = 0.5, dilate: int = 3) -> None:
        if not 0.0 <= p <= 1.0:
            raise SteelError(f"blackout_p {p}: must be in [0, 1]")
        self.p, self.dilate = p, dilate

    def __call__(self, image: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        present = np.flatnonzero(masks.reshape(-1, masks.shape[-1]).any(0))
        if present.size == 0 or np.random.random() >= self.p:
            return image, masks
        c = int(np.random.choice(present))
        region = masks[..., c]
        if self.dilate > 0:
            k = 2 * self.dilate + 1
            region = cv2.dilate(region, np.ones((k, k), np.uint8))
        region = region.astype(bool) & ~np.delete(masks, c, axis=-1).any(
            -1
        )  # other classes keep their pixels
        background = np.where(masks.any(-1), np.nan, image.astype(np.float32))
        with warnings.catch_warnings():  # rows that are all defect give NaN medians; replaced below
            warnings.simplefilter("ignore", RuntimeWarning)
            row_med = np.nanmedian(background, axis=1)
            overall = np.nanmedian(background)
        if np.isnan(overall):
            row_med, spread = np.full(image.shape[0], float(np.median(image))), 0.0
        else:
            row_med = np.where(np.isnan(row_med), overall, row_med)
            spread = float(np.nanstd(background - row_med[:, None]))
        ys, xs = np.nonzero(region)
        fill = row_med[ys] + np.random.normal(0.0, spread, ys.size)
        out = image.copy()
        out[ys, xs] = np.clip(fill, 0, 255).astype(np.uint8)
        masks = masks.copy()
        masks[..., c] = 0
        return out, masks
