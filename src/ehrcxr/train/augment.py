"""X-ray augmentation on whole batches, on the batch's device: random horizontal flip and random affine
(rotation, isotropic scale, translation), as MedFuse, DrFuse and CareBench do with torchvision transforms."""
from __future__ import annotations

import math

import torch
from torch.nn import functional as F

AUGMENT_KEYS = ("hflip", "degrees", "translate", "scale")


def check_augment(settings: dict | None) -> dict | None:
    """Validate config ``cxr.augment`` (None: off): hflip probability in [0, 1], degrees >= 0,
    translate in [0, 1] (fraction of the side), scale (low, high) with 0 < low <= high."""
    if settings is None:
        return None
    unknown = sorted(set(settings) - set(AUGMENT_KEYS))
    if unknown:
        raise ValueError(f"cxr.augment: unknown key(s) {unknown}; allowed: {', '.join(AUGMENT_KEYS)}")
    checked = {"hflip": float(settings.get("hflip", 0.0)), "degrees": float(settings.get("degrees", 0.0)),
               "translate": float(settings.get("translate", 0.0)),
               "scale": tuple(float(s) for s in settings.get("scale", (1.0, 1.0)))}
    low, high = checked["scale"] if len(checked["scale"]) == 2 else (0.0, -1.0)
    if not (0 <= checked["hflip"] <= 1 and checked["degrees"] >= 0 and 0 <= checked["translate"] <= 1
            and 0 < low <= high):
        raise ValueError(f"cxr.augment out of range: {settings}")
    return checked


def affine_matrices(n: int, settings: dict, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """(n, 2, 3) matrices for ``F.affine_grid``: each maps an output pixel to where it samples the input.

    Per image: flip with probability ``hflip``; angle ~ U(−degrees, degrees); scale ~ U(scale); shift of
    each axis ~ U(−translate, translate) of the side. The draws come from ``generator`` (on ``device``).
    """
    draws = torch.rand(n, 5, generator=generator, device=device)
    flip = torch.where(draws[:, 0] < settings["hflip"], -1.0, 1.0)
    angle = (draws[:, 1] * 2 - 1) * math.radians(settings["degrees"])
    low, high = settings["scale"]
    scale = low + draws[:, 2] * (high - low)
    shift = (draws[:, 3:] * 2 - 1) * (2 * settings["translate"])  # affine_grid spans [-1, 1]: a side is 2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 0, 1] = cos * flip, -sin
    theta[:, 1, 0], theta[:, 1, 1] = sin * flip, cos
    theta[:, :, 2] = shift
    return theta


def augment_images(images: torch.Tensor, settings: dict, generator: torch.Generator) -> torch.Tensor:
    """Augment (B, C, H, W) images with values in [0, 1] (bilinear, black outside the image)."""
    theta = affine_matrices(images.shape[0], settings, generator, images.device).to(images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
