"""Finding the parts of a causal LM that stages act on: decoder layers and target Linears.

Module-name patterns follow llm-compressor's convention: a plain string matches a name exactly or as
a dotted suffix (`"lm_head"`, `"mlp.down_proj"`); a string starting with `re:` is a regular
expression matched against the whole name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn


def name_matches(name: str, pattern: str) -> bool:
    """Whether module `name` matches one pattern (exact, dotted suffix, or `re:` full match)."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    return any(name_matches(name, p) for p in patterns)


def find_linears(module: nn.Module, targets: Iterable[str], ignore: Iterable[str] = (), prefix: str = "") -> dict[
    str, nn.Linear
]:
    """Linear modules under `module` whose full name matches a target and no ignore pattern.

    `prefix` is the dotted name of `module` inside the whole model, so that patterns written against
    full names (`model.layers.3.mlp.up_proj`) also work when searching inside one decoder layer.
    """
    targets, ignore = list(targets), list(ignore)
    found: dict[str, nn.Linear] = {}
    for name, child in module.named_modules():
        if not isinstance(child, nn.Linear):
            continue
        full = f"{prefix}.{name}" if prefix and name else (prefix or name)
        if matches_any(full, targets) and not matches_any(full, ignore):
            found[full] = child
    return found


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The stack of decoder blocks of a causal LM and its dotted name (e.g. `model.layers`).

    Works for the Llama family and most decoder-only models in transformers; raises a clear error
    for an architecture whose block stack it cannot find.
    """
    for name, child in model.named_modules():
        if isinstance(child, nn.ModuleList) and len(child) > 0 and name.split(".")[-1] in ("layers", "h", "blocks"):
            return name, child
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every Linear inside the decoder layers, by full dotted name (embeddings and lm_head excluded)."""
    prefix, layers = decoder_layers(model)
    return find_linears(layers, ["re:.*"], prefix=prefix)
