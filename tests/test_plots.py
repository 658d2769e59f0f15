"""The offline page of `dvc plots show`: every chart drawn by a real browser that has no network."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import typing
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from pipeline import plots
from pipeline.config import HeadKind
from tests.conftest import ROOT, run, write_params

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHARTS = {
    "loss", "accuracy", "confusion_normalized", "reports_evaluate_plots_sklearn_confusion_matrix_json",
    "reports_evaluate_plots_sklearn_roc_json", "reports_evaluate_plots_sklearn_precision_recall_json",
    "reports_evaluate_per_class_json", "reports_curve_curve_csv",
}  # fmt: skip
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


def test_the_offline_page_is_dvcs_page_with_the_scripts_inlined():
    page = plots.offline_page("/* the bundle */")
    assert "{plot_divs}" in page and "{scripts}" not in page
    assert "<script>\n/* the bundle */\n</script>" in page and "src=" not in page


def test_the_confusion_templates_are_dvcs_own_with_thinned_labels():
    from dvc_render.vega_templates import ConfusionTemplate, NormalizedConfusionTemplate

    templates = plots.thinned_confusion_templates()
    for dvcs in (ConfusionTemplate, NormalizedConfusionTemplate):
        ours = templates[dvcs.DEFAULT_NAME]
        for axis in ("x", "y"):
            assert ours["spec"]["encoding"][axis].pop("axis") == {"labelOverlap": True}
        assert ours == dvcs.DEFAULT_CONTENT


def test_the_training_curves_name_the_step_of_each_head_on_their_x_axis(reproduced: Path):
    """Regression: the x axis read "Epoch (logreg: the index of C in train.logreg_C)" whatever the head."""
    for head in typing.get_args(HeadKind):
        write_params(reproduced, {"train": {"head": head}})  # what dvc.yaml's plots read: nothing re-runs
        shown = json.loads(run(reproduced, "dvc", "plots", "show", "--json").stdout)
        assert "errors" not in shown, shown["errors"]
        for chart in ("loss", "accuracy"):
            (plot,) = shown["data"][chart]
            axis = "Index of C in train.logreg_C" if head == "logreg" else "Epoch"
            assert plot["content"]["encoding"]["x"]["title"] == axis, (head, chart)


def test_the_templates_of_the_training_curves_differ_in_the_x_axis_alone():
    """.dvc/plots/epochs_<head>.json, one per head (dvc.yaml picks one by train.head): the same chart but its x axis."""
    templates = {h: json.loads((ROOT / f".dvc/plots/epochs_{h}.json").read_text()) for h in typing.get_args(HeadKind)}
    axes = {head: template["encoding"]["x"].pop("title") for head, template in templates.items()}
    assert axes == {"linear": "Epoch", "mlp": "Epoch", "logreg": "Index of C in train.logreg_C"}
    for template in templates.values():
        del template["description"]
    assert all(template == templates["mlp"] for template in templates.values())


class Charts(HTMLParser):
    """The vega charts of a rendered page: for each chart's element id, its drawn marks and its texts."""

    def __init__(self) -> None:
        super().__init__()
        self.marks: dict[str, int] = {}
        self.texts: dict[str, list[str]] = {}
        self.images: list[str] = []
        self._open: list[tuple[str, str | None, bool]] = []  # (tag, chart id, inside a mark group)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        chart, in_mark = self._open[-1][1:] if self._open else (None, False)
        if tag == "div" and "vega-embed" in a.get("class", ""):
            chart = a["id"]
            self.marks[chart], self.texts[chart] = 0, []
        in_mark = in_mark or (tag == "g" and "role-mark" in a.get("class", ""))
        if chart and in_mark and tag == "path" and a.get("d", "").startswith("M"):
            self.marks[chart] += 1
        if tag == "img":
            self.images.append(a.get("src", ""))
        if tag not in VOID:
            self._open.append((tag, chart, in_mark))

    def handle_endtag(self, tag: str) -> None:
        while self._open and self._open.pop()[0] != tag:
            pass

    def handle_data(self, data: str) -> None:
        if self._open and self._open[-1][1] and data.strip():
            self.texts[self._open[-1][1]].append(data.strip())


@pytest.fixture(scope="session")
def page(reproduced_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`dvc plots show` of the session's three-class project, with the offline template installed."""
    project = Path(shutil.copytree(reproduced_template, tmp_path_factory.mktemp("plots") / "p", symlinks=True))
    run(project, "python", "-m", "pipeline.plots")
    run(project, "dvc", "plots", "show", "-o", "html")
    return project / "html" / "index.html"


def test_the_page_loads_nothing_from_the_network(page: Path):
    html = page.read_text()
    assert "cdn.jsdelivr.net" not in html and "<script src=" not in html
    assert html.count("vegaEmbed('#") == len(CHARTS)


def render(page: Path) -> str:
    """The page's DOM after its scripts ran, in headless Chromium, every request sent to a closed port."""
    with tempfile.TemporaryDirectory() as profile:
        flags = [
            "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
            "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>", "--virtual-time-budget=20000",
        ]  # fmt: skip
        result = subprocess.run(
            [CHROMIUM, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=180
        )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium)")
def test_every_chart_draws_in_a_browser_without_network(page: Path):
    charts = Charts()
    charts.feed(render(page))
    assert set(charts.marks) == CHARTS
    assert all(charts.marks[c] > 0 for c in CHARTS), charts.marks  # an SVG with drawn marks, not an empty frame
    for chart in ("confusion_normalized", "reports_evaluate_plots_sklearn_confusion_matrix_json"):
        assert {"cat", "dog", "owl"} <= set(charts.texts[chart])  # class names on the axes
    assert {"Loss per epoch", "train/loss.tsv", "val/loss.tsv"} <= set(charts.texts["loss"])
    assert any(text.startswith("cat (") for text in charts.texts["reports_evaluate_per_class_json"])
    audit = {Path(src).name.rsplit("_", 1)[-1] for src in charts.images if "audit" in src}  # workspace_reports_…
    assert audit == {"leaks.png", "labels.png", "duplicates.png", "outliers.png"}, charts.images  # contact sheets
    (sheet,) = [src for src in charts.images if src.endswith("worst_test_images.png")]
    image = Image.open(page.parent / sheet)
    tests = (page.parents[1] / "data" / "prepared" / "manifest.csv").read_text().count(",test,")
    assert image.size == (4 * 128, -(-min(tests, 16) // 4) * (128 + 14))  # the test images, rows of 4
