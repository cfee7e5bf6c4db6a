"""Load a job's compressed export as a standard transformers model, optionally saving a plain copy.

    sparseflow download ARTIFACT_ID -o out/                        # the job's last compressed_model
    python docs/examples/load_compressed.py out/compressed [out/plain]

The model has exactly the exported weights, in the dtype they were written in; the plain copy loads
with `AutoModelForCausalLM.from_pretrained` in any transformers release.
"""

from __future__ import annotations

import sys

import torch
from transformers import AutoTokenizer

from pipelines.export import load_compressed_model


def main(path: str, plain_out: str | None = None) -> None:
    model = load_compressed_model(path)  # stock from_pretrained refuses these folders (see docs/export.md)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer("The quick brown fox", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    print(tokenizer.decode(out[0]))
    if plain_out:
        model.save_pretrained(plain_out)
        tokenizer.save_pretrained(plain_out)


if __name__ == "__main__":
    main(*sys.argv[1:3])
