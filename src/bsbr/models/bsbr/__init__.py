"""HuggingFace BSBR models. Importing this registers ``model_type="bsbr"`` with the Auto classes."""
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForQuestionAnswering,
                          AutoModelForSequenceClassification, AutoModelForTokenClassification)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .configuration_bsbr import BSBRConfig
from .loading import load_bsbr_model
from .modeling_bsbr import (BSBRBaseModel, BSBRCache, BSBRForCausalLM, BSBRForQuestionAnswering,
                            BSBRForSequenceClassification, BSBRForTokenClassification, BSBRPreTrainedModel)

AutoConfig.register("bsbr", BSBRConfig, exist_ok=True)
AutoModel.register(BSBRConfig, BSBRBaseModel, exist_ok=True)
AutoModelForCausalLM.register(BSBRConfig, BSBRForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(BSBRConfig, BSBRForSequenceClassification, exist_ok=True)
AutoModelForTokenClassification.register(BSBRConfig, BSBRForTokenClassification, exist_ok=True)
AutoModelForQuestionAnswering.register(BSBRConfig, BSBRForQuestionAnswering, exist_ok=True)
# transformers' Trainer shifts the labels (for label smoothing) only for the causal LMs named here
MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.setdefault("bsbr", "BSBRForCausalLM")

__all__ = ["BSBRBaseModel", "BSBRCache", "BSBRConfig", "BSBRForCausalLM", "BSBRForQuestionAnswering",
           "BSBRForSequenceClassification", "BSBRForTokenClassification", "BSBRPreTrainedModel", "load_bsbr_model"]
