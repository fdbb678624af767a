"""What an inspector looks at: defect regions and an image | heat-map overlay picture."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw
from scipy import ndimage


@dataclass(frozen=True)
class Region:
    x0: int
    y0: int
    x1: int  # exclusive
    y1: int
    area: int  # pixels above threshold
    peak: float  # highest normalized score inside
    area_share: float = 0.0  # area as a fraction of the whole image
    mean: float = 0.0  # mean normalized score inside

    def to_dict(self) -> dict:
        return asdict(self)


def find_regions(normalized_map: np.ndarray, min_area: int = 16, min_share: float = 0.0,
                 threshold: float = 1.0) -> list[Region]:
    """Connected areas where the normalized map reaches `threshold` (1.0 = the calibrated pixel
    threshold), largest first; specks under `min_area` pixels or `min_share` of the image are
    noise from smoothing, not defects."""
    if min_area < 0 or not 0.0 <= min_share < 1.0:
        raise ValueError(f"smallest region: min_area must be >= 0 and min_share in [0, 1), "
                         f"got {min_area} and {min_share}")
    labeled, n = ndimage.label(normalized_map >= threshold, structure=np.ones((3, 3), bool))
    smallest = max(min_area, min_share * normalized_map.size)
    regions = []
    for i, sl in enumerate(ndimage.find_objects(labeled), start=1):
        inside = labeled[sl] == i
        area = int(inside.sum())
        if area >= smallest:
            values = normalized_map[sl][inside]
            regions.append(Region(sl[1].start, sl[0].start, sl[1].stop, sl[0].stop, area, float(values.max()),
                                  round(area / normalized_map.size, 6), float(values.mean())))
    return sorted(regions, key=lambda r: -r.area)


def _to_rgb8(image: np.ndarray) -> np.ndarray:
    rgb = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]
    return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)


def overlay_image(image: np.ndarray, normalized_map: np.ndarray, regions: list[Region], title: str,
                  flagged: bool) -> Image.Image:
    """Side by side: the image, and the image under a heat map (transparent below half the
    threshold so good texture stays visible) with region boxes; a header line with the verdict."""
    base = _to_rgb8(image).astype(np.float32)
    heat_level = np.clip(normalized_map / 2.0, 0, 1)  # 1.0 (threshold) sits mid-scale
    heat = colormaps["jet"](heat_level)[..., :3] * 255
    alpha = (np.clip((normalized_map - 0.5) / 0.5, 0, 1) * 0.55)[..., None]
    blended = (base * (1 - alpha) + heat * alpha).round().astype(np.uint8)
    h, w = base.shape[:2]
    header = 18
    canvas = Image.new("RGB", (2 * w + 4, h + header), (255, 255, 255))
    canvas.paste(Image.fromarray(base.astype(np.uint8)), (0, header))
    canvas.paste(Image.fromarray(blended), (w + 4, header))
    draw = ImageDraw.Draw(canvas)
    for r in regions:
        draw.rectangle([w + 4 + r.x0, header + r.y0, w + 4 + r.x1 - 1, header + r.y1 - 1], outline=(255, 0, 255),
                       width=2)
    draw.text((3, 3), title, fill=(200, 0, 0) if flagged else (0, 110, 0))
    return canvas
