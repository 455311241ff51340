"""PNG plots written into runs, when matplotlib is installed (`pip install "transferctl[plots]"`):

    curves.png      training and validation loss, learning rate and the other validation metrics per epoch (training runs)
    confusion.png   the confusion matrix (evaluations of classifiers)
    regression.png  predicted against true values (evaluations of regressors)
    segmentation.png test images with their true and predicted masks (evaluations of segmenters)
    views.png       augmented view pairs from the first training batch (SimCLR: a method draws its own)

Without matplotlib they are skipped quietly. A plot never fails a run: a problem drawing one goes to
the run's log. matplotlib is used through its object API (no pyplot): no global backend, no GUI.
"""

from __future__ import annotations

import importlib.util
import io
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from transferctl.runs import Run

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure

    from transferctl.data.samples import Batch


def available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _write_png(run: Run, name: str, draw: Callable[[], Figure]) -> None:
    """Draw and write one PNG through the run (atomically); skipped without matplotlib or on rank > 0."""
    if not run.writer or not available():
        return
    try:
        figure = draw()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=100)
    except Exception as exc:  # a plot is a convenience: never lose a finished run to one
        run.log(f"{name} not written: {type(exc).__name__}: {exc}")
        return
    run.write_file(name, buffer.getvalue())


def write_curves(run: Run) -> None:
    """curves.png from the run's metrics rows: loss, learning rate and the method's or task's other validation
    metrics (classifiers: val_accuracy) by epoch."""
    rows = [r for r in run.metrics if "epoch" in r]
    if rows:
        _write_png(run, "curves.png", lambda: _curves(rows))


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _curves(rows: list[dict[str, Any]]) -> Figure:
    from matplotlib.figure import Figure

    validation = tuple(dict.fromkeys(k for r in rows for k, v in r.items() if k.startswith("val_") and k != "val_loss" and _number(v)))
    panels = [("loss", ("train_loss", "val_loss")), ("learning rate", ("lr",)), ("validation", validation)]
    panels = [(title, keys) for title, keys in panels if any(r.get(k) is not None for r in rows for k in keys)]
    figure = Figure(figsize=(4.2 * len(panels), 3.4), layout="constrained")
    for ax, (title, keys) in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
        for key in keys:
            points = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=key)
        ax.set(title=title, xlabel="epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend()
    return figure


def write_confusion(run: Run, classes: list[str], confusion: list[list[int]], title: str = "confusion matrix") -> None:
    _write_png(run, "confusion.png", lambda: _confusion(classes, confusion, title))


def _confusion(classes: list[str], confusion: list[list[int]], title: str) -> Figure:
    from matplotlib.figure import Figure

    size = max(4.0, 0.45 * len(classes) + 2)
    figure = Figure(figsize=(size + 1, size), layout="constrained")
    ax = figure.subplots()
    image = ax.imshow(confusion, cmap="Blues")
    figure.colorbar(image, ax=ax)
    ticks = range(len(classes))
    ax.set(xticks=ticks, yticks=ticks, xlabel="predicted", ylabel="true", title=title)
    ax.set_xticklabels(classes, rotation=90)
    ax.set_yticklabels(classes)
    if len(classes) <= 20:  # counts stay legible up to about 20 classes
        peak = max(max(row) for row in confusion) or 1
        for i, row in enumerate(confusion):
            for j, count in enumerate(row):
                ax.text(j, i, count, ha="center", va="center", fontsize=7, color="white" if count > peak / 2 else "black")
    return figure


def write_regression(run: Run, names: list[str], predictions: torch.Tensor, targets: torch.Tensor) -> None:
    """regression.png: predicted against true, one panel per target, with the line of perfect predictions."""
    _write_png(run, "regression.png", lambda: _regression(names, predictions.numpy(), targets.numpy()))


def _regression(names: list[str], predictions: Any, targets: Any) -> Figure:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.2 * len(names), 4.2), layout="constrained")
    axes = figure.subplots(1, len(names), squeeze=False)[0]
    for i, (ax, name) in enumerate(zip(axes, names, strict=True)):
        true, predicted = targets[:, i], predictions[:, i]
        low, high = min(true.min(), predicted.min()), max(true.max(), predicted.max())
        ax.scatter(true, predicted, s=4, alpha=0.4)
        ax.plot([low, high], [low, high], color="black", linewidth=1)
        ax.set(xlabel=f"true {name}", ylabel=f"predicted {name}", title=f"{name}: {len(true)} test samples")
    return figure


def write_segmentation(run: Run, images: torch.Tensor, truth: torch.Tensor, predicted: torch.Tensor, num_classes: int) -> None:
    """segmentation.png: test images (N, H, W, C in [0, 1]) above their true and their predicted masks (N, H, W)."""
    _write_png(run, "segmentation.png", lambda: _segmentation(images, truth, predicted, num_classes))


