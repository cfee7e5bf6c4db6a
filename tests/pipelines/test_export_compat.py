"""Compressed exports against the newest transformers / compressed-tensors (installed) and the oldest the pins allow.

In each environment both formats are loaded two ways (tests/pipelines/export_compat_check.py): stock
`AutoModelForCausalLM.from_pretrained` must give the exact pruned model or raise, never a model with
random weights; `pipelines.export.load_compressed_model` must give the exact pruned model. The oldest
pair is installed with `pip install --target` into pytest's cache (about 30 s the first time).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pipelines.export import export_compressed
from pipelines.pruning.magnitude import prune_magnitude

REPO = Path(__file__).resolve().parents[2]
CHECK = Path(__file__).with_name("export_compat_check.py")
# pyproject: transformers>=4.56, compressed-tensors>=0.12; transformers 4.56.0 wants huggingface-hub<1 and
# tokenizers<=0.23.0, older than the ones installed beside transformers 5.
OLDEST = ("transformers==4.56.0", "compressed-tensors==0.12.0", "huggingface-hub==0.34.0", "tokenizers==0.22.0")
NETWORK_ERRORS = ("NewConnectionError", "Max retries exceeded", "Temporary failure in name resolution",
                  "Network is unreachable", "Connection refused", "ConnectTimeout", "ReadTimeout")
FORMATS = {"sparse-bitmask": None, "sparse-24-bitmask": (2, 4)}


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """(export folder, expected weights file) per format, from one tiny bf16 model pruned each way.

    Its RoPE base is SmolLM2's 100000, not the default 10000, so a release that misreads it shows.
    """
    from tiny_models import build_tiny_model
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("compat")
    paths: list[Path] = []
    for fmt, nm in FORMATS.items():
        config = build_tiny_model(512).config
        config.rope_parameters = {"rope_theta": 100000.0, "rope_type": "default"}
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
        rope = {f"buffer.{k}": v.clone() for k, v in model.named_buffers() if k.endswith("rotary_emb.inv_freq")}  # fp32
        model = model.to(torch.bfloat16)
        names = [n for n, _ in model.named_modules() if n.endswith("_proj")]
        with torch.no_grad():
            for name in names:
                linear = model.get_submodule(name)
                linear.weight.copy_(prune_magnitude(linear.weight.float(), 0.5, nm).weight)
        out = export_compressed(model, root / fmt, fmt, names, sparsity_structure="2:4" if nm else "unstructured")
        expected = root / f"{fmt}.expected.safetensors"
        tensors = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
        save_file({**tensors, **rope}, str(expected))
        paths += [out, expected]
    return paths


def _install_oldest(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """The oldest pinned transformers and compressed-tensors in a --target folder kept in pytest's cache."""
    name = "export-compat-" + "-".join(p.split("==")[1] for p in OLDEST)
    cache = getattr(request.config, "cache", None)  # None with -p no:cacheprovider: install afresh
    target = cache.mkdir(name) if cache is not None else tmp_path / name
    if (target / "COMPLETE").exists():
        return target
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--upgrade",
                           "--target", str(target), *OLDEST], capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode:
        if any(marker in proc.stdout + proc.stderr for marker in NETWORK_ERRORS):
            pytest.skip(f"pip cannot reach the package index to install {' '.join(OLDEST)}")
        pytest.fail(f"pip install {' '.join(OLDEST)} failed:\n{proc.stderr[-3000:]}")
    (target / "COMPLETE").write_text("\n".join(OLDEST) + "\n")
    return target


def _run_check(exports: list[Path], extra_path: Path | None) -> list[dict]:
    paths = [str(extra_path)] if extra_path else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*paths, str(REPO), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run([sys.executable, str(CHECK), *map(str, exports)], capture_output=True, text=True,
                          env=env, timeout=600, check=False, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return [json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]


def _assert_correct_or_refused(results: list[dict], transformers: str, compressed_tensors: str) -> None:
    assert len(results) == len(FORMATS)
    for result in results:
        assert (result["transformers"], result["compressed_tensors"]) == (transformers, compressed_tensors), result
        assert result["sparseflow"] == "exact", result
        assert result["stock"] == "exact" or result["stock"].startswith("refused: "), result


def _without_guard(exports: list[Path], root: Path) -> list[Path]:
    """Copies of the exports without the [0] `.weight` placeholders: the plain compressed-tensors layout."""
    from safetensors.torch import load_file

    copies: list[Path] = []
    for folder, expected in zip(exports[::2], exports[1::2], strict=True):
        copy = root / folder.name
        shutil.copytree(folder, copy)
        state = load_file(str(copy / "model.safetensors"))
        save_file({k: v for k, v in state.items() if v.numel() or not k.endswith(".weight")},
                  str(copy / "model.safetensors"), metadata={"format": "pt"})
        copies += [copy, expected]
    return copies


def test_newest_versions_load_exactly_or_refuse(exports: list[Path], tmp_path: Path) -> None:
    import compressed_tensors
    import transformers
    from compressed_tensors import compressors

    unguarded = _without_guard(exports, tmp_path)
    results = _run_check(exports + unguarded, None)
    _assert_correct_or_refused(results[:2], transformers.__version__, compressed_tensors.__version__)
    if not hasattr(compressors, "Sparse24BitMaskCompressor"):  # no sparse decompressor in this release
        # the same tensors without the guard cannot load right (5.24 with 0.20.1 gives random Linears,
        # "wrong weights"); with it, the stock loader refuses
        assert all(r["stock"] != "exact" for r in results[2:]), results
        assert all(r["stock"].startswith("refused: ") for r in results[:2]), results


def test_oldest_pinned_versions_load_exactly_or_refuse(exports: list[Path], request: pytest.FixtureRequest,
                                                       tmp_path: Path) -> None:
    target = _install_oldest(request, tmp_path)
    results = _run_check(exports, target)
    _assert_correct_or_refused(results, "4.56.0", "0.12.0")
    by_format = {Path(r["path"]).name: r["stock"] for r in results}
    # these releases still ship compressed-tensors' 2:4 decompressor: the stock route gives the exact model
    assert by_format["sparse-24-bitmask"] == "exact", by_format
