"""The nightly zoo's report: one self-contained HTML page, and a few lines of text for the webhook.

Pure functions over plain data: the caller (the nightly flow, the API) reads the store and builds the
frozen dataclasses below; nothing here touches a database, Prefect or Ray, so a report renders the same
in a flow, in a test or from the docs' sample script.

The page opens from a download: CSS is inline, the four figures (`zoo_plots`) are inline
`data:image/png;base64,...` images, there is no script and no external reference, and a
Content-Security-Policy forbids loading anything else. Every string that comes from a zoo file, a recipe
or a job (model names, recipe names, errors) is hostile input and passes through `html.escape`.
Missing data (no kernel tuning, a first night, failed jobs only) prints a short "no data" note in
place of a figure.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from orchestrator import zoo_plots

# The trend figure's metrics: what a reader of the zoo checks each morning. The speedup entry is the
# geometric mean of a job's tuned per-shape speedups (see `key_metrics`).
TREND_METRICS = ("perplexity", "model_size_bytes", "kernel_speedup_geomean")
SPEEDUP_PREFIX = "kernel_speedup."
ERROR_CHARS = 300


def _check_number(owner: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{owner}.{name} must be a number, got {type(value).__name__}")


def _check_aware(owner: str, name: str, value: datetime | None) -> None:
    if value is not None and (not isinstance(value, datetime) or value.utcoffset() is None):
        raise ValueError(f"{owner}.{name} must be a timezone-aware datetime, got {value!r}")


@dataclass(frozen=True)
class Regression:
    """A metric of one (model, recipe) that moved past its tolerance since the last successful night.

    `tolerance` is a signed relative change: +0.02 means the metric may grow by at most 2% (perplexity,
    size on disk), -0.05 that it may shrink by at most 5% (a speedup). `job_id` is tonight's job,
    `previous_job_id` the job of the night it is compared with.
    """

    model: str
    recipe: str
    metric: str
    old: float
    new: float
    tolerance: float
    job_id: str
    previous_job_id: str

    def __post_init__(self) -> None:
        for name in ("old", "new", "tolerance"):
            _check_number("Regression", name, getattr(self, name))

    @property
    def change(self) -> float | None:
        """Relative change new/old - 1; None when old is 0 or either value is not finite."""
        if self.old == 0 or not (math.isfinite(self.old) and math.isfinite(self.new)):
            return None
        return self.new / self.old - 1.0


@dataclass(frozen=True)
class NightJob:
    """One (model, recipe) job of a night, as the report needs it.

    `status` is the job's final status (`succeeded`, `failed`, `cancelled`, ...); `reused` is True when
    unchanged inputs let the job reuse the previous night's stages. `metrics` holds the job's last value
    per metric name (`perplexity`, `dense_perplexity`, `sparsity`, `model_size_bytes`, ...).
    `stage_seconds` maps each stage to its wall time, in run order. `kernel_speedups` holds
    `(shape, speedup over dense)` pairs, shape as in the kernel_tune metrics (`<out>x<in>.<tokens>`;
    `speedups_from_metrics` extracts them). `sparsity` overrides `metrics["sparsity"]` when given.
    """

    model: str
    recipe: str
    job_id: str
    status: str
    reused: bool = False
    metrics: Mapping[str, float] = field(default_factory=dict)
    stage_seconds: Mapping[str, float] = field(default_factory=dict)
    kernel_speedups: Sequence[tuple[str, float]] = ()
    sparsity: float | None = None
    error: str | None = None

    def __post_init__(self) -> None:
        for name in ("model", "recipe", "job_id", "status"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"NightJob.{name} must be a non-empty string, got {getattr(self, name)!r}")
        for key, value in self.metrics.items():
            _check_number("NightJob", f"metrics[{key!r}]", value)
        for key, value in self.stage_seconds.items():
            _check_number("NightJob", f"stage_seconds[{key!r}]", value)
        for i, pair in enumerate(self.kernel_speedups):
            if not (isinstance(pair, tuple | list) and len(pair) == 2 and isinstance(pair[0], str)):
                raise ValueError(f"NightJob.kernel_speedups[{i}] must be a (shape, speedup) pair, got {pair!r}")
            _check_number("NightJob", f"kernel_speedups[{i}]", pair[1])
        if self.sparsity is not None:
            _check_number("NightJob", "sparsity", self.sparsity)

    @property
    def label(self) -> str:
        return f"{self.model}/{self.recipe}"

    @property
    def effective_sparsity(self) -> float | None:
        return self.sparsity if self.sparsity is not None else self.metrics.get("sparsity")


@dataclass(frozen=True)
class Night:
    """One night of a zoo: its jobs and the regressions found against earlier nights.

    `finished_at` is None while the night is still running. Datetimes must be timezone-aware.
    """

    zoo: str
    night_id: str
    started_at: datetime
    finished_at: datetime | None
    jobs: Sequence[NightJob] = ()
    regressions: Sequence[Regression] = ()

    def __post_init__(self) -> None:
        _check_aware("Night", "started_at", self.started_at)
        _check_aware("Night", "finished_at", self.finished_at)
        if self.finished_at is not None and self.finished_at < self.started_at:
            raise ValueError("Night.finished_at is before Night.started_at")

    @property
    def wall(self) -> timedelta | None:
        return None if self.finished_at is None else self.finished_at - self.started_at

    def count(self, status: str) -> int:
        return sum(job.status == status for job in self.jobs)

    @property
    def reused(self) -> int:
        return sum(job.reused for job in self.jobs)


def speedups_from_metrics(metrics: Mapping[str, float]) -> tuple[tuple[str, float], ...]:
    """`kernel_speedup.<out>x<in>.<tokens>` metrics (the kernel_tune stage's) as (shape, speedup) pairs."""
    pairs = [(name[len(SPEEDUP_PREFIX):], float(v)) for name, v in metrics.items() if name.startswith(SPEEDUP_PREFIX)]
    return tuple(sorted(pairs, key=lambda pair: zoo_plots.natural_key(pair[0])))


def key_metrics(job: NightJob) -> dict[str, float]:
    """The job's values of TREND_METRICS that it has and that are finite."""
    values = {name: job.metrics[name] for name in TREND_METRICS if name in job.metrics}
    speedups = [s for _, s in job.kernel_speedups if zoo_plots.finite(s) and s > 0]
    if speedups:
        values["kernel_speedup_geomean"] = math.exp(sum(math.log(s) for s in speedups) / len(speedups))
    return {k: float(v) for k, v in values.items() if zoo_plots.finite(v)}


def format_duration(delta: timedelta | None) -> str:
    if delta is None:
        return "still running"
    seconds = int(round(delta.total_seconds()))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {seconds:02d} s"


def format_change(regression: Regression) -> str:
    """`+4.5% > +2.0%` (or `-12.0% < -5.0%` for a tolerance on a drop)."""
    sign = ">" if regression.tolerance >= 0 else "<"
    change = "n/a" if regression.change is None else f"{regression.change:+.1%}"
    return f"{change} {sign} {regression.tolerance:+.1%}"


def _num(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "—"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}g}"


