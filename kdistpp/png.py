"""A dependency-free PNG writer, scatter raster and bitmap-font titles, so that the demo needs no plotting library."""

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
    panel = np.empty((size, size, 3))
    panel[...] = density_colors((density / max(density.max(), 1e-12)) ** 0.5)
    cols = ((points[:, 0] + extent) / (2 * extent) * (size - 1)).round().astype(int)
    rows = ((extent - points[:, 1]) / (2 * extent) * (size - 1)).round().astype(int)
    inside = (cols >= 1) & (cols < size - 1) & (rows >= 1) & (rows < size - 1)
    for dr in (0, 1):
        for dc in (0, 1):
            panel[rows[inside] + dr, cols[inside] + dc] = color
    return panel.astype(np.uint8)


DENSITY_TINT = np.array([150.0, 110.0, 40.0])  # subtracted from white at the densest point


def density_colors(shade: np.ndarray) -> np.ndarray:
    """The background colour for a shade in [0, 1] (square root of the density over its maximum)."""
    return 255 - np.asarray(shade, dtype=float)[..., None] * DENSITY_TINT


def density_legend(width: int, scale: int = 2, margin: int = 4, ramp_width: int = 160) -> np.ndarray:
    """A white (H, width, 3) band saying what the panels show: the background's colour ramp from no
    data density to the highest (the halos around the modes), and what the dots are."""
    height = GLYPH_HEIGHT * scale
    left, right = render_text("no data", scale), render_text("highest data density", scale)
    ramp = density_colors(np.linspace(0.0, 1.0, ramp_width)[None, :].repeat(height, axis=0))
    gap = 3 * GLYPH_WIDTH * scale // 2
    total = left.shape[1] + right.shape[1] + ramp_width + 2 * gap
    row = np.full((height, max(total, width), 3), 255.0)
    x = max((width - total) // 2, 0)
    row[:, x:x + left.shape[1]][left] = 30
    x += left.shape[1] + gap
    row[:, x:x + ramp_width] = ramp
    x += ramp_width + gap
    row[:, x:x + right.shape[1]][right] = 30
    top = np.full((margin, width, 3), 255, dtype=np.uint8)
    dots = title_band(["background: the data density. dots: samples (grey: exact data, red: each method)"], width,
                      scale)
    return np.concatenate([top, row[:, :width].astype(np.uint8), dots], axis=0)


def side_by_side(panels: list[np.ndarray], gap: int = 6) -> np.ndarray:
    h = panels[0].shape[0]
    spacer = np.full((h, gap, 3), 255, dtype=np.uint8)
    out = [panels[0]]
    for p in panels[1:]:
        out += [spacer, p]
    return np.concatenate(out, axis=1)


# A 5x9 bitmap font (7 rows above the baseline, 2 for descenders), one row per word, "#" = ink.
GLYPH_WIDTH, GLYPH_HEIGHT = 5, 9
_GLYPHS = {
    "A": ".###. #...# #...# ##### #...# #...# #...#",
    "B": "####. #...# #...# ####. #...# #...# ####.",
    "C": ".###. #...# #.... #.... #.... #...# .###.",
    "D": "####. #...# #...# #...# #...# #...# ####.",
    "E": "##### #.... #.... ####. #.... #.... #####",
    "F": "##### #.... #.... ####. #.... #.... #....",
    "G": ".###. #...# #.... #.### #...# #...# .####",
    "H": "#...# #...# #...# ##### #...# #...# #...#",
    "I": ".###. ..#.. ..#.. ..#.. ..#.. ..#.. .###.",
    "J": "..### ...#. ...#. ...#. ...#. #..#. .##..",
    "K": "#...# #..#. #.#.. ##... #.#.. #..#. #...#",
    "L": "#.... #.... #.... #.... #.... #.... #####",
    "M": "#...# ##.## #.#.# #.#.# #...# #...# #...#",
    "N": "#...# #...# ##..# #.#.# #..## #...# #...#",
    "O": ".###. #...# #...# #...# #...# #...# .###.",
    "P": "####. #...# #...# ####. #.... #.... #....",
    "Q": ".###. #...# #...# #...# #.#.# #..#. .##.#",
    "R": "####. #...# #...# ####. #.#.. #..#. #...#",
    "S": ".#### #.... #.... .###. ....# ....# ####.",
    "T": "##### ..#.. ..#.. ..#.. ..#.. ..#.. ..#..",
    "U": "#...# #...# #...# #...# #...# #...# .###.",
    "V": "#...# #...# #...# #...# #...# .#.#. ..#..",
    "W": "#...# #...# #...# #.#.# #.#.# #.#.# .#.#.",
    "X": "#...# #...# .#.#. ..#.. .#.#. #...# #...#",
    "Y": "#...# #...# .#.#. ..#.. ..#.. ..#.. ..#..",
    "Z": "##### ....# ...#. ..#.. .#... #.... #####",
    "a": "..... ..... .###. ....# .#### #...# .####",
    "b": "#.... #.... #.##. ##..# #...# #...# ####.",
    "c": "..... ..... .###. #.... #.... #...# .###.",
    "d": "....# ....# .##.# #..## #...# #...# .####",
    "e": "..... ..... .###. #...# ##### #.... .###.",
    "f": "..##. .#..# .#... ###.. .#... .#... .#...",
    "g": "..... ..... .#### #...# #...# #...# .#### ....# .###.",
    "h": "#.... #.... #.##. ##..# #...# #...# #...#",
    "i": "..#.. ..... .##.. ..#.. ..#.. ..#.. .###.",
    "j": "...#. ..... ..##. ...#. ...#. ...#. ...#. #..#. .##..",
    "k": "#.... #.... #..#. #.#.. ##... #.#.. #..#.",
    "l": ".##.. ..#.. ..#.. ..#.. ..#.. ..#.. .###.",
    "m": "..... ..... ##.#. #.#.# #.#.# #.#.# #.#.#",
    "n": "..... ..... #.##. ##..# #...# #...# #...#",
    "o": "..... ..... .###. #...# #...# #...# .###.",
    "p": "..... ..... ####. #...# #...# #...# ####. #.... #....",
    "q": "..... ..... .#### #...# #...# #...# .#### ....# ....#",
    "r": "..... ..... #.##. ##..# #.... #.... #....",
    "s": "..... ..... .#### #.... .###. ....# ####.",
    "t": ".#... .#... ###.. .#... .#... .#..# ..##.",
    "u": "..... ..... #...# #...# #...# #..## .##.#",
    "v": "..... ..... #...# #...# #...# .#.#. ..#..",
    "w": "..... ..... #...# #...# #.#.# #.#.# .#.#.",
    "x": "..... ..... #...# .#.#. ..#.. .#.#. #...#",
    "y": "..... ..... #...# #...# #...# #...# .#### ....# .###.",
    "z": "..... ..... ##### ...#. ..#.. .#... #####",
    "0": ".###. #...# #..## #.#.# ##..# #...# .###.",
    "1": "..#.. .##.. ..#.. ..#.. ..#.. ..#.. .###.",
    "2": ".###. #...# ....# ...#. ..#.. .#... #####",
    "3": "##### ...#. ..#.. ...#. ....# #...# .###.",
    "4": "...#. ..##. .#.#. #..#. ##### ...#. ...#.",
    "5": "##### #.... ####. ....# ....# #...# .###.",
    "6": "..##. .#... #.... ####. #...# #...# .###.",
    "7": "##### ....# ...#. ..#.. .#... .#... .#...",
    "8": ".###. #...# #...# .###. #...# #...# .###.",
    "9": ".###. #...# #...# .#### ....# ...#. .##..",
    " ": "",
    "+": "..... ..#.. ..#.. ##### ..#.. ..#.. .....",
    "-": "..... ..... ..... ##### ..... ..... .....",
    "=": "..... ..... ##### ..... ##### ..... .....",
    ".": "..... ..... ..... ..... ..... .##.. .##..",
    ",": "..... ..... ..... ..... ..... .##.. .##.. ..#.. .#...",
    "(": "...#. ..#.. .#... .#... .#... ..#.. ...#.",
    ")": ".#... ..#.. ...#. ...#. ...#. ..#.. .#...",
    ":": "..... .##.. .##.. ..... .##.. .##.. .....",
    "/": "....# ....# ...#. ..#.. .#... #.... #....",
}


def glyph(char: str) -> np.ndarray:
    """The (GLYPH_HEIGHT, GLYPH_WIDTH) bool bitmap of one character."""
    if char not in _GLYPHS:
        raise ValueError(f"no glyph for {char!r} in kdistpp's bitmap font")
    rows = [[c == "#" for c in row] for row in _GLYPHS[char].split()]
    rows += [[False] * GLYPH_WIDTH] * (GLYPH_HEIGHT - len(rows))
    return np.array(rows, dtype=bool)


def render_text(text: str, scale: int = 1) -> np.ndarray:
    """A bool mask of `text` in one line: one blank column between glyphs, each pixel scale x scale."""
    if not text:
        return np.zeros((GLYPH_HEIGHT * scale, 0), dtype=bool)
    spacer = np.zeros((GLYPH_HEIGHT, 1), dtype=bool)
    cells = []
    for char in text:
        cells += [glyph(char), spacer]
    mask = np.concatenate(cells[:-1], axis=1)
    return mask.repeat(scale, axis=0).repeat(scale, axis=1)


def title_band(lines: list[str], width: int, scale: int = 2, color=(30, 30, 30), margin: int = 4) -> np.ndarray:
    """A white (H, width, 3) band with each line centred. A line wider than `width` at `scale` is drawn
    at the largest smaller scale that fits (at scale 1 it is cropped); H depends only on the number of
    lines and `scale`."""
    line_height = (GLYPH_HEIGHT + 2) * scale
    band = np.full((2 * margin + line_height * len(lines), width, 3), 255, dtype=np.uint8)
    for k, line in enumerate(lines):
        s = scale
        while s > 1 and render_text(line, s).shape[1] > width - 2 * margin:
            s -= 1
        mask = render_text(line, s)[:, : width - 2 * margin]
        top = margin + k * line_height + (line_height - mask.shape[0]) // 2
        left = (width - mask.shape[1]) // 2
        band[top:top + mask.shape[0], left:left + mask.shape[1]][mask] = color
    return band


def titled(panel: np.ndarray, lines: list[str], scale: int = 2) -> np.ndarray:
    """`panel` with a title band of `lines` above it."""
    return np.concatenate([title_band(lines, panel.shape[1], scale), panel], axis=0)
