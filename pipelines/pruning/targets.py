"""Which Linears a prune stage touches, checked before any work: errors name the recipe field."""

from __future__ import annotations

from torch import nn

from pipelines.modeling import decoder_layers, find_linears, name_matches
from pipelines.stage import StageError


class PruneConfigError(StageError, ValueError):
    """A prune spec that cannot apply to this model or data; the message names the field."""


def resolve_targets(model: nn.Module, targets: list[str], ignore: list[str]) -> dict[int, dict[str, nn.Linear]]:
    """Targeted Linears grouped by decoder-layer index, by full dotted name.

    Raises `PruneConfigError` when a target pattern matches no Linear of the model, when targets
    minus ignore leave nothing, or when a selected Linear lies outside the decoder layers (only
    those are pruned layer by layer; add such a module to `ignore`).
    """
    all_linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    for i, pattern in enumerate(targets):
        if not any(name_matches(name, pattern) for name in all_linears):
            sample = ", ".join(all_linears[:4])
            raise PruneConfigError(f"targets.{i}: pattern {pattern!r} matches no Linear module (e.g. {sample})")
    selected = find_linears(model, targets, ignore)
    if not selected:
        raise PruneConfigError(f"targets: every Linear matching {targets} is excluded by ignore {ignore}")
    prefix, layers = decoder_layers(model)
    by_layer: dict[int, dict[str, nn.Linear]] = {}
    for index, layer in enumerate(layers):
        found = find_linears(layer, targets, ignore, prefix=f"{prefix}.{index}")
        if found:
            by_layer[index] = found
    inside = {name for found in by_layer.values() for name in found}
    outside = sorted(set(selected) - inside)
    if outside:
        raise PruneConfigError(
            f"targets: {outside[0]} is outside the decoder layers ({prefix}); only decoder Linears are pruned, "
            "add it to ignore"
        )
    return by_layer


def check_pattern_fits(linears: dict[str, nn.Linear], nm: tuple[int, int] | None) -> None:
    """Raise `PruneConfigError` naming `pattern` when M does not divide some Linear's input dimension."""
    if nm is None:
        return
    n, m = nm
    if not 0 < n < m:
        raise PruneConfigError(f"pattern: need 0 < N < M, got {n}:{m}")
    for name, linear in linears.items():
        if linear.in_features % m:
            raise PruneConfigError(
                f"pattern: M={m} of '{n}:{m}' does not divide the input dimension {linear.in_features} of {name}"
            )
