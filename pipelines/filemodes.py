"""File modes of written artifacts: every file as an ordinary `open()` would create it (0666 less the umask).

safetensors writes through a private temp file and keeps its mode, 0600, so a model directory held a
0600 `model.safetensors` beside 0644 config and tokenizer files. Standard library only, so the
artifact store can use it without importing torch.
"""

from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    """The process umask, read without changing it (Linux reports it in /proc; elsewhere set and restored)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def normalize_modes(path: str | Path) -> None:
    """Give every regular file under `path` (or `path` itself) mode 0666 less the umask."""
    path = Path(path)
    mode = 0o666 & ~current_umask()
    files = [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()] if path.is_dir() else [path]
    for file in files:
        if file.stat().st_mode & 0o777 != mode:
            file.chmod(mode)
