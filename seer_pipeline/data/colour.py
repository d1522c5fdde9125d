"""Colour jitter and grayscale on uint8 crops, compiled with numba, with PIL's arithmetic.

Each operation reproduces the PIL call the SwAV reference makes, pixel for pixel (same luma
weights, float32 blends truncated to uint8, the HSV round trip of PIL's Convert.c with its float /
double mix and round-half-away-from-zero), so the output distribution is the reference's. PIL's
HSV round trip costs ~1.3 ms per 224 px crop on this machine, more than all the rest of a crop's
augmentation; a compiled loop over the pixels does the whole jitter in one pass per operation.
"""
from __future__ import annotations

import math

import numba
import numpy as np

# Pillow's ITU-R 601 luma in 16-bit fixed point (Convert.c, L24): L = (19595 R + 38470 G + 7471 B
# + 0x8000) >> 16, i.e. 0.299/0.587/0.114 rounded.
_LR, _LG, _LB = 19595, 38470, 7471


@numba.njit(cache=True, inline="always")
def _luma(r: int, g: int, b: int) -> int:
    return (r * _LR + g * _LG + b * _LB + 0x8000) >> 16


@numba.njit(cache=True, inline="always")
def _blend(base: float, v: int, alpha: np.float32) -> int:
    # Pillow Blend.c: float temp = in1 + alpha * (in2 - in1); clip; truncate
    t = np.float32(base + alpha * np.float32(v - base))
    if t <= 0.0:
        return 0
    if t >= 255.0:
        return 255
    return int(t)


@numba.njit(cache=True, inline="always")
def _round_c(x: float) -> int:
    # C round(): half away from zero
    return int(math.floor(x + 0.5)) if x >= 0 else -int(math.floor(-x + 0.5))


@numba.njit(cache=True)
def _hue(a: np.ndarray, shift: int) -> None:
    h_, w_ = a.shape[0], a.shape[1]
    for y in range(h_):
        for x in range(w_):
            r, g, b = np.int32(a[y, x, 0]), np.int32(a[y, x, 1]), np.int32(a[y, x, 2])
            mx, mn = max(r, g, b), min(r, g, b)
            if mx == mn:
                continue  # s == 0: gray stays gray whatever the hue
            cr = np.float32(mx - mn)
            s = cr / np.float32(mx)
            rc, gc, bc = np.float32(mx - r) / cr, np.float32(mx - g) / cr, np.float32(mx - b) / cr
            if r == mx:
                hf = np.float32(bc - gc)
            elif g == mx:
                hf = np.float32(2.0 + rc - bc)
            else:
                hf = np.float32(4.0 + gc - rc)
            hx = hf / 6.0 + 1.0  # in [5/6, 11/6]: fmod(hx, 1) is hx - floor(hx), exactly
            hf = np.float32(hx - math.floor(hx))
            uh = min(max(int(hf * 255.0), 0), 255)
            us = min(max(int(s * 255.0), 0), 255)
            uh = (uh + shift) & 0xFF
            if us == 0:
                a[y, x, 0] = a[y, x, 1] = a[y, x, 2] = mx
                continue
            h6 = np.float32(uh) * 6.0 / 255.0
            i = int(math.floor(h6))
            f = np.float32(h6 - i)
            fs = np.float32(us / 255.0)
            p = min(max(_round_c(mx * (1.0 - fs)), 0), 255)
            q = min(max(_round_c(mx * (1.0 - fs * f)), 0), 255)
            t = min(max(_round_c(mx * (1.0 - fs * (1.0 - f))), 0), 255)
            k = i % 6
            if k == 0:
                r, g, b = mx, t, p
            elif k == 1:
                r, g, b = q, mx, p
            elif k == 2:
                r, g, b = p, mx, t
            elif k == 3:
                r, g, b = p, q, mx
            elif k == 4:
                r, g, b = t, p, mx
            else:
                r, g, b = mx, p, q
            a[y, x, 0], a[y, x, 1], a[y, x, 2] = r, g, b


@numba.njit(cache=True)
def _brightness(a: np.ndarray, f: np.float32) -> None:
    table = np.empty(256, np.uint8)  # ImageEnhance.Brightness: blend with black
    for v in range(256):
        table[v] = _blend(0.0, v, f)
    for y in range(a.shape[0]):
        for x in range(a.shape[1]):
            for c in range(3):
                a[y, x, c] = table[a[y, x, c]]


@numba.njit(cache=True)
def _contrast(a: np.ndarray, f: np.float32) -> None:
    total = 0  # ImageEnhance.Contrast: blend with the rounded mean luma
    for y in range(a.shape[0]):
        for x in range(a.shape[1]):
            total += _luma(np.int64(a[y, x, 0]), np.int64(a[y, x, 1]), np.int64(a[y, x, 2]))
    mean = float(int(total / (a.shape[0] * a.shape[1]) + 0.5))
    table = np.empty(256, np.uint8)
    for v in range(256):
        table[v] = _blend(mean, v, f)
    for y in range(a.shape[0]):
        for x in range(a.shape[1]):
            for c in range(3):
                a[y, x, c] = table[a[y, x, c]]


@numba.njit(cache=True)
def _saturation(a: np.ndarray, f: np.float32) -> None:
    for y in range(a.shape[0]):  # ImageEnhance.Color: blend with the luma, per pixel
        for x in range(a.shape[1]):
            lum = float(_luma(np.int32(a[y, x, 0]), np.int32(a[y, x, 1]), np.int32(a[y, x, 2])))
            for c in range(3):
                a[y, x, c] = _blend(lum, np.int32(a[y, x, c]), f)


@numba.njit(cache=True)
def jitter_inplace(a: np.ndarray, order: np.ndarray, fb: float, fc: float, fs: float, shift: int) -> None:
    """Brightness (0), contrast (1), saturation (2), hue shift (3) on `a` [H,W,3] uint8, in `order`."""
    for k in order:
        if k == 0:
            _brightness(a, np.float32(fb))
        elif k == 1:
            _contrast(a, np.float32(fc))
        elif k == 2:
            _saturation(a, np.float32(fs))
        else:
            _hue(a, shift)


@numba.njit(cache=True)
def gray_inplace(a: np.ndarray) -> None:
    """PIL's convert("L") then back to 3 equal channels."""
    for y in range(a.shape[0]):
        for x in range(a.shape[1]):
            v = _luma(np.int32(a[y, x, 0]), np.int32(a[y, x, 1]), np.int32(a[y, x, 2]))
            a[y, x, 0] = a[y, x, 1] = a[y, x, 2] = v
