"""GGUF -> a transformers `save_pretrained` directory (model + tokenizer), through transformers' own loader.

transformers dequantizes GGUF files itself (`from_pretrained(dir, gguf_file=...)`, with the `gguf`
package) for the architectures it maps; we only check the architecture first, so an unsupported
one is named in one line instead of failing deep inside the loader, and drop the "quantized" marks
it leaves (the weights are plain dequantized floats) so `save_pretrained` accepts the model.
"""

from __future__ import annotations

from pathlib import Path

import torch


class GGUFError(ValueError):
    """A GGUF file that cannot be read or whose architecture transformers cannot dequantize."""


def gguf_architecture(path: str | Path) -> str:
    """The `general.architecture` field of a GGUF file (e.g. "llama")."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise GGUFError("reading GGUF files needs the gguf package: pip install 'gguf==0.19.0'") from None
    try:
        reader = GGUFReader(str(path))
    except (ValueError, OSError, IndexError) as e:
        raise GGUFError(f"{str(path)!r} is not a readable GGUF file ({type(e).__name__}: {e})") from None
    field = reader.fields.get("general.architecture")
    if field is None:
        raise GGUFError(f"{str(path)!r} has no general.architecture field")
    return bytes(field.parts[field.data[0]]).decode()


def supported_architectures() -> list[str]:
    """GGUF architectures transformers can dequantize (its own table)."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return sorted(GGUF_SUPPORTED_ARCHITECTURES)


def convert_gguf(path: str | Path, out_dir: str | Path, *, dtype: torch.dtype = torch.float32) -> None:
    """Dequantize a GGUF causal LM and write it (safetensors) with its tokenizer to `out_dir`.

    Args:
        path: the `.gguf` file.
        out_dir: an empty directory (the caller makes the write atomic).
        dtype: weights dtype to save (fp32 holds every dequantized Q4/Q8 value exactly).

    Raises:
        GGUFError: unreadable file, or an architecture transformers cannot dequantize (named).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    arch = gguf_architecture(path)
    known = supported_architectures()
    if arch not in known and arch.replace("moe", "_moe") not in known:
        raise GGUFError(f"{path.name}: GGUF architecture {arch!r} cannot be dequantized by transformers; "
                        f"it knows {known}")
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model.hf_quantizer = None  # dequantized already: save_pretrained refuses a "quantized" model otherwise
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))


__all__ = ["GGUFError", "convert_gguf", "gguf_architecture", "supported_architectures"]
