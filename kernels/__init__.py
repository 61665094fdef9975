"""Expert kernels: a pure-PyTorch reference (the oracle) and dispatching ops.

Layers: kernel (Triton, GPU) -> op (`zoo.kernels.ops`, dispatch by device) -> module
(`zoo.moe.experts`). Every kernel has a reference in `zoo.kernels.reference` with the same
signature; tests compare outputs and all gradients against it.

This folder is the package `zoo.kernels`. Python started from the repository root also sees it as
a top-level `kernels`, the name of the Hugging Face `kernels` package that transformers probes for
(`is_kernels_available` imports it when it finds no metadata). Imported under that name it exports
nothing and looks like a namespace-package shadow (no `__file__`), so the probe reports "not
installed" and nothing of the zoo is imported twice.
"""

if __name__ != "zoo.kernels":
    del globals()["__file__"]
else:
    from zoo.kernels.ops import backend_for, moe_swiglu, sort_by_expert

    __all__ = ["backend_for", "moe_swiglu", "sort_by_expert"]
