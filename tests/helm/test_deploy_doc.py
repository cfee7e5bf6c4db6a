"""The `sparseflow` commands that docs/deploy.md and the chart run exist, with the options they pass.

docs/deploy.md walks through `sparseflow up`, `deploy`, `worker` and `serve`, and the chart runs
`sparseflow worker` and `sparseflow deploy` in its pods; a renamed command or option would otherwise
only show up on a live cluster. Checked against the CLI's own parser (typer's click command).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer.main
from chart_helpers import containers, needs_helm, one, render

from api.cli import app

ROOT = Path(__file__).resolve().parents[2]
DEPLOY_DOC = (ROOT / "docs" / "deploy.md").read_text()
COMMANDS = typer.main.get_command(app).commands


def documented_invocations(text: str) -> list[str]:
    """`sparseflow ...` in inline code, and ```sh lines that run it (after any VAR=value; comments dropped)."""
    found = re.findall(r"`(sparseflow [^`]+)`", text)
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        for line in block.splitlines():
            match = re.match(r"\s*(?:\w+=\S+\s+)*(sparseflow\s.*)", re.sub(r"(^|\s)#.*", "", line))
            if match:
                found.append(match.group(1).strip())
    return found


def check(invocation: str) -> None:
    tokens = invocation.split()
    assert tokens[0] == "sparseflow"
    command = COMMANDS.get(tokens[1])
    assert command is not None, f"{invocation!r}: no command {tokens[1]!r} (have {sorted(COMMANDS)})"
    known = {opt for param in command.params for opt in (*param.opts, *getattr(param, "secondary_opts", []))}
    for token in tokens[2:]:
        if token.startswith("--"):
            option = token.split("=", 1)[0]
            assert option in known, f"{invocation!r}: `sparseflow {tokens[1]}` has no option {option}"


def test_the_doc_runs_the_local_cluster_commands():
    used = {inv.split()[1] for inv in documented_invocations(DEPLOY_DOC)}
    assert {"up", "down", "deploy", "worker", "serve", "submit", "status"} <= used


@pytest.mark.parametrize("invocation", sorted(set(documented_invocations(DEPLOY_DOC))))
def test_documented_invocation_matches_the_cli(invocation):
    check(invocation)


def test_check_rejects_an_unknown_option():
    with pytest.raises(AssertionError, match="no option --concurrency"):
        check("sparseflow worker --concurrency 2")


@needs_helm
def test_chart_commands_match_the_cli(tmp_path):
    values = {"database": {"external": {"existingSecret": "db"}}, "api": {"auth": {"existingSecret": "t"}},
              "deploy": {"poolConcurrencyLimit": 4}}
    docs = render(tmp_path, values)
    worker = containers(one(docs, "Deployment", "prefect-worker"))[0]
    (line,) = [ln.strip() for ln in worker["args"][0].splitlines() if "sparseflow worker" in ln]
    check(line.removeprefix("exec ").replace('"', ""))
    deploy = containers(one(docs, "Job", "deploy"))[-1]
    check(" ".join(deploy["command"] + deploy["args"]))
    api = containers(one(docs, "Deployment", "api"))[0]
    check(" ".join(api["command"] + api["args"]))
    no_ray = containers(one(render(tmp_path, {**values, "rayCluster": {"enabled": False}}),
                            "Deployment", "prefect-worker"))[0]
    check(" ".join(no_ray["command"]))
