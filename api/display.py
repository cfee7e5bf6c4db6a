"""Terminal output of the CLI: a live progress bar per stage and the end-of-job summary."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

if TYPE_CHECKING:
    from pipelines.recipe import Recipe

_STATUS_STYLE = {"succeeded": "green", "failed": "red", "cancelled": "yellow", "running": "cyan",
                 "queued": "dim", "skipped": "green"}


def job_progress(console: Console, recipe: Recipe) -> Any:
    """A live bar per stage on a terminal; plain, flushed log lines otherwise (a pipe, CI, `kubectl logs`),
    where a bar would show nothing until the job ends."""
    if console.is_terminal:
        return JobDisplay(console, recipe)
    from api.plain_progress import PlainProgress

    return PlainProgress(console.file, recipe)


class JobDisplay:
    """A rich progress bar per stage, fed by the flow's events (`handle` is the flow's `on_event`)."""

    def __init__(self, console: Console, recipe: Recipe) -> None:
        self.progress = Progress(
            TextColumn("{task.fields[label]:<16}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.description}"), console=console, transient=False,
        )
        self.tasks: dict[str, TaskID] = {}
        self.labels = [f"{i:02d}-{spec.stage}" for i, spec in enumerate(recipe.stages)]
        self.run_labels: dict[str, str] = {}

    def __enter__(self) -> JobDisplay:
        self.progress.start()
        for label in self.labels:
            self.tasks[label] = self.progress.add_task("queued", label=label, total=None, start=False)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.progress.stop()

    def handle(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "stage":
            self._on_stage(event)
        elif kind == "progress":
            self._on_progress(event)

    def _on_stage(self, event: dict[str, Any]) -> None:
        self.run_labels[event["stage_run_id"]] = event["label"]
        task = self.tasks.get(event["label"])
        if task is None:
            return
        status = event["status"]
        style = _STATUS_STYLE.get(status, "")
        if status == "running":
            self.progress.start_task(task)
            self.progress.update(task, description=f"[{style}]running")
            return
        total = self.progress.tasks[task].total or 1
        text = status if status != "failed" else f"failed: {event.get('error', '')[:80]}"
        notes = event.get("notes") or []
        if notes:
            text += f" ({notes[0][:70]})"
        self.progress.update(task, total=total, completed=total if status in ("succeeded", "skipped") else None,
                             description=f"[{style}]{text}")
        self.progress.stop_task(task)

    def _on_progress(self, event: dict[str, Any]) -> None:
        task = self.tasks.get(self.run_labels.get(event["stage_run_id"], ""))
        if task is not None:
            self.progress.update(task, total=max(event["total"], 1), completed=event["done"],
                                 description=event["message"][:60])


def _fmt_bytes(value: float | None) -> str:
    if value is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:,.1f} {unit}"
        value /= 1024
    return f"{value:.1f}"


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_summary(console: Console, orchestrator: Any, job_id: str) -> None:
    """The job's outcome: perplexities, sparsity, size, time per stage, artifacts."""
    from api.reuse import reused_from
    from api.views import artifact_public, job_detail
    from orchestrator.store import queries

    with orchestrator.sessions() as session:
        detail = job_detail(session, queries.get_job(session, job_id))
        artifacts = queries.list_artifacts(session, job_id)
        reused = reused_from(session, job_id)
    print_job(console, detail.model_dump(mode="json"), [
        artifact_public(a).model_dump(mode="json") for a in artifacts
    ], reused=reused)


def _stage_time(stage: dict[str, Any], reused: dict[str, str]) -> str:
    """The stage's own seconds, or which job's run it reused: a cache hit's copied seconds are another run's."""
    origin = reused.get(stage["id"], stage.get("reused_from_job"))
    if origin is not None:
        return f"reused from job {origin}" if origin else "reused (its job is gone)"
    return _fmt(stage["metrics"].get("stage_seconds"), ".1f")


