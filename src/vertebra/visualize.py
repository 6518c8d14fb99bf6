"""Drawing predictions on images (``vertebra predict``'s pictures)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image, ImageDraw

__all__ = ["PALETTE", "draw_detections"]

#: box colours, by label
PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40)]


def draw_detections(image: torch.Tensor, detections: Sequence[dict[str, Any]]) -> Image.Image:
    """``image`` (3 x H x W, 0..1) as a PIL image with each detection's box and ``"<category> <score>"`` drawn;
    a detection is ``{"bbox_xyxy", "score", "label", "category"}``."""
    pil = Image.fromarray((image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
    draw = ImageDraw.Draw(pil)
    for d in detections:
        col = PALETTE[d["label"] % len(PALETTE)]
        x1, y1, x2, y2 = d["bbox_xyxy"]
        draw.rectangle([x1, y1, x2, y2], outline=col, width=2)
        text = f"{d['category']} {d['score']:.2f}"
        tb = draw.textbbox((x1, y1), text)
        h = tb[3] - tb[1]
        ty = y1 - h - 2 if y1 > h + 2 else y1
        draw.rectangle([x1, ty, x1 + tb[2] - tb[0] + 2, ty + h + 2], fill=col)
        draw.text((x1 + 1, ty), text, fill=(0, 0, 0))
    return pil
