import os, sys, json, subprocess, tempfile, warnings
os.environ["HF_HUB_OFFLINE"] = "1"
warnings.filterwarnings("ignore")
import torch
from transformers import (BertConfig, BertForSequenceClassification, ViTConfig, ViTForImageClassification,
    GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM)
from transformers.utils import logging as hf_logging; hf_logging.set_verbosity_error()
sys.path.insert(0, os.path.dirname(__file__))
import gp_adapter_proto as G
from peft import get_peft_model, PeftModel
from safetensors.torch import load_file

def builders():
    return {
     "bert": (lambda: BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100, hidden_dropout_prob=0, attention_probs_dropout_prob=0)),
              dict(input_ids=torch.randint(0, 100, (2, 7)))),
     "vit": (lambda: ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8, num_labels=3)),
             dict(pixel_values=torch.randn(2, 3, 32, 32))),
     "gpt2": (lambda: GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0)),
              dict(input_ids=torch.randint(0, 100, (2, 7)))),
     "llama": (lambda: LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64, vocab_size=100)),
               dict(input_ids=torch.randint(0, 100, (2, 7)))),
    }

out_root = tempfile.mkdtemp(prefix="gpad_", dir=None)
for style in ("parallel", "sequential"):
    for name, (build, inputs) in builders().items():
        torch.manual_seed(0); base = build().eval()
        ref = base(**inputs).logits
        torch.manual_seed(1)
        cfg = G.GPAdapterConfig(bottleneck_dim=4, adapter_style=style, init_weights=False, scaling=0.5,
                                modules_to_save=["classifier"] if name in ("bert", "vit") else None)
        pm = get_peft_model(base, cfg).eval()
        out = pm(**inputs).logits
        trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
        bad = [n for n in trainable if G.PREFIX not in n and "modules_to_save" not in n]
        with pm.disable_adapter():
            same_disabled = torch.allclose(pm(**inputs).logits, ref)
        d = os.path.join(out_root, f"{name}_{style}")
        pm.save_pretrained(d)
        sd = load_file(os.path.join(d, "adapter_model.safetensors"))
        conf = json.load(open(os.path.join(d, "adapter_config.json")))
        torch.manual_seed(0); base2 = build().eval()
        pm2 = PeftModel.from_pretrained(base2, d).eval()
        out2 = pm2(**inputs).logits
        # also load_adapter as second adapter + trainable reload
        pm2.load_adapter(d, adapter_name="other", is_trainable=True)
        print(f"{style:10s} {name:5s} targets={sorted(pm.base_model.targeted_module_names)[:2]}... n={len(pm.base_model.targeted_module_names)} "
              f"changed={not torch.allclose(out, ref)} disabled==base={same_disabled} bad_trainable={bad} "
              f"keys={len(sd)} nonadapter_keys={[k for k in sd if G.PREFIX not in k]} peft_type={conf['peft_type']!r} "
              f"reload_exact={torch.equal(out, out2)} type(cfg.peft_type)={type(pm2.peft_config['default'].peft_type).__name__}")
print("sample keys:", sorted(load_file(os.path.join(out_root, "bert_parallel", "adapter_model.safetensors")))[:3])
print("SAVED_IN", out_root)
# fresh process WITHOUT registration
code = ("import os,warnings;warnings.filterwarnings('ignore');os.environ['HF_HUB_OFFLINE']='1';import torch;"
        "from transformers import GPT2Config,GPT2LMHeadModel;from peft import PeftModel, PeftConfig;"
        "m=GPT2LMHeadModel(GPT2Config(n_embd=32,n_layer=2,n_head=2,vocab_size=100,n_positions=64,bos_token_id=0,eos_token_id=0));"
        f"d='{out_root}/gpt2_parallel';"
        "\nfor f in (lambda: PeftModel.from_pretrained(m,d), lambda: PeftConfig.from_pretrained(d)):\n"
        "  try: f()\n  except Exception as e: print('UNREGISTERED ->', type(e).__name__ + ':', e)\n")
r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
print(r.stdout, r.stderr[-1500:])
