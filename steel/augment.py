"""Training augmentations: albumentations pipelines by name, crops/resize, and the defect blackout.

Images are grey uint8 (H, W); masks are uint8 (C, H, W) 0/1, channel first as the model takes them, given as
an array or as a ``steel.rle.RunMasks`` (RLE runs: a crop then decodes only its window).
``build_train_transform`` returns a ``TrainTransform`` called as ``image, masks = t(image, masks)``.
Randomness comes from a generator per DataLoader worker, seeded from torch's per-worker seed, so workers
draw different crops and ``seed_everything`` makes runs repeatable.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import albumentations as A
import cv2
import numpy as np
import torch

from steel.errors import SteelError
from steel.rle import RunMasks, pack_masks

Masks = np.ndarray | RunMasks


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


def _as_array(masks: Masks) -> np.ndarray:
    return masks.decode() if isinstance(masks, RunMasks) else masks


# 9th place: a crop is "black" (off the strip, beyond its edge) when more than 85 % of its pixels are below 10
# or its mean is below 15; such a crop moves to the end of the image that shows steel
DARK_LEVEL, DARK_SHARE, DARK_MEAN = 10, 0.85, 15.0


def mostly_black(window: np.ndarray) -> bool:
    """True when a grey uint8 window (h, w) is mostly the black margin beyond the steel strip's edge."""
    return bool((window < DARK_LEVEL).mean() > DARK_SHARE or window.mean() < DARK_MEAN)


def _defect_pixel(masks: Masks, rng: np.random.Generator) -> tuple[int, int] | None:
    """(y, x) of a random pixel of a random present class; None when the masks are empty."""
    if isinstance(masks, RunMasks):
        if not masks.present.size:
            return None
        c = int(rng.choice(masks.present))
        return masks.pixel(c, int(rng.integers(masks.areas[c])))
    present = np.flatnonzero(masks.any(axis=(1, 2)))
    if not present.size:
        return None
    ys, xs = np.nonzero(masks[rng.choice(present)])
    k = int(rng.integers(ys.size))
    return int(ys[k]), int(xs[k])


