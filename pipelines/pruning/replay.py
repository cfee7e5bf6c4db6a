"""Replaying a decoder layer's finished sub-modules in the later passes over the same layer.

Under `within_layer`, a layer runs once more for each shared-input group after the first (stopped
at the group's input) and once more to propagate its outputs. A direct child of the layer (Llama's
`self_attn`, `mlp`) whose targeted Linears are all pruned, and before which every targeted Linear
that is called is pruned too, computes the same output in every later pass: its inputs come from
the same layer inputs through modules that no longer change. So its output is recorded, per batch,
in the first pass after that, and later passes return the record instead of computing the child
again. For SmolLM2 that skips the attention block in the down_proj pass and in the propagating
pass: about a third of those passes' work.

The record holds one output per batch: the size of the layer's activations (the driver keeps two
buffers of that size already). It is used on the CPU only, where memory is plentiful and the
passes are the cost; on a GPU the driver does not enable it. A child called more than once per
forward, or one whose record missed a batch, is never replayed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn
from torch.utils._pytree import tree_map


def _clone(value: Any) -> Any:
    # a copy per use: the layer's code may modify its child's output in place
    return tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, value)


class SubmoduleReplay:
    """Records and replays the outputs of one decoder layer's finished children, batch by batch."""

    def __init__(self, layer: nn.Module, layer_prefix: str, linears: dict[str, nn.Linear], enabled: bool):
        self.enabled = enabled
        self.batch = 0
        self._children: dict[str, nn.Module] = dict(layer.named_children())
        self._owner = {name: self._child_of(name, layer_prefix) for name in linears}
        self._groups: list[list[str]] = []
        self._pruned: set[str] = set()
        self._records: dict[str, list[Any]] = {}
        self._complete: set[str] = set()
        self._broken: set[str] = set()

    def _child_of(self, linear_name: str, layer_prefix: str) -> str | None:
        rest = linear_name.removeprefix(layer_prefix + ".")
        child = rest.split(".", 1)[0]
        return child if child in self._children and child != rest else None

    def set_groups(self, groups: list[list[str]]) -> None:
        """The layer's shared-input groups in call order (as the first pass found them)."""
        self._groups = [list(group) for group in groups]

    def mark_pruned(self, names: list[str]) -> None:
        """These Linears are final for this layer."""
        self._pruned.update(names)

    def _finished(self, child: str) -> bool:
        """All targeted Linears of `child`, and all called before its last one, are pruned."""
        last = max((g for g, group in enumerate(self._groups) if any(self._owner[n] == child for n in group)),
                   default=None)
        if last is None:
            return False  # no targeted Linear inside: never changes, but costs little; not recorded
        return all(name in self._pruned for group in self._groups[: last + 1] for name in group)

    @contextmanager
    def active(self, batches: int) -> Iterator[None]:
        """During one pass over `batches` batches: replay complete records, record finished children."""
        if not self.enabled or not self._groups:
            yield
            return
        handles, replaced = [], []
        for name, child in self._children.items():
            if name in self._broken or not self._finished(name):
                continue
            if name in self._complete:
                record = self._records[name]
                child.forward = lambda *args, _record=record, **kwargs: _clone(_record[self.batch])
                replaced.append(child)
            elif name not in self._records:
                self._records[name] = [None] * batches
                handles.append(child.register_forward_hook(self._recorder(name)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            for child in replaced:
                del child.forward  # back to the class's forward
            for name, record in list(self._records.items()):
                if name not in self._complete and name not in self._broken:
                    if any(item is None for item in record):
                        self._broken.add(name)  # a batch stopped before the child ran: never replayed
                        del self._records[name]
                    else:
                        self._complete.add(name)

    def _recorder(self, name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            record = self._records.get(name)
            if record is None:
                return
            if record[self.batch] is not None:  # called twice in one forward: outputs differ per call
                self._broken.add(name)
                del self._records[name]
                return
            record[self.batch] = _clone(output)

        return hook

    def clear(self) -> None:
        """Free the records (the layer is done)."""
        self._records.clear()
        self._complete.clear()
