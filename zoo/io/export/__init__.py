"""Export to plain transformers: one adapter per HF target (`HF_TARGETS`), the LM exporter, the multimodal
exporter, and the LLaVA-native exporter (one adapter per vision tower class, `VISION_TOWERS`)."""

from zoo.io.export.hf import ExportError, check_parity, export_hf, hf_target, to_hf
from zoo.io.export.llava import VISION_TOWERS, export_llava, llava_blocker, llava_blockers, to_llava
from zoo.io.export.multimodal import FORMATS, export_multimodal
from zoo.io.export.targets import HF_TARGETS

TARGETS = tuple(HF_TARGETS.names())

__all__ = ["ExportError", "FORMATS", "HF_TARGETS", "TARGETS", "VISION_TOWERS", "check_parity", "export_hf",
           "export_llava", "export_multimodal", "hf_target", "llava_blocker", "llava_blockers", "to_hf", "to_llava"]
