"""SqueezeNet.

Iandola, Han, Moskewicz, Ashraf, Dally, Keutzer, "SqueezeNet: AlexNet-level accuracy with 50x
fewer parameters and <0.5MB model size" (arXiv 1602.07360, ICLR 2017 submission).

The Fire module (Sec. 3.2): a 1x1 "squeeze" convolution (s filters, ReLU) feeds two "expand"
convolutions, 1x1 (e1) and 3x3 (e3, padding 1), each followed by ReLU and concatenated.

- ``squeezenet1_0`` (Table 1): conv1 96 7x7/2, max-pool 3x3/2, fire2-4, max-pool, fire5-8,
  max-pool, fire9, dropout 0.5, conv10 1x1 to the classes (ReLU), global average pool. No FC.
  Pools are 3x3/2 with ceil rounding (Caffe), so a 224 input gives 109-54-27-13.
- ``squeezenet1_1``: the v1.1 of the authors' repository (forresti/SqueezeNet, not in the paper):
  conv1 64 3x3/2 and the pools moved after conv1, fire3 and fire5: 2.4x less compute, same accuracy.
- ``squeezenet1_0_simple_bypass`` / ``squeezenet1_0_complex_bypass`` (Sec. 6, Fig. 2, Table 3):
  identity bypasses around fire3, 5, 7 and 9 (where input and output widths match); the complex
  variant also puts a 1x1 convolution bypass (with bias, no ReLU, as a Caffe conv layer) around
  fire2, 4, 6 and 8. The bypass adds to the Fire module's output (after its ReLUs). Table 3
  gives model sizes (4.8 MB / 4.8 MB / 7.7 MB), not parameter counts; the four 1x1 bypass
  convolutions (96->128, 128->256, 256->384, 384->512) add 341,248 parameters here (1.589672M in
  all, 6.4 MB as float32); the paper's 7.7 MB is not reproducible from its description.

Features (detectors): conv1 (s2), the end of fire4 / fire3 (s4), fire8 / fire5 (s8), fire9 (s16)
for v1.0 / v1.1. SqueezeNet has no stride-32 stage; a detector that needs one adds its own
extra levels (as RetinaNet's P6/P7). conv10 is the classifier and belongs to the head.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..backbone import Backbone, FeatureInfo
from ..layers.heads import ResettableHead
from ..registry import register

_SQZ = dict(family="SqueezeNet",
            paper="SqueezeNet: AlexNet-level accuracy with 50x fewer parameters and <0.5MB model size "
                  "(arXiv; ICLR 2017 submission)",
            year=2016, arxiv="1602.07360", supports_drop_path=False)


class Fire(nn.Module):
    """squeeze 1x1 (ReLU) -> [expand 1x1 (ReLU), expand 3x3 (ReLU)] concatenated, optionally with
    a bypass: ``"simple"`` (identity) or ``"complex"`` (1x1 convolution with bias)."""

    def __init__(self, in_ch: int, squeeze: int, e1: int, e3: int, bypass: str | None = None) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(in_ch, squeeze, 1)
        self.expand1x1 = nn.Conv2d(squeeze, e1, 1)
        self.expand3x3 = nn.Conv2d(squeeze, e3, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        out_ch = e1 + e3
        if bypass == "simple" and in_ch != out_ch:
            raise ValueError(f"a simple bypass needs equal widths, got {in_ch} -> {out_ch}")
        self.bypass = bypass
        self.bypass_conv = nn.Conv2d(in_ch, out_ch, 1) if bypass == "complex" else None

    def fuse_for_inference(self) -> None:
        """After ``layers.fused.fuse_conv_act``: the three ReLUs run inside their convolutions."""
        from ..layers.fused import FusedConv

        convs = (self.squeeze, self.expand1x1, self.expand3x3)
        if isinstance(self.act, nn.ReLU) and all(isinstance(c, FusedConv) and not c.relu for c in convs):
            for c in convs:
                c.relu = True
            self.act = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        s = self.act(self.squeeze(x))
        out = torch.cat([self.act(self.expand1x1(s)), self.act(self.expand3x3(s))], 1)
        if self.bypass == "simple":
            out = out + x
        elif self.bypass_conv is not None:
            out = out + self.bypass_conv(x)
        return out


class SqueezeHead(ResettableHead):
    """dropout 0.5 -> conv10 1x1 to the classes -> ReLU -> global average pool (the classifier is ``conv10``)."""

    classifier_name = "conv10"

    def __init__(self, in_ch: int, num_classes: int, drop_rate: float = 0.5) -> None:
        super().__init__()
        self.num_features = in_ch
        self.drop = nn.Dropout(drop_rate)
        self.conv10 = nn.Conv2d(in_ch, num_classes, 1)
        self.act = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def make_classifier(self, num_classes: int) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        conv = nn.Conv2d(self.num_features, num_classes, 1)
        nn.init.normal_(conv.weight, 0.0, 0.01)  # the paper's Caffe init of conv10
        nn.init.zeros_(conv.bias)
        return conv

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if pre_logits:  # what conv10 reads, pooled (the fire9 output is ReLU'd already)
            return self.pool(self.drop(x)).flatten(1)
        return self.pool(self.act(self.conv10(self.drop(x)))).flatten(1)


# (squeeze, expand1x1, expand3x3) of fire2..fire9 (Table 1)
_FIRES = ((16, 64, 64), (16, 64, 64), (32, 128, 128), (32, 128, 128),
          (48, 192, 192), (48, 192, 192), (64, 256, 256), (64, 256, 256))


class SqueezeNet(Backbone):
    """SqueezeNet v1.0 / v1.1, with the paper's optional bypasses (v1.0 layout)."""

    def __init__(self, version: str = "1_0", num_classes: int = 1000, in_chans: int = 3, bypass: str | None = None,
                 drop_rate: float = 0.5) -> None:
        super().__init__(in_chans, num_classes)
        if version not in ("1_0", "1_1"):
            raise ValueError(f"version must be '1_0' or '1_1', got {version!r}")
        if bypass not in (None, "simple", "complex"):
            raise ValueError(f"bypass must be None, 'simple' or 'complex', got {bypass!r}")
        if version == "1_0":
            self.conv1 = nn.Conv2d(in_chans, 96, 7, 2)
            stem, pools_after = 96, (2, 6)  # pools after conv1 and after fire4 and fire8 (indices 2, 6)
        else:
            self.conv1 = nn.Conv2d(in_chans, 64, 3, 2)
            stem, pools_after = 64, (1, 3)  # after conv1, fire3, fire5
        self.act1 = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(3, 2, ceil_mode=True)
        in_ch = stem
        fires = []
        for i, (s, e1, e3) in enumerate(_FIRES):
            n = i + 2  # fire2 .. fire9
            kind = None
            if bypass is not None:
                kind = "simple" if n % 2 else ("complex" if bypass == "complex" else None)
            fires.append(Fire(in_ch, s, e1, e3, kind))
            in_ch = e1 + e3
        # stage s4: up to the fire before the second pool, s8: up to the third pool, s16: the rest
        a, b = pools_after
        self.stage1 = nn.Sequential(*fires[: a + 1])
        self.stage2 = nn.Sequential(*fires[a + 1: b + 1])
        self.stage3 = nn.Sequential(*fires[b + 1:])
        ch = lambda seq: seq[-1].expand1x1.out_channels + seq[-1].expand3x3.out_channels  # noqa: E731
        self.stage_info = [FeatureInfo("conv1", stem, 2), FeatureInfo("stage1", ch(self.stage1), 4),
                             FeatureInfo("stage2", ch(self.stage2), 8), FeatureInfo("stage3", ch(self.stage3), 16)]
        self.head = SqueezeHead(in_ch, num_classes, drop_rate)
        self._init()

    def _init(self) -> None:
        # the paper's Caffe files: Xavier for every conv, Gaussian(0, 0.01) for conv10
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if self.head is not None and m is self.head.conv10:
                    nn.init.normal_(m.weight, 0.0, 0.01)
                else:
                    nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def stages(self, x: Tensor):
        x = self.act1(self.conv1(x))
        yield x
        x = self.stage1(self.pool(x))
        yield x
        x = self.stage2(self.pool(x))
        yield x
        yield self.stage3(self.pool(x))


@register("squeezenet1_0", **_SQZ, version="1_0")
@register("squeezenet1_1", **{**_SQZ, "paper": "forresti/SqueezeNet repo v1.1 (not in paper)"}, version="1_1")
@register("squeezenet1_0_simple_bypass", **_SQZ, version="1_0", bypass="simple")
@register("squeezenet1_0_complex_bypass", **_SQZ, version="1_0", bypass="complex")
def squeezenet(**kw) -> SqueezeNet:
    return SqueezeNet(**kw)
