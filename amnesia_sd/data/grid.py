"""Image grids: what people look at first."""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont


def make_grid(rows: list[list[Image.Image]], pad: int = 2, labels: list[str] | None = None,
              min_size: int = 64) -> Image.Image:
    """Rows of equally sized images on a white sheet; optional column labels on top.
    Small images (the digits model's 8x8) are enlarged without smoothing so they stay legible."""
    w, h = rows[0][0].size
    if w < min_size:
        w, h = min_size, round(h * min_size / w)
    cols = max(len(r) for r in rows)
    top = 14 if labels else 0
    sheet = Image.new("RGB", (cols * (w + pad) + pad, top + len(rows) * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for c, label in enumerate(labels or []):
        draw.text((pad + c * (w + pad), 1), label, fill="black", font=font)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            sheet.paste(image.convert("RGB").resize((w, h), Image.Resampling.NEAREST), (pad + c * (w + pad), top + pad + r * (h + pad)))
    return sheet
