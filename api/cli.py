"""The `sparseflow` command line.

`run` executes a job in this process (Prefect flow, local or remote Ray, the configured store) with a
live progress bar per stage on a terminal, plain log lines otherwise (`api.plain_progress`); Prefect's
API and the local Ray node start side by side as its first acts (`api.run_services`). `serve` starts the
REST API. `submit`, `status`, `jobs`, `download`, `cancel` and `resume` talk to an API at `--url` (or
`SPARSEFLOW_URL`); without one, `jobs`, `status` and `download` read the embedded store directly
(`api.store_client`: no Prefect, Ray or torch loaded), and the others run the same API code in-process.
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

UrlOpt = Annotated[str | None, typer.Option("--url", help="API base URL (default: SPARSEFLOW_URL).")]
TokenOpt = Annotated[str | None, typer.Option("--token", help="API bearer token (default: SPARSEFLOW_TOKEN).")]
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
    # Prefect's ephemeral server gets 20 s to start by default: a busy 2-core machine needs more
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _fail(message: str, code: int = 2) -> None:
    err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _load_recipe(path: str):
    from rich.markup import escape

    from pipelines.recipe import RecipeError, load_recipe

    if path == QUICKSTART:
        path = str(Path(__file__).resolve().parent.parent / "pipelines" / "recipes" / "quickstart.yaml")
    try:
        return load_recipe(path)
    except RecipeError as error:  # names the field; brackets in it are text, not rich markup
        _fail(escape(f"invalid recipe {path}: {error}"))


def _services_ready(services, orchestrator) -> None:
    """Prefect's API answering, before a job is recorded: a service that cannot start leaves no queued job."""
    from api.prefect_server import PrefectServerError

    try:
        services.ready()
    except PrefectServerError as error:
        _close(services, orchestrator)
        _fail(str(error), 1)


_finished_runs: list[object] = []  # run/resume in this process: `main` leaves without Python's finalization


def _close(services, orchestrator, *, finished: bool = False) -> None:
    """Close the store and stop the run's services; a `finished` run only tells Prefect's server to stop
    (the process exits next, and its reaper ends whatever is left)."""
    orchestrator.close()
    services.close(wait=not finished)
    if finished:
        _finished_runs.append(services)
        note = services.kept_note()
        if note:
            console.print(note, style="dim", markup=False, highlight=False)


@app.command()
def run(
    recipe: Annotated[str, typer.Argument(help=f"Recipe file (YAML/JSON), or '{QUICKSTART}'.")] = QUICKSTART,
) -> None:
    """Run a compression job here, showing progress, then a summary."""
    parsed = _load_recipe(recipe)
    _quiet_frameworks()
    from api.reaper import install_reaper

    install_reaper()  # Ray and Prefect's processes end with this one
    from api.run_services import RunServices
    from orchestrator.access import AccessDenied, check_recipe
    from orchestrator.runtime import JobRuntime
    from orchestrator.settings import get_settings
    from orchestrator.store.errors import NotFound

    services = RunServices(get_settings(), keep=True).start_prefect()  # up while the flow's code is imported
    store = JobRuntime.from_settings(services.settings)  # the store alone: no Prefect or Ray imported yet
    with store.sessions() as session:
        try:  # the same data access policy as the API (no auth: owner 'local', paths unrestricted)
            check_recipe(session, parsed, owner="local", settings=services.settings)
        except (AccessDenied, NotFound) as error:
            from rich.markup import escape

            services.close()
            _fail(escape(str(error)))
    services.start_ray()
    from api.display import job_progress, print_summary
    from orchestrator.service import Orchestrator, submit_job

    orchestrator = Orchestrator(services.settings)
    _services_ready(services, orchestrator)
    with orchestrator.sessions.begin() as session:
        job_id = submit_job(session, parsed).id
    console.print(f"job [bold]{job_id}[/bold] ({parsed.name}): {len(parsed.stages)} stages")
    with job_progress(console, parsed) as display:
        try:
            status = orchestrator.run(job_id, on_event=display.handle)
        except Exception as error:  # the flow recorded the failure; show it and keep the job resumable
            status = "failed"
            display.stop()
            err.print(f"[red]job {job_id} failed:[/red] {error}")
    print_summary(console, orchestrator, job_id)
    _close(services, orchestrator, finished=True)
    if status != "succeeded":
        console.print(f"resume with: sparseflow resume {job_id}")
        raise typer.Exit(1)


