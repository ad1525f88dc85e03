"""``bsbr distill``: single process, or data parallel under ``torchrun --nproc_per_node N``."""
from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)


def _base_lr(args):
    if args.stage2_params == "new":
        if args.stage2_base_lr is not None:
            raise ValueError("--stage2-base-lr applies only to --stage2-params all or lora")
        return None
    if args.stage2_params == "lora":
        return args.stage2_base_lr  # None: the adapters share --stage2-lr
    return 6e-5 if args.stage2_base_lr is None else args.stage2_base_lr


def cmd_distill(args) -> int:
    import torch
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from ..convert.converter import load_source
    from ..corpus import corpus_texts, token_windows
    from ..models import load_bsbr_model
    from .trainer import DistillConfig, distill

    if args.minutes is None and not args.steps and not args.stage2_steps:
        raise ValueError("nothing to train: give --minutes M (the usual), --stage2-steps S or --steps S")
    cfg = DistillConfig(steps=args.steps, minutes=args.minutes, stage2_steps=args.stage2_steps,
                        stage2_share=args.stage2_share, lr=args.lr, stage2_lr=args.stage2_lr,
                        stage2_params=args.stage2_params, stage2_base_lr=_base_lr(args), bf16=args.bf16,
                        lm_weight=args.lm_weight, schedule=args.schedule, seed=args.seed, checkpoint_every=args.checkpoint_every)
    cfg.validate()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    torch.manual_seed(args.seed)
    student_dir = Path(args.student)
    student = load_bsbr_model(student_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(student_dir))
    teacher = load_source(args.teacher).eval()
    # the standard library's "train" split by default: evaluation uses the disjoint "heldout" split
    texts, _ = corpus_texts(text_files=args.text_file, dataset=args.dataset, dataset_split="train", split="train",
                            seed=args.seed)
    windows = list(token_windows(tokenizer, texts, args.seq_len, args.max_windows))
    logger.info("%d training windows of %d tokens", len(windows), args.seq_len)
    progress = distill(teacher, student, windows, args.output, cfg, resume=args.resume)
    if not dist.is_initialized() or dist.get_rank() == 0:
        tokenizer.save_pretrained(args.output)
        last = progress["log"][-1] if progress["log"] else {}
        print(f"distilled {len(progress['log'])} steps in {progress['elapsed'] / 60:.1f} min; last: {last}; "
              f"saved to {args.output}")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


def register(sub) -> None:
    p = sub.add_parser("distill", help="recover a converted model's quality from its source")
    p.add_argument("--teacher", default=None, help="the source model (default: the bundled SmolLM2)")
    p.add_argument("--student", required=True, help="converted model directory (bsbr convert)")
    p.add_argument("--output", required=True, help="where to write checkpoints and the distilled model")
    p.add_argument("--minutes", type=float, default=None, help="wall-clock budget for both stages")
    # defaults = the recipe measured best in docs/findings.md for the default exact window: end-to-end
    # KL (no LM term) on the new pieces only, no stage 1
    p.add_argument("--steps", type=int, default=0,
                   help="stage-1 (attention transfer) steps (default 0: it made perplexity worse alone)")
    p.add_argument("--stage2-steps", type=int, default=0, help="end-to-end KL steps after stage 1")
    p.add_argument("--stage2-share", type=float, default=0.99,
                   help="with --minutes: fraction of the budget for stage 2 (default 0.99)")
    p.add_argument("--stage2-params", choices=["new", "all", "lora"], default="new",
                   help="what stage 2 trains: the new BSBR pieces (default), all weights, or the new pieces "
                        "plus LoRA adapters (peft; merged into the weights when saved)")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--stage2-lr", type=float, default=3e-3, help="stage-2 learning rate of the new pieces (default 3e-3)")
    p.add_argument("--stage2-base-lr", type=float, default=None,
                   help="with --stage2-params all: learning rate of the source's own weights (default 6e-5); "
                        "with lora: of the adapters (default: --stage2-lr)")
    p.add_argument("--schedule", choices=["constant", "linear", "cosine"], default="constant",
                   help="learning-rate schedule within each stage: constant, or decay to 0 at its end "
                        "(over its steps or its share of --minutes)")
    p.add_argument("--bf16", action="store_true",
                   help="bfloat16 matmuls (CPU autocast) for teacher and student; weights and optimizer stay float32")
    p.add_argument("--lm-weight", type=float, default=0.0,
                   help="weight of the LM loss beside the KL (default 0: pure imitation of the source)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=2000)
    p.add_argument("--text-file", nargs="*", default=None, help="train on these text files")
    p.add_argument("--dataset", default=None, help="a HuggingFace dataset name (needs network)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=25)
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint")
    p.set_defaults(func=cmd_distill)
