import os; os.environ["HF_HUB_OFFLINE"]="1"
import re, torch
from transformers import (BertConfig, BertModel, BertForSequenceClassification, ViTConfig, ViTForImageClassification,
    GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM)
models = {
 "bert": BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100)),
 "vit": ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8, num_labels=3)),
 "gpt2": GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64)),
 "llama": LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64, vocab_size=100)),
}
for k, m in models.items():
    print("==", k, m.config.model_type, type(m).__name__)
    for n, mod in m.named_modules():
        if re.search(r"\.0(\.|$)", n) or n.count(".") <= 1:
            print("  ", n, type(mod).__name__)
