"""vertebra's RetinaNet against torchvision's ``retinanet_resnet50_fpn``: same weights, same input, CPU.

Both models are the torchvision v1 configuration with a frozen-BN backbone (what torchvision
builds with pretrained backbone weights): ResNet-50, FrozenBatchNorm2d, the first two stages
frozen (trainable_backbone_layers=3), P6 from P5, 91 classes. vertebra loads torchvision's
randomly initialised state_dict through ``load_reference_weights``; both run the same images.

Measured, per input size (default 800x800 and 512x512, one image for inference, two for training):
- inference ``network``: backbone + FPN + heads on the preprocessed batch (torch.inference_mode);
- inference ``postprocess``: anchors + decoding + top-k + NMS + rescaling, on the same head outputs;
- ``end-to-end`` inference: ``model(images)``;
- one training step: forward with targets, backward, SGD step.
vertebra runs twice: as built (its frozen BN is folded into the convolutions on the fly), and
optimised: for inference ``vertebra.optimize_for_inference(model)`` (frozen BN folded for good,
channels_last, every conv + ReLU of the backbone and of the head towers and every residual add + ReLU
as one oneDNN call, the 3x3 convolutions that are faster as Winograd ones as such), for training
``model.to(memory_format=torch.channels_last)`` with the forward in the engine's context
(``layers.gemm_conv.training_convs``: weight-bound convolutions as one GEMM, the head's float32 3x3 convolutions
as Winograd ones), what ``vertebra train``
runs. ``--no-winograd`` adds a column: the optimised model with ``winograd=False`` (what the Winograd
convolutions gain). The ratio is vertebra / torchvision (lower is better).
Timings alternate between the models and report the median of ``--reps`` runs.

``--bf16`` adds two rows and a check: both networks with bfloat16 weights and activations (torchvision's
cast with ``.to(torch.bfloat16)``, vertebra's through ``optimize_for_inference(model, dtype=torch.bfloat16)``,
which keeps anchors, decoding and NMS in float32); vertebra's bf16 end-to-end inference against torchvision's
float32 one (what a user gets from switching to bf16); and how many of vertebra's 100 best float32 detections
its bf16 run returns (same label, IoU >= 0.9) on a net whose class scores are spread out (the random prior
init scores every anchor 0.01, below the threshold).

Results: benchmarks/RESULTS.md, section retinanet_vs_torchvision.

    python benchmarks/retinanet_vs_torchvision.py [--sizes 800 512] [--reps 5] [--threads N] [--bf16] [--no-winograd]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time

import torch
from torch import nn
from torchvision.models.detection import retinanet_resnet50_fpn
from torchvision.ops import FrozenBatchNorm2d

from vertebra.detection import create_detector
from vertebra.inference import optimize_for_inference
from vertebra.layers.gemm_conv import training_convs
from vertebra.weights import load_reference_weights


def frozen_bn_(module: nn.Module) -> None:
    """torchvision's own conversion: BatchNorm2d -> torchvision.ops.FrozenBatchNorm2d, stats copied."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            f = FrozenBatchNorm2d(child.num_features, child.eps)
            with torch.no_grad():
                for k in ("weight", "bias", "running_mean", "running_var"):
                    getattr(f, k).copy_(getattr(child, k))
            setattr(module, name, f)
        else:
            frozen_bn_(child)


def build(size: int, num_classes: int = 91):
    torch.manual_seed(0)
    tv = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=num_classes, min_size=size,
                                max_size=size)
    frozen_bn_(tv.backbone.body)
    for name, p in tv.backbone.body.named_parameters():  # trainable_backbone_layers=3
        if not name.startswith(("layer2", "layer3", "layer4")):
            p.requires_grad_(False)
    vt = create_detector("retinanet", backbone="resnet50", num_classes=num_classes, min_size=size, max_size=size,
                         frozen_bn=True, trainable_stages=3, p6_from="p5")
    load_reference_weights(vt, tv.state_dict(), source="torchvision")
    return tv, vt


CLOCK = time.perf_counter


