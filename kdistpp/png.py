"""A dependency-free PNG writer and scatter raster, so that the demo needs no plotting library."""

from __future__ import annotations

import struct
import zlib

import numpy as np


def write_png(path, rgb: np.ndarray) -> None:
    """Writes an (H, W, 3) uint8 array as an 8-bit RGB PNG."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[row].tobytes() for row in range(h))  # filter type 0 per row

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def scatter_panel(points: np.ndarray, density: np.ndarray, extent: float, color=(200, 40, 40)) -> np.ndarray:
    """An (S, S, 3) panel: `density` (S, S, rows = +y down) as a blue-white background, points as dots."""
    size = density.shape[0]
    shade = (density / max(density.max(), 1e-12)) ** 0.5
    panel = np.empty((size, size, 3))
    panel[...] = 255 - shade[..., None] * np.array([150.0, 110.0, 40.0])
    cols = ((points[:, 0] + extent) / (2 * extent) * (size - 1)).round().astype(int)
    rows = ((extent - points[:, 1]) / (2 * extent) * (size - 1)).round().astype(int)
    inside = (cols >= 1) & (cols < size - 1) & (rows >= 1) & (rows < size - 1)
    for dr in (0, 1):
        for dc in (0, 1):
            panel[rows[inside] + dr, cols[inside] + dc] = color
    return panel.astype(np.uint8)


def side_by_side(panels: list[np.ndarray], gap: int = 6) -> np.ndarray:
    h = panels[0].shape[0]
    spacer = np.full((h, gap, 3), 255, dtype=np.uint8)
    out = [panels[0]]
    for p in panels[1:]:
        out += [spacer, p]
    return np.concatenate(out, axis=1)
