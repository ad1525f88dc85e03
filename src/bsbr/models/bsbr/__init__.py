"""HuggingFace BSBR models. Importing this registers ``model_type="bsbr"`` with the Auto classes."""
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_bsbr import BSBRConfig
from .loading import load_bsbr_model
from .modeling_bsbr import BSBRBaseModel, BSBRCache, BSBRForCausalLM, BSBRPreTrainedModel

AutoConfig.register("bsbr", BSBRConfig, exist_ok=True)
AutoModel.register(BSBRConfig, BSBRBaseModel, exist_ok=True)
AutoModelForCausalLM.register(BSBRConfig, BSBRForCausalLM, exist_ok=True)

__all__ = ["BSBRBaseModel", "BSBRCache", "BSBRConfig", "BSBRForCausalLM", "BSBRPreTrainedModel", "load_bsbr_model"]
