"""Models built from the layers: the native BSBR stack and the HuggingFace BSBR models."""
from .bsbr import (BSBRBaseModel, BSBRCache, BSBRConfig, BSBRForCausalLM, BSBRForQuestionAnswering,
                   BSBRForSequenceClassification, BSBRForTokenClassification, load_bsbr_model)
from .native import BSBRLayer, BSBRModel
from .shell import ATTENTIONS, AttentionLM

__all__ = ["ATTENTIONS", "AttentionLM", "BSBRBaseModel", "BSBRCache", "BSBRConfig", "BSBRForCausalLM",
           "BSBRForQuestionAnswering", "BSBRForSequenceClassification", "BSBRForTokenClassification", "BSBRLayer",
           "BSBRModel", "load_bsbr_model"]
