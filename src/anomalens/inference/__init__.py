"""What scores and what it decides: the one verdict function, regions and overlays."""

from anomalens.inference.overlay import overlay_image, verdict_overlay
from anomalens.inference.verdict import MIN_REGION_AREA, Region, Verdict, decide, find_regions

__all__ = [
    "MIN_REGION_AREA",
    "Region",
    "Verdict",
    "decide",
    "find_regions",
    "overlay_image",
    "verdict_overlay",
]
