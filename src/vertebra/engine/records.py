"""What a run writes for people: ``metrics.csv`` (a row per log interval and per evaluation), ``loss.png``,
console lines and the progress bar. Only the main process writes (``enabled``)."""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np

from .._io import atomic_write

__all__ = ["MetricsLog", "RunConsole", "TrainWindow", "skip_lines", "data_counts", "data_line"]

log = logging.getLogger("vertebra.engine")


class MetricsLog:
    """The rows of ``metrics.csv``: ``{"kind": "train" | "eval", "step", "epoch", ...}``."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.path = Path(run_dir) / "metrics.csv"
        self.plot_path = Path(run_dir) / "loss.png"
        self.enabled = enabled
        self.rows: list[dict[str, Any]] = []

    def load(self, up_to_step: int) -> None:
        """Resuming: the rows already written, up to ``up_to_step``."""
        if self.path.is_file():
            with open(self.path, newline="", encoding="utf-8") as f:
                self.rows = [r for r in csv.DictReader(f) if int(float(r.get("step") or 0)) <= up_to_step]

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)

    def last(self) -> dict[str, Any]:
        return self.rows[-1] if self.rows else {}

    def write(self) -> None:
        if not self.enabled or not self.rows:
            return
        fields: list[str] = []
        for r in self.rows:
            fields.extend(k for k in r if k not in fields)
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=fields)
        w.writeheader()
        for r in self.rows:
            w.writerow({k: ("" if v is None else v) for k, v in r.items()})
        atomic_write(self.path, buf.getvalue())

    def plot(self, metric: str, title: str) -> None:
        """``loss.png``: the training loss against steps, and the evaluation ``metric`` on a second axis."""
        if not self.enabled or not self.rows:
            return
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:  # pragma: no cover
            return
        tr = [r for r in self.rows if r.get("kind") == "train" and r.get("loss") not in (None, "")]
        ev = [r for r in self.rows if r.get("kind") == "eval" and r.get(metric) not in (None, "")]
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        if tr:
            ax.plot([float(r["step"]) for r in tr], [float(r["loss"]) for r in tr], label="train loss", color="C0")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        if ev:
            ax2 = ax.twinx()
            ax2.plot([float(r["step"]) for r in ev], [float(r[metric]) for r in ev], "o-", color="C1",
                     label=f"val {metric}")
            ax2.set_ylabel(f"val {metric}")
            ax2.legend(loc="upper right")
        ax.legend(loc="upper left")
        ax.set_title(title)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        atomic_write(self.plot_path, buf.getvalue())


class TrainWindow:
    """The means over one log interval of the training steps: a ``metrics.csv`` train row."""

    def __init__(self):
        self.losses: list[float] = []
        self.parts: dict[str, list[float]] = {}
        self.images, self.seconds = 0, 0.0

    def add(self, loss: float, parts: dict[str, float], images: int, seconds: float) -> None:
        self.losses.append(loss)
        for k, v in parts.items():
            self.parts.setdefault(k, []).append(v)
        self.images += images
        self.seconds += seconds

    def row(self, step: int, steps_per_epoch: int, lr: float, train_seconds: float) -> dict[str, Any]:
        row = {"kind": "train", "epoch": round(step / steps_per_epoch, 4), "step": step,
               "loss": float(np.mean(self.losses))}
        row.update({f"loss_{k}": float(np.mean(v)) for k, v in self.parts.items()})
        row.update({"lr": lr, "images_per_s": self.images / max(self.seconds, 1e-9),
                    "train_minutes": train_seconds / 60})
        self.__init__()
        return row


class RunConsole:
    """Console output of the main process: a rich console when given, else print (progress) or the log."""

    def __init__(self, console=None, *, enabled: bool = True, progress: bool = True):
        self.console, self.enabled, self.show_progress = console, enabled, progress

    def print(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.console is not None:  # as it is: paths and lists in brackets are not rich markup
            self.console.print(msg, markup=False, highlight=False, soft_wrap=True)
        elif self.show_progress:
            print(msg, flush=True)
        else:
            log.info(msg)

    def progress_bar(self):
        """A rich progress bar for the epochs (None without progress output)."""
        if not (self.enabled and self.show_progress):
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        return Progress(TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  "
                                   "{task.fields[ips]:.1f} img/s"), TimeElapsedColumn(), console=self.console)

    @staticmethod
    def show_step(progress, bar, loss: float, lr: float, ips: float, step: int, steps_per_epoch: int,
                  train_seconds: float, last_row: dict[str, Any], log_every: int) -> None:
        """Advance the progress bar; off a terminal also print a line every ``10 x log_every`` steps."""
        progress.update(bar, advance=1, loss=loss, lr=lr, ips=ips)
        if not progress.console.is_terminal and step % (10 * log_every) == 0:
            progress.console.print(
                f"step {step} (epoch {step / steps_per_epoch:.2f}): loss {last_row.get('loss', loss):.4f}"
                f"  lr {lr:.2e}  {last_row.get('images_per_s', ips):.2f} img/s  {train_seconds / 60:.1f} min")


def data_counts(ds) -> dict[str, Any]:
    """A data set's :meth:`~vertebra.data.common.DetectionDataset.counts` (a classification set: its images and
    classes, and what it skipped)."""
    if hasattr(ds, "counts"):
        return ds.counts()
    out: dict[str, Any] = {"images": len(ds)}
    classes = getattr(ds, "classes", None)
    if classes is not None:
        out["classes"] = len(classes)
    out["skipped"] = dict(getattr(ds, "skipped", None) or {})
    return out


def data_line(name: str, c: dict[str, Any]) -> str:
    """One line of :func:`data_counts`: ``train: 1000 images (12 without boxes, kept), 5321 boxes of 3 classes;
    clipped 3 boxes to their image; skipped 2 (zero-area box: 1, box x2 < x1: 1)``."""
    head = f"{name}: {c['images']} images"
    if "boxes" in c:
        head += f" ({c['images_without_boxes']} without boxes, kept)" if c.get("images_without_boxes") else ""
        head += f", {c['boxes']} boxes of {c['classes']} classes"
    elif "classes" in c:
        head += f" of {c['classes']} classes"
    parts = [head]
    if c.get("clipped_boxes"):
        parts.append(f"clipped {c['clipped_boxes']} boxes to their image")
    if c.get("skipped"):
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(c["skipped"].items(), key=lambda kv: (-kv[1], kv[0])))
        parts.append(f"skipped {sum(c['skipped'].values())} ({reasons})")
    if c.get("ignored_crowd"):
        parts.append(f"left out {c['ignored_crowd']} crowd boxes")
    return "; ".join(parts)


def skip_lines(datasets: dict[str, Any], workers: int = 0) -> list[str]:
    """A line per data set (by name) that skipped bad items, with the reasons counted."""
    out = []
    for name, ds in datasets.items():
        skipped = getattr(ds, "skipped", None)
        if skipped:
            reasons = ", ".join(f"{k}: {v}" for k, v in skipped.items())
            note = "; counts from the main process only (workers keep their own)" if workers else ""
            out.append(f"{name}: skipped {sum(skipped.values())} ({reasons}){note}")
    return out
