"""Models: the LM wrapper, the multimodal model, placeholder splicing, configs and builders."""

from zoo.models.builders import build_encoder, build_language_model, build_model, model_for_checkpoint
from zoo.models.config import AdapterConfig, ConnectorConfig, EncoderConfig, LMConfig, MODALITIES, ModelConfig
from zoo.models.checkpointing import activation_checkpointing
from zoo.models.compile import compiled_layers
from zoo.models.lm import IGNORE_INDEX, MoEBlock, MoECausalLM, MoECausalLMOutput, decoder_layers
from zoo.models.loss import causal_lm_loss, linear_cross_entropy
from zoo.models.multimodal import MultimodalMoE, MultimodalOutput
from zoo.models.splicing import SplicedInputs

__all__ = [
    "AdapterConfig",
    "ConnectorConfig",
    "EncoderConfig",
    "IGNORE_INDEX",
    "LMConfig",
    "MODALITIES",
    "ModelConfig",
    "MoEBlock",
    "MoECausalLM",
    "MoECausalLMOutput",
    "MultimodalMoE",
    "MultimodalOutput",
    "SplicedInputs",
    "activation_checkpointing",
    "build_encoder",
    "build_language_model",
    "build_model",
    "causal_lm_loss",
    "compiled_layers",
    "decoder_layers",
    "linear_cross_entropy",
    "model_for_checkpoint",
]
