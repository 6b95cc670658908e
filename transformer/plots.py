"""Figures of a run: training curves from metrics.jsonl, attention heatmaps, and an HTML page of them.

    plots.plot_training(["runs/a", "runs/b"], "curves.png")     # one line per run
    plots.attention_heatmaps(weights, rows, columns, "Layer 0", "layer0.png")   # weights [N, T, S]
    plots.write_page("index.html", "Title", ["a paragraph"], [("Heading", [("layer0.png", "caption")])])

matplotlib is imported only when a figure is drawn, and figures are `matplotlib.figure.Figure`s
saved as PNG by its Agg canvas: no pyplot, no GUI backend, nothing global is switched.
"""

from __future__ import annotations

import html
import json
import math
import os
import urllib.parse
from collections.abc import Sequence

import numpy as np

from transformer import metrics

# (metrics.jsonl key, panel title), in the order the panels are drawn; a metric no run wrote is left out.
TRAINING_METRICS = (
    ("train/loss", "training loss"),
    ("eval/loss", "eval loss"),
    ("eval/bleu", "BLEU (dashed: lowercased)"),
    ("train/learning_rate", "learning rate"),
    ("train/tokens_per_s", "tokens/s"),
)
_COMPANIONS = {"eval/bleu": "eval/bleu_lc"}  # drawn dashed in the same panel
TIME_LABEL = "wall-clock time (min)"


def _figure(**kwargs):
    from matplotlib.figure import Figure  # noqa: PLC0415 - only when a figure is drawn

    return Figure(layout="constrained", **kwargs)


# ---------------------------------------------------------------------------------------------
# Training curves.


def read_metrics(workdir: str) -> list[dict]:
    """The records of `<workdir>/metrics.jsonl`, skipping a line cut short by a crash."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: is {workdir} the workdir of a training run?")
    records = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and "step" in record:
                records.append(record)
    return records


def series(records: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the records that hold `key`, in step order."""
    points = sorted((r["step"], r[key]) for r in records if key in r)
    return np.array([p[0] for p in points], float), np.array([p[1] for p in points], float)


def training_minutes(records: Sequence[dict], steps: np.ndarray) -> np.ndarray | None:
    """Minutes since the run started at each of `steps`; None if the run logged neither times nor step times.

    Records with a `wall_time` (metrics.MetricsWriter writes one) give true wall-clock time,
    evaluation, checkpoints and any pause before a resume included. The run's start is the first
    record's time less the step time of the steps before it (mostly compilation). Older files
    without timestamps: the sum of the logged `train/step_time` (seconds per step, averaged over
    each logging window) times the steps of each window, training only.
    Both are interpolated between records.
    """
    logged, step_time = series(records, "train/step_time")
    window = np.diff(logged, prepend=0.0)  # steps in each logging window
    summed = np.concatenate([[0.0], np.cumsum(window * step_time) / 60.0])
    summed_steps = np.concatenate([[0.0], logged])
    stamped = {}
    for record in sorted((r for r in records if metrics.WALL_TIME in r), key=lambda r: r[metrics.WALL_TIME]):
        stamped.setdefault(float(record["step"]), float(record[metrics.WALL_TIME]))  # a step's first record
    if stamped:
        stamp_steps, stamps = np.array(sorted(stamped)), np.array([stamped[s] for s in sorted(stamped)])
        before = np.interp(stamp_steps[0], summed_steps, summed) if len(logged) else 0.0
        minutes = before + (stamps - stamps[0]) / 60.0
        return np.interp(steps, np.concatenate([[0.0], stamp_steps]), np.concatenate([[0.0], minutes]))
    if not len(logged):
        return None
    return np.interp(steps, summed_steps, summed)


def run_labels(workdirs: Sequence[str]) -> list[str]:
    """Each workdir's name (its last path component), or the path itself where two names clash."""
    names = [os.path.basename(os.path.normpath(w)) for w in workdirs]
    return [name if names.count(name) == 1 else w for name, w in zip(names, workdirs)]


