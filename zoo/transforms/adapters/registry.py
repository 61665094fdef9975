"""`ADAPTERS`: transforms that add trainable parameters to a built language model.

An adapter entry is built from its options and has:

* `apply(language_model) -> language_model`: freeze what is there and add the adapter (in place
  where it can; the returned module replaces the given one);
* `merge(language_model) -> (language_model, remaining_options | None)`: after training, fold
  what can be folded into base weights; `remaining_options` describe what is left as modules
  (recorded in `ModelConfig.adapters`, so `build_model` rebuilds the checkpoint), None if nothing;
* `preserves_output`: the model's outputs are unchanged right after `apply` (LoRA B = 0).
"""

from zoo.registry import Registry

ADAPTERS: Registry = Registry("adapter")

__all__ = ["ADAPTERS"]
