"""The RetinaNet head: a classification and a box subnet shared across the pyramid levels.

Each subnet is ``num_convs`` x [3x3 conv (+ GroupNorm with ``norm="gn"``: 32 groups as FCOS / torchvision v2,
fewer where the channels do not divide by 32: the largest divisor of both), ReLU] and a 3x3 conv to
``A * K`` class logits (bias -log((1 - pi) / pi), pi = 0.01) or ``A * 4`` box codes.

Under autocast the GroupNorms compute in float32 (:class:`GroupNorm`), as CUDA's autocast runs ``group_norm``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GroupNorm", "RetinaNetHead"]


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` that computes in float32 under autocast and returns autocast's dtype. CUDA's autocast
    already runs ``group_norm`` in float32; CPU's runs it in bf16, whose channels_last kernels are slower than
    the float32 ones with the casts (``benchmarks/RESULTS.md``, shapes_retinanet 2026-12-07). Same parameters and
    state_dict keys as ``nn.GroupNorm``."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype in (torch.bfloat16, torch.float16) and torch.is_autocast_enabled(x.device.type):
            return F.group_norm(x.float(), self.num_groups, self.weight, self.bias, self.eps).to(x.dtype)
        return super().forward(x)


def _tower(channels: int, num_convs: int, norm: str | None) -> nn.Sequential:
    blocks = []
    for _ in range(num_convs):
        layers = [nn.Conv2d(channels, channels, 3, padding=1, bias=norm is None)]
        if norm == "gn":
            layers.append(GroupNorm(math.gcd(32, channels), channels))
        layers.append(nn.ReLU(inplace=True))
        blocks.append(nn.Sequential(*layers))
    return nn.Sequential(*blocks)


class RetinaNetHead(nn.Module):
    """The classification and box subnets, shared across pyramid levels.

    ``forward(levels)`` returns ``cls_logits [B, sum(H*W*A), K]`` and ``bbox_regression
    [B, sum(H*W*A), 4]``, ordered level by level, then row-major cells, then anchors (torchvision's
    order). Levels have different sizes, so each runs through the towers in turn (5 calls, no
    loop over images or classes); the outputs are concatenated.
    """

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int, num_convs: int = 4,
                 prior_probability: float = 0.01, norm: str | None = None):
        super().__init__()
        if norm not in (None, "gn"):
            raise ValueError(f"head_norm must be None or 'gn', got {norm!r}")
        if int(num_convs) < 0:
            raise ValueError(f"head_convs must be >= 0, got {num_convs}")
        self.num_classes, self.num_anchors, self.norm = num_classes, num_anchors, norm
        self.cls_tower = _tower(in_channels, num_convs, norm)
        self.cls_logits = nn.Conv2d(in_channels, num_anchors * num_classes, 3, padding=1)
        self.box_tower = _tower(in_channels, num_convs, norm)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, 3, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_probability) / prior_probability))

    def forward(self, levels: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        k = self.num_classes
        cls_out, box_out = [], []
        for f in levels:
            b = f.shape[0]
            # [B, A*K, H, W] -> [B, H, W, A*K] -> [B, H*W*A, K]: a view when channels_last
            cls_out.append(self.cls_logits(self.cls_tower(f)).permute(0, 2, 3, 1).reshape(b, -1, k))
            box_out.append(self.bbox_pred(self.box_tower(f)).permute(0, 2, 3, 1).reshape(b, -1, 4))
        return torch.cat(cls_out, dim=1), torch.cat(box_out, dim=1)
