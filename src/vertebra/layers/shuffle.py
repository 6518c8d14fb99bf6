"""Channel shuffle (Zhang et al., "ShuffleNet", CVPR 2018, Sec. 3.1).

Reshape the channels of a grouped output to (groups, channels/groups), transpose and flatten,
so the next grouped convolution sees channels from every group. ShuffleNet v1 shuffles with its
group count after the first grouped 1x1; ShuffleNet V2 with 2 after concatenating its branches;
CondenseNet's learned group convolution shuffles its output to mix the groups of the next layer.
"""

from __future__ import annotations

from torch import Tensor


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """``(N, g*c, H, W) -> (N, c*g, H, W)`` with channel ``i*c + j`` moved to ``j*g + i``."""
    if groups == 1:
        return x
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)
