"""Export a `MultimodalMoE` as HF-native files: the LM through `export_hf`, encoders and connectors as safetensors."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zoo.io.checkpoint import atomic_directory_write, write_manifest
from zoo.io.export.hf import ExportError, check_parity, to_hf
from zoo.io.export.llava import export_llava, llava_blocker
from zoo.models.lm import MoECausalLM

FORMATS = ("hf", "llava")

_EXPORT_README = """\
# {name}: Hugging Face export of a moe-zoo multimodal model

Written by `zoo export` (moe-zoo {zoo_version}). Every file's sha256 is in `manifest.json`.

| path | what it is | how to load it |
|---|---|---|
| `language_model/` | the language model as a transformers `{lm_class}` with the tokenizer | `AutoModelForCausalLM.from_pretrained(...)`, `AutoTokenizer.from_pretrained(...)` (no zoo needed) |
{encoder_rows}| `multimodal_config.json` | the moe-zoo `ModelConfig` (encoders, connectors, LM, MoE), placeholder token ids, and this table as data | `json.load` |
| `processor/` | tokenizer + `processor.json` (image size/mean/std, audio mel settings) | `zoo.processor.MultimodalProcessor.from_pretrained(...)` |
{card_row}
How the parts fit: each medium goes through its encoder (`[n, ...] -> [n, N, D]`), then its
connector (`-> [n, M, d_model]`); the connector's output rows replace the placeholder token
(`<image>` id {image_id}, `<audio>` id {audio_id}) in the LM's input embeddings (one placeholder
per medium, expanded to M positions), and the LM runs on the result.

LLaVA-native export (`--format llava`): {llava_reason}

Rebuild the whole model with moe-zoo: `zoo.build_model(zoo.ModelConfig.from_dict(cfg["model"]))`,
then load `encoders/*.safetensors` into `model.encoders[m]`, `connectors/*.safetensors` into
`model.connectors[m]`, and the LM weights from `language_model/`.
"""


def _llava_reason(model: nn.Module, model_config: Any) -> str:
    reason = llava_blocker(model, model_config)
    if reason is None:
        return "this model can be a `LlavaForConditionalGeneration`; `zoo export ... --format llava` writes it."
    return f"`LlavaForConditionalGeneration` cannot represent this model: {reason}."


def _module_state(module: nn.Module) -> dict[str, torch.Tensor]:
    # Cloned, contiguous, on CPU: safetensors refuses tensors that share storage.
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in module.state_dict().items()}


def export_multimodal(
    model: nn.Module,
    processor: Any,
    model_config: Any,
    directory: str | os.PathLike,
    *,
    format: str = "hf",
    name: str | None = None,
    card_text: str | None = None,
    verify: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write a `MultimodalMoE` as HF-native files, atomically, with a README saying what each is.

    Layout: `language_model/` (a `MixtralForCausalLM` / `Qwen2MoeForCausalLM` via `export_hf`,
    or the dense LM's own `save_pretrained`, plus the tokenizer), `encoders/<modality>.safetensors`,
    `connectors/<modality>.safetensors`, `multimodal_config.json`, `processor/`, `MODEL_CARD.md`
    (when `card_text` is given), `README.md`, and `manifest.json`.

    Args:
        model: the `zoo.model.MultimodalMoE`.
        processor: its `zoo.processor.MultimodalProcessor`.
        model_config: its `zoo.models.ModelConfig`.
        directory: output path; must not exist unless `overwrite`.
        format: "hf", or "llava" (`zoo.io.export.llava.export_llava`: a `LlavaForConditionalGeneration`
            directory, or an `ExportError` naming every part LLaVA cannot hold).
        name: the model's name for the README (default: the config's).
        card_text: the model card to copy in as `MODEL_CARD.md`.
        verify: check the exported MoE LM's logits against the zoo LM.
        overwrite: replace an existing directory.

    Returns:
        The directory's path.
    """
    import json
    import tempfile

    from safetensors.torch import save_file

    import zoo
    from zoo.models.config import ModelConfig

    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; supported: {FORMATS}")
    if not isinstance(model_config, ModelConfig):
        raise ExportError(f"model_config must be a zoo.models.ModelConfig, got {type(model_config).__name__}")
    if format == "llava":
        return export_llava(model, processor, model_config, directory, name=name, card_text=card_text, verify=verify,
                            overwrite=overwrite)
    lm = model.language_model
    is_moe = isinstance(lm, MoECausalLM)
    hf_lm = to_hf(lm) if is_moe else lm
    if is_moe and verify:
        check_parity(lm, hf_lm)
    name = name or model_config.name

    def write(tmp: Path) -> None:
        lm_dir = tmp / "language_model"
        hf_lm.save_pretrained(lm_dir)
        with tempfile.TemporaryDirectory() as scratch:
            processor.tokenizer.save_pretrained(scratch)
            for f in sorted(Path(scratch).iterdir()):
                if (lm_dir / f.name).exists():
                    raise ExportError(f"tokenizer file {f.name!r} would overwrite a file transformers wrote")
                shutil.copyfile(f, lm_dir / f.name)
        processor.save_pretrained(tmp / "processor")
        files: dict[str, dict[str, str]] = {"encoders": {}, "connectors": {}}
        for kind in ("encoders", "connectors"):
            for modality, module in getattr(model, kind).items():
                rel = f"{kind}/{modality}.safetensors"
                (tmp / kind).mkdir(exist_ok=True)
                save_file(_module_state(module), str(tmp / rel), metadata={"format": "pt", "modality": modality})
                files[kind][modality] = rel
        meta = {
            "format": "moe-zoo-hf-export",
            "format_version": 1,
            "model": model_config.to_dict(),
            "placeholder_ids": dict(model.placeholder_ids),
            "language_model": {"path": "language_model", "class": type(hf_lm).__name__},
            **files,
        }
        (tmp / "multimodal_config.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        if card_text is not None:
            (tmp / "MODEL_CARD.md").write_text(card_text, encoding="utf-8")
        rows = ""
        for modality, enc in model_config.encoders.items():
            con = model_config.connectors[modality]
            rows += (f"| `encoders/{modality}.safetensors` | the {modality} encoder's state dict ({enc.kind}"
                     f"{': ' + enc.name if enc.name else ''}) | `safetensors.torch.load_file`, keys of `model.encoders['{modality}']` |\n")
            rows += (f"| `connectors/{modality}.safetensors` | the {modality} connector's state dict ({con.kind}) | "
                     f"`safetensors.torch.load_file`, keys of `model.connectors['{modality}']` |\n")
        ids = model_config.placeholder_ids()
        readme = _EXPORT_README.format(
            name=name,
            zoo_version=zoo.__version__,
            lm_class=type(hf_lm).__name__,
            encoder_rows=rows,
            card_row="| `MODEL_CARD.md` | the model card (task family, metrics and the commands that measured them) | |\n"
            if card_text is not None else "",
            image_id=ids.get("image", model_config.image_token_id),
            audio_id=ids.get("audio", model_config.audio_token_id),
            llava_reason=_llava_reason(model, model_config),
        )
        (tmp / "README.md").write_text(readme, encoding="utf-8")
        write_manifest(tmp)

    return atomic_directory_write(directory, write, overwrite=overwrite)


__all__ = ["FORMATS", "export_multimodal"]