def timeit(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = CLOCK()
        fn()
        out.append(CLOCK() - t0)
    return out


def bench_pair(fns: dict, reps: int, warmup: int = 1) -> dict:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(reps):  # alternate so that both see the same machine load
        for k, fn in fns.items():
            times[k] += timeit(fn, 1)
    return {k: statistics.median(v) for k, v in times.items()}


def detection_agreement(ref: dict, other: dict, top: int = 100) -> dict:
    """How many of ``ref``'s best ``top`` detections ``other`` has (same label, IoU >= 0.9), and the largest
    score difference among those."""
    from torchvision.ops import box_iou

    r_boxes, r_scores, r_labels = ref["boxes"][:top], ref["scores"][:top], ref["labels"][:top]
    if len(r_boxes) == 0 or len(other["boxes"]) == 0:
        return {"reference": len(r_boxes), "found": 0, "max_score_diff": float("nan")}
    iou = box_iou(r_boxes, other["boxes"]) * (r_labels[:, None] == other["labels"][None])
    best, idx = iou.max(1)
    hit = best >= 0.9
    diff = (r_scores[hit] - other["scores"][idx[hit]]).abs()
    return {"reference": len(r_boxes), "found": int(hit.sum()),
            "max_score_diff": float(diff.max()) if len(diff) else float("nan")}


def lively_heads_(tv: nn.Module, img: list) -> None:
    """Class scores spread over 0..1 (the prior init keeps every score at 0.01, so a random net has no
    detections to compare): the classification subnet's last conv rescaled so that its logits have a
    standard deviation of 2 around the prior's -4.6 on ``img``."""
    conv = tv.head.classification_head.cls_logits
    out = []
    h = conv.register_forward_hook(lambda m, a, o: out.append(o - m.bias[None, :, None, None]))
    with torch.inference_mode():
        tv.eval()(img)
    h.remove()
    std = torch.cat([o.flatten() for o in out]).std()
    with torch.no_grad():
        conv.weight.mul_(2.0 / std)


def bf16_agreement(size: int) -> dict:
    """vertebra's bf16 detections against its float32 ones, on one image, with lively class scores."""
    tv, vt = build(size)
    img = [torch.rand(3, size, size, generator=torch.Generator().manual_seed(size))]
    lively_heads_(tv, img)
    load_reference_weights(vt, tv.state_dict(), source="torchvision")  # the livelier heads too
    with torch.inference_mode():
        ref = optimize_for_inference(vt)(img)[0]
        low = optimize_for_inference(vt, dtype=torch.bfloat16)(img)[0]
    return detection_agreement(ref, low)


def bench_size(size: int, reps: int, train_reps: int, bf16: bool = False, no_winograd: bool = False) -> list:
    rows = []
    tv, vt = build(size)
    vf = optimize_for_inference(vt)
    direct = {"vertebra optimized, no winograd": optimize_for_inference(vt, winograd=False)} if no_winograd else {}
    tv.eval(), vt.eval()
    g = torch.Generator().manual_seed(size)
    img = [torch.rand(3, size, size, generator=g)]
    with torch.inference_mode():
        il, _ = tv.transform(img)
        x = il.tensors
        batch, _ = vt.transform(img)

        def tv_net():
            return tv.head(list(tv.backbone(x).values()))

        res = bench_pair({"torchvision": tv_net, "vertebra": lambda: vt.net(x),
                          "vertebra optimized": lambda: vf.net(x),
                          **{k: (lambda m=m: m.net(x)) for k, m in direct.items()}}, reps)
        rows.append((size, "inference: network", res))
        if bf16:
            # both networks in bfloat16 (weights and activations; torchvision's cast with .to()), and
            # vertebra's bf16 detections against its float32 ones
            tv16 = copy.deepcopy(tv).to(torch.bfloat16)
            vf16 = optimize_for_inference(vt, dtype=torch.bfloat16)
            x16 = x.to(torch.bfloat16)

            def tv16_net():
                return tv16.head(list(tv16.backbone(x16).values()))

            res = bench_pair({"torchvision": tv16_net, "vertebra": lambda: vf16.net(x)}, reps)
            rows.append((size, "inference: network, bf16", res))
            res = bench_pair({"torchvision": lambda: tv(img), "vertebra": lambda: vf16(img)}, reps)
            rows.append((size, "e2e: bf16 vertebra vs fp32", res))

        feats = list(tv.backbone(x).values())
        ho = tv.head(feats)
        hw = [f.shape[-2] * f.shape[-1] for f in feats]

        def tv_post():
            anchors = tv.anchor_generator(il, feats)
            a = ho["cls_logits"].shape[1] // sum(hw)
            split = [h * a for h in hw]
            sh = {k: list(v.split(split, dim=1)) for k, v in ho.items()}
            sa = [list(an.split(split)) for an in anchors]
            det = tv.postprocess_detections(sh, sa, il.image_sizes)
            return tv.transform.postprocess(det, il.image_sizes, [(size, size)])

        levels = vt.net.pyramid(batch.tensor)

        def vt_post():
            anchors, per = vt.anchors_for(batch.tensor, levels)
            return vt.postprocess(ho["cls_logits"], ho["bbox_regression"], anchors, per, batch.image_sizes,
                                  batch.original_sizes)

        res = bench_pair({"torchvision": tv_post, "vertebra": vt_post}, reps)
        rows.append((size, "inference: postprocess", res))
        res = bench_pair({"torchvision": lambda: tv(img), "vertebra": lambda: vt(img),
                          "vertebra optimized": lambda: vf(img),
                          **{k: (lambda m=m: m(img)) for k, m in direct.items()}}, reps)
        rows.append((size, "inference: end-to-end", res))

    # one training step, 2 images with 3 boxes each
    imgs = [torch.rand(3, size, size, generator=g) for _ in range(2)]
    s = size / 800
    targets = [{"boxes": torch.tensor([[50., 60, 300, 400], [400, 100, 700, 350], [100, 500, 180, 560]]) * s,
                "labels": torch.tensor([1, 5, 17])} for _ in imgs]
    tv.train(), vt.train()
    opt_tv = torch.optim.SGD([p for p in tv.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
    opt_vt = torch.optim.SGD([p for p in vt.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)

    def step(model, opt, engine: bool = False):
        def run():
            with training_convs("cpu") if engine else contextlib.nullcontext():
                losses = model(imgs, targets)
            loss = sum(losses.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return run

    vc = copy.deepcopy(vt).to(memory_format=torch.channels_last)
    opt_vc = torch.optim.SGD([p for p in vc.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
    res = bench_pair({"torchvision": step(tv, opt_tv), "vertebra": step(vt, opt_vt),
                      "vertebra channels_last": step(vc, opt_vc, engine=True)}, train_reps)
    rows.append((size, "training step (2 images)", res))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[800, 512])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--train-reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--bf16", action="store_true",
                    help="also time both networks in bfloat16, and vertebra's bf16 end-to-end against torchvision's "
                         "float32; prints how many of vertebra's float32 detections its bf16 run keeps")
    ap.add_argument("--no-winograd", action="store_true",
                    help="also time the optimised model with winograd=False (the direct convolutions alone)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: elapsed time; cpu: CPU time of the process (steadier on a shared machine)")
    args = ap.parse_args()
    global CLOCK
    CLOCK = time.perf_counter if args.clock == "wall" else time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, {args.clock} clock")
    print(f"\n{'size':>5}  {'what':<26} {'torchvision ms':>15} {'vertebra ms':>12} {'ratio':>6}"
          f"  {'vertebra, optimised':<24} {'ms':>9} {'ratio':>6}", flush=True)
    for size in args.sizes:
        for _, what, res in bench_size(size, args.reps, args.train_reps, args.bf16, args.no_winograd):
            t, v = res["torchvision"] * 1e3, res["vertebra"] * 1e3
            line = f"{size:>5}  {what:<26} {t:>15.1f} {v:>12.1f} {v / t:>6.2f}"
            for k in ("vertebra optimized", "vertebra optimized, no winograd", "vertebra channels_last"):
                if k in res:
                    f = res[k] * 1e3
                    line += f"  {k[9:]:<24} {f:>9.1f} {f / t:>6.2f}"
            print(line, flush=True)
        if args.bf16:
            a = bf16_agreement(size)
            print(f"{size:>5}  bf16 detections: {a['found']} of the {a['reference']} best float32 ones (same label, "
                  f"IoU >= 0.9), scores within {a['max_score_diff']:.4f}", flush=True)


if __name__ == "__main__":
    main()
