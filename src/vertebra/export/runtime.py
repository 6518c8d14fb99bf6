"""The onnxruntime backend: a model's exported ONNX graph run by onnxruntime behind the model's own call.

``vertebra.optimize_for_inference(model, backend="onnxruntime")`` returns one of these modules; each exports the
model (:func:`~vertebra.export.backbone.export_onnx`, :func:`~vertebra.detection.export.export_retinanet_onnx`),
opens an onnxruntime session on it and, before it is returned, runs sample inputs through both and refuses
(``ValueError``) where the outputs differ beyond the export check's tolerance.

- :class:`OnnxRuntimeModule`: a backbone (or any ``images -> tensor(s)`` module). ``forward(x)`` takes the
  tensor the PyTorch model takes and returns what it returns (a tensor, or a list of feature maps with
  ``features_only``), as float32 CPU tensors. The batch is dynamic; the input size too unless the network pools
  to a fixed grid (then the export's size only, said in the error).
- :class:`OnnxRuntimeDetector`: a RetinaNet. ``forward(images)`` takes a list of ``3 x H x W`` images (or a batch)
  in 0..1 and returns ``[{"boxes", "scores", "labels"}]`` in each image's pixels, as the eager detector does.
  The exported graph has a square canvas fixed at export (``size``): each image is resized to fit it
  (:func:`~vertebra.detection.export.preprocess_for_export`), where the eager detector resizes the shorter side
  to its ``min_size``; on images of the canvas's shape both see the same pixels.

onnxruntime is an optional dependency (``pip install vertebra[onnx]``); without it the backend says so in one line.
"""

from __future__ import annotations

import io

import torch
from torch import Tensor, nn

__all__ = ["OnnxRuntimeModule", "OnnxRuntimeDetector", "onnxruntime_available", "require_onnxruntime", "BACKENDS"]

#: what ``optimize_for_inference(backend=...)``, ``vertebra predict --backend`` and ``vertebra bench --backend`` take
BACKENDS = ("torch", "compile", "onnxruntime")


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def require_onnxruntime() -> None:
    """Raise one line (``ImportError``) where onnxruntime or onnx is not installed."""
    missing = [m for m in ("onnx", "onnxruntime") if not _importable(m)]
    if missing:
        raise ImportError(f"the onnxruntime backend needs {' and '.join(missing)}: pip install vertebra[onnx] "
                          f"(or pip install {' '.join(missing)})")


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _session(data: bytes, threads: int | None):
    from .backbone import _ort_session  # the export check's session: CPU provider, every graph optimisation

    return _ort_session(data, threads)


class OnnxRuntimeModule(nn.Module):
    """A backbone's ONNX graph in onnxruntime, called like the backbone (see the module docstring)."""

    def __init__(self, model: nn.Module, example: Tensor | None = None, *, threads: int | None = None,
                 rtol: float = 1e-3, atol: float = 1e-4):
        super().__init__()
        require_onnxruntime()
        from .backbone import check_onnx, example_input, export_onnx, sample_inputs

        model = model.eval()
        if example is None:
            example = example_input(model, None, 1)
        example = example.detach().float().cpu()
        try:
            data = export_onnx(model, None, example, dynamic_batch=True, dynamic_size=True)
            self.fixed_size = None
        except ValueError:  # pools to a fixed grid: exact at the example's size only
            data = export_onnx(model, None, example, dynamic_batch=True)
            self.fixed_size = tuple(example.shape[-2:])
        check = check_onnx(model, data, sample_inputs(example, True, self.fixed_size is None,
                                                      int(getattr(model, "min_input_size", 32))),
                           rtol=rtol, atol=atol, threads=threads)
        if not check.ok:
            raise ValueError(f"{getattr(model, 'name', type(model).__name__)}: the onnxruntime graph does not give "
                             f"PyTorch's outputs ({check})")
        self.check = check
        self.name = getattr(model, "name", type(model).__name__)
        with torch.no_grad():
            out = model(example)
        self.returns_list = isinstance(out, (list, tuple))
        self.onnx_bytes = data
        self.session = _session(data, threads)
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: Tensor):
        if self.fixed_size is not None and tuple(x.shape[-2:]) != self.fixed_size:
            raise ValueError(f"{self.name} runs in onnxruntime at {self.fixed_size[0]}x{self.fixed_size[1]} only (it "
                             f"pools to a fixed grid), got {x.shape[-2]}x{x.shape[-1]}")
        outs = self.session.run(None, {self.input_name: x.detach().float().cpu().contiguous().numpy()})
        tensors = [torch.from_numpy(o) for o in outs]
        return tensors if self.returns_list else tensors[0]

    def extra_repr(self) -> str:
        return f"{self.name}, onnxruntime, {len(self.onnx_bytes) / 2**20:.1f} MiB graph"