def plot_training(workdirs: Sequence[str], path: str) -> str:
    """Draws the `TRAINING_METRICS` of every run against step (left) and wall-clock time (right) into `path`.

    One line per run, labelled by its workdir's name; one row per metric that any run wrote.
    Returns `path`.
    """
    runs = [(label, read_metrics(w)) for label, w in zip(run_labels(workdirs), workdirs)]
    panels = [(key, title) for key, title in TRAINING_METRICS if any(key in r for _, records in runs for r in records)]
    if not panels:
        raise ValueError(f"No metric to plot ({', '.join(k for k, _ in TRAINING_METRICS)}) in the metrics.jsonl of "
                         f"{', '.join(workdirs)}.")
    fig = _figure(figsize=(10, 2.4 * len(panels) + 0.6))
    axes = fig.subplots(len(panels), 2, squeeze=False)
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for row, (key, title) in enumerate(panels):
        by_step, by_time = axes[row]
        for (label, records), color in zip(runs, colors):
            for k, style in ((key, "-"), (_COMPANIONS.get(key), "--")):
                steps, values = series(records, k) if k else (np.array([]), None)
                if not len(steps):
                    continue
                line = dict(color=color, linewidth=1.2, marker="o" if len(steps) == 1 else None)  # a lone point shows
                by_step.plot(steps, values, style, label=label if style == "-" else None, **line)
                minutes = training_minutes(records, steps)
                if minutes is not None:
                    by_time.plot(minutes, values, style, **line)
        for ax in (by_step, by_time):
            ax.set_title(title, fontsize=9)
            ax.grid(True, alpha=0.3)
            ax.tick_params(labelsize=8)
            if key == "train/learning_rate":
                ax.yaxis.set_major_formatter("{x:.1e}")  # not an offset text, which the title would cover
    axes[-1][0].set_xlabel("step", fontsize=9)
    axes[-1][1].set_xlabel(TIME_LABEL, fontsize=9)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper center", ncol=min(len(runs), 4), fontsize=9, frameon=False)
    _save(fig, path)
    return path


# ---------------------------------------------------------------------------------------------
# Attention maps.


def attention_heatmaps(weights, row_labels: Sequence[str], column_labels: Sequence[str], title: str, path: str, *,
                       row_axis: str = "query", column_axis: str = "key", head_titles: Sequence[str] | None = None,
                       columns: int = 4) -> str:
    """A grid of heatmaps, one per head: weights [N, T, S] (or [T, S]) in [0, 1], rows T, columns S.

    The tick labels are the tokens at each query (row) and key (column) position. Returns `path`.
    """
    weights = np.asarray(weights, np.float32)
    if weights.ndim == 2:
        weights = weights[None]
    num_heads, q_len, kv_len = weights.shape
    if (len(row_labels), len(column_labels)) != (q_len, kv_len):
        raise ValueError(f"{len(row_labels)} row and {len(column_labels)} column labels for weights {weights.shape}.")
    columns = min(columns, num_heads)
    rows = math.ceil(num_heads / columns)
    # Panels grow with the sequence so that every token keeps a readable tick label.
    panel_w, panel_h = max(2.6, 0.17 * kv_len + 1.2), max(2.4, 0.17 * q_len + 1.0)
    fig = _figure(figsize=(columns * panel_w + 0.8, rows * panel_h + 0.5))
    axes = fig.subplots(rows, columns, squeeze=False)
    image = None
    for h, ax in enumerate(axes.flat):
        if h >= num_heads:
            ax.set_axis_off()
            continue
        image = ax.imshow(weights[h], cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
        ax.set_xticks(range(kv_len), column_labels, rotation=90, fontsize=7)
        ax.set_yticks(range(q_len), row_labels, fontsize=7)
        if head_titles is not None:
            ax.set_title(head_titles[h], fontsize=8)
        elif num_heads > 1:
            ax.set_title(f"head {h}", fontsize=8)
        if h % columns == 0:
            ax.set_ylabel(row_axis, fontsize=8)
        if h // columns == rows - 1 or h + columns >= num_heads:
            ax.set_xlabel(column_axis, fontsize=8)
    fig.colorbar(image, ax=axes, shrink=0.8, label="attention weight")
    fig.suptitle(title, fontsize=10)
    _save(fig, path)
    return path


def _save(fig, path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)


# ---------------------------------------------------------------------------------------------
# A page of figures.


def write_page(path: str, title: str, paragraphs: Sequence[str], sections: Sequence[tuple[str, Sequence]]) -> str:
    """A static HTML page: a title, paragraphs of text, then sections (heading, [(image, caption)]).

    Image paths are written relative to the page's directory, so the folder can be moved or served
    as it is. Text is HTML-escaped. Returns `path`.
    """
    directory = os.path.dirname(os.path.abspath(path))
    lines = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             f"<title>{html.escape(title)}</title>",
             "<style>body { font-family: sans-serif; margin: 1.5em; } "
             "figure { margin: 0 0 1.5em 0; } img { max-width: 100%; border: 1px solid #ddd; } "
             "figcaption { color: #555; font-size: 0.9em; }</style>",
             "</head>", "<body>", f"<h1>{html.escape(title)}</h1>"]
    lines += [f"<p>{html.escape(p)}</p>" for p in paragraphs]
    for heading, images in sections:
        lines.append(f"<h2>{html.escape(heading)}</h2>")
        for image, caption in images:
            src = urllib.parse.quote(os.path.relpath(os.path.abspath(image), directory).replace(os.sep, "/"))
            lines += ["<figure>", f'<img src="{html.escape(src)}" alt="{html.escape(caption)}">',
                      f"<figcaption>{html.escape(caption)}</figcaption>", "</figure>"]
    lines += ["</body>", "</html>"]
    os.makedirs(directory, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path
