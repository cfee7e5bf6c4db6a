"""Stored artifacts have one file mode: what `open()` gives (0666 less the umask), safetensors' 0600 files too."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from pipelines.filemodes import current_umask
from workers.storage import ArtifactStorage


def test_stored_files_get_the_ordinary_mode_whatever_wrote_them(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    os.umask(umask)
    assert current_umask() == umask
    model = tmp_path / "work" / "model"
    model.mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, str(model / "model.safetensors"))
    (model / "config.json").write_text("{}")
    masks = tmp_path / "work" / "masks.safetensors"
    save_file({"m": torch.zeros(2, dtype=torch.uint8)}, str(masks))
    assert (model / "model.safetensors").stat().st_mode & 0o777 == 0o600  # what safetensors does

    storage = ArtifactStorage(f"file://{tmp_path / 'root'}", tmp_path / "cache")
    stored = [storage.put(path, job_id="j", label="00-prune", kind=kind)
              for path, kind in ((model, "model"), (masks, "masks"))]
    model_dir, masks_file = (storage.local_path(s.uri) for s in stored)
    files = [*model_dir.rglob("*"), masks_file]
    assert len(files) == 4  # model.safetensors, config.json, checksums.json, masks.safetensors
    assert {f.stat().st_mode & 0o777 for f in files} == {0o666 & ~umask}
