"""The reading-latents figures: one panel per step, one line per reader, the values each line plots."""

from diffusionlens.viz.reading import plot_lens_kl, plot_reading_accuracy


def test_lens_kl_figure_plots_each_readers_values_by_step(tmp_path):
    logit = {"layers": [0, 1, 2], "steps": [0, 1], "values": [[3.0, 2.0], [2.5, 1.5], [1.0, 0.5]], "counts": [9, 4]}
    tuned = {**logit, "values": [[1.0, 0.9], [0.8, 0.7], [0.2, 0.1]]}
    figure = plot_lens_kl({"logit lens": logit, "tuned lens": tuned}, path=tmp_path / "kl.png", title="KL")
    assert (tmp_path / "kl.png").stat().st_size > 0
    step1 = figure.axes[1]
    assert [list(line.get_ydata()) for line in step1.lines] == [[2.0, 1.5, 0.5], [0.9, 0.7, 0.1]]
    assert step1.get_title() == "step 1 (n=4)" and figure._suptitle.get_text() == "KL"


def test_reading_accuracy_figure_plots_each_reader_by_layer():
    table = {
        "steps": [0, 1],
        "readers": ["logit lens", "target alone"],
        "accuracy": {"logit lens": [[0.1, 0.2], [0.5, 0.9]], "target alone": [[0.0, 0.0], [0.0, 0.1]]},
        "counts": [5, 3],
    }
    figure = plot_reading_accuracy(table)
    step0 = figure.axes[0]
    assert [list(line.get_ydata()) for line in step0.lines] == [[0.1, 0.5], [0.0, 0.0]]
    assert step0.lines[1].get_linestyle() == "--" and figure._suptitle is None
