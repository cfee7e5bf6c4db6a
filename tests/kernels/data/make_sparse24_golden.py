"""Regenerate `sparse24_bitmask_golden.safetensors` with compressed-tensors' own 2:4 compressor.

compressed-tensors dropped `Sparse24BitMaskCompressor` after 0.14, so the golden file pins what its
last releases wrote. Run with 0.12.x importable, e.g.::

    pip install --no-deps --target /tmp/ct012 compressed-tensors==0.12.2
    PYTHONPATH=/tmp/ct012 python tests/kernels/data/make_sparse24_golden.py
"""

from pathlib import Path

import torch
from compressed_tensors.compressors.sparse_compressors.sparse_24_bitmask import Sparse24BitMaskCompressor
from compressed_tensors.config import Sparse24BitMaskConfig
from safetensors.torch import save_file


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    dense = {
        "a.weight": torch.randn(16, 64, generator=gen).to(torch.float16),
        "b.weight": torch.randn(8, 36, generator=gen).to(torch.bfloat16),
    }
    compressor = Sparse24BitMaskCompressor(config=Sparse24BitMaskConfig())
    out = compressor.compress(dense, compression_targets={"a", "b"})
    tensors = {f"input.{k}": v for k, v in dense.items()}
    tensors.update({f"output.{k}": v.contiguous() for k, v in out.items()})
    save_file(tensors, str(Path(__file__).with_name("sparse24_bitmask_golden.safetensors")))


if __name__ == "__main__":
    main()
