import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Model,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 97


def randomize(model):
    """Perturb every weight (norms and biases included), so a weight the converter skips cannot
    hide behind its default initialisation."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def make_source(family: str):
    torch.manual_seed(0)
    if family == "gpt2":
        return randomize(GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=48, n_layer=2, n_head=4, n_positions=64,
                                                    bos_token_id=0, eos_token_id=0)))
    if family == "gpt2-base":
        return randomize(GPT2Model(GPT2Config(vocab_size=VOCAB, n_embd=48, n_layer=2, n_head=4, n_positions=64,
                                              bos_token_id=0, eos_token_id=0)))
    if family == "llama":  # grouped K/V, biases everywhere, untied LM head
        return randomize(LlamaForCausalLM(LlamaConfig(
            vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
            num_key_value_heads=2, attention_bias=True, mlp_bias=True, tie_word_embeddings=False,
            rope_theta=500.0, bos_token_id=1, eos_token_id=2)))
    if family == "llama3-rope":  # a scaled rope type
        return randomize(LlamaForCausalLM(LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=4, tie_word_embeddings=True, max_position_embeddings=256,
            rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
            bos_token_id=1, eos_token_id=2)))
    if family == "mistral":
        return randomize(MistralForCausalLM(MistralConfig(
            vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, bos_token_id=1, eos_token_id=2)))
    if family == "qwen2":
        return randomize(Qwen2ForCausalLM(Qwen2Config(
            vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)))
    raise ValueError(family)


FAMILIES = ["gpt2", "gpt2-base", "llama", "llama3-rope", "mistral", "qwen2"]