def _bytes(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return _num(value)
    if abs(value) < 1024:
        return f"{value:.0f} B"
    exponent = min(int(math.log(abs(value), 1024)), 3)
    return f"{value / 1024 ** exponent:.3g} {('B', 'KiB', 'MiB', 'GiB')[exponent]}"


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _first_line(text: str | None) -> str:
    line = text.strip().splitlines()[0] if text and text.strip() else ""
    return line if len(line) <= ERROR_CHARS else line[: ERROR_CHARS - 1] + "…"


def _perplexity_series(night: Night) -> dict[str, list[tuple[float, float, str]]]:
    series: dict[str, list[tuple[float, float, str]]] = {}
    for job in night.jobs:
        if job.status != "succeeded":
            continue
        sparsity, ppl = job.effective_sparsity, job.metrics.get("perplexity")
        if ppl is None or sparsity is None:
            continue
        points = series.setdefault(job.model, [])
        points.append((sparsity, ppl, job.recipe))
        dense = job.metrics.get("dense_perplexity")
        if dense is not None and not any(name == "dense" for _, _, name in points):
            points.append((0.0, dense, "dense"))  # the model before pruning anchors its curve
    return series


def _trend_series(nights: Sequence[Night]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    trends: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for index, night in enumerate(nights):
        for job in night.jobs:
            if job.status != "succeeded":
                continue
            for metric, value in key_metrics(job).items():
                trends.setdefault(metric, {}).setdefault(job.label, []).append((index, value))
    return trends


def _speedups_by_shape(night: Night) -> dict[str, list[float]]:
    by_shape: dict[str, list[float]] = {}
    for job in night.jobs:
        for shape, speedup in job.kernel_speedups:
            by_shape.setdefault(shape, []).append(speedup)
    return by_shape


def _figures(night: Night, history: Sequence[Night], trend_nights: int) -> list[tuple[str, bytes | None, str]]:
    """(title, PNG or None, what is missing when None) for each of the report's figures."""
    earlier = sorted((n for n in history if n.night_id != night.night_id and n.started_at < night.started_at),
                     key=lambda n: n.started_at)
    nights = [*earlier[-(trend_nights - 1):], night] if trend_nights > 1 else [night]
    labels = [n.started_at.astimezone(UTC).strftime("%Y-%m-%d") for n in nights]
    if len(set(labels)) < len(labels):  # several nights a day: tell them apart by the hour
        labels = [n.started_at.astimezone(UTC).strftime("%m-%d %H:%M") for n in nights]
    no_trend = ("no earlier night of this zoo to compare with" if len(nights) < 2
                else "no key metric (perplexity, size, tuned speedup) recorded in these nights")
    return [
        ("Perplexity vs sparsity per model",
         zoo_plots.perplexity_vs_sparsity(_perplexity_series(night)),
         "no succeeded job reported both perplexity and sparsity tonight"),
        (f"Key metrics over the last {len(nights)} nights",
         zoo_plots.metric_trends(_trend_series(nights), labels), no_trend),
        ("Tuned kernel speedup per layer shape",
         zoo_plots.kernel_speedups(_speedups_by_shape(night)),
         "no job ran a kernel_tune stage that timed a kernel tonight"),
        ("Stage time per job",
         zoo_plots.stage_times([(job.label + (" (reused)" if job.reused else "")
                                 + ("" if job.status == "succeeded" else f" ({job.status})"), job.stage_seconds)
                                for job in night.jobs]),
         "no stage times recorded tonight"),
    ]


CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1100px;
       padding: 0 1rem; color: #1b1f24; }
h1 { font-size: 1.5rem; margin-bottom: .2rem; } h2 { font-size: 1.15rem; margin-top: 2rem; }
.meta { color: #57606a; } .notice { background: #fff8c5; border: 1px solid #d4a72c; padding: .5rem .8rem; }
.headline { display: flex; gap: 1rem; flex-wrap: wrap; margin: 1rem 0; }
.headline div { border: 1px solid #d0d7de; border-radius: 6px; padding: .4rem .9rem; }
.headline b { display: block; font-size: 1.4rem; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { border-bottom: 1px solid #d0d7de; padding: .25rem .5rem; text-align: left; vertical-align: top; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
.succeeded { color: #1a7f37; } .failed, .cancelled, .regressed { color: #cf222e; font-weight: 600; }
.nodata { color: #57606a; font-style: italic; } img { max-width: 100%; height: auto; }
code { font-size: 12px; }
"""
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric: set[int]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f'<td class="n">{cell}</td>' if i in numeric else f"<td>{cell}</td>"
                         for i, cell in enumerate(row)) + "</tr>"
        for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _regressions_html(night: Night) -> str:
    if not night.regressions:
        return '<p class="nodata">No regression tonight.</p>'
    rows = [[_e(r.model), _e(r.recipe), _e(r.metric), _num(r.old), _num(r.new), _e(format_change(r)),
             f"<code>{_e(r.job_id)}</code>", f"<code>{_e(r.previous_job_id)}</code>"] for r in night.regressions]
    return _table(["model", "recipe", "metric", "old", "new", "change vs tolerance", "job", "previous job"],
                  rows, {3, 4})


def _jobs_html(night: Night) -> str:
    if not night.jobs:
        return '<p class="nodata">No job tonight.</p>'
    regressed = {r.job_id for r in night.regressions}
    rows = []
    for job in sorted(night.jobs, key=lambda j: (j.model, j.recipe)):
        status = f'<span class="{_e(job.status)}">{_e(job.status)}</span>'
        if job.job_id in regressed:
            status += ' <span class="regressed">regressed</span>'
        metrics = key_metrics(job)
        rows.append([_e(job.model), _e(job.recipe), status, "yes" if job.reused else "",
                     _num(job.effective_sparsity, 3), _num(job.metrics.get("perplexity")),
                     _bytes(job.metrics.get("model_size_bytes")), _num(metrics.get("kernel_speedup_geomean"), 3),
                     f"{sum(job.stage_seconds.values()):.1f}" if job.stage_seconds else "—",
                     f"<code>{_e(job.job_id)}</code>", _e(_first_line(job.error))])
    return _table(["model", "recipe", "status", "reused", "sparsity", "perplexity", "size", "speedup (geo. mean)",
                   "stage time (s)", "job", "error"], rows, {4, 5, 6, 7, 8})


def _figure_html(title: str, png: bytes | None, missing: str) -> str:
    if png is None:
        body = f'<p class="nodata">No data: {_e(missing)}.</p>'
    else:
        body = f'<img alt="{_e(title)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'
    return f"<section><h2>{_e(title)}</h2>{body}</section>"


def render_html(night: Night, history: Sequence[Night] = (), *, trend_nights: int = 14,
                notice: str | None = None) -> str:
    """The night's report as one self-contained HTML page.

    `history` holds earlier nights of the same zoo (any order; the night itself and later nights are
    ignored); the trend figure covers the last `trend_nights` nights including this one. `notice`, when
    given, is shown in a banner at the top (the docs' sample says there that its data are made up).
    """
    if trend_nights < 1:
        raise ValueError(f"trend_nights must be at least 1, got {trend_nights}")
    title = f"Zoo {night.zoo}: night {night.night_id}"
    finished = "still running" if night.finished_at is None else night.finished_at.isoformat(timespec="seconds")
    cells = [("jobs", len(night.jobs)), ("succeeded", night.count("succeeded")), ("reused", night.reused),
             ("failed", night.count("failed") + night.count("cancelled")), ("regressions", len(night.regressions)),
             ("wall time", format_duration(night.wall))]
    headline = "".join(f"<div><b>{_e(value)}</b>{_e(name)}</div>" for name, value in cells)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>",
        f'<p class="notice">{_e(notice)}</p>' if notice else "",
        f"<h1>{_e(title)}</h1>",
        f'<p class="meta">started {_e(night.started_at.isoformat(timespec="seconds"))}, finished {_e(finished)}</p>',
        f'<div class="headline">{headline}</div>',
        "<h2>Regressions</h2>", _regressions_html(night),
        "<h2>Jobs</h2>", _jobs_html(night),
        *(_figure_html(*figure) for figure in _figures(night, history, trend_nights)),
        "</body></html>",
    ]
    return "\n".join(part for part in parts if part) + "\n"



def _slack(text: object) -> str:
    """Slack reads `<...>` as links and mentions (`<!channel>`): escape its three control characters."""
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _slack_change(regression: Regression) -> str:
    # Our own `>` stays literal (harmless once no `<` is left to open a link); a drop's `<` is escaped.
    return format_change(regression).replace("<", "&lt;")


def text_summary(night: Night) -> str:
    """A few plain lines for a Slack-compatible webhook: counts, each regression, failed jobs, wall time.

    Slack's message format: strings from the zoo have `&`, `<` and `>` escaped, so a model named
    `<!channel>` pings nobody; no raw `<` is left anywhere (a drop reads `-12.0% &lt; -5.0%`, which
    Slack shows as `<`).
    """
    failed = [job for job in night.jobs if job.status in ("failed", "cancelled")]
    head = (f"Zoo {_slack(night.zoo)} night {_slack(night.night_id)}: {len(night.jobs)} jobs, "
            f"{night.count('succeeded')} succeeded ({night.reused} reused), {len(failed)} failed, "
            f"{len(night.regressions)} regression{'' if len(night.regressions) == 1 else 's'}; "
            f"wall time {format_duration(night.wall)}")
    lines = [head]
    for r in night.regressions:
        lines.append(f"- {_slack(r.model)}/{_slack(r.recipe)}: {_slack(r.metric)} {_num(r.old)} -> {_num(r.new)} "
                     f"({_slack_change(r)}) job {_slack(r.job_id)}")
    for job in failed:
        reason = _first_line(job.error)
        lines.append(f"- {_slack(job.status)}: {_slack(job.label)} job {_slack(job.job_id)}"
                     + (f": {_slack(reason)}" if reason else ""))
    return "\n".join(lines)
