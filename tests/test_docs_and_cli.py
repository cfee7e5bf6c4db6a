"""Every documented recipe validates, and the CLI rejects bad input with one line naming the field."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from api.cli import app
from pipelines.recipe import load_recipe, parse_recipe

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted([*ROOT.glob("docs/examples/*.yaml"), *ROOT.glob("pipelines/recipes/*.yaml")])


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_validate(path: Path) -> None:
    assert load_recipe(path).stages


def test_readme_recipe_block_validates() -> None:
    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert blocks, "README shows a recipe"
    for block in blocks:
        assert parse_recipe(yaml.safe_load(block)).stages


def test_cli_invalid_recipe_exits_nonzero_naming_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages:\n  - stage: calibrate\n  - stage: prune\n    method: wanda\n    sparsity: 1.2\n")
    result = CliRunner().invoke(app, ["run", str(bad)])
    assert result.exit_code == 2
    assert "stages.1.prune.sparsity" in result.output
    assert "less than 1" in result.output


def test_cli_missing_recipe_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["run", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2
    assert "recipe file not found" in result.output


def test_cli_wanda_without_calibration_is_rejected(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"stages": [{"stage": "prune", "method": "wanda"}]}')
    result = CliRunner().invoke(app, ["run", str(bad)])
    assert result.exit_code == 2
    assert "needs a 'calibrate' stage" in result.output


def test_cli_unreachable_api_is_one_clear_line() -> None:
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "api.cli", "jobs", "--url", "http://127.0.0.1:9"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "cannot reach http://127.0.0.1:9" in result.stderr
    assert "Traceback" not in result.stderr


def test_every_documented_endpoint_exists() -> None:
    from api.app import create_app

    documented = re.findall(r"\| `(GET|POST)` \| `([^`]+)` \|", (ROOT / "docs" / "api.md").read_text())
    paths = create_app().openapi()["paths"]
    assert len(documented) >= 10
    for method, path in documented:
        assert method.lower() in paths.get(path, {}), f"{method} {path} is documented but not served"
