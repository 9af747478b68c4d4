"""The label-efficiency plot never hides its data under the legend."""

from __future__ import annotations


def test_legend_sits_outside_the_axes_of_a_one_budget_plot(tmp_path, monkeypatch):
    """A one-budget plot (the demo's) put the legend on the pretrained arm's point; now the
    legend's box lies right of the axes, so no point can be under it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from ssl_em.finetune.benchmark_report import Ceiling, plot

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure plot() would close
    summary = {"shipped backbone": {2: (0.776, 0.011, 4)}, "random-init (resnet18)": {2: (0.741, 0.02, 4)}, "unet-resnet18": {2: (0.761, 0.010, 4)}}
    plot(summary, "dice/membrane", tmp_path / "p.png", "demo", top=Ceiling("unet-resnet18", 2, (0.761, 0.010, 4), 2))
    (fig,) = figures
    ax = fig.axes[0]
    fig.canvas.draw()
    legend, axes = ax.get_legend().get_window_extent(), ax.get_window_extent()
    assert legend.x0 >= axes.x1  # beside the axes, not over them
    points = ax.transData.transform([(2, d[2][0]) for d in summary.values()])
    assert not any(legend.contains(x, y) for x, y in points)
    assert legend.x1 <= fig.bbox.x1 and Image.open(tmp_path / "p.png").size[0] > 600  # on the canvas, saved whole
    plt.close("all")
