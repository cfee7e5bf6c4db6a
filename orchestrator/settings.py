"""Service settings, read from `SPARSEFLOW_*` environment variables.

The embedded defaults need nothing set: data under `~/.sparseflow` (SQLite file, artifacts, caches),
a local Ray started by the job, Prefect in its ephemeral mode.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SPARSEFLOW_", extra="ignore")

    home: Path = Field(default_factory=lambda: Path.home() / ".sparseflow")
    database_url: str | None = None
    artifact_root: str | None = Field(None, description="fsspec URL; default: <home>/artifacts")
    ray_address: str | None = None
    ray_num_cpus: int | None = None
    ray_num_gpus: int | None = None
    api_tokens: dict[str, str] = Field(
        default_factory=dict,
        description="Bearer token -> owner name (JSON). Empty: no auth, every job belongs to 'local'.",
    )
    max_concurrent_jobs: int = Field(1, ge=1)

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    @property
    def artifacts_url(self) -> str:
        return self.artifact_root or (self.home / "artifacts").resolve().as_uri()

    @property
    def database(self) -> str:
        return self.database_url or f"sqlite:///{(self.home / 'sparseflow.db').resolve()}"

    def ensure_dirs(self) -> None:
        for path in (self.home, self.cache_dir):
            path.mkdir(parents=True, exist_ok=True)


@lru_cache
def get_settings() -> Settings:
    """The process's settings, read once; tests override by clearing the cache or building their own."""
    return Settings()
