"""Loads a compressed export with whatever transformers / compressed-tensors PYTHONPATH provides; prints JSON.

Run as a script by tests/pipelines/test_export_compat.py: `python export_compat_check.py EXPORT EXPECTED ...`
(pairs), where EXPECTED is a safetensors file of the pruned model's weights in the exported dtype and, under
`buffer.`, its RoPE buffers as the exporting transformers computed them (an older release that misreads
the config's RoPE settings gets other values). Two routes are
tried: stock `AutoModelForCausalLM.from_pretrained` (which must give the exact model or raise) and
`pipelines.export.load_compressed_model` (which must give the exact model). "Exact" means every weight
bit-identical to EXPECTED and the logits bit-identical to those of a reference model built here, with
this transformers, from EXPECTED (logits of another transformers release may differ in the last bits).
"""

from __future__ import annotations

import json
import sys

import compressed_tensors
import torch
import transformers
from safetensors.torch import load_file


def reference(path: str, weights: dict[str, torch.Tensor]):
    """The pruned model itself: the export's architecture with the EXPECTED weights loaded."""
    config = transformers.AutoConfig.from_pretrained(path)
    del config.quantization_config
    dtype = next(iter(weights.values())).dtype
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return model.eval()


def compare(model, ref, weights: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor]) -> str:
    """'exact' when every weight, buffer and the logits match bit for bit, else what differs."""
    own = dict(model.named_buffers())
    wrong_buffers = [name for name, tensor in buffers.items() if not torch.allclose(own[name], tensor)]
    if wrong_buffers:
        return f"wrong buffers: {wrong_buffers}"
    state = model.state_dict()
    wrong = [name for name, tensor in weights.items() if not torch.equal(state[name].to(tensor.dtype), tensor)]
    if model.dtype != ref.dtype:
        return f"dtype {model.dtype}, not {ref.dtype}"
    if wrong:
        return f"wrong weights: {len(wrong)} of {len(weights)}, e.g. {wrong[0]}"
    ids = torch.arange(24).reshape(2, 12) % ref.config.vocab_size
    with torch.no_grad():
        same = torch.equal(model(ids).logits, ref(ids).logits)
    return "exact" if same else "wrong logits"


def check(path: str, expected_path: str) -> dict[str, str]:
    expected = load_file(expected_path)
    buffers = {k[len("buffer."):]: v for k, v in expected.items() if k.startswith("buffer.")}
    weights = {k: v for k, v in expected.items() if not k.startswith("buffer.")}
    dtype = next(iter(weights.values())).dtype
    ref = reference(path, weights)
    result = {"path": path, "transformers": transformers.__version__,
              "compressed_tensors": compressed_tensors.__version__}
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        result["stock"] = compare(model.eval(), ref, weights, buffers)
    except Exception as error:  # the refusal this route must give when it cannot decompress
        result["stock"] = f"refused: {type(error).__name__}: {str(error)[:200]}"
    from pipelines.export import load_compressed_model

    result["sparseflow"] = compare(load_compressed_model(path), ref, weights, buffers)
    return result


if __name__ == "__main__":
    args = sys.argv[1:]
    for export, expected in zip(args[::2], args[1::2], strict=True):
        print("RESULT " + json.dumps(check(export, expected)), flush=True)
