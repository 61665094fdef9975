"""Triton kernels for the routed SwiGLU experts (GPU; CPU only under `TRITON_INTERPRET=1`).

Files, one piece each: `routing.py` (sort by expert, per-expert tiles), `swiglu_gemm.py`
(gathered gate_up GEMM + SwiGLU forward; down^T GEMM + SwiGLU backward + d(weights)),
`scatter_gemm.py` (down GEMM with the router-weighted scatter; dx), `weight_grad.py` (grouped
dW), `moe_swiglu.py` (the custom ops and their autograd). Import this package lazily: importing
it decorates the kernels, and `TRITON_INTERPRET` must be set before that.
"""

from zoo.kernels.triton.moe_swiglu import moe_swiglu
from zoo.kernels.triton.routing import Routing, route

__all__ = ["Routing", "moe_swiglu", "route"]
