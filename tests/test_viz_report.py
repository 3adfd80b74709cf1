"""Figures (t-SNE, retrieval, confusion matrix, accuracy bars) and the Markdown run report, on tiny inputs."""

import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display in tests; must come before pyplot is imported

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from simclr_lib import viz  # noqa: E402
from simclr_lib.cli import main as cli_main  # noqa: E402
from simclr_lib.errors import UserError  # noqa: E402
from simclr_lib.report import fresh_path, latest_path, write_report  # noqa: E402

CLASSES = ["cat", "dog", "ship"]


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def two_clusters(n_per_cluster: int = 60, dim: int = 64, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Two Gaussian clusters around opposite directions: far apart in cosine distance."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.randn(dim, generator=g)
    a = centre + 0.3 * torch.randn(n_per_cluster, dim, generator=g)
    b = -centre + 0.3 * torch.randn(n_per_cluster, dim, generator=g)
    labels = np.array([0] * n_per_cluster + [1] * n_per_cluster)
    return torch.cat([a, b]), labels


# ---------------------------------------------------------------- t-SNE


def test_tsne_embedding_shape_determinism_and_separation():
    features, labels = two_clusters()
    first = viz.tsne_embedding(features, seed=0)
    second = viz.tsne_embedding(features, seed=0)
    assert first.shape == (120, 2)
    assert np.isfinite(first).all()
    np.testing.assert_allclose(first, second, rtol=0, atol=1e-6)
    # Nearest centroid in the 2-d map must recover the two clusters.
    centroids = np.stack([first[labels == c].mean(axis=0) for c in (0, 1)])
    predicted = np.linalg.norm(first[:, None, :] - centroids[None], axis=2).argmin(axis=1)
    assert (predicted == labels).mean() == 1.0


def test_tsne_embedding_handles_few_points_and_few_dims():
    # 10 points in 5-d: no PCA step, and the default perplexity (30) is more than sklearn allows for 10 points.
    features, _ = two_clusters(n_per_cluster=5, dim=5)
    embedding = viz.tsne_embedding(features, seed=1)
    assert embedding.shape == (10, 2)
    assert np.isfinite(embedding).all()


def test_plot_tsne_panels_legend_and_no_ticks():
    rng = np.random.default_rng(0)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    embeddings = {"random init": rng.normal(size=(6, 2)), "trained encoder": rng.normal(size=(6, 2))}
    fig = viz.plot_tsne(embeddings, labels, CLASSES, title="my t-SNE")
    assert isinstance(fig, Figure)
    assert [ax.get_title() for ax in fig.axes] == ["random init", "trained encoder"]
    assert len(fig.legends) == 1
    assert [t.get_text() for t in fig.legends[0].get_texts()] == CLASSES
    assert fig._suptitle.get_text() == "my t-SNE"
    for ax in fig.axes:
        assert len(ax.get_xticks()) == 0 and len(ax.get_yticks()) == 0
        assert ax.get_xlabel() and ax.get_ylabel()
        assert len(ax.collections[0].get_offsets()) == 6
    # Points of one class share a colour and differ from the other classes'.
    colours = fig.axes[0].collections[0].get_facecolors()
    np.testing.assert_allclose(colours[0], colours[3])
    assert not np.allclose(colours[0], colours[1])


def test_class_colours_distinct_for_many_classes():
    for n in (3, 10, 15, 100):
        colours = [tuple(np.round(to_rgba(c), 4)) for c in viz.class_colours(n)]
        assert len(set(colours)) == n


# ---------------------------------------------------------------- retrieval


def test_plot_retrieval_grid_titles_and_colours():
    n_queries, k = 2, 3
    queries = torch.randint(0, 256, (n_queries, 3, 8, 8), dtype=torch.uint8)
    neighbours = torch.randint(0, 256, (n_queries, k, 3, 8, 8), dtype=torch.uint8)
    query_labels = torch.tensor([0, 2])
    neighbour_labels = torch.tensor([[0, 1, 0], [2, 2, 0]])
    sims = torch.tensor([[0.91, 0.85, 0.80], [0.99, 0.70, 0.65]])
    fig = viz.plot_retrieval(queries, neighbours, query_labels, neighbour_labels, CLASSES, similarities=sims)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == n_queries * (k + 1)
    assert all(len(ax.images) == 1 for ax in fig.axes)
    grid = np.array(fig.axes).reshape(n_queries, k + 1)
    assert "query" in grid[0, 0].get_title() and "cat" in grid[0, 0].get_title()
    for q in range(n_queries):
        for j in range(k):
            title = grid[q, j + 1].title
            label = int(neighbour_labels[q, j])
            assert CLASSES[label] in title.get_text()
            assert f"{float(sims[q, j]):.2f}" in title.get_text()
            expected = viz.MATCH_COLOUR if label == int(query_labels[q]) else viz.MISMATCH_COLOUR
            assert to_rgba(title.get_color()) == to_rgba(expected)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["same class as the query", "another class"]


def test_plot_retrieval_without_similarities():
    fig = viz.plot_retrieval(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), torch.zeros(1, 2, 3, 4, 4, dtype=torch.uint8),
                             [1], [[1, 2]], CLASSES)
    assert len(fig.axes) == 3
    assert fig.axes[1].get_title() == "dog" and fig.axes[2].get_title() == "ship"


