"""The reference 2:4 backend, counting the calls that reach it: which route a `SparseLinear` call took
(a call captured into a CUDA graph counts once; a replay runs no Python)."""

from kernels.backends import ReferenceBackend


class CountingReference(ReferenceBackend):
    def __init__(self) -> None:
        self.calls = 0

    def linear(self, x, handle):
        self.calls += 1
        return super().linear(x, handle)