@app.command()
def services(
    stop: Annotated[bool, typer.Option("--stop", help="Stop them now (refused while a run uses them).")] = False,
) -> None:
    """The Prefect server and Ray node that embedded runs keep up between them (SPARSEFLOW_KEEP_SERVICES_S)."""
    import fcntl

    from api.kept_services import ServiceFiles, stop_keeper
    from orchestrator.settings import get_settings

    files = ServiceFiles(get_settings().home)
    with files.locked(), files.open_in_use() as in_use:
        state = files.read()
        if state is None or not state.alive():
            console.print("no services kept up", highlight=False)
            return
        if not stop:
            idle = files.idle_s()
            console.print(f"keeper pid {state.pid}: {state.state}; Prefect {state.prefect_api_url}, Ray "
                          f"{state.ray_address or '-'}; unused for {idle:.0f} s of {state.idle_s:g} s; "
                          f"log {files.log}", highlight=False)
            return
        try:
            fcntl.flock(in_use, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _fail("a run is using the kept services; stop them once it ends")
        stop_keeper(state)
        files.state.unlink(missing_ok=True)
    console.print(f"stopped Prefect's server and the Ray node (keeper pid {state.pid})", highlight=False)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
) -> None:
    """Serve the REST API, running submitted jobs in this process."""
    _quiet_frameworks()
    from api.reaper import exit_service, install_reaper

    install_reaper()  # Ray and Prefect's processes end with this one, even after SIGKILL
    import uvicorn

    from api.app import create_app

    code = 0
    try:
        uvicorn.run(create_app(), host=host, port=port)
    except SystemExit as stop:  # SIGTERM (after uvicorn's graceful shutdown), or uvicorn could not start
        code = stop.code if isinstance(stop.code, int) else 1
    except KeyboardInterrupt:
        code = 130
    exit_service(code)  # stop Ray and Prefect's server now, without waiting for a running job's thread


def _client(url: str | None, token: str | None):
    from api.client import ApiClient
    from orchestrator.settings import get_settings

    settings = get_settings()  # the one reader of SPARSEFLOW_URL / SPARSEFLOW_TOKEN
    url, token = url or settings.url, token or settings.token
    if url is None:
        _quiet_frameworks()
    return ApiClient(url, token)


def _reader(url: str | None, token: str | None):
    """The API at `url` (or SPARSEFLOW_URL); without one, the embedded store read directly (no service stack)."""
    from orchestrator.settings import get_settings

    settings = get_settings()
    url, token = url or settings.url, token or settings.token
    if url is not None:
        from api.client import ApiClient

        return ApiClient(url, token)
    from api.store_client import StoreClient

    return StoreClient(settings, token)


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

    with _reader(url, token) as client:
        job = client.job(job_id)
        reused = client.reused_from(job_id) if hasattr(client, "reused_from") else None
        print_job(console, job, client.artifacts(job_id), reused=reused)


