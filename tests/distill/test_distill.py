"""Distillation trains only the new pieces, reduces its loss, is deterministic, resumes exactly,
and runs data-parallel under torchrun."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from model_sources import VOCAB, make_source
from safetensors.torch import load_file

from bsbr import convert_to_bsbr, load_bsbr_model
from bsbr.distill import DistillConfig, attention_transfer_loss, distill, new_parameters
from bsbr.distill.teacher import teacher_targets

CHUNK = 8


def windows(n=6, length=40):
    return [torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(i)) for i in range(n)]


def fresh(gate_init=0.0):
    teacher = make_source("llama")
    return teacher, convert_to_bsbr(teacher, chunk_size=CHUNK, gate_init=gate_init, retrieval_blocks=0)


def transfer_loss(teacher, student, ws):
    total = 0.0
    for w in ws:
        records, _ = teacher_targets(teacher, w[None])
        with torch.no_grad():
            total += attention_transfer_loss(student, records, w[None], backward=False)
    return total / len(ws)


def test_attention_transfer_trains_only_new_pieces_and_lowers_the_loss(tmp_path):
    teacher, student = fresh()
    frozen = {k: v.clone() for k, v in student.state_dict().items() if k not in new_parameters(student)}
    ws = windows()
    before = transfer_loss(teacher, student, ws)
    progress = distill(teacher, student, ws, tmp_path, DistillConfig(steps=30, lr=3e-2, checkpoint_every=10))
    after = transfer_loss(teacher, student, ws)
    assert after < 0.9 * before, (before, after)
    for k, v in student.state_dict().items():
        if k in frozen:
            assert torch.equal(v, frozen[k]), k
    assert any(float(l.attn.gate_value().detach().abs().max()) > 0 for l in student.model.layers)  # gate opened
    assert len(progress["log"]) == 30
    assert (tmp_path / "distill.png").stat().st_size > 1000  # the training curve beside distill.json
    reloaded = load_bsbr_model(tmp_path)  # the saved result is a normal BSBR checkpoint
    ids = ws[0][None]
    torch.testing.assert_close(reloaded(ids).logits, student(ids).logits)


def test_deterministic_and_resume_reaches_the_same_weights(tmp_path):
    ws = windows()
    cfg = dict(lr=1e-2, checkpoint_every=2)
    t1, s1 = fresh(0.1)
    distill(t1, s1, ws, tmp_path / "a", DistillConfig(steps=6, **cfg))
    t2, s2 = fresh(0.1)
    distill(t2, s2, ws, tmp_path / "b", DistillConfig(steps=6, **cfg))
    # interrupted after 3 steps, then resumed in a new process-like setting (fresh models)
    t3, s3 = fresh(0.1)
    distill(t3, s3, ws, tmp_path / "c", DistillConfig(steps=3, **cfg))
    t4, s4 = fresh(0.1)
    distill(t4, s4, ws, tmp_path / "c", DistillConfig(steps=6, **cfg), resume=True)
    p1, p2, p4 = (new_parameters(s) for s in (s1, s2, s4))
    for k in p1:
        assert torch.equal(p1[k], p2[k]), k
        assert torch.equal(p1[k], p4[k]), k
    assert not all(torch.equal(p1[k], new_parameters(s3)[k]) for k in p1)


def test_linear_schedule_decays_each_stage_and_resumes_exactly(tmp_path, monkeypatch):
    ws = windows()
    cfg = dict(steps=4, stage2_steps=4, stage2_params="all", stage2_lr=1e-3, schedule="linear", checkpoint_every=3)
    t1, s1 = fresh(0.1)
    progress = distill(t1, s1, ws, tmp_path / "a", DistillConfig(**cfg))
    scales = [(e["stage"], e["lr_scale"]) for e in progress["log"]]
    # by steps: 1 - step/steps in each stage, restarting at the stage-2 boundary
    assert scales == [(1, 1.0), (1, 0.75), (1, 0.5), (1, 0.25), (2, 1.0), (2, 0.75), (2, 0.5), (2, 0.25)]
    # a run killed inside stage 2 (after its checkpoint at stage-2 step 3) resumes onto the same decayed rates
    from bsbr.distill import trainer

    calls = []

    def dies_at_step_8(*args, **kw):
        calls.append(1)
        if len(calls) == 8:
            raise KeyboardInterrupt
        return train_step(*args, **kw)

    train_step = trainer._train_step
    t2, s2 = fresh(0.1)
    monkeypatch.setattr(trainer, "_train_step", dies_at_step_8)
    with pytest.raises(KeyboardInterrupt):
        distill(t2, s2, ws, tmp_path / "b", DistillConfig(**cfg))
    monkeypatch.setattr(trainer, "_train_step", train_step)
    t3, s3 = fresh(0.1)
    resumed = distill(t3, s3, ws, tmp_path / "b", DistillConfig(**cfg), resume=True)
    assert [(e["stage"], e["lr_scale"]) for e in resumed["log"]] == scales
    for (k, a), b in zip(s1.state_dict().items(), s3.state_dict().values()):
        assert torch.equal(a, b), k


def test_lr_scale_shapes():
    from bsbr.distill.trainer import lr_scale

    assert [lr_scale("constant", f) for f in (0, 0.5, 1)] == [1.0, 1.0, 1.0]
    assert [lr_scale("linear", f) for f in (0, 0.5, 1, 2)] == [1.0, 0.5, 0.0, 0.0]
    assert lr_scale("cosine", 0) == 1.0 and abs(lr_scale("cosine", 0.5) - 0.5) < 1e-12 and lr_scale("cosine", 1) < 1e-12
    with pytest.raises(ValueError, match="schedule must be one of"):
        lr_scale("step", 0.5)


def test_stage2_end_to_end(tmp_path):
    teacher, student = fresh(0.1)
    cfg = DistillConfig(steps=2, stage2_steps=3, stage2_params="all", stage2_lr=1e-3, checkpoint_every=100)
    progress = distill(teacher, student, windows(), tmp_path, cfg)
    stages = [e["stage"] for e in progress["log"]]
    assert stages == [1, 1, 2, 2, 2]
    assert all(torch.isfinite(torch.tensor(e["kl"])) for e in progress["log"] if e["stage"] == 2)


def test_stage2_all_weights_with_their_own_learning_rate(tmp_path):
    teacher, student = fresh(0.1)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    new = set(new_parameters(student))
    cfg = DistillConfig(steps=0, stage2_steps=2, stage2_params="all", stage2_lr=1e-2, stage2_base_lr=1e-6,
                        checkpoint_every=100)
    distill(teacher, student, windows(), tmp_path, cfg)
    moved = {k: float((v - before[k]).abs().max()) for k, v in student.state_dict().items()}
    assert max(moved[k] for k in new) > 1e-3  # Adam moves each weight by about its learning rate per step
    assert 0 < max(m for k, m in moved.items() if k not in new) < 1e-5


def test_stage2_lora_trains_adapters_and_new_pieces_then_merges_into_a_plain_checkpoint(tmp_path, monkeypatch):
    pytest.importorskip("peft")
    from bsbr.distill import trainer

    teacher, student = fresh(0.1)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    new = set(new_parameters(student))
    ws = windows()
    seen = {}

    def merge(s):  # just before merging: adapters in place, the source's weights untouched
        seen["lora"] = sorted({n.split(".lora_")[0] for n, p in s.named_parameters() if "lora_" in n})
        seen["frozen_moved"] = [n for n, p in s.named_parameters() if "lora_" not in n and n.replace(".base_layer", "")
                                not in new and not torch.equal(p, before[n.replace(".base_layer", "")])]
        with torch.no_grad():
            seen["logits"] = s(ws[0][None]).logits
        merge_lora(s)

    merge_lora = trainer._merge_lora
    monkeypatch.setattr(trainer, "_merge_lora", merge)
    cfg = DistillConfig(steps=0, stage2_steps=3, stage2_params="lora", stage2_lr=1e-2, checkpoint_every=100)
    distill(teacher, student, ws, tmp_path, cfg)
    assert seen["frozen_moved"] == []
    assert {n.rsplit(".", 1)[-1] for n in seen["lora"]} == {"q_proj", "k_proj", "v_proj", "out_proj"}
    # saved: the adapters folded into q/k/v/out, no adapter left, the same function as with them
    after = student.state_dict()
    assert set(after) == set(before)
    moved = {k for k in after if not torch.equal(after[k], before[k])}
    assert moved & new and any(k.endswith("q_proj.weight") for k in moved)
    assert not any(k.endswith(("embed_tokens.weight", "up_proj.weight")) for k in moved)
    reloaded = load_bsbr_model(tmp_path)
    assert not any("lora_" in n for n, _ in reloaded.named_parameters())
    torch.testing.assert_close(reloaded(ws[0][None]).logits, seen["logits"], rtol=1e-4, atol=1e-4)


def test_bf16_autocast_trains_in_float32_weights(tmp_path):
    teacher = make_source("llama")
    student = convert_to_bsbr(teacher, chunk_size=CHUNK, gate_init=0.1, retrieval_blocks=0)
    before = {k: v.clone() for k, v in new_parameters(student).items()}
    cfg = DistillConfig(steps=0, stage2_steps=3, stage2_lr=1e-2, bf16=True, checkpoint_every=100)
    progress = distill(teacher, student, windows(), tmp_path, cfg)
    assert all(torch.isfinite(torch.tensor(e["kl"])) for e in progress["log"])
    assert all(p.dtype == torch.float32 for p in student.parameters())
    assert any(not torch.equal(p, before[k]) for k, p in new_parameters(student).items())
    ids = windows(1)[0][None]
    torch.testing.assert_close(load_bsbr_model(tmp_path)(ids).logits, student(ids).logits)


def test_bad_config():
    with pytest.raises(ValueError, match="steps or --minutes"):
        DistillConfig().validate()
    with pytest.raises(ValueError, match="stage2_params"):
        DistillConfig(steps=1, stage2_params="some").validate()
    with pytest.raises(ValueError, match="stage2_base_lr"):
        DistillConfig(steps=1, stage2_base_lr=1e-5).validate()  # "new" trains no source weight
    with pytest.raises(ValueError, match="schedule must be one of"):
        DistillConfig(steps=1, schedule="exponential").validate()
    teacher, student = fresh()
    with pytest.raises(ValueError, match="no training windows"):
        distill(teacher, student, [], "/tmp/unused", DistillConfig(steps=1))


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    assert torchrun, "torchrun not found next to the interpreter"
    tests_dir = str(Path(__file__).parents[1])
    worker = str(Path(__file__).with_name("ddp_worker.py"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29533", worker, str(tmp_path), tests_dir],
                   check=True, env=env, timeout=600)
    r0, r1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k  # averaged gradients keep the replicas identical
    import json
    log = json.loads((tmp_path / "distill.json").read_text())
    assert log["world_size"] == 2 and len(log["log"]) == 4


def test_cli_defaults_are_the_measured_recipe_and_bad_combinations_are_refused(capsys):
    from bsbr.cli import build_parser, main
    from bsbr.distill.cli import _base_lr

    args = build_parser().parse_args(["distill", "--student", "s", "--output", "o", "--minutes", "60"])
    assert (args.steps, args.stage2_share, args.stage2_params, args.stage2_lr, args.lm_weight, _base_lr(args)) == (
        0, 0.99, "new", 3e-3, 0.0, None)
    full = build_parser().parse_args(["distill", "--student", "s", "--output", "o", "--minutes", "60",
                                      "--stage2-params", "all"])
    assert _base_lr(full) == 6e-5
    assert main(["distill", "--student", "s", "--output", "o"]) == 2
    assert "nothing to train" in capsys.readouterr().err
    assert main(["distill", "--student", "s", "--output", "o", "--minutes", "1", "--stage2-params", "new",
                 "--stage2-base-lr", "1e-5"]) == 2
    assert "--stage2-base-lr" in capsys.readouterr().err
    lora = build_parser().parse_args(["distill", "--student", "s", "--output", "o", "--minutes", "60",
                                      "--stage2-params", "lora"])
    assert _base_lr(lora) is None  # the adapters share --stage2-lr unless told otherwise
