"""Figures of the latent readers (#36): KL to the model's output by layer and step for the logit lens and the
tuned lens, and reading accuracy by layer and step for every reader.

Both take the plain dicts the measurements write (`LensKL.to_dict()`, `ReadingTable.to_dict()`), so a figure
can be redrawn from the JSON report without the model."""

from __future__ import annotations

from pathlib import Path

from diffusionlens.viz._common import finish_panels, pyplot


def plot_lens_kl(tables: dict[str, dict], path: str | Path | None = None, title: str = ""):
    """One panel per step: mean KL(model output ‖ reader) against the layer, one line per reader.

    `tables`: reader name → `LensKL.to_dict()` (layers, steps, values `[layer][step]`, counts). Saves to `path`
    (PNG) when given; returns the figure."""
    plt = pyplot()
    first = next(iter(tables.values()))
    steps = first["steps"]
    fig, axes = plt.subplots(1, len(steps), figsize=(2.6 * len(steps) + 1, 2.8), sharey=True, squeeze=False)
    for column, step in enumerate(steps):
        ax = axes[0, column]
        for name, table in tables.items():
            values = [row[table["steps"].index(step)] for row in table["values"]]
            ax.plot(table["layers"], values, marker="o", label=name)
        ax.set_yscale("symlog", linthresh=0.01)
        ax.set_title(f"step {step} (n={first['counts'][column]})", fontsize=9)
        ax.set_xlabel("layer (resid_post)")
    axes[0, 0].set_ylabel("KL to the model's output (nats)")
    axes[0, -1].legend(fontsize=8)
    return finish_panels(fig, title, path)


def plot_reading_accuracy(table: dict, path: str | Path | None = None, title: str = ""):
    """One panel per step: accuracy of each reader against the layer (`ReadingTable.to_dict()`)."""
    plt = pyplot()
    steps = table["steps"]
    fig, axes = plt.subplots(1, len(steps), figsize=(2.6 * len(steps) + 1, 2.8), sharey=True, squeeze=False)
    for column, step in enumerate(steps):
        ax = axes[0, column]
        for name in table["readers"]:
            values = [row[column] for row in table["accuracy"][name]]
            ax.plot(
                range(len(values)), values, marker="o", label=name, linestyle="--" if name == "target alone" else "-"
            )
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"step {step} (n={table['counts'][column]})", fontsize=9)
        ax.set_xlabel("layer (resid_post)")
    axes[0, 0].set_ylabel("final token read")
    axes[0, -1].legend(fontsize=7)
    return finish_panels(fig, title, path)