def _segmentation(images: torch.Tensor, truth: torch.Tensor, predicted: torch.Tensor, num_classes: int) -> Figure:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(1.3 * len(images), 4.3), layout="constrained")
    axes = figure.subplots(3, len(images), squeeze=False)
    for col in range(len(images)):
        image = images[col].numpy()
        axes[0][col].imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1)
        for row, masks in ((1, truth), (2, predicted)):
            mask = masks[col].numpy().astype(float)
            mask[mask == 255] = float("nan")  # no class: left blank
            axes[row][col].imshow(mask, cmap="tab20", vmin=0, vmax=max(num_classes - 1, 1), interpolation="nearest")
        for row in range(3):
            axes[row][col].set_axis_off()
    for row, title in enumerate(("image", "true mask", "predicted mask")):
        axes[row][0].set_title(title, fontsize=8, loc="left")
    figure.suptitle("segmentation of test images")
    return figure


def write_detections(run: Run, images: torch.Tensor, truth: list[torch.Tensor], found: list[torch.Tensor], classes: list[str]) -> None:
    """detections.png: test images (N, H, W, C in [0, 1]) with their true boxes (green) and the detected ones (red,
    with class and score); boxes as `boxes` rows and detection rows (x1, y1, x2, y2, score, class)."""
    _write_png(run, "detections.png", lambda: _detections(images, truth, found, classes))


def _detections(images: torch.Tensor, truth: list[torch.Tensor], found: list[torch.Tensor], classes: list[str]) -> Figure:
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    figure = Figure(figsize=(2.0 * len(images), 2.4), layout="constrained")
    axes = figure.subplots(1, len(images), squeeze=False)[0]
    for ax, image, true, detected in zip(axes, images, truth, found, strict=True):
        picture = image.numpy()
        ax.imshow(picture[..., 0] if picture.shape[-1] == 1 else picture, cmap="gray", vmin=0, vmax=1)
        for x1, y1, x2, y2 in true[:, :4].tolist():
            ax.add_patch(Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, edgecolor="lime", linewidth=1))
        for x1, y1, x2, y2, score, label in detected.tolist():
            ax.add_patch(Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, edgecolor="red", linewidth=1, linestyle="--"))
            ax.text(x1, y1 - 1, f"{classes[int(label)]} {score:.2f}", color="red", fontsize=5, va="bottom")
        ax.set_axis_off()
    figure.suptitle("test images: true boxes (green), detections (red)")
    return figure


def write_view_pairs(run: Run, views: list[torch.Tensor]) -> None:
    """views.png: each column one image, its augmented views one above the other (as the model saw them);
    `views` are displayable images, (N, H, W, C) in [0, 1] (the modality's `displayable`)."""
    write_image_rows(run, "views.png", views, "augmented view pairs, first training batch")


def write_image_rows(run: Run, name: str, rows: list[torch.Tensor], title: str, row_titles: list[str] | None = None) -> None:
    """A PNG of images in rows (each (N, H, W, C) in [0, 1]), one column per sample: views, reconstructions, ..."""
    _write_png(run, name, lambda: _image_rows(rows, title, row_titles))


def _image_rows(rows: list[torch.Tensor], title: str, row_titles: list[str] | None) -> Figure:
    from matplotlib.figure import Figure

    pixels = [v.numpy() for v in rows]
    count = len(pixels[0])
    figure = Figure(figsize=(1.3 * count, 1.3 * len(pixels) + 0.4), layout="constrained")
    axes = figure.subplots(len(pixels), count, squeeze=False)
    for row, images in enumerate(pixels):
        for col, image in enumerate(images):
            ax = axes[row][col]
            ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray" if image.shape[-1] == 1 else None, vmin=0, vmax=1)
            ax.set_axis_off()
            if row_titles and col == 0:
                ax.set_title(row_titles[row], fontsize=8, loc="left")
    figure.suptitle(title)
    return figure


class FirstBatch:
    """Wraps a training pipeline and keeps the first few samples of each input of the first batch it yields:
    what the model was really shown (drawing a separate batch would move the augmentation's random state)."""

    def __init__(self, pipeline: Any, keep: int = 8):
        self.pipeline, self.keep = pipeline, keep
        self.inputs: tuple[torch.Tensor, ...] | None = None

    def __getattr__(self, name: str) -> Any:  # views, state, restore
        return getattr(self.pipeline, name)

    def batches(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        for batch in self.pipeline.batches(epoch, start_batch):
            if self.inputs is None:
                self.inputs = tuple(v[: self.keep].detach().float().cpu() for v in batch.inputs)
            yield batch
