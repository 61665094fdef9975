"""Export to plain transformers: one adapter per HF target (`HF_TARGETS`), the LM exporter, the multimodal exporter."""

from zoo.io.export.hf import ExportError, check_parity, export_hf, hf_target, to_hf
from zoo.io.export.multimodal import FORMATS, export_multimodal, llava_blocker
from zoo.io.export.targets import HF_TARGETS

TARGETS = tuple(HF_TARGETS.names())

__all__ = ["ExportError", "FORMATS", "HF_TARGETS", "TARGETS", "check_parity", "export_hf", "export_multimodal",
           "hf_target", "llava_blocker", "to_hf"]
