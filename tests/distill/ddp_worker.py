"""Run by test_distill.py under torchrun: a tiny distillation on 2 CPU processes (gloo, DDP)."""
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, sys.argv[2])  # tests/ for model_sources
from model_sources import make_source  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from bsbr import convert_to_bsbr  # noqa: E402
from bsbr.distill import DistillConfig, distill, new_parameters  # noqa: E402

dist.init_process_group("gloo")
out = sys.argv[1]
teacher = make_source("llama")
student = convert_to_bsbr(teacher, chunk_size=8, gate_init=0.1, retrieval_blocks=2)  # 40-token windows: 5 chunks
windows = [torch.randint(0, 97, (40,), generator=torch.Generator().manual_seed(i)) for i in range(8)]
# no activation checkpointing, as the test's one-process reference: with it the first layer's attention inputs
# require grad and take another softmax kernel, whose rounding Adam can amplify
distill(teacher, student, windows, out, DistillConfig(steps=4, lr=1e-2, checkpoint_every=100,
                                                      activation_checkpointing=False))
save_file({k: v.detach().contiguous() for k, v in new_parameters(student).items()},
          f"{out}/rank{dist.get_rank()}.safetensors")
dist.barrier()
dist.destroy_process_group()
