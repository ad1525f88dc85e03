"""Run by test_distill.py under torchrun: a tiny distillation on 2 CPU processes (gloo, DDP)."""
import datetime
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, sys.argv[2])  # tests/ for model_sources
from model_sources import make_source  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from bsbr import convert_to_bsbr  # noqa: E402
from bsbr.distill import DistillConfig, distill, new_parameters, trainer  # noqa: E402

out, mode = sys.argv[1], sys.argv[3] if len(sys.argv) > 3 else ""
minutes = mode == "minutes"
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
teacher = make_source("llama")
student = convert_to_bsbr(teacher, chunk_size=8, gate_init=0.1, retrieval_blocks=2)  # 40-token windows: 5 chunks
windows = [torch.randint(0, 97, (40,), generator=torch.Generator().manual_seed(i)) for i in range(8)]
if minutes:  # a time budget, and rank 0 slow to write its checkpoints (as a big model's are): the ranks' clocks part
    write = trainer.save_checkpoint
    trainer.save_checkpoint = lambda *a, **k: (time.sleep(1.0), write(*a, **k))[1]
    cfg = DistillConfig(minutes=0.05, lr=1e-2, checkpoint_every=1)
elif mode == "short":  # all weights, on windows within the exact reach (32 tokens), where the new pieces get no
    windows = [w[:24] for w in windows]  # gradient
    cfg = DistillConfig(steps=2, lr=1e-3, params="all", lm_weight=1.0, checkpoint_every=100)
else:  # no activation checkpointing, as the test's one-process reference: with it the first layer's attention
    # inputs require grad and take another softmax kernel, whose rounding Adam can amplify
    cfg = DistillConfig(steps=4, lr=1e-2, checkpoint_every=100, activation_checkpointing=False)
distill(teacher, student, windows, out, cfg)
save_file({k: v.detach().contiguous() for k, v in new_parameters(student).items()},
          f"{out}/rank{dist.get_rank()}.safetensors")
dist.barrier()
dist.destroy_process_group()
