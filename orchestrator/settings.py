"""Service settings: the one reader of the `SPARSEFLOW_*` environment variables.

The embedded defaults need nothing set: data under `~/.sparseflow` (SQLite file, artifacts, caches),
a local Ray started by the job, Prefect in its ephemeral mode, jobs run by the process that accepted
them. Setting `SPARSEFLOW_PREFECT_API_URL` selects cluster mode: the API only records a job and creates
a flow run of the `compression-job` deployment; Prefect workers (`sparseflow worker`) run it, each
building its own runtime from these same settings.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

Mode = Literal["embedded", "cluster"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SPARSEFLOW_", extra="ignore")

    home: Path = Field(default_factory=lambda: Path.home() / ".sparseflow")
    database_url: str | None = None
    artifact_root: str | None = Field(None, description="fsspec URL; default: <home>/artifacts")
    ray_address: str | None = Field(None, description="An existing Ray cluster (`ray start --head`); None: local.")
    ray_num_cpus: int | None = None
    ray_num_gpus: int | None = None
    ray_bind_host: str = Field("127.0.0.1", description="Interface a local Ray binds (its GCS included).")
    api_tokens: dict[str, str] = Field(
        default_factory=dict,
        description="Bearer token -> owner name (JSON). Empty: no auth, every job belongs to 'local'.",
    )
    max_concurrent_jobs: int = Field(1, ge=1, description="Embedded mode: jobs one process runs at once.")
    keep_services_s: float = Field(
        600.0, ge=0, description="Embedded `run`/`resume`: keep Prefect's server and the Ray node up between "
        "runs until unused this long (api.kept_services); 0: each run starts and stops its own.",
    )

    # the CLI's client side
    url: str | None = Field(None, description="API base URL for submit/status/jobs/download/cancel/resume.")
    token: str | None = Field(None, description="Bearer token the CLI sends to that API.")

    # cluster mode
    prefect_api_url: str | None = Field(None, description="Prefect server API; set, it selects cluster mode.")
    work_pool: str = Field("sparseflow", min_length=1, max_length=100)
    deployment: str = Field("compression-job", min_length=1, max_length=100)

    # liveness: a runner beats while it runs a job; a job whose beat is older than `runner_lost_after_s`
    # has no live runner (its process or node died) and is failed, then resumed if its recipe allows
    heartbeat_s: float = Field(2.0, gt=0)
    runner_lost_after_s: float = Field(30.0, gt=0)
    reconcile_every_s: float = Field(5.0, gt=0)
    verify_every_s: float = Field(60.0, gt=0, description="The API re-hashes a few stored artifacts this often.")
    status_cache_s: float = Field(
        0.5, ge=0, le=10, description="How old a polled job status may be (per API process; 0: always read "
        "the store). The process's own writes to a job drop its kept status at once.",
    )

    # tenancy and limits
    local_roots: list[str] | None = Field(
        None, description="Directories whose files recipes may name (model, calibration, evaluation). None: any "
        "path without auth, none with auth (hub ids, builtin: and uploaded datasets only).",
    )
    max_request_bytes: int = Field(1 << 20, gt=0, description="Largest request body (a recipe).")
    max_dataset_bytes: int = Field(256 << 20, gt=0, description="Largest uploaded dataset.")

    @property
    def mode(self) -> Mode:
        return "cluster" if self.prefect_api_url else "embedded"

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    @property
    def artifacts_url(self) -> str:
        return self.artifact_root or (self.home / "artifacts").resolve().as_uri()

    @property
    def database(self) -> str:
        return self.database_url or f"sqlite:///{(self.home / 'sparseflow.db').resolve()}"

    @property
    def allowed_local_roots(self) -> list[Path] | None:
        """Resolved roots recipes may read from; None means unrestricted (embedded use without auth)."""
        if self.local_roots is None:
            return [] if self.api_tokens else None
        return [Path(root).expanduser().resolve() for root in self.local_roots]

    def ensure_dirs(self) -> None:
        for path in (self.home, self.cache_dir):
            path.mkdir(parents=True, exist_ok=True)


@lru_cache
def get_settings() -> Settings:
    """The process's settings, read once; tests override by clearing the cache or building their own."""
    return Settings()
