"""What an inspector looks at: the image | the image under its heat map, with region boxes."""

from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw

from anomalens.inference.verdict import Region, Verdict

# matplotlib's jet as a (256, 3) table: a colormap call on a full-size map builds an (H, W, 4)
# float64 array, many times the cost of indexing this
_JET = (colormaps["jet"](np.arange(256))[:, :3] * 255).astype(np.float32)
#: PNG compression of overlays: zlib level 1 writes them in about half the time of the default
#: level 6 for files a few percent larger (a photo under a heat map compresses poorly either way)
PNG_LEVEL = 1


def _to_rgb8(image: np.ndarray) -> np.ndarray:
    rgb = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]
    return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)


def overlay_image(
    image: np.ndarray, normalized_map: np.ndarray, regions: list[Region], title: str, flagged: bool
) -> Image.Image:
    """Side by side: the image, and the image under a heat map (transparent below half the
    threshold so good texture stays visible) with region boxes; a header line with the verdict."""
    rgb8 = _to_rgb8(image)
    base = rgb8.astype(np.float32)
    normalized_map = np.asarray(normalized_map, dtype=np.float32)
    # 1.0 (threshold) sits mid-scale; the table index as matplotlib computes it
    heat = _JET[np.minimum((np.clip(normalized_map / 2.0, 0, 1) * 256).astype(np.int32), 255)]
    alpha = (np.clip((normalized_map - 0.5) / 0.5, 0, 1) * 0.55)[..., None]
    blended = (base * (1 - alpha) + heat * alpha).round().astype(np.uint8)
    h, w = base.shape[:2]
    header = 18
    canvas = Image.new("RGB", (2 * w + 4, h + header), (255, 255, 255))
    canvas.paste(Image.fromarray(rgb8), (0, header))
    canvas.paste(Image.fromarray(blended), (w + 4, header))
    draw = ImageDraw.Draw(canvas)
    for r in regions:
        draw.rectangle(
            [w + 4 + r.x0, header + r.y0, w + 4 + r.x1 - 1, header + r.y1 - 1], outline=(255, 0, 255), width=2
        )
    draw.text((3, 3), title, fill=(200, 0, 0) if flagged else (0, 110, 0))
    return canvas


def verdict_title(name: str, normalized_score: float, anomalous: bool) -> str:
    return f"{name}  score {normalized_score:.2f} (threshold 1.00)  {'DEFECT' if anomalous else 'ok'}"


def verdict_overlay(image: np.ndarray, verdict: Verdict, name: str) -> Image.Image:
    """The overlay of one verdict, titled with the image's name, normalized score and verdict."""
    return overlay_image(
        image,
        verdict.normalized_map,
        verdict.regions,
        verdict_title(name, verdict.normalized_score, verdict.anomalous),
        verdict.anomalous,
    )