def print_job(console: Console, job: dict[str, Any], artifacts: list[dict[str, Any]],
              reused: dict[str, str] | None = None) -> None:
    """A job's results, stages and artifacts; `reused` maps its cache-hit stage runs to the job they reused."""
    reused = reused or {}
    metrics: dict[str, float] = {}
    for stage in job["stages"]:
        metrics.update(stage["metrics"])
    results = Table(title=f"job {job['id']} — {job['name']} — [{_STATUS_STYLE.get(job['status'], '')}]"
                    f"{job['status']}")
    results.add_column("measure")
    results.add_column("value", justify="right")
    # after a quantize stage the evaluated model is the FP8 one (the evaluate stage's fp8_linears metric)
    evaluated = "sparse FP8 perplexity" if metrics.get("fp8_linears") else "sparse perplexity"
    rows = [
        ("dense perplexity", _fmt(metrics.get("dense_perplexity"), ".2f")),
        (evaluated, _fmt(metrics.get("perplexity"), ".2f")),
        ("achieved sparsity (decoder linears)", _fmt(metrics.get("sparsity"), ".2%")),
        ("parameters", _fmt(metrics.get("param_count"), ",.0f")),
        ("non-zero parameters", _fmt(metrics.get("nonzero_params"), ",.0f")),
        ("size on disk (safetensors)", _fmt_bytes(metrics.get("model_size_bytes"))),
    ]
    compressed = [a for a in artifacts if a.get("kind") == "compressed_model"]
    if compressed:
        rows.append(("size on disk (compressed-tensors)", _fmt_bytes(compressed[-1].get("size_bytes"))))
    for name, value in rows:
        results.add_row(name, value)
    console.print(results)

    stages = Table(title="stages")
    for column in ("stage", "status", "attempts", "seconds", "notes"):
        stages.add_column(column)
    for stage in job["stages"]:
        notes = "; ".join(stage["notes"]) or (stage["error"] or "")
        stages.add_row(f"{stage['index']:02d}-{stage['kind']}", stage["status"], str(stage["attempt"]),
                       _stage_time(stage, reused), notes)
    console.print(stages)

    produced = [a for a in artifacts if a.get("stage_run_id")]
    if produced:
        table = Table(title="artifacts")
        for column in ("id", "kind", "size", "name"):
            table.add_column(column, overflow="fold")
        for art in produced:
            name = art["name"] + ("  [red]corrupt[/red]" if art.get("corrupt_reason") else "")
            table.add_row(art["id"], art["kind"], _fmt_bytes(art.get("size_bytes")), name)
        console.print(table)
    console.print(f"job id: [bold]{job['id']}[/bold]")
    if job.get("flow_run_id"):
        console.print(f"Prefect flow run: {job['flow_run_id']}")
    if job.get("resumes"):
        console.print(f"resumed automatically {job['resumes']} time(s) after its runner died")
    for note in job.get("notes", []):
        console.print(f"note: {escape(note)}")
    if job.get("error"):
        console.print(f"[red]error:[/red] {escape(job['error'])}")
    console.print("download: sparseflow download ARTIFACT_ID -o DIR   (verifies sha256)")


def print_jobs(console: Console, jobs: list[dict[str, Any]]) -> None:
    table = Table(title="jobs")
    for column in ("id", "name", "status", "created", "finished"):
        table.add_column(column)
    for job in jobs:
        style = _STATUS_STYLE.get(job["status"], "")
        table.add_row(job["id"], job["name"], f"[{style}]{job['status']}", job["created_at"][:19],
                      (job["finished_at"] or "")[:19])
    console.print(table)


def print_night(console: Console, zoo: str, night: dict[str, Any] | None, regressions: list[dict[str, Any]]) -> None:
    """The last night of a zoo at a glance: status, the caller's jobs, regressions, the report to download."""
    if night is None:
        console.print(f"zoo {escape(zoo)}: no night with a job of yours yet")
        return
    style = _STATUS_STYLE.get(night["status"], "")
    console.print(f"zoo {escape(zoo)}, night {night['id']}: [{style}]{night['status']}[/] "
                  f"(started {night['started_at'][:19]}, finished {(night['finished_at'] or 'not yet')[:19]})")
    table = Table(title="jobs")
    table.add_column("job", no_wrap=True)
    table.add_column("model", overflow="fold")
    table.add_column("recipe", overflow="fold")
    table.add_column("status", no_wrap=True)
    table.add_column("reused", no_wrap=True)
    for job in night["jobs"]:
        table.add_row(job["job_id"], escape(job["model"]), escape(job["recipe"]),
                      f"[{_STATUS_STYLE.get(job['status'], '')}]{job['status']}", "yes" if job["reused"] else "")
    console.print(table)
    for found in regressions:
        console.print(f"[red]regressed[/red] {escape(found['model'])}/{escape(found['recipe'])}: {found['metric']} "
                      f"{found['old_value']:.6g} -> {found['new_value']:.6g} (worse when {found['worse']}, "
                      f"tolerance {found['tolerance']:.1%}), job {found['job_id']} vs {found['previous_job_id']}")
    if not regressions:
        console.print("no regressions")
    if night.get("report_artifact_id"):
        console.print(f"report: sparseflow download {night['report_artifact_id']} -o DIR   (HTML, verified)")