# ---------------------------------------------------------------- confusion matrix and bars


def test_plot_confusion_matrix_annotations_are_row_percentages():
    confusion = np.array([[8, 2, 0], [1, 1, 2], [0, 0, 0]])  # the last class has no test images
    fig = viz.plot_confusion_matrix(confusion, CLASSES)
    assert isinstance(fig, Figure)
    heatmap, colourbar = fig.axes  # the matrix and its colour bar
    expected = 100 * confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    shown = [float(t.get_text()) for t in heatmap.texts]
    np.testing.assert_allclose(shown, expected.flatten().round(1))
    assert heatmap.get_xlabel() == "predicted class" and heatmap.get_ylabel() == "true class"
    assert heatmap.get_title() == "linear probe: confusion matrix"
    assert [t.get_text() for t in heatmap.get_xticklabels()] == CLASSES
    assert [t.get_text() for t in heatmap.get_yticklabels()] == CLASSES
    assert colourbar.get_ylabel()


def test_plot_accuracy_bars_values_and_legend():
    results = {"1 %": {"SimCLR fine-tuned": 40.1, "supervised": 35.2}, "10 %": {"SimCLR fine-tuned": 60.5}}
    fig = viz.plot_accuracy_bars(results, "label fractions")
    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    assert len(ax.patches) == 3  # the missing "supervised" at 10 % gets no bar
    labels = sorted(t.get_text() for t in ax.texts)
    assert labels == ["35.2", "40.1", "60.5"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["SimCLR fine-tuned", "supervised"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1 %", "10 %"]
    assert ax.get_title() == "label fractions" and ax.get_xlabel() and ax.get_ylabel()


def test_save_figure_writes_png(tmp_path):
    path = viz.save_figure(viz.plot_accuracy_bars({"a": {"m": 1.0}}, "t"), tmp_path / "sub" / "bars.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- report


def make_run(root: Path, name: str, with_eval: bool) -> Path:
    """A fake run folder: config and summary; the full one also two evaluations and three figure files."""
    run = root / name
    run.mkdir(parents=True)
    config = {"preset": "quick", "dataset": "cifar10", "backbone": "resnet18", "width": 8, "epochs": 16,
              "batch_size": 256, "optimizer": "lars", "temperature": 0.5, "lr": 1.0, "lr_scaling": "linear",
              "weight_decay": 1e-6, "train_subset": 10000, "seed": 0}
    # summary.json's accuracies are never shown: accuracies come from eval.json only.
    summary = {"pretrain_images": 10000, "device": "CPU (2 cores)", "knn_top1": 11.0, "linear_top1": 11.5,
               "pretrain_seconds": 267.2, "total_seconds": 311.2, "run_dir": str(run)}
    if not with_eval:
        config = {k: v for k, v in config.items() if k != "lr"} | {"preset": "cifar10-r18"}
        summary["device"] = "NVIDIA H200"
    (run / "config.json").write_text(json.dumps(config))
    (run / "summary.json").write_text(json.dumps(summary))
    if not with_eval:
        return run
    evaluation = {
        "device": "CPU (2 cores)", "seconds": 123.4,
        "knn": {"top1": 42.9, "random_init_top1": 26.2, "protocol": "weighted kNN k=200", "split": "test"},
        "linear": {"top1": 44.5, "random_init_top1": 29.1, "protocol": "linear probe, last epoch", "split": "test",
                   "epochs": 100},
        "finetune": {"10": {"top1": 55.55, "protocol": "fine-tune", "epochs": 30, "labelled_images": 5000},
                     "1": {"top1": 30.1, "protocol": "fine-tune", "epochs": 30, "labelled_images": 500}},
        "supervised": {"1": {"top1": 25.0, "protocol": "from scratch", "epochs": 30}},
    }
    # An earlier evaluation stays beside the latest one (nothing is overwritten); the report reads the latest.
    (run / "eval.json").write_text(json.dumps({"knn": {"top1": 1.0, "protocol": "old kNN"}}))
    (run / "eval-2.json").write_text(json.dumps(evaluation))
    (run / "figures").mkdir()
    for figure in ("tsne", "tsne-2", "training_curves"):
        plt.imsave(run / "figures" / f"{figure}.png", np.zeros((4, 4, 3)))
    return run


def table_row(markdown: str, label: str) -> list[str]:
    """The cells after the label of the table row that starts with `label`."""
    for line in markdown.splitlines():
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == label:
            return cells[1:]
    raise AssertionError(f"no row {label!r} in the report")


def image_links(markdown: str) -> list[str]:
    return [link.strip("<>") for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)]


@pytest.fixture
def runs(tmp_path):
    return make_run(tmp_path / "runs", "full", with_eval=True), make_run(tmp_path / "runs", "bare", with_eval=False)


def test_fresh_and_latest_path_number_versions(tmp_path):
    path = tmp_path / "eval.json"
    assert latest_path(path) is None and fresh_path(path) == path
    assert latest_path(tmp_path / "missing-folder" / "eval.json") is None
    path.write_text("{}")
    assert latest_path(path) == path and fresh_path(path) == tmp_path / "eval-2.json"
    for n in range(2, 11):
        assert fresh_path(path) == tmp_path / f"eval-{n}.json"
        fresh_path(path).write_text("{}")
    assert latest_path(path) == tmp_path / "eval-10.json"  # numerically, 10 > 9
    assert fresh_path(path) == tmp_path / "eval-11.json"
    # Only a trailing -N (N >= 2) of the same stem and suffix is a version.
    for other in ("eval-99.txt", "eval-x.json", "eval-01.json", "eval-2-3.json", "my-eval-12.json", "eval-12.json.bak"):
        (tmp_path / other).write_text("{}")
    assert latest_path(path) == tmp_path / "eval-10.json"
    figure = tmp_path / "training_curves.png"
    (tmp_path / "training_curves-3.png").write_text("")
    assert latest_path(figure) == tmp_path / "training_curves-3.png"  # version 1 itself may be gone
    assert fresh_path(figure) == tmp_path / "training_curves-4.png"  # after the newest: it stays the latest
    hyphenated = tmp_path / "label-fractions.png"
    assert latest_path(hyphenated) is None and fresh_path(hyphenated) == hyphenated
    (tmp_path / "quick-20250101-120000").mkdir()  # folders too: a run folder named by its start time
    assert fresh_path(tmp_path / "quick-20250101-120000") == tmp_path / "quick-20250101-120000-2"
    assert fresh_path(tmp_path / "quick-20250101-120001") == tmp_path / "quick-20250101-120001"


def test_write_report_two_runs_side_by_side(runs):
    full, bare = runs
    path = write_report([full, bare])
    assert path == full / "report.md" and path.is_file()
    text = path.read_text()
    assert table_row(text, "")[:2] == ["full", "bare"]
    assert table_row(text, "preset") == ["quick", "cifar10-r18"]
    assert table_row(text, "backbone") == ["resnet18 (width 8)", "resnet18 (width 8)"]
    assert table_row(text, "optimiser") == ["lars, lr 1 × batch/256 = 1", "lars"]
    assert table_row(text, "pretraining images") == ["10,000", "10,000"]
    assert table_row(text, "hardware (pretraining)") == ["CPU (2 cores)", "NVIDIA H200"]
    assert table_row(text, "wall time: evaluation (eval.json)") == ["123 s (2.1 min)", "—"]
    assert table_row(text, "wall time: pretraining") == ["267 s (4.5 min)", "267 s (4.5 min)"]
    # Accuracies come from the latest eval file only; the bare run has none, so '—' (summary.json is not read).
    assert table_row(text, "kNN") == ["42.90 %", "—"]
    assert table_row(text, "linear probe") == ["44.50 %", "—"]
    assert table_row(text, "linear probe, same network at random init") == ["29.10 %", "—"]
    # Fractions: the union over runs and kinds, in numeric order, '—' where not measured.
    assert table_row(text, "fine-tuned, 1 % of labels") == ["30.10 %", "—"]
    assert table_row(text, "fine-tuned, 10 % of labels") == ["55.55 %", "—"]
    assert table_row(text, "supervised from scratch, 1 % of labels") == ["25.00 %", "—"]
    assert table_row(text, "supervised from scratch, 10 % of labels") == ["—", "—"]
    assert text.index("fine-tuned, 1 %") < text.index("fine-tuned, 10 %")
    # Protocols of the latest evaluation; the earlier file is named so it stays findable.
    assert "- `full`: eval-2.json (earlier evaluations: eval.json)" in text
    assert "  - kNN: weighted kNN k=200, test split" in text and "old kNN" not in text
    assert "  - fine-tuning (1 %, 10 %): fine-tune, 30 epochs" in text  # equal protocols merged
    assert "- `bare`: no eval.json" in text
    links = image_links(text)
    assert links == ["figures/training_curves.png", "figures/tsne-2.png"]  # the latest version of each figure
    assert all((path.parent / link).is_file() for link in links)
    assert "No figures saved." in text  # the bare run's section
    # A second report goes beside the first one.
    assert write_report([full]) == full / "report-2.md" and path.read_text() == text


def test_write_report_elsewhere_has_working_relative_links(runs, tmp_path):
    full, bare = runs
    path = write_report([bare, full], out=tmp_path / "reports" / "compare.md")
    assert path == tmp_path / "reports" / "compare.md"
    links = image_links(path.read_text())
    assert len(links) == 2
    for link in links:
        assert not Path(link).is_absolute() and link.startswith("../runs/full/figures/")
        assert (path.parent / link).is_file()
    # A folder as `out` gets report.md inside it.
    (tmp_path / "folder").mkdir()
    assert write_report([full], out=tmp_path / "folder") == tmp_path / "folder" / "report.md"


def test_report_command_line_and_bad_input(runs, tmp_path, capsys):
    full, bare = runs
    (bare / "config.json").write_text("{ not json")  # a damaged file is shown as missing, not a crash
    (full / "eval-3.json").write_text("[1, 2]")  # so is an eval file that is not a JSON object
    out = tmp_path / "cli.md"
    assert cli_main(["report", str(full), str(bare), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    text = out.read_text()
    assert all((out.parent / link).is_file() for link in image_links(text))
    assert table_row(text, "preset") == ["quick", "—"] and table_row(text, "kNN") == ["—", "—"]
    with pytest.raises(UserError):
        write_report([tmp_path / "no-such-run"])
    with pytest.raises(UserError):
        write_report([])


def test_training_curves_show_the_contrastive_accuracy_when_logged():
    steps = [{"kind": "step", "step": i, "loss": 5 - i / 10, "lr": 0.1, "contrastive_acc": i / 20} for i in range(1, 9)]
    epochs = [{"kind": "epoch", "epoch": 1, "knn_monitor_top1": 30.0}]
    fig = viz.plot_training_curves(steps + epochs)
    assert len(fig.axes) == 4 and list(fig.axes[3].lines[0].get_ydata()) == [100 * i / 20 for i in range(1, 9)]
    old_run = [{k: v for k, v in r.items() if k != "contrastive_acc"} for r in steps]
    assert len(viz.plot_training_curves(old_run + epochs).axes) == 3  # runs of earlier versions still draw
    plt.close("all")
