"""The backbone contract: ``Backbone``, ``FeatureInfo`` and the stage bookkeeping.

A network subclasses :class:`Backbone`, fills ``self.feature_info`` (one entry per stage,
strides strictly increasing), puts everything that only classification needs under
``self.head`` (and auxiliary classifiers under ``self.aux_heads``), and writes
:meth:`Backbone.stages` by hand: a generator that yields each stage's output in order.
That is the one place where a network says what its features are, functional steps
included (DenseNet's final ReLU, a pre-activation net's final BN+ReLU).

``forward_features`` returns the stages selected by ``out_strides`` and stops running the
network after the deepest one selected; ``forward_head`` turns the features into logits.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["Backbone", "FeatureInfo"]


@dataclass(frozen=True)
class FeatureInfo:
    name: str
    channels: int
    stride: int


class Backbone(nn.Module):
    """Base class of every vertebra network."""

    #: attribute names of the modules that exist only for classification
    head_attrs: tuple[str, ...] = ("head", "aux_heads")

    def __init__(self, in_chans: int = 3, num_classes: int = 0) -> None:
        super().__init__()
        self.feature_info: list[FeatureInfo] = []
        self.features_only = False
        self.out_indices: tuple[int, ...] = ()
        #: the smallest input side the network runs on; a network whose geometry allows less (or
        #: needs more) sets it in its constructor: it is the one place this figure lives
        self.min_input_size = 32
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.spec = None

    # -- to be written by each network ------------------------------------------------
    def stages(self, x: Tensor) -> Iterator[Tensor]:
        """Yield the output of every stage, in order (one per ``feature_info`` entry)."""
        raise NotImplementedError

    def forward_head(self, features: Sequence[Tensor] | Tensor) -> Tensor:
        """Logits from the deepest feature (pooling, dropout, classifier)."""
        if getattr(self, "head", None) is None:
            raise RuntimeError(f"{self.name} was built with features_only=True: it has no classifier head")
        x = features[-1] if isinstance(features, (list, tuple)) else features
        return self.head(x)

    # -- the contract ----------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.spec.name if self.spec is not None else type(self).__name__

    @property
    def strides(self) -> list[int]:
        return [f.stride for f in self.feature_info]

    @property
    def num_features(self) -> int:
        return self.feature_info[-1].channels

    def configure_outputs(self, *, features_only: bool = False, out_strides=None) -> None:
        """Select the stages ``forward_features`` returns; drop the head for features_only."""
        strides = self.strides
        if any(b <= a for a, b in zip(strides, strides[1:])):
            raise AssertionError(f"{self.name}: feature strides {strides} are not strictly increasing")
        if out_strides is None:
            idx = tuple(range(len(strides)))
        else:
            wanted = [int(s) for s in out_strides]
            missing = [s for s in wanted if s not in strides]
            if missing:
                raise ValueError(
                    f"{self.name} has no stage at stride {', '.join(map(str, missing))}; "
                    f"its strides are {', '.join(map(str, strides))}"
                )
            idx = tuple(sorted(strides.index(s) for s in set(wanted)))
        self.out_indices = idx
        self.features_only = bool(features_only)
        if features_only:
            for attr in self.head_attrs:
                if getattr(self, attr, None) is not None:
                    setattr(self, attr, None)

    @property
    def out_feature_info(self) -> list[FeatureInfo]:
        return [self.feature_info[i] for i in self.out_indices]

    def check_input(self, x: Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"{self.name} takes a 4-d batch N x C x H x W, got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"{self.name} was built for {self.in_chans} input channels, got {x.shape[1]}")
        h, w = x.shape[-2], x.shape[-1]
        if h < self.min_input_size or w < self.min_input_size:
            m = self.min_input_size
            raise ValueError(f"{self.name} needs an input of at least {m}x{m} pixels, got {h}x{w}")

    def forward_features(self, x: Tensor) -> list[Tensor]:
        self.check_input(x)
        wanted = self.out_indices
        last = wanted[-1]
        out: list[Tensor] = []
        for i, feat in enumerate(self.stages(x)):
            if i in wanted:
                out.append(feat)
            if i == last:
                break
        return out

    def prepare_inference(self, dtype: torch.dtype | None = None, channels_last: bool = True, *,
                          fold_bn: bool = True, fuse: bool = True) -> Backbone:
        """In place, for inference (eval mode): BatchNorm folded, conv + act fused, weights channels_last
        and in ``dtype``; the input is converted to match and the output comes back as float32 (see
        ``vertebra.inference``). Irreversible. Returns self."""
        from .inference import prepare_module

        self.eval()
        prepare_module(self, dtype, channels_last, fold_bn=fold_bn, fuse=fuse)
        return self

    def forward(self, x: Tensor):
        if self.features_only:
            return self.forward_features(x)
        self.check_input(x)
        *_, last = self.stages(x)
        return self.forward_head([last])


def init_weights(module: nn.Module) -> None:
    """The usual initialisation of the classic nets: He-normal convs, unit BN, small FC."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            if m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """The number of parameters (only those with ``requires_grad`` when ``trainable_only``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