def _same_scores(model, data: bytes, batch: Tensor, sizes: Tensor, rtol: float, atol: float):
    """The whole graph against the eager postprocessing: per image the same number of detections with the same
    scores (sorted; near-equal scores may come in another order, so boxes are not compared one to one)."""
    import numpy as np

    from ..detection.export import reference_detections
    from .backbone import ExportCheck

    refs = reference_detections(model, batch, sizes)
    _, scores, _, index = _session(data, None).run(None, {"images": batch.numpy(), "image_sizes": sizes.numpy()})
    diff, details = 0.0, []
    for i, ref in enumerate(refs):
        mine = np.sort(scores[index == i])[::-1]
        theirs = np.sort(ref["scores"].numpy())[::-1]
        if len(mine) != len(theirs):
            diff = float("inf")
            details.append(f"image {i}: {len(mine)} detections, PyTorch {len(theirs)}")
            continue
        d = float(np.abs(mine - theirs).max(initial=0.0))
        details.append(f"image {i}: {len(mine)} detections, scores max abs diff {d:.3g}")
        diff = max(diff, d)
    return ExportCheck(diff, 1.0, atol + rtol, details)


class OnnxRuntimeDetector(nn.Module):
    """A RetinaNet's ONNX graph (network, decoding, NMS) in onnxruntime, called like the detector (see the module
    docstring). ``size``: the canvas (default the detector's ``min_size``, rounded up to its pad multiple)."""

    def __init__(self, model: nn.Module, size: int | None = None, *, threads: int | None = None,
                 rtol: float = 1e-3, atol: float = 1e-3):
        super().__init__()
        require_onnxruntime()
        from ..detection.export import export_retinanet_onnx, sample_detection_batch

        model = model.eval()
        t = model.transform
        pad = int(t.size_divisible)
        if size is None:
            size = int(max(t.min_size) if isinstance(t.min_size, (list, tuple)) else t.min_size)
        self.size = int(-(-int(size) // pad) * pad)
        self.mean = [float(v) for v in t.image_mean.flatten()]
        self.std = [float(v) for v in t.image_std.flatten()]
        self.num_classes = int(model.num_classes)
        data = export_retinanet_onnx(model, io.BytesIO(), self.size, batch=1, dynamic_batch=True)
        batch, sizes, _ = sample_detection_batch(self.size)
        # two checks: the network (class logits and box codes of every anchor) exported alone against PyTorch's,
        # which holds on any weights; and the whole graph's detections against the eager postprocessing (an untrained
        # detector has few above its threshold, and its near-equal scores make the order of a threshold-0 list
        # arbitrary, so the network is where the numbers are compared)
        from .backbone import _compare, _summarise, write_onnx

        net = model.net.eval()
        probe = write_onnx(net, (batch,), None, model=model, opset_version=17, input_names=["images"],
                           output_names=["cls_logits", "bbox_regression"])
        with torch.no_grad():
            refs = list(net(batch))
        acc: list = []
        _compare(_session(probe, threads).run(None, {"images": batch.numpy()}), refs, "network", acc)
        check = self.network_check = _summarise(acc, rtol, atol)
        if check.ok:
            check = _same_scores(model, data, batch, sizes, rtol, atol)
        self.check = check
        self.onnx_bytes = data
        self.session = _session(data, threads)

    def forward(self, images) -> list[dict[str, Tensor]]:
        from ..detection.export import preprocess_for_export

        if isinstance(images, Tensor):
            images = list(images[None] if images.dim() == 3 else images)
        images = [im.detach().float().cpu() for im in images]
        batch, sizes, scales = preprocess_for_export(images, self.size, self.mean, self.std)
        boxes, scores, labels, index = (torch.from_numpy(o) for o in self.session.run(
            None, {"images": batch.numpy(), "image_sizes": sizes.numpy()}))
        out = []
        for i, im in enumerate(images):
            sel = index == i
            b = boxes[sel] / scales[i]
            h, w = im.shape[-2:]
            b[:, 0::2] = b[:, 0::2].clamp(0, w)
            b[:, 1::2] = b[:, 1::2].clamp(0, h)
            out.append({"boxes": b, "scores": scores[sel], "labels": labels[sel].long()})
        return out

    def extra_repr(self) -> str:
        return f"retinanet, onnxruntime, canvas {self.size}x{self.size}, {len(self.onnx_bytes) / 2**20:.1f} MiB graph"
