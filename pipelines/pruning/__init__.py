"""Pruning algorithms (pure tensor functions) and the one layer-sequential driver that runs them.

- `patterns`: mask selection from a score (unstructured per-row exact count, N:M).
- `magnitude`, `wanda`, `sparsegpt`: prune one weight from its statistics, returning a `PruneResult`.
- `owl`: outlier-weighted layerwise sparsities.
- `stats`: input statistics (x xᵀ, column norms) and the relative output error.
- `sequential`: capture decoder inputs, run layer by layer, hooks, memory.
- `engine`: prune one decoder layer, Linears sharing an input together.
- `targets`: which Linears a spec selects, checked before any work.
"""

from pipelines.pruning.magnitude import prune_magnitude
from pipelines.pruning.patterns import nm_mask, prune_count, select_mask, unstructured_mask
from pipelines.pruning.result import PruneResult
from pipelines.pruning.sparsegpt import HessianNotPositiveDefiniteError, inverse_hessian_factor, prune_sparsegpt
from pipelines.pruning.wanda import prune_wanda

__all__ = [
    "HessianNotPositiveDefiniteError",
    "PruneResult",
    "inverse_hessian_factor",
    "nm_mask",
    "prune_count",
    "prune_magnitude",
    "prune_sparsegpt",
    "prune_wanda",
    "select_mask",
    "unstructured_mask",
]
