"""The nightly zoo report: a self-contained page with four real PNG figures, honest about missing data,
safe against hostile names, and a webhook text that lists every regression."""

from __future__ import annotations

import base64
import importlib.util
import io
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from orchestrator import zoo_plots
from orchestrator.zoo_report import (
    Night,
    NightJob,
    Regression,
    render_html,
    speedups_from_metrics,
    text_summary,
)

ROOT = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PAGE_TAGS = {"html", "head", "meta", "title", "style", "body", "p", "h1", "h2", "div", "b", "table", "thead", "tbody",
             "tr", "th", "td", "span", "code", "section", "img"}
T0 = datetime(2026, 11, 20, 1, 0, tzinfo=UTC)


@dataclass
class Section:
    title: str = ""
    images: list[str] = field(default_factory=list)
    nodata: list[str] = field(default_factory=list)


class ReportParser(HTMLParser):
    """Collects tags, attributes, per-section images and "no data" notes, and the visible text."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str, str]] = []
        self.sections: list[Section] = []
        self.text: list[str] = []
        self._in: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attrs += [(tag, name, value or "") for name, value in attrs]
        if tag == "section":
            self.sections.append(Section())
        if tag == "img" and self.sections:
            self.sections[-1].images.append(dict(attrs)["src"] or "")
        if tag not in ("img", "meta"):
            self._in.append(tag if tag != "p" or ("class", "nodata") not in attrs else "nodata")

    def handle_endtag(self, tag: str) -> None:
        if self._in:
            self._in.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self.sections and self._in and self._in[-1] == "h2":
            self.sections[-1].title += data
        if self.sections and self._in and self._in[-1] == "nodata":
            self.sections[-1].nodata.append(data)


def parse(page: str) -> ReportParser:
    parser = ReportParser()
    parser.feed(page)
    parser.close()
    return parser


def job(model: str, recipe: str, night: int, *, ppl: float = 12.0, status: str = "succeeded", tune: bool = True,
        error: str | None = None, reused: bool = False) -> NightJob:
    if status != "succeeded":
        return NightJob(model, recipe, f"{model}-{recipe}-{night}", status, stage_seconds={"calibrate": 5.0},
                        error=error)
    metrics = {"perplexity": ppl, "dense_perplexity": ppl / 1.2, "sparsity": 0.5, "model_size_bytes": 4e8}
    speedups = (("2048x2048.16", 0.97), ("8192x2048.2048", 1.41), ("2048x2048.2048", 1.22 + 0.01 * night))
    stages = {"calibrate": 12.0, "prune": 40.5, "evaluate": 9.0} | ({"kernel_tune": 30.0} if tune else {})
    return NightJob(model, recipe, f"{model}-{recipe}-{night}", status, reused=reused, metrics=metrics,
                    stage_seconds=stages, kernel_speedups=speedups if tune else ())


def night(index: int, jobs: list[NightJob], regressions: tuple[Regression, ...] = ()) -> Night:
    start = T0 + timedelta(days=index)
    return Night("team-zoo", f"n{index}", start, start + timedelta(minutes=47, seconds=3), jobs, regressions)


def zoo_history() -> list[Night]:
    nights = []
    for i in range(4):
        jobs = [job("llama-1b", "2of4", i, ppl=12.0 + 0.1 * i), job("llama-1b", "wanda50", i, ppl=14.0, tune=False),
                job("qwen-0.5b", "2of4", i, ppl=18.0 - 0.2 * i, reused=i == 3)]
        nights.append(night(i, jobs))
    last = nights[-1]
    failed = job("mistral-7b", "2of4", 3, status="failed", error="CUDA out of memory\nTraceback ...")
    regression = Regression("llama-1b", "2of4", "perplexity", 12.2, 12.6, 0.02, "llama-1b-2of4-3", "llama-1b-2of4-2")
    nights[-1] = Night(last.zoo, last.night_id, last.started_at, last.finished_at, [*last.jobs, failed], (regression,))
    return nights


@pytest.fixture(scope="module")
def full_report() -> str:
    nights = zoo_history()
    return render_html(nights[-1], nights[:-1])


def test_page_parses_and_references_nothing_outside_itself(full_report: str) -> None:
    parsed = parse(full_report)
    assert parsed.tags[0] == "html" and "body" in parsed.tags
    assert "script" not in parsed.tags and "link" not in parsed.tags and "iframe" not in parsed.tags
    assert "http://" not in full_report and "https://" not in full_report
    for tag, name, value in parsed.attrs:
        if name in ("src", "href"):
            assert value.startswith("data:image/png;base64,"), (tag, name, value[:60])
    csp = [v for t, n, v in parsed.attrs if t == "meta" and n == "content" and "default-src" in v]
    assert csp == ["default-src 'none'; img-src data:; style-src 'unsafe-inline'"]


def test_four_figures_are_real_pngs_of_plausible_size(full_report: str) -> None:
    sections = parse(full_report).sections
    assert [s.title for s in sections] == [
        "Perplexity vs sparsity per model", "Key metrics over the last 4 nights",
        "Tuned kernel speedup per layer shape", "Stage time per job"]
    for section in sections:
        assert len(section.images) == 1 and not section.nodata, section
        png = base64.b64decode(section.images[0].removeprefix("data:image/png;base64,"), validate=True)
        assert png.startswith(PNG_SIGNATURE)
        assert b"http" not in png  # matplotlib's "Software" chunk (with its URL) is dropped
        with Image.open(io.BytesIO(png)) as image:
            image.load()
            assert image.format == "PNG"
            assert 500 <= image.width <= 1200 and 150 <= image.height <= 3000, (section.title, image.size)


def test_headline_tables_and_counts(full_report: str) -> None:
    text = " ".join(" ".join(parse(full_report).text).split())
    for value, name in [("4", "jobs"), ("3", "succeeded"), ("1", "reused"), ("1", "failed"), ("1", "regressions"),
                        ("47 min 03 s", "wall time")]:
        assert f"{value} {name}" in text
    assert "llama-1b 2of4 perplexity 12.2 12.6 +3.3% > +2.0% llama-1b-2of4-3 llama-1b-2of4-2" in text
    assert "mistral-7b 2of4 failed" in text and "CUDA out of memory" in text and "Traceback" not in text
    assert "succeeded regressed" in text


def test_missing_data_gives_notes_not_figures_or_exceptions() -> None:
    crashed = [job("llama-1b", "2of4", 0, status="failed", error="boom"),
               NightJob("qwen", "2of4", "q0", "cancelled")]
    first = Night("z", "n0", T0, None, crashed)
    sections = parse(render_html(first)).sections
    assert [len(s.images) for s in sections] == [0, 0, 0, 1]  # the failed job still spent 5 s calibrating
    assert all(len(s.nodata) == 1 for s in sections[:3])
    assert "no earlier night" in sections[1].nodata[0] and "kernel_tune" in sections[2].nodata[0]

    empty = parse(render_html(Night("z", "n0", T0, None, [])))
    assert [len(s.images) for s in empty.sections] == [0, 0, 0, 0]
    assert all(len(s.nodata) == 1 for s in empty.sections)
    assert "still running" in " ".join(empty.text)


def test_first_night_with_data_has_every_figure_but_the_trend() -> None:
    untuned = Night("z", "n0", T0, T0 + timedelta(hours=1), [job("llama-1b", "wanda50", 0, tune=False)])
    sections = parse(render_html(untuned)).sections
    assert [len(s.images) for s in sections] == [1, 0, 0, 1]


def test_trend_covers_only_the_last_n_nights_before_this_one() -> None:
    nights = zoo_history()
    later = night(9, [job("llama-1b", "2of4", 9, ppl=99.0)])
    page = render_html(nights[-1], [later, *nights[:-1]], trend_nights=2)
    assert parse(page).sections[1].title == "Key metrics over the last 2 nights"
    with pytest.raises(ValueError, match="trend_nights"):
        render_html(nights[-1], trend_nights=0)


def test_hostile_strings_are_escaped_and_still_drawn() -> None:
    evil = "<script>alert(1)</script>"
    attr = '"><img src=x onerror=alert(1)>'
    jobs = [job(evil, attr, 0), job("$\\frac{broken$_{", "_hidden", 0),
            job("m", "r", 0, status="failed", error="<b>bold</b> & <!channel>")]
    regression = Regression(evil, attr, "<i>ppl</i>", 1.0, 2.0, 0.02, evil, attr)
    page = render_html(Night(evil, attr, T0, T0 + timedelta(seconds=5), jobs, (regression,)), notice=evil)
    parsed = parse(page)
    assert "<script>" not in page and "<b>bold" not in page and "<i>ppl" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert set(parsed.tags) <= PAGE_TAGS  # no element came from the data
    assert all(value.startswith("data:image/png;base64,") for t, n, value in parsed.attrs if n in ("src", "href"))
    assert not [a for a in parsed.attrs if a[1].startswith("on")]
    assert evil in " ".join(parsed.text)  # shown to the reader as text
    sections = parsed.sections
    assert [len(s.images) for s in sections] == [1, 0, 1, 1]  # mathtext-looking names did not break matplotlib


def test_text_summary_lists_counts_each_regression_and_failures() -> None:
    nights = zoo_history()
    drop = Regression("qwen-0.5b", "2of4", "kernel_speedup_geomean", 1.25, 1.10, -0.05, "q3", "q2")
    last = nights[-1]
    summary = text_summary(Night(last.zoo, last.night_id, last.started_at, last.finished_at, last.jobs,
                                 (*last.regressions, drop, Regression("a<!channel>", "r", "size", 0.0, 5.0, 0.01,
                                                                      "j", "p"))))
    lines = summary.splitlines()
    assert lines[0] == ("Zoo team-zoo night n3: 4 jobs, 3 succeeded (1 reused), 1 failed, 3 regressions; "
                        "wall time 47 min 03 s")
    assert "- llama-1b/2of4: perplexity 12.2 -> 12.6 (+3.3% > +2.0%) job llama-1b-2of4-3" in lines
    assert "- qwen-0.5b/2of4: kernel_speedup_geomean 1.25 -> 1.1 (-12.0% &lt; -5.0%) job q3" in lines
    assert "- a&lt;!channel&gt;/r: size 0 -> 5 (n/a > +1.0%) job j" in lines
    assert "- failed: mistral-7b/2of4 job mistral-7b-2of4-3: CUDA out of memory" in lines
    assert "<" not in summary
    assert len(lines) == 5


def test_bad_input_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"Night\.started_at must be a timezone-aware datetime"):
        Night("z", "n", datetime(2026, 1, 1), None)  # naive: the point of the test
    with pytest.raises(ValueError, match=r"Night\.finished_at is before"):
        Night("z", "n", T0, T0 - timedelta(seconds=1))
    with pytest.raises(TypeError, match=r"NightJob\.metrics\['perplexity'\] must be a number"):
        NightJob("m", "r", "j", "succeeded", metrics={"perplexity": "12"})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match=r"NightJob\.model must be a non-empty string"):
        NightJob("", "r", "j", "succeeded")
    with pytest.raises(ValueError, match=r"NightJob\.kernel_speedups\[0\]"):
        NightJob("m", "r", "j", "succeeded", kernel_speedups=("4096x4096.16",))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"Regression\.old must be a number"):
        Regression("m", "r", "perplexity", None, 1.0, 0.02, "j", "p")  # type: ignore[arg-type]


def test_speedups_from_kernel_tune_metrics_in_natural_order() -> None:
    metrics = {"perplexity": 9.0, "kernel_speedup.4096x11008.16": 1.1, "kernel_speedup.4096x4096.2048": 1.4,
               "kernel_speedup.4096x4096.16": 0.9, "kernel_tuned_shapes": 2.0}
    assert speedups_from_metrics(metrics) == (("4096x4096.16", 0.9), ("4096x4096.2048", 1.4),
                                              ("4096x11008.16", 1.1))


def test_docs_sample_script_builds_a_labelled_report(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("make_zoo_report_sample", ROOT / "docs/make_zoo_report_sample.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    built = module.build(tmp_path / "sample.html")
    for page in (built.read_text(), (ROOT / "docs/zoo-report-sample.html").read_text()):
        parsed = parse(page)
        assert "the zoo, the jobs and every number on this page are made up" in page
        assert [len(s.images) for s in parsed.sections] == [1, 1, 1, 1]
        assert re.search(r"<b>1</b>regressions", page) and re.search(r"<b>1</b>failed", page)


def _png_size(png: bytes | None) -> tuple[int, int]:
    assert png is not None and png.startswith(PNG_SIGNATURE)
    with Image.open(io.BytesIO(png)) as image:
        return image.size


def test_stage_figure_grows_with_jobs_up_to_its_cap() -> None:
    def jobs(n: int) -> list[tuple[str, dict[str, float]]]:
        return [(f"model-{i}/r", {"prune": 10.0 + i, "evaluate": 3.0}) for i in range(n)]

    few, cap, many = (_png_size(zoo_plots.stage_times(jobs(n)))[1] for n in (4, zoo_plots.STAGE_BARS_MAX, 90))
    assert few < cap == many
    assert zoo_plots.stage_times([("a/r", {}), ("b/r", {"prune": float("nan")})]) is None


def test_plot_labels_are_literal_text() -> None:
    assert zoo_plots.label("$\\alpha$") == r"\$\alpha\$"
    assert zoo_plots.label("_hidden") == " _hidden"
    assert zoo_plots.label("a\nb   c") == "a b c"
    assert len(zoo_plots.label("x" * 500)) == 48