@app.command()
def jobs(
    url: UrlOpt = None,
    token: TokenOpt = None,
    limit: Annotated[int, typer.Option(min=1, max=500, help="How many, newest first.")] = 20,
) -> None:
    """List recent jobs."""
    from api.display import print_jobs

    with _reader(url, token) as client:
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
    from api.download import ChecksumMismatch, DownloadError
    from api.http_error import ApiError
    from api.store_client import StoreRefused

    with _reader(url, token) as client:
        try:
            path = client.download(artifact_id, output, force=force)
        except ChecksumMismatch as error:
            _fail(f"checksum mismatch: {error}", 1)
        except DownloadError as error:
            _fail(str(error), 1)
        except (ApiError, StoreRefused) as error:
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
    force: Annotated[bool, typer.Option(help="Also take over a job still recorded queued or running whose runner "
                                        "died (a live runner notices and stops).")] = False,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Run a failed or cancelled job again from its first unfinished stage: here, or through the API (--url)."""
    from orchestrator.settings import get_settings

    if (url or get_settings().url) is not None:
        with _client(url, token) as client:
            job = client.post(f"/v1/jobs/{job_id}/resume?force={str(force).lower()}")
        console.print(f"{job['id']} {job['status']}")
        return
    _quiet_frameworks()
    from api.reaper import install_reaper

    install_reaper()  # Ray and Prefect's processes end with this one
    from api.run_services import RunServices
    from orchestrator.lifecycle import requeue_job
    from orchestrator.runtime import JobRuntime
    from orchestrator.states import InvalidTransition, Status
    from orchestrator.store import queries
    from orchestrator.store.errors import NotFound, StoreError
    from orchestrator.stored_specs import stored_recipe

    def requeue(sessions, *, keep: bool):
        """Requeue the job (`keep`: committed; else rolled back, a check that it can be resumed)."""
        try:
            with sessions() as session:
                requeue_job(session, job_id, force=force)
                recipe = stored_recipe(queries.get_job(session, job_id).recipe)
                if keep:
                    session.commit()
                else:
                    session.rollback()
                return recipe
        except InvalidTransition as error:
            hint = " (its runner died? resume with --force to take it over)" \
                if error.current in (Status.queued, Status.running) else ""
            return f"{error}{hint}"
        except (NotFound, StoreError) as error:
            return str(error)

    refused = requeue(JobRuntime.from_settings(get_settings()).sessions, keep=False)  # fail fast, start nothing
    if isinstance(refused, str):
        _fail(refused)
    services = RunServices(get_settings(), keep=True).start_prefect().start_ray()
    from api.display import job_progress, print_summary
    from orchestrator.service import Orchestrator

    orchestrator = Orchestrator(services.settings)
    _services_ready(services, orchestrator)
    recipe = requeue(orchestrator.sessions, keep=True)
    if isinstance(recipe, str):  # changed meanwhile (another resume): as refused
        _close(services, orchestrator)
        _fail(recipe)
    with job_progress(console, recipe) as display:
        final = orchestrator.run(job_id, on_event=display.handle)
    print_summary(console, orchestrator, job_id)
    _close(services, orchestrator, finished=True)
    raise typer.Exit(0 if final == "succeeded" else 1)


def _cluster_settings():
    from orchestrator.settings import get_settings

    settings = get_settings()
    if settings.mode != "cluster":
        _fail("cluster mode is off: set SPARSEFLOW_PREFECT_API_URL to the Prefect server's API "
              "(e.g. http://127.0.0.1:4200/api)")
    return settings


@app.command()
def deploy(
    pool_limit: Annotated[int | None, typer.Option(help="Jobs the whole work pool runs at once.")] = None,
) -> None:
    """Cluster mode: create the `sparseflow` process work pool and the `compression-job` deployment (idempotent)."""
    from orchestrator import deployments

    settings = _cluster_settings()
    try:
        deployment_id = deployments.register(settings, pool_concurrency=pool_limit)
    except deployments.ClusterUnavailable as error:
        _fail(str(error))
    console.print(f"deployment {deployments.FLOW_NAME}/{settings.deployment} ({deployment_id}) "
                  f"in work pool {settings.work_pool}")


@app.command()
def worker(
    pool: Annotated[str | None, typer.Option(help="Work pool (default: SPARSEFLOW_WORK_POOL).")] = None,
    limit: Annotated[int, typer.Option(min=1, help="Jobs this worker runs at once.")] = 1,
    name: Annotated[str | None, typer.Option(help="Worker name shown in Prefect.")] = None,
    poll_seconds: Annotated[float, typer.Option(min=0.5, help=(
        "How often the worker asks Prefect for new runs: a job waits up to this long for a free worker to "
        "see it (Prefect's own default is 10 s)."))] = 2.0,
    health_port: Annotated[int | None, typer.Option(min=1, max=65535, help=(
        "Serve Prefect's worker healthcheck on this port: GET /health answers 200 while the worker keeps "
        "polling the pool and 503 once it has missed its polls, for a liveness probe."))] = None,
    health_host: Annotated[str, typer.Option(help=(
        "Address the healthcheck listens on (0.0.0.0 in a pod, where the kubelet probes the pod's IP)."))]
        = "127.0.0.1",
) -> None:
    """Cluster mode: run jobs from the work pool (a Prefect process worker; each job runs as its own process)."""
    settings = _cluster_settings()
    from api.reaper import install_reaper

    install_reaper()  # the worker's job processes end with it (the reaper watches this pid across exec)
    prefect = Path(sys.executable).parent / "prefect"
    command = [str(prefect), "worker", "start", "--pool", pool or settings.work_pool, "--type", "process",
               "--limit", str(limit), *(["--name", name] if name else []),
               *(["--with-healthcheck"] if health_port else [])]
    health = ({"PREFECT_WORKER_WEBSERVER_HOST": health_host, "PREFECT_WORKER_WEBSERVER_PORT": str(health_port)}
              if health_port else {})
    env = {
        **health,
        **os.environ,
        # the deployment runs flows with `python -m prefect.engine`: this interpreter, whatever PATH had first
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "PREFECT_API_URL": settings.prefect_api_url,
        # flow-run heartbeats for Prefect's own zombie-run automations; ours beat in the store too
        "PREFECT_RUNNER_HEARTBEAT_FREQUENCY": os.environ.get("PREFECT_RUNNER_HEARTBEAT_FREQUENCY", "30"),
        "PREFECT_LOGGING_LEVEL": os.environ.get("PREFECT_LOGGING_LEVEL", "INFO"),
        "PREFECT_WORKER_QUERY_SECONDS": f"{poll_seconds:g}",
    }
    os.execve(command[0], command, env)


@app.command()
def up(
    workers: Annotated[int, typer.Option(min=0, help="Prefect workers, one job at a time each.")] = 2,
    gpus: Annotated[int, typer.Option(min=0, help="Logical GPUs the Ray head offers.")] = 0,
    cpus: Annotated[int | None, typer.Option(min=1, help="CPUs the Ray head offers (default: all).")] = None,
    postgres: Annotated[str, typer.Option(help="Admin URL of the PostgreSQL server to use.")] = (
        "postgresql://postgres@127.0.0.1:5432/postgres"),
    store_db: Annotated[str, typer.Option(help="Database for our store (created if missing).")] = "sparseflow_local",
    prefect_db: Annotated[str, typer.Option(help="Database for Prefect (created if missing).")] = "prefect_local",
    bucket: Annotated[str, typer.Option(help="S3 bucket for artifacts.")] = "sparseflow",
    api_port: Annotated[int | None, typer.Option(help="API port (default: a free one).")] = None,
    prefect_port: Annotated[int | None, typer.Option(help="Prefect server port (default: a free one).")] = None,
    ray_port: Annotated[int | None, typer.Option(help="Ray GCS port (default: a free one).")] = None,
    s3_port: Annotated[int | None, typer.Option(help="S3 server port (default: a free one).")] = None,
    ray_dashboard: Annotated[bool, typer.Option(help="Start Ray's dashboard (on 127.0.0.1).")] = False,
    deploy_first: Annotated[bool, typer.Option("--deploy/--no-deploy", help="Run `sparseflow deploy`.")] = True,
    timeout: Annotated[float, typer.Option(min=1, help="Seconds each part may take to be ready.")] = 180.0,
    env_file: Annotated[Path | None, typer.Option(help="Also write the export lines to this file.")] = None,
    print_env: Annotated[bool, typer.Option(
        "--print-env", help="Start nothing: print the export lines of the cluster already up.")] = False,
) -> None:
    """Start the whole service on this machine (PostgreSQL databases, S3 stand-in, Prefect, Ray, workers, API).

    moto's S3 server is a stand-in for trials; real deployments bring S3 or MinIO (docs/deploy.md).
    """
    from rich.table import Table

    from api import localcluster
    from orchestrator.settings import get_settings

    settings = get_settings()
    if print_env:
        try:
            state = localcluster.running(settings.home.expanduser().resolve())
        except localcluster.ClusterError as error:
            _fail(str(error))
        if state is None:
            _fail(f"no local cluster is up from {settings.home}: start one with `sparseflow up`", code=1)
        print("\n".join(state.exports()))
        return
    config = localcluster.ClusterConfig(
        home=settings.home, workers=workers, gpus=gpus, cpus=cpus, postgres_url=postgres, store_db=store_db,
        prefect_db=prefect_db, bucket=bucket, api_port=api_port, prefect_port=prefect_port, ray_port=ray_port,
        s3_port=s3_port, ray_dashboard=ray_dashboard, deploy=deploy_first, work_pool=settings.work_pool,
        timeout_s=timeout)
    try:
        state = localcluster.up(config, echo=lambda line: console.print(line, markup=False, highlight=False))
    except localcluster.ClusterError as error:
        err.print("[red]error:[/red] ", end="")
        err.print(str(error), markup=False, highlight=False)
        raise typer.Exit(1) from None
    table = Table(title=f"local cluster {state.instance[:8]}", caption=f"logs in {state.home}/cluster/logs")
    for column in ("part", "pid", "address", "log"):
        table.add_column(column)
    for record in state.processes:
        table.add_row(record.name, str(record.pid), record.address, Path(record.log).name)
    console.print(table)
    exports = state.exports()
    if env_file:
        env_file.write_text("\n".join(exports) + "\n")
        console.print(f"export lines written to {env_file}", markup=False)
    console.print("talk to it with:", *exports, sep="\n", markup=False, highlight=False, soft_wrap=True)
    console.print("stop it with: sparseflow down", markup=False)


@app.command()
def down() -> None:
    """Stop the local cluster that `sparseflow up` started (idempotent)."""
    from api import localcluster
    from orchestrator.settings import get_settings

    try:
        localcluster.down(get_settings().home, echo=lambda line: console.print(line, markup=False, highlight=False))
    except localcluster.ClusterError as error:
        _fail(str(error))


@app.command()
def nightly(
    zoo: Annotated[Path, typer.Argument(help="Model zoo file (models, recipes, owners, tolerances, webhook, cron).")],
    now: Annotated[bool, typer.Option("--now", help="Run one night now instead of serving the schedule.")] = False,
) -> None:
    """Run a model zoo: every (model, recipe) pair as its own job, now or every night on the zoo's cron.

    As for `run`, Prefect's API server and the local Ray node start first, side by side: a night starts
    many flows at once, and each would otherwise wait on (or race to start) Prefect's ephemeral server.
    """
    from orchestrator.zoo_file import load_zoo  # the file alone: a bad zoo starts nothing
    from pipelines.recipe import RecipeError

    try:
        load_zoo(zoo)
    except RecipeError as error:
        from rich.markup import escape

        _fail(escape(str(error)))
    _quiet_frameworks()
    from api.reaper import install_reaper

    install_reaper()  # Ray and Prefect's processes end with this one
    from api.prefect_server import PrefectServerError
    from api.run_services import RunServices
    from orchestrator.settings import get_settings

    services = RunServices(get_settings()).start_prefect()  # before Prefect is imported: it reads its address once
    try:
        from orchestrator.schedules import nightly as nightly_flow
        from orchestrator.schedules import serve_nightly

        services.start_ray()
        try:
            services.ready()
        except PrefectServerError as error:
            _fail(str(error), 1)
        if not now:
            serve_nightly(str(zoo))
            return
        outcome = nightly_flow(str(zoo))
    finally:
        services.close()
    for job_id, final in outcome["jobs"].items():
        console.print(f"{job_id}  {final}{'  (reused)' if job_id in outcome['reused'] else ''}", highlight=False)
    console.print(outcome["summary"], markup=False, highlight=False)
    console.print(f"night {outcome['night_id']}: {outcome['status']}"
                  + (f", webhook {outcome['webhook']}" if outcome["webhook"] else ""), highlight=False)
    raise typer.Exit(0 if outcome["status"] == "succeeded" else 1)


zoo_app = typer.Typer(no_args_is_help=True, help="The nightly model zoo: its last night at a glance.")
app.add_typer(zoo_app, name="zoo")


@zoo_app.command("status")
def zoo_status(name: str, url: UrlOpt = None, token: TokenOpt = None) -> None:
    """The zoo's last night with a job of yours: its jobs, regressions and report."""
    from api.display import print_night

    with _client(url, token) as client:
        nights = client.zoo_nights(name, limit=1)
        regressions = client.zoo_regressions(name, nights[0]["id"]) if nights else []
    print_night(console, name, nights[0] if nights else None, regressions)


def _client_error(error: Exception) -> str | None:
    """The one-line message for an API or store refusal or an unreachable API; None for anything else.

    Looked up in `sys.modules`: a command that never loaded the HTTP client (a listing of the embedded
    store) cannot have raised its errors, and does not pay for importing it.
    """
    client, httpx, store = (sys.modules.get(name) for name in ("api.client", "httpx", "api.store_client"))
    if client is not None and isinstance(error, client.ApiError):
        return str(error)
    if store is not None and isinstance(error, store.StoreRefused):
        return error.detail
    if httpx is not None and isinstance(error, httpx.TransportError):
        where = error.request.url if error.request else "the API"
        return f"cannot reach {where}: {error}"
    return None


def main() -> None:
    try:
        app()
    except SystemExit as done:
        if _finished_runs:  # Ray and Prefect's server are stopped: skip tearing down their modules (~1 s)
            from api.reaper import exit_service

            exit_service(done.code if isinstance(done.code, int) else 0 if done.code is None else 1)
        raise
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except Exception as error:
        message = _client_error(error)
        if message is None:
            raise
        err.print(f"[red]error:[/red] {message}", highlight=False)
        sys.exit(1)


if __name__ == "__main__":
    main()
