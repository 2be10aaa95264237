import os, sys, glob, warnings, tempfile
os.environ["HF_HUB_OFFLINE"] = "1"; os.environ["WANDB_DISABLED"] = "true"
warnings.filterwarnings("ignore")
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
from transformers.utils import logging as hf_logging; hf_logging.set_verbosity_error()
sys.path.insert(0, os.path.dirname(__file__))
import gp_adapter_proto as G
from peft import get_peft_model, PeftModel

def build():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0))

class DS(torch.utils.data.Dataset):
    def __len__(self): return 16
    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i); ids = torch.randint(0, 100, (8,), generator=g)
        return {"input_ids": ids, "labels": ids}

out = tempfile.mkdtemp(prefix="trainer_", dir=None)
pm = get_peft_model(build(), G.GPAdapterConfig(bottleneck_dim=4))
pm.print_trainable_parameters()
args = TrainingArguments(out, max_steps=4, save_steps=2, eval_strategy="steps", eval_steps=2, per_device_train_batch_size=4,
                         learning_rate=1e-2, report_to=[], load_best_model_at_end=True, save_total_limit=3, use_cpu=True)
tr = Trainer(model=pm, args=args, train_dataset=DS(), eval_dataset=DS())
tr.train()
ckpts = sorted(glob.glob(f"{out}/checkpoint-*")); print("ckpts", [os.path.basename(c) for c in ckpts], sorted(os.listdir(ckpts[-1]))[:6])
# resume
pm2 = get_peft_model(build(), G.GPAdapterConfig(bottleneck_dim=4))
args2 = TrainingArguments(out, max_steps=6, save_steps=2, per_device_train_batch_size=4, learning_rate=1e-2, report_to=[], use_cpu=True)
Trainer(model=pm2, args=args2, train_dataset=DS()).train(resume_from_checkpoint=ckpts[-1])
print("resume OK")
# transformers PeftAdapterMixin path (no PeftModel): base.load_adapter(dir)
x = torch.randint(0, 100, (1, 8))
pm.save_pretrained(f"{out}/final")
ref = pm.eval()(input_ids=x).logits
b = build().eval()
try:
    b.load_adapter(f"{out}/final", adapter_name="default")
    print("mixin load_adapter exact:", torch.allclose(b(input_ids=x).logits, ref, atol=1e-6))
except Exception as e:
    print("mixin load_adapter ->", type(e).__name__, e)
try:
    b.delete_adapter("default"); print("mixin delete_adapter OK", any("gp_adapter" in n for n, _ in b.named_parameters()))
except Exception as e:
    print("mixin delete_adapter ->", type(e).__name__, e)
print(pm.get_model_status().available_adapters if hasattr(pm, "get_model_status") else "")
try:
    print("model_status peft_types:", pm.get_model_status().peft_types)
except Exception as e:
    print("get_model_status ->", type(e).__name__, e)
