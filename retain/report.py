"""Text tables and PNG figures of a run's results (``retain show``, end of ``retain run``)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from . import metrics


def pct(x: float) -> str:
    return "  -  " if x is None or np.isnan(x) else f"{100 * x:5.1f}"


def counts(results: dict) -> tuple[np.ndarray, np.ndarray]:
    """(correct, total) as square (T, T) arrays (zeros above the diagonal)."""
    n = len(results["stages"])
    correct, total = np.zeros((n, n)), np.zeros((n, n))
    for i, st in enumerate(results["stages"]):
        correct[i, : i + 1], total[i, : i + 1] = st["correct"], st["total"]
    return correct, total


def stage_line(stage: dict, num_tasks: int, summary: dict) -> str:
    i = stage["task"]
    old = summary["old_accuracy"][i]
    return (f"task {i + 1}/{num_tasks}  classes {stage['num_classes']:>4}  "
            f"acc {pct(summary['seen_accuracy'][i])}%  old {pct(old)}%  "
            f"new {pct(summary['new_accuracy'][i])}%  learn {stage['seconds_learn']:.1f}s  "
            f"eval {stage['seconds_eval']:.1f}s")


def table(results: dict) -> str:
    """The accuracy matrix and the summary numbers, as text."""
    correct, total = counts(results)
    r = metrics.accuracy_matrix(correct, total)
    s = metrics.summary(correct, total)
    n = r.shape[0]
    cfg = results["config"]
    lines = [f"{cfg['method']} on {cfg['dataset']} {cfg['scenario']} (seed {cfg['seed']}), "
             f"backbone {results['backbone']['name']} sha256 {results['backbone']['sha256'][:12]}",
             f"{'':>8}" + "".join(f"{'T' + str(j + 1):>7}" for j in range(n)) + f"{'all':>8}"]
    for i in range(n):
        row = "".join(f"{pct(r[i, j]):>7}" for j in range(n))
        lines.append(f"{'after ' + str(i + 1):>8}{row}{pct(s['seen_accuracy'][i]):>8}")
    lines += ["",
              f"average incremental accuracy (Ā)  {pct(s['avg_incremental_accuracy'])}%",
              f"last accuracy (A_B)               {pct(s['last_accuracy'])}%",
              f"forgetting                        {pct(s['forgetting'])}%",
              f"backward transfer                 {pct(s['backward_transfer'])}%"]
    if results.get("uses_batch_information"):
        lines.append("NOTE: this run uses batch information at test time (not per-sample)")
    if n < results.get("num_tasks", n):
        lines.append(f"(unfinished: {n} of {results['num_tasks']} tasks learned)")
    return "\n".join(lines)


def plot(results: dict, run_dir: Path) -> list[Path]:
    """accuracy_curve.png and accuracy_matrix.png in ``run_dir``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    correct, total = counts(results)
    r = metrics.accuracy_matrix(correct, total)
    seen = metrics.seen_accuracy(correct, total)
    classes = [st["num_classes"] for st in results["stages"]]
    title = f"{results['config']['method']} · {results['config']['dataset']} " \
            f"{results['config']['scenario']}"

    fig = Figure(figsize=(5, 3.5), dpi=120)
    ax = fig.add_subplot()
    ax.plot(classes, 100 * seen, marker="o")
    ax.set(xlabel="classes seen", ylabel="top-1 accuracy on seen classes (%)", title=title,
           ylim=(0, 100))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    curve = _save(fig, FigureCanvasAgg, run_dir / "accuracy_curve.png")

    fig = Figure(figsize=(1 + 0.6 * len(r), 1 + 0.5 * len(r)), dpi=120)
    ax = fig.add_subplot()
    ax.imshow(100 * r, vmin=0, vmax=100, cmap="viridis")
    for (i, j), v in np.ndenumerate(r):
        if not np.isnan(v):
            ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=7,
                    color="black" if v > 0.6 else "white")
    ax.set(xlabel="task evaluated", ylabel="after learning task", title=title)
    ax.set_xticks(range(len(r)), [str(j + 1) for j in range(len(r))])
    ax.set_yticks(range(len(r)), [str(j + 1) for j in range(len(r))])
    fig.tight_layout()
    matrix = _save(fig, FigureCanvasAgg, run_dir / "accuracy_matrix.png")
    return [curve, matrix]


def _save(fig, canvas, path: Path) -> Path:
    from .io import write_bytes  # (torch: imported only when a figure is written)

    buf = io.BytesIO()
    canvas(fig).print_png(buf)
    write_bytes(path, buf.getvalue())
    return path
