"""Draws docs/img/icon.png, the 400 x 400 icon the Comfy Registry and ComfyUI-Manager show.

A few-step student path (white, four steps from noise to a clean point) whose first step is bent
by the teacher (orange): Distillation++ in one picture. Run: python docs/img/make_icon.py
"""

from pathlib import Path

from PIL import Image, ImageDraw

SIZE, SCALE = 400, 4  # drawn at 4x and downsampled: smooth edges without antialiasing support


def main(out: Path = Path(__file__).with_name("icon.png")) -> Path:
    n = SIZE * SCALE
    img = Image.new("RGB", (n, n), (22, 27, 44))
    d = ImageDraw.Draw(img)
    s = lambda *xy: [v * SCALE for v in xy]  # noqa: E731
    d.rounded_rectangle(s(8, 8, 392, 392), radius=56 * SCALE, outline=(70, 84, 130), width=6 * SCALE)
    # noise: a seeded scatter on the left
    state = 12345
    for _ in range(90):
        state = (1103515245 * state + 12345) % 2**31
        x = 40 + state % 90
        state = (1103515245 * state + 12345) % 2**31
        y = 80 + state % 240
        r = 3 + state % 4
        d.ellipse(s(x - r, y - r, x + r, y + r), fill=(120, 132, 170))
    # the student's first step unguided (grey) and guided by the teacher (orange), then its other steps
    student = [(90, 200), (170, 130)]  # the unguided first step (grey)
    guided = [(90, 200), (165, 205)]
    d.line(s(*student[0], *student[1]), fill=(150, 150, 160), width=5 * SCALE)
    d.line(s(*guided[0], *guided[1]), fill=(255, 150, 40), width=10 * SCALE)
    path = [guided[1], (240, 200), (300, 200), (345, 200)]
    for a, b in zip(path, path[1:]):
        d.line(s(*a, *b), fill=(245, 245, 250), width=10 * SCALE)
    for x, y in path[:-1]:
        d.ellipse(s(x - 11, y - 11, x + 11, y + 11), fill=(245, 245, 250))
    d.ellipse(s(325, 180, 365, 220), fill=(255, 150, 40))
    # "D++" as strokes (no font files needed)
    w = 12 * SCALE
    d.arc(s(110, 270, 190, 350), start=-90, end=90, fill=(245, 245, 250), width=w)
    d.line(s(150, 270, 150, 350), fill=(245, 245, 250), width=w)
    d.line(s(124, 276, 150, 276), fill=(245, 245, 250), width=w)
    d.line(s(124, 344, 150, 344), fill=(245, 245, 250), width=w)
    for cx in (230, 300):
        d.line(s(cx - 25, 310, cx + 25, 310), fill=(255, 150, 40), width=w)
        d.line(s(cx, 285, cx, 335), fill=(255, 150, 40), width=w)
    img.resize((SIZE, SIZE), Image.LANCZOS).save(out, optimize=True)
    return out


if __name__ == "__main__":
    print(main())