class DefectAwareCrop:
    """Random (height, width) window of image (H, W) and masks (C, H, W); with probability ``defect_p`` (and
    when the masks have pixels) the window contains a random defect pixel. The image comes back as a view, the
    masks decoded for the window only (RunMasks) or as a view; inputs smaller than the window are
    reflect-padded first. ``avoid_black``: a random (not defect) window that is ``mostly_black`` moves to the
    left or right end of the image, whichever is not (a random one if both are not, else the right end)."""

    def __init__(self, height: int, width: int, defect_p: float = 0.0, avoid_black: bool = False) -> None:
        if not 0.0 <= defect_p <= 1.0:
            raise SteelError(f"defect_crop_p {defect_p}: must be in [0, 1]")
        self.h, self.w, self.defect_p, self.avoid_black = height, width, defect_p, avoid_black

    def __call__(
        self, image: np.ndarray, masks: Masks, rng: np.random.Generator | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        image, masks, y0, x0 = self.place(image, masks, rng)
        if isinstance(masks, RunMasks):
            return image, masks.window(y0, x0, self.h, self.w)
        return image, masks[:, y0 : y0 + self.h, x0 : x0 + self.w]

    def place(
        self, image: np.ndarray, masks: Masks, rng: np.random.Generator | None = None
    ) -> tuple[np.ndarray, Masks, int, int]:
        """(image window (view), masks (reflect-padded arrays if the input was small), y0, x0): the window
        ``__call__`` cuts, before the masks are cut."""
        rng = np.random.default_rng() if rng is None else rng
        H, W = image.shape[:2]
        if H < self.h or W < self.w:
            ph, pw = max(0, self.h - H), max(0, self.w - W)
            image = np.pad(image, ((0, ph), (0, pw)), mode="reflect")
            masks = np.pad(_as_array(masks), ((0, 0), (0, ph), (0, pw)), mode="reflect")
            H, W = image.shape[:2]
        y0, x0 = int(rng.integers(H - self.h + 1)), int(rng.integers(W - self.w + 1))
        pixel = None
        if self.defect_p > 0 and rng.random() < self.defect_p:
            pixel = _defect_pixel(masks, rng)
            if pixel is not None:  # window start so that the pixel falls at a random place inside it
                y0 = int(np.clip(pixel[0] - rng.integers(self.h), 0, H - self.h))
                x0 = int(np.clip(pixel[1] - rng.integers(self.w), 0, W - self.w))
        rows = slice(y0, y0 + self.h)
        if self.avoid_black and pixel is None and mostly_black(image[rows, x0 : x0 + self.w]):
            ends = [x for x in (0, W - self.w) if not mostly_black(image[rows, x : x + self.w])]
            x0 = int(rng.choice(ends)) if ends else W - self.w
        return image[y0 : y0 + self.h, x0 : x0 + self.w], masks, y0, x0


class TrainTransform:
    """The training pipeline on image uint8 (H, W) and masks (C, H, W) (array or RunMasks):
    resize (optional) -> crop (optional, defect-aware with prob ``defect_crop_p``, off the black margin with
    ``avoid_black``) -> defect blackout (prob ``blackout_p``) -> the named albumentations list, which sees only
    the masks that have pixels (an empty mask stays empty under every transform here). Cropping first keeps
    every copy crop-sized.
    Returns contiguous (image uint8 (h, w), masks uint8 (C, h, w))."""

    def __init__(
        self,
        augment: str = "light",
        crop: list[int] | tuple[int, int] | None = None,
        resize: list[int] | tuple[int, int] | None = None,
        defect_crop_p: float = 0.0,
        blackout_p: float = 0.0,
        avoid_black: bool = False,
    ) -> None:
        if augment not in AUGMENTS:
            raise SteelError(f"augment {augment!r}: choose one of {', '.join(AUGMENTS)}")
        if not 0.0 <= defect_crop_p <= 1.0:
            raise SteelError(f"defect_crop_p {defect_crop_p}: must be in [0, 1]")
        crop, resize = _size(crop, "train_crop"), _size(resize, "train_resize")
        self.resize = resize
        self.crop = DefectAwareCrop(*crop, defect_crop_p, avoid_black) if crop is not None else None
        self.blackout = DefectBlackout(blackout_p) if blackout_p > 0 else None
        self.augs = A.Compose(AUGMENTS[augment]())
        self._seed: int | None = None

    def _generator(self) -> np.random.Generator:
        """This process's generator, (re)seeded when torch's seed changes: a DataLoader worker starts with its
        own torch seed (base seed drawn from the main process + worker id), the main process keeps its own."""
        seed = torch.initial_seed()
        if seed != self._seed:
            self._seed, self._rng = seed, np.random.default_rng(seed)
            self.augs.set_random_state(np.random.default_rng([seed, 1]), random.Random(seed))
        return self._rng

    def packed(self, image: np.ndarray, masks: Masks) -> tuple[np.ndarray, np.ndarray]:
        """``self(image, masks)`` with the masks as ``steel.rle.pack_masks`` gives them: uint8 (h, w), bit c set
        where mask c is (C <= 8). The same pixels and random draws as ``__call__``; for RunMasks without
        resize or blackout the window is decoded straight into the bits and the augmentations see one
        packed mask (every mask transform here moves pixels, nearest-neighbour, or leaves them)."""
        if self.resize is not None or self.blackout is not None or not isinstance(masks, RunMasks):
            image, masks = self(image, masks)
            return image, pack_masks(masks)
        rng = self._generator()
        if self.crop is not None:
            image, masks, y0, x0 = self.crop.place(image, masks, rng)
            h, w = self.crop.h, self.crop.w
        else:
            (y0, x0), (h, w) = (0, 0), image.shape
        bits = masks.packed_window(y0, x0, h, w) if isinstance(masks, RunMasks) else pack_masks(
            masks[:, y0 : y0 + h, x0 : x0 + w])  # fmt: skip
        image = np.ascontiguousarray(image)
        if self.augs.transforms:
            out = self.augs(image=image, mask=bits) if bits.any() else self.augs(image=image)
            image, bits = np.ascontiguousarray(out["image"]), np.ascontiguousarray(out.get("mask", bits))
        return image, bits

    def __call__(self, image: np.ndarray, masks: Masks) -> tuple[np.ndarray, np.ndarray]:
        rng = self._generator()
        if self.resize is not None:
            h, w = self.resize
            masks = _as_array(masks)
            image = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
            masks = np.stack([cv2.resize(m, (w, h), interpolation=cv2.INTER_NEAREST) for m in masks])
        if self.crop is not None:
            image, masks = self.crop(image, masks, rng)
        image, masks = np.ascontiguousarray(image), np.ascontiguousarray(_as_array(masks))
        if self.blackout is not None:
            image, masks = self.blackout(image, masks, rng)
        if self.augs.transforms:
            present = np.flatnonzero(masks.any(axis=(1, 2)))
            if present.size:
                out = self.augs(image=image, masks=masks[present])
                masks = np.zeros_like(masks)
                masks[present] = out["masks"]
            else:
                out = self.augs(image=image)
            image = np.ascontiguousarray(out["image"])
        return image, masks


def build_train_transform(
    augment: str = "light",
    crop: list[int] | tuple[int, int] | None = None,
    resize: list[int] | tuple[int, int] | None = None,
    defect_crop_p: float = 0.0,
    blackout_p: float = 0.0,
    avoid_black: bool = False,
) -> TrainTransform:
    """The training pipeline (``TrainTransform``); crop and resize sizes must be multiples of 32."""
    return TrainTransform(augment, crop, resize, defect_crop_p, blackout_p, avoid_black)


class DefectBlackout:
    """With probability ``p`` erase all pixels of one present defect class: its (dilated) region is filled with the
    per-row median of the image's defect-free pixels plus noise of their spread, and that class's mask is cleared
    (so its label drops too). Works on image uint8 (H, W) and masks uint8 (C, H, W)."""

    def __init__(self, p: float = 0.5, dilate: int = 3) -> None:
        if not 0.0 <= p <= 1.0:
            raise SteelError(f"blackout_p {p}: must be in [0, 1]")
        self.p, self.dilate = p, dilate

    def __call__(
        self, image: np.ndarray, masks: np.ndarray, rng: np.random.Generator | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng() if rng is None else rng
        present = np.flatnonzero(masks.any(axis=(1, 2)))
        if present.size == 0 or rng.random() >= self.p:
            return image, masks
        c = int(rng.choice(present))
        region = np.ascontiguousarray(masks[c])
        if self.dilate > 0:
            k = 2 * self.dilate + 1
            region = cv2.dilate(region, np.ones((k, k), np.uint8))
        others = np.delete(masks, c, axis=0).any(0)
        region = region.astype(bool) & ~others  # other classes keep their pixels
        rows = np.flatnonzero(region.any(1))
        sub = image[rows].astype(np.float32)
        bg = ~masks[:, rows].any(0)  # defect-free pixels of those rows
        count = bg.sum(1)
        ordered = np.sort(np.where(bg, sub, np.inf), axis=1)  # background values first, per row
        if (count == 0).any():  # rows that are all defect: the image's background median, or the image's
            free = ~masks.any(0)
            fallback = float(np.median(image[free])) if free.any() else float(np.median(image))
        else:
            fallback = 0.0
        row_med = np.where(count > 0, ordered[np.arange(len(rows)), np.maximum(count - 1, 0) // 2], fallback)
        spread = float(np.std((sub - row_med[:, None])[bg])) if bg.any() else 0.0
        ys, xs = np.nonzero(region[rows])
        fill = row_med[ys] + rng.normal(0.0, spread, ys.size)
        ys = rows[ys]
        out = image.copy()
        out[ys, xs] = np.clip(fill, 0, 255).astype(np.uint8)
        masks = masks.copy()
        masks[c] = 0
        return out, masks
