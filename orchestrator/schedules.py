"""The nightly schedule of a model zoo: a Prefect flow that runs one night, served on the zoo's cron.

The zoo file (`orchestrator.zoo_file`) names the models, their recipes, owners, tolerances and a webhook;
`orchestrator.nights.run_night` runs every (model, recipe) pair as its own job in parallel, skips the
work of unchanged pairs through the stage cache, records regressions and announces the night.

`sparseflow nightly ZOO --now` runs one night in this process; `sparseflow nightly ZOO` serves the
`nightly-model-zoo` flow as a Prefect deployment named after the zoo on its cron schedule (UTC). With
`SPARSEFLOW_PREFECT_API_URL` set (cluster mode) each job of the night is a flow run of the
`compression-job` deployment, run by the Prefect workers.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from prefect import flow

from orchestrator.settings import Settings
from orchestrator.zoo_file import Zoo, load_zoo

log = logging.getLogger(__name__)

__all__ = ["load_zoo", "nightly", "serve_nightly"]


@flow(name="nightly-model-zoo", validate_parameters=False)
def nightly(zoo_path: str, settings: Settings | None = None) -> dict[str, Any]:
    """Run one night of the zoo at `zoo_path`; returns `NightOutcome.as_dict()` (night id, status, jobs)."""
    from orchestrator.nights import run_night
    from orchestrator.service import Orchestrator
    from orchestrator.settings import get_settings

    zoo: Zoo = load_zoo(zoo_path)
    orchestrator = Orchestrator(settings or get_settings())
    try:
        return run_night(zoo, orchestrator).as_dict()
    finally:
        orchestrator.close()


def serve_nightly(zoo_path: str) -> None:
    """Serve the nightly flow as a Prefect deployment on the zoo's cron schedule (blocks)."""
    zoo = load_zoo(zoo_path)
    log.info("serving zoo %s on %r (%d pairs)", zoo.name, zoo.cron, len(zoo.pairs))
    nightly.serve(name=zoo.name, cron=zoo.cron, parameters={"zoo_path": str(Path(zoo_path).resolve())})
