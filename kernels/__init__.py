"""Expert kernels: a pure-PyTorch reference (the oracle) and dispatching ops.

Layers: kernel (Triton, GPU) -> op (`zoo.kernels.ops`, dispatch by device) -> module
(`zoo.moe.experts`). Every kernel has a reference in `zoo.kernels.reference` with the same
signature; tests compare outputs and all gradients against it.
"""

from zoo.kernels.ops import backend_for, moe_swiglu, sort_by_expert

__all__ = ["backend_for", "moe_swiglu", "sort_by_expert"]
