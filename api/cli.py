"""The `sparseflow` command line.

`run` executes a job in this process (Prefect flow, local or remote Ray, the configured store) with a
live progress bar per stage. `serve` starts the REST API. `submit`, `status`, `jobs`, `download`,
`cancel` and `resume` talk to an API at `--url` (or `SPARSEFLOW_URL`); without one they use the
embedded store directly through the same API code, in-process.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
    help="sparseflow: compress language models. Run jobs, serve the API, inspect and download results.",
)
console = Console()
err = Console(stderr=True)

UrlOpt = Annotated[str | None, typer.Option("--url", envvar="SPARSEFLOW_URL", help="API base URL.")]
TokenOpt = Annotated[str | None, typer.Option("--token", envvar="SPARSEFLOW_TOKEN", help="API bearer token.")]
QUICKSTART = "quickstart"


def _quiet_frameworks() -> None:
    """Keep Prefect and Ray logs out of the progress display; keep Prefect's files under our home."""
    from orchestrator.settings import get_settings

    home = get_settings().home
    (home / "prefect").mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(home / "prefect"))
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _fail(message: str, code: int = 2) -> None:
    err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _load_recipe(path: str):
    from pipelines.recipe import RecipeError, load_recipe

    if path == QUICKSTART:
        path = str(Path(__file__).resolve().parent.parent / "pipelines" / "recipes" / "quickstart.yaml")
    try:
        return load_recipe(path)
    except RecipeError as error:
        _fail(f"invalid recipe {path}: {error}")


@app.command()
def run(
    recipe: Annotated[str, typer.Argument(help=f"Recipe file (YAML/JSON), or '{QUICKSTART}'.")] = QUICKSTART,
) -> None:
    """Run a compression job here, showing progress, then a summary."""
    parsed = _load_recipe(recipe)
    _quiet_frameworks()
    from api.display import JobDisplay, print_summary
    from orchestrator.service import Orchestrator, submit_job
    from orchestrator.settings import get_settings

    orchestrator = Orchestrator(get_settings())
    with orchestrator.sessions.begin() as session:
        job_id = submit_job(session, parsed).id
    console.print(f"job [bold]{job_id}[/bold] ({parsed.name}): {len(parsed.stages)} stages")
    with JobDisplay(console, parsed) as display:
        try:
            status = orchestrator.run(job_id, on_event=display.handle)
        except Exception as error:  # the flow recorded the failure; show it and keep the job resumable
            status = "failed"
            display.stop()
            err.print(f"[red]job {job_id} failed:[/red] {error}")
    print_summary(console, orchestrator, job_id)
    orchestrator.close()
    if status != "succeeded":
        console.print(f"resume with: sparseflow resume {job_id}")
        raise typer.Exit(1)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
) -> None:
    """Serve the REST API, running submitted jobs in this process."""
    _quiet_frameworks()
    import uvicorn

    from api.app import create_app

    uvicorn.run(create_app(), host=host, port=port)


def _client(url: str | None, token: str | None):
    from api.client import ApiClient

    if url is None:
        _quiet_frameworks()
    return ApiClient(url, token)


@app.command()
def submit(recipe: str, url: UrlOpt = None, token: TokenOpt = None) -> None:
    """Submit a recipe to the API; prints the job id."""
    parsed = _load_recipe(recipe)
    with _client(url, token) as client:
        job = client.submit(parsed.model_dump(mode="json"))
    console.print(job["id"])


@app.command()
def status(job_id: str, url: UrlOpt = None, token: TokenOpt = None) -> None:
    """A job's state, stages and metrics."""
    from api.display import print_job

    with _client(url, token) as client:
        print_job(console, client.job(job_id), client.artifacts(job_id))


@app.command()
def jobs(url: UrlOpt = None, token: TokenOpt = None, limit: int = 20) -> None:
    """List recent jobs."""
    from api.display import print_jobs

    with _client(url, token) as client:
        print_jobs(console, client.jobs(limit))


@app.command()
def download(
    artifact_id: str,
    output: Annotated[Path, typer.Option("-o", "--output", help="Directory to write into (created if missing); "
                                         "the artifact lands there under its own name.")] = Path("."),
    force: Annotated[bool, typer.Option("--force", help="Replace an existing file or folder of that name.")] = False,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Download an artifact, verify its sha256, then move it into place (an interrupted one resumes)."""
    from api.client import ApiError
    from api.download import ChecksumMismatch, DownloadError

    with _client(url, token) as client:
        try:
            path = client.download(artifact_id, output, force=force)
        except ChecksumMismatch as error:
            _fail(f"checksum mismatch: {error}", 1)
        except DownloadError as error:
            _fail(str(error), 1)
        except ApiError as error:
            if error.status == 404:
                _fail(f"artifact {artifact_id} not found (or not downloadable with this token)", 1)
            _fail(f"cannot download artifact {artifact_id}: {error.detail}", 1)
    console.print(f"{path} (sha256 verified)")


@app.command()
def cancel(job_id: str, url: UrlOpt = None, token: TokenOpt = None) -> None:
    """Cancel a queued or running job."""
    with _client(url, token) as client:
        console.print(client.post(f"/v1/jobs/{job_id}/cancel")["status"])


@app.command()
def resume(
    job_id: str,
    force: Annotated[bool, typer.Option(help="Also resume a job still marked running whose process died.")] = False,
) -> None:
    """Run a failed or cancelled job again here, from its first unfinished stage."""
    _quiet_frameworks()
    from api.display import JobDisplay, print_summary
    from orchestrator.service import Orchestrator, requeue_job
    from orchestrator.settings import get_settings
    from orchestrator.states import InvalidTransition
    from orchestrator.store import queries
    from orchestrator.store.errors import NotFound, StoreError
    from pipelines.recipe import Recipe

    orchestrator = Orchestrator(get_settings())
    try:
        with orchestrator.sessions.begin() as session:
            requeue_job(session, job_id, force=force)
            recipe = Recipe.model_validate(queries.get_job(session, job_id).recipe)
    except (NotFound, StoreError, InvalidTransition) as error:
        _fail(str(error))
    with JobDisplay(console, recipe) as display:
        final = orchestrator.run(job_id, on_event=display.handle)
    print_summary(console, orchestrator, job_id)
    orchestrator.close()
    raise typer.Exit(0 if final == "succeeded" else 1)


@app.command()
def nightly(
    zoo: Annotated[Path, typer.Argument(help="Model zoo file (models, recipe template, cron).")],
    now: Annotated[bool, typer.Option("--now", help="Run once now instead of serving the schedule.")] = False,
) -> None:
    """Submit one job per model of a zoo: now, or every night on the zoo's cron schedule."""
    from pipelines.recipe import RecipeError

    _quiet_frameworks()
    from orchestrator.schedules import load_zoo, serve_nightly
    from orchestrator.schedules import nightly as nightly_flow

    try:
        load_zoo(zoo)
    except RecipeError as error:
        _fail(str(error))
    if not now:
        serve_nightly(str(zoo))
        return
    outcomes = nightly_flow(str(zoo))
    for job_id, final in outcomes.items():
        console.print(f"{job_id}  {final}")
    raise typer.Exit(0 if all(s == "succeeded" for s in outcomes.values()) else 1)


def main() -> None:
    import httpx

    from api.client import ApiError

    try:
        app()
    except ApiError as error:
        err.print(f"[red]error:[/red] {error}", highlight=False)
        sys.exit(1)
    except httpx.TransportError as error:
        where = error.request.url if error.request else "the API"
        err.print(f"[red]error:[/red] cannot reach {where}: {error}", highlight=False)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
