"""The demo's PNG: panels with their titles drawn in, by the built-in bitmap font (no plotting library)."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from kdistpp import png
from kdistpp import demo
from kdistpp.demo import run_demo


def read_png(path) -> np.ndarray:
    """Reads back what png.write_png writes: 8-bit RGB, one IDAT, filter type 0 on every row."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        tag, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0] == zlib.crc32(tag + body) & 0xFFFFFFFF
        chunks[tag] = body
        pos += 12 + length
    w, h = struct.unpack(">II", chunks[b"IHDR"][:8])
    raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), dtype=np.uint8).reshape(h, 1 + 3 * w)
    assert (raw[:, 0] == 0).all()
    return raw[:, 1:].reshape(h, w, 3)


def ink(image: np.ndarray) -> int:
    return int((image.min(axis=-1) < 128).sum())


def test_font_covers_what_the_titles_need_and_glyphs_are_distinct():
    needed = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 +-=.,()/:"
    glyphs = {c: png.glyph(c).tobytes() for c in needed}
    assert all(png.glyph(c).shape == (png.GLYPH_HEIGHT, png.GLYPH_WIDTH) for c in needed)
    assert len(set(glyphs.values())) == len(needed)  # no two characters look the same
    assert not png.glyph(" ").any() and all(png.glyph(c).any() for c in needed if c != " ")
    with pytest.raises(ValueError, match="no glyph"):
        png.glyph("\u00e9")


def test_rendered_text_is_in_the_band_and_depends_on_the_string():
    blank = png.title_band([""], width=200)
    student = png.title_band(["student"], width=200)
    teacher = png.title_band(["teacher"], width=200)
    assert student.shape == blank.shape == teacher.shape and student.dtype == np.uint8
    assert ink(blank) == 0 and ink(student) > 50 and ink(teacher) > 50
    assert (student != teacher).any()
    # centred: the ink's horizontal midpoint is the band's
    cols = np.nonzero((student.min(axis=-1) < 128).any(axis=0))[0]
    assert abs((cols[0] + cols[-1]) / 2 - 100) <= png.GLYPH_WIDTH
    # two lines take two rows of glyphs; a line too long for the width is drawn smaller, not cut
    assert png.title_band(["a", "b"], width=200).shape[0] > student.shape[0]
    long = png.title_band(["interpolate, w=0.125, 5 NFE"], width=200)
    assert ink(long) > 0 and ink(long[:, :2]) == 0 and ink(long[:, -2:]) == 0


def test_demo_png_has_a_titled_panel_per_method(tmp_path):
    _, path = run_demo(n=200, out_dir=str(tmp_path))
    image = read_png(path)
    band = png.title_band(["x", "y"], width=10).shape[0]
    size, gap = demo.PANEL_SIZE, demo.PANEL_GAP
    legend = png.density_legend(4 * size + 3 * gap)
    assert image.shape == (band + size + legend.shape[0], 4 * size + 3 * gap, 3)
    # the legend under the panels: its ramp runs from the panels' emptiest background to their densest
    assert (image[band + size:] == legend).all()
    ramp_colors = {tuple(c) for c in legend.reshape(-1, 3)}
    background = image[band:band + size, :size].reshape(-1, 3)
    background = background[(background != (60, 60, 60)).any(1)]  # without the data panel's dots
    lightest, darkest = background[background.sum(1).argmax()], background[background.sum(1).argmin()]
    assert tuple(lightest) == (255, 255, 255) and tuple(darkest) in ramp_colors
    assert tuple(darkest) == tuple(png.density_colors(np.array(1.0)).astype(np.uint8))
    panels = [image[:band + size, k * (size + gap):k * (size + gap) + size] for k in range(4)]
    titles = [p[:band] for p in panels]
    assert all(ink(t) > 50 for t in titles)
    assert len({t.tobytes() for t in titles}) == 4  # data, student, student++, teacher: four different titles
    expected = png.title_band(["data", "exact samples"], width=panels[0].shape[1])
    assert (titles[0] == expected).all()
