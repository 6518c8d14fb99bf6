"""timm ``legacy_xception`` (Cadene's port of the Keras Xception) keys -> vertebra.backbones.xception.

The same tensors in the same order (each block's shortcut before its residual branch), so
they pair by position with every shape checked; ``fc`` renames to ``head.fc``.
"""

from __future__ import annotations

from . import keymap
from .inception import pair_by_order


@keymap("timm", "xception")
def xception_keys(sd, model):
    return pair_by_order(sd, model, "fc.")
