"""Distillation trains only the new pieces, reduces its loss, is deterministic, resumes exactly,
and runs data-parallel under torchrun (DistributedDataParallel) with the weights of one process."""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from model_sources import VOCAB, make_source
from safetensors.torch import load_file

from bsbr import convert_to_bsbr, load_bsbr_model
from bsbr.distill import DistillConfig, distill, end_to_end_loss, new_parameters
from bsbr.errors import CheckpointError

CHUNK = 8


def windows(n=6, length=40):
    return [torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(i)) for i in range(n)]


def fresh(gate_init=0.0):
    teacher = make_source("llama")
    return teacher, convert_to_bsbr(teacher, chunk_size=CHUNK, gate_init=gate_init, retrieval_blocks=0)


def kl(teacher, student, ws):
    with torch.no_grad():
        return sum(end_to_end_loss(student, teacher, w[None], 0.0)[1] for w in ws) / len(ws)


class _FixedLM(torch.nn.Module):
    """A causal LM whose next-token log-probabilities are ``logp`` (2,) at every position: its final
    hidden state is them and its LM head the identity."""

    def __init__(self, logp, chunk_size=1):
        super().__init__()
        self.logp, self.config, self.head = logp, SimpleNamespace(chunk_size=chunk_size), torch.nn.Identity()

    def forward(self, input_ids, use_cache=False, output_hidden_states=False, logits_to_keep=0):
        h = self.logp.expand(input_ids.shape[0], input_ids.shape[1], 2)
        return SimpleNamespace(logits=h[:, -logits_to_keep:], hidden_states=(h,))

    def get_output_embeddings(self):
        return self.head


def test_a_student_that_is_not_a_conversion_is_refused_by_type(tmp_path):
    # (an AttributeError: 'LlamaConfig' object has no attribute 'chunk_size')
    with pytest.raises(TypeError, match="student must be a converted BSBRForCausalLM"):
        distill(make_source("llama"), make_source("llama"), [torch.randint(3, VOCAB, (96,))], tmp_path / "out",
                DistillConfig(steps=1))
    assert not (tmp_path / "out").exists()


def test_distill_trains_under_no_grad_and_refuses_weights_made_in_inference_mode(tmp_path):
    teacher, student = fresh()
    with torch.no_grad():  # (a notebook's torch.set_grad_enabled(False): backward of no graph)
        distill(teacher, student, windows(2, 48), tmp_path / "a", DistillConfig(steps=2), progress=False)
    with torch.inference_mode():
        teacher, student = fresh()
    teacher, student = fresh()
    with torch.inference_mode():  # (a notebook cell's windows)
        ws = windows(2, 48)
    distill(teacher, student, ws, tmp_path / "c", DistillConfig(steps=2), progress=False)
    with torch.inference_mode():
        teacher, student = fresh()
    with pytest.raises(ValueError, match="loaded under torch.inference_mode"):
        distill(teacher, student, windows(2, 48), tmp_path / "b", DistillConfig(steps=2), progress=False)
    assert not (tmp_path / "b").exists()


def test_without_a_progress_bar_the_steps_are_logged(tmp_path, monkeypatch, caplog):
    # with stderr not a terminal (a log file, CI) a run said nothing between its start and its end
    from bsbr.distill import trainer

    monkeypatch.setattr(trainer, "STEP_LOG_SECONDS", 0.0)
    teacher, student = fresh()
    with caplog.at_level("INFO", logger="bsbr.distill.trainer"):
        log = distill(teacher, student, windows(2, 48), tmp_path / "a", DistillConfig(steps=2), progress=False)["log"]
    assert re.search(r"step 1/2: kl [0-9.]+, ce [0-9.]+, \d+ s in", caplog.text), caplog.text
    assert f"step 2/2: kl {log[1]['kl']:.4f}, ce {log[1]['ce']:.4f}, " in caplog.text  # (the log's, in order)


def test_an_earlier_bsbrs_checkpoint_is_named_first_by_the_library_too(tmp_path):
    # resume=True said to move a file beside it, then refused the checkpoint as an earlier bsbr's
    import json

    from bsbr.errors import CheckpointError

    teacher, student = fresh()
    ckpt = tmp_path / "out" / "checkpoint"
    ckpt.mkdir(parents=True)
    (ckpt / "progress.json").write_text(json.dumps(dict(step=2, log=[], config={}, stage=2)))
    for name in ("trainable.safetensors", "optimizer.safetensors", "notes.txt"):
        (ckpt / name).write_text("{}")
    for resume in (True, False):
        with pytest.raises(CheckpointError, match="was written by an earlier bsbr"):
            distill(teacher, student, windows(2, 48), tmp_path / "out", DistillConfig(steps=1), resume=resume)
    assert sorted(p.name for p in ckpt.iterdir()) == ["notes.txt", "optimizer.safetensors", "progress.json",
                                                      "trainable.safetensors"]


def test_int32_windows_train_as_int64_ones(tmp_path):
    # token arrays kept as int32 passed the checks, then failed in the loss ("expected target dtype to be Long")
    teacher, student = fresh()
    ws = windows(2, 48)
    distill(teacher, student, [w.int() for w in ws], tmp_path / "a", DistillConfig(steps=2), progress=False)
    teacher, again = fresh()
    distill(teacher, again, ws, tmp_path / "b", DistillConfig(steps=2), progress=False)
    assert all(torch.equal(p, q) for p, q in zip(student.state_dict().values(), again.state_dict().values()))


def test_bad_windows_and_an_output_holding_files_are_refused_before_training(tmp_path):
    # windows of floats, of ids past the vocabulary or of lists failed deep in the first step; an output_dir
    # holding a user's files had them replaced (the CLI checked, the library did not), and a file as
    # output_dir failed at the first checkpoint
    teacher, student = fresh()
    ws = windows(2, 96)
    for bad, error, words in (([w.float() for w in ws], TypeError,
                               r"windows\[0\] must be a 1-D int64 \(or int32\) tensor"),
                              ([w.tolist() for w in ws], TypeError, "windows.0. must be"),
                              ([ws[0], ws[1] + VOCAB], ValueError, r"windows\[1\] holds ids outside"),
                              ([ws[0], ws[1].index_fill(0, torch.tensor([5]), VOCAB)], ValueError,
                               r"windows\[1\] holds ids outside"),  # (the vocabulary's size itself is past it)
                              ([ws[0], ws[1][:1]], ValueError, r"windows\[1\] holds 1 token\(s\): a window needs 2")):
        with pytest.raises(error, match=words):
            distill(teacher, student, bad, tmp_path / "out", DistillConfig(steps=1))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "checkpoint").mkdir()  # a folder of the user's own where a checkpoint would go: a save replaced it
    (mine / "checkpoint" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="holds a checkpoint"):
        distill(teacher, student, ws, mine, DistillConfig(steps=1))
    assert (mine / "checkpoint" / "notes.txt").read_text() == "mine"
    shutil.rmtree(mine / "checkpoint")
    (mine / "config.json").write_text('{"mine": 1}')
    with pytest.raises(ValueError, match="holds files, which the model would replace"):
        distill(teacher, student, ws, mine, DistillConfig(steps=1))
    for ckpt in (False, True):  # resume=True with no checkpoint (or an empty folder) replaced them
        if ckpt:
            (mine / "checkpoint").mkdir()
        with pytest.raises(ValueError, match=r"holds files no bsbr command wrote \(config.json\): resume=True "):
            distill(teacher, student, ws, mine, DistillConfig(steps=1), resume=True)
    (mine / "config.json").rename(tmp_path / "config.json")  # an empty checkpoint folder alone: started fresh
    distill(teacher, student, ws, mine, DistillConfig(steps=1), resume=True, progress=False)
    shutil.rmtree(mine)
    mine.mkdir()
    (tmp_path / "config.json").rename(mine / "config.json")
    assert (mine / "config.json").read_text() == '{"mine": 1}' and len(list(mine.iterdir())) == 1
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match="is not a directory"):
        distill(teacher, student, ws, tmp_path / "a_file", DistillConfig(steps=1))
    assert not (tmp_path / "out").exists()
    # overwrite=True replaced every entry of output_dir, a user's folders and files with the old model
    (mine / "data").mkdir()
    with pytest.raises(ValueError, match=r"holds files no bsbr command wrote \(data\): overwrite=True "
                                         "replaces only a bsbr output"):
        distill(teacher, student, ws, mine, DistillConfig(steps=1), overwrite=True)
    assert sorted(p.name for p in mine.iterdir()) == ["config.json", "data"]
    # a teacher of another vocabulary, or none, or a dict for cfg, failed inside the first step
    other = make_source("llama")
    other.resize_token_embeddings(VOCAB + 5)
    for bad_teacher, bad_cfg, error, words in ((None, DistillConfig(steps=1), TypeError, "teacher must be a causal LM"),
                                               (teacher, dict(steps=1), TypeError, "cfg must be a DistillConfig")):
        with pytest.raises(error, match=words):
            distill(bad_teacher, student, ws, tmp_path / "out", bad_cfg)
    with pytest.raises(ValueError, match="the teacher's vocabulary"):
        distill(other, student, ws, tmp_path / "out", DistillConfig(steps=1))
    with pytest.raises(ValueError, match="seed must be an int in"):
        DistillConfig(steps=1, seed=2 ** 70).validate()
    assert not (tmp_path / "out").exists()


def test_end_to_end_loss_by_hand():
    """KL(teacher || student) and the LM term on one position past the first chunk, computed by hand."""
    import math

    student = _FixedLM(torch.log(torch.tensor([0.25, 0.75])))  # p = (0.25, 0.75)
    teacher = _FixedLM(torch.log(torch.tensor([0.5, 0.5])))  # p = (0.5, 0.5)
    ids = torch.tensor([[0, 1, 1]])  # scored: position 1 (past chunk 0), predicting token 1
    want_kl = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    total, kl_value, ce = end_to_end_loss(student, teacher, ids, 0.0)
    assert kl_value == pytest.approx(want_kl) and float(total) == pytest.approx(want_kl)
    assert ce == pytest.approx(-math.log(0.75))
    assert float(end_to_end_loss(student, teacher, ids, 1.0)[0]) == pytest.approx(want_kl - math.log(0.75))
    # the LM term trains: d/dlogits of KL is p - q = (-0.25, 0.25), of CE p - onehot(1) = (0.25, -0.25)
    student.logp.requires_grad_(True)
    end_to_end_loss(student, teacher, ids, 2.0)[0].backward()
    assert student.logp.grad.tolist() == pytest.approx([0.25, -0.25])


def test_loss_over_blocks_of_positions_is_the_loss_over_the_whole_window(monkeypatch):
    """The loss makes logits a block of positions at a time (both models' logits of a 4,096-token window
    were 4 of a step's 9.4 GB): loss and gradients as with every position at once."""
    from bsbr.models import heads

    teacher, student = fresh(0.3)
    ids = windows(n=2, length=50)
    ids = torch.stack(ids)
    grads = []
    for block in (1024, 7):
        monkeypatch.setattr(heads, "POSITION_BLOCK", block)
        student.zero_grad(set_to_none=True)
        total, kl_value, ce = end_to_end_loss(student, teacher, ids, 0.5)
        total.backward()
        grads.append((float(total.detach()), kl_value, ce, {n: p.grad.clone() for n, p in new_parameters(student).items()}))
    (t0, k0, c0, g0), (t1, k1, c1, g1) = grads
    assert (t1, k1, c1) == pytest.approx((t0, k0, c0), rel=1e-5) and k0 > 1e-4
    with torch.no_grad():  # and the loss is the plain one, from each model's whole logits
        s, t = (F.log_softmax(m(ids).logits[:, CHUNK:-1], -1) for m in (student, teacher))
        want_kl = float((t.exp() * (t - s)).sum(-1).mean())
        want_ce = float(F.nll_loss(s.flatten(0, 1), ids[:, CHUNK + 1:].flatten()))
    assert (k0, c0) == pytest.approx((want_kl, want_ce), rel=1e-5)
    assert g0.keys() == g1.keys() and any(float(g.abs().max()) > 0 for g in g0.values())
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-7)


def test_trains_only_new_pieces_and_lowers_the_kl(tmp_path):
    teacher, student = fresh()
    frozen = {k: v.clone() for k, v in student.state_dict().items() if k not in new_parameters(student)}
    ws = windows()
    before = kl(teacher, student, ws)
    progress = distill(teacher, student, ws, tmp_path, DistillConfig(steps=12, lr=1e-2, checkpoint_every=5))
    after = kl(teacher, student, ws)
    assert 0 < after < 0.9 * before, (before, after)
    for k, v in student.state_dict().items():
        if k in frozen:
            assert torch.equal(v, frozen[k]), k
    assert any(float(l.attn.gate_value().detach().abs().max()) > 0 for l in student.model.layers)  # gate opened
    assert [e["step"] for e in progress["log"]] == list(range(1, 13))
    assert all(torch.isfinite(torch.tensor(e["kl"])) for e in progress["log"])
    assert (tmp_path / "distill.png").stat().st_size > 1000  # the training curve beside distill.json
    reloaded = load_bsbr_model(tmp_path)  # the saved result is a normal BSBR checkpoint
    ids = ws[0][None]
    torch.testing.assert_close(reloaded(ids).logits, student(ids).logits)


@pytest.mark.parametrize("params", ["new", "lora"])
def test_the_models_are_given_back_as_they_came(tmp_path, params):
    """distill() left the caller's teacher frozen and in eval mode, and the student with the input-gradient hook of
    activation checkpointing (one more per call), so a frozen student still built an autograd graph."""
    if params == "lora":
        pytest.importorskip("peft")
    teacher, student = fresh(0.1)
    teacher.train()
    student.train()
    student.model.embed_tokens.eval()  # (submodules in the other mode came back in their model's)
    teacher.lm_head.train(False)
    student.model.layers[0].mlp.requires_grad_(False)
    held = next(iter(new_parameters(student).values()))  # (a parameter every run trains, holding the caller's grad)
    mine = held.grad = torch.ones_like(held)
    grads = {m: [p.requires_grad for p in m.parameters()] for m in (teacher, student)}
    modes = {m: [s.training for s in m.modules()] for m in (teacher, student)}
    for i, global_seed in enumerate((1, 2)):
        torch.manual_seed(global_seed)
        rng = torch.random.get_rng_state()
        distill(teacher, student, windows(2), tmp_path / str(i), DistillConfig(steps=1, params=params))
        assert torch.equal(torch.random.get_rng_state(), rng)  # (lora's adapters were drawn from the caller's RNG)
        assert {m: [s.training for s in m.modules()] for m in (teacher, student)} == modes
        assert {m: [p.requires_grad for p in m.parameters()] for m in (teacher, student)} == grads
        assert not student.model.embed_tokens._forward_hooks and not student.is_activation_checkpointing
        assert not hasattr(student, "peft_config")  # (lora's, left after its adapters were folded in)
        # the last step's gradients were left, and replaced the caller's own
        assert held.grad is mine and torch.equal(mine, torch.ones_like(mine))
        assert all(p.grad is None for m in (teacher, student) for p in m.parameters() if p is not held)
    trained = []  # the same cfg.seed trains the same weights whatever the caller's RNG
    for global_seed in (1, 2):
        _, fresh_student = fresh(0.1)
        torch.manual_seed(global_seed)
        distill(teacher, fresh_student, windows(2), tmp_path / f"seed{global_seed}", DistillConfig(steps=1,
                                                                                                  params=params))
        trained.append(fresh_student.state_dict())
    assert all(torch.equal(trained[0][k], trained[1][k]) for k in trained[0])
    student.requires_grad_(False)
    assert not student(windows(1)[0][None]).logits.requires_grad
    # interrupted (lora's adapters in place then: restored by order, the flags went to other parameters)
    student.requires_grad_(True)
    student.model.layers[1].requires_grad_(False)
    flags = {n: p.requires_grad for n, p in student.named_parameters()}
    from bsbr.distill.trainer import DistillInterrupted

    with pytest.raises(DistillInterrupted):
        distill(teacher, student, windows(2), tmp_path / "stopped", DistillConfig(steps=5, params=params),
                should_stop=lambda: True)
    assert {n: p.requires_grad for n, p in student.named_parameters()} == flags


def test_a_refused_run_leaves_the_callers_own_adapters_in_place(tmp_path):
    peft = pytest.importorskip("peft")
    teacher, student = fresh()
    peft.inject_adapter_in_model(peft.LoraConfig(r=4, target_modules=["q_proj"]), student)
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="holds files"):
        distill(teacher, student, windows(1), tmp_path, DistillConfig(steps=1))
    assert sum(hasattr(m, "base_layer") for m in student.modules()) == 2  # (they were merged and removed)


def test_the_progress_bar_can_be_turned_off(tmp_path, capsys):
    # distill() had no progress argument (evaluate and run_passkey have one): a program's log got its bar
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    teacher, student = fresh()
    disable_progress_bars("huggingface_hub.http_get")  # a program's own switch of one group of the hub's bars
    try:
        for i, shown in enumerate((False, True)):
            distill(teacher, student, windows(1), tmp_path / str(i), DistillConfig(steps=1), progress=shown)
            err = capsys.readouterr().err
            assert ("distill" in err) is shown and ("Writing model shards" in err) is shown  # (save_pretrained's)
            assert are_progress_bars_disabled("huggingface_hub.http_get") and not are_progress_bars_disabled()
    finally:
        enable_progress_bars()


def test_a_command_without_bars_silences_no_other_threads_bars():
    # a command run with --no-progress in one thread (a program's, or a test's) turned every thread's bars off while
    # it ran: the test above failed now and then beside another test's command
    import threading

    from bsbr.progress import bar, bars_off

    entered, done = threading.Event(), threading.Event()

    def quiet_command():
        with bars_off():
            entered.set()
            done.wait(10)

    t = threading.Thread(target=quiet_command)
    t.start()
    try:
        assert entered.wait(10)
        assert not bar(range(1)).disable
        with bars_off():
            assert bar(range(1)).disable
    finally:
        done.set()
        t.join()


def test_deterministic_and_resume_reaches_the_same_weights(tmp_path):
    ws = windows()
    cfg = dict(lr=1e-2, checkpoint_every=2)
    t1, s1 = fresh(0.1)
    distill(t1, s1, ws, tmp_path / "a", DistillConfig(steps=6, **cfg))
    t2, s2 = fresh(0.1)
    distill(t2, s2, ws, tmp_path / "b", DistillConfig(steps=6, **cfg))
    # stopped after 3 steps, then resumed in a new process-like setting (fresh models)
    t3, s3 = fresh(0.1)
    distill(t3, s3, ws, tmp_path / "c", DistillConfig(steps=3, **cfg))
    t4, s4 = fresh(0.1)
    distill(t4, s4, ws, tmp_path / "c", DistillConfig(steps=6, **cfg), resume=True)
    p1, p2, p4 = (new_parameters(s) for s in (s1, s2, s4))
    for k in p1:
        assert torch.equal(p1[k], p2[k]), k
        assert torch.equal(p1[k], p4[k]), k
    assert not all(torch.equal(p1[k], new_parameters(s3)[k]) for k in p1)


def test_activation_checkpointing_recomputes_each_layer_and_reaches_the_same_weights(tmp_path, monkeypatch):
    from bsbr.models.bsbr.modeling_bsbr import BSBRMLP
    from bsbr.ops.bsbr import softmax

    ws = windows(n=3, length=40)
    calls = []
    forward = BSBRMLP.forward  # inside the checkpointed layer
    # with checkpointing every layer's input requires grad, so the first layer's attention takes the written-out
    # softmax where, without it, its inputs need no gradient and it takes the fused CPU kernel: one kernel for
    # both runs, so rounding cannot flip Adam's steps
    monkeypatch.setattr(softmax, "_FLASH_CPU", None)
    monkeypatch.setattr(BSBRMLP, "forward", lambda self, *a, **kw: calls.append(1) or forward(self, *a, **kw))
    got = {}
    for on in (False, True):
        calls.clear()
        t, s = fresh(0.1)
        distill(t, s, ws, tmp_path / str(on), DistillConfig(steps=3, lr=1e-2, activation_checkpointing=on))
        layers = len(s.model.layers)
        # without: one forward per layer and step; with: each layer's forward runs again in the backward; and
        # the check of the trained model's logits, one forward
        assert len(calls) == 3 * layers * (2 if on else 1) + layers, (on, len(calls))
        assert not s.is_activation_checkpointing and not s.training  # the saved model is a plain one
        got[on] = new_parameters(s)
    for k in got[False]:
        torch.testing.assert_close(got[True][k], got[False][k], rtol=1e-6, atol=1e-7)


def test_a_killed_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    ws = windows()
    cfg = dict(steps=6, params="all", base_lr=1e-4, checkpoint_every=2)
    t1, s1 = fresh(0.1)
    distill(t1, s1, ws, tmp_path / "a", DistillConfig(**cfg))
    from bsbr.distill import trainer

    calls = []

    def dies_at_step_5(*args, **kw):  # after the checkpoint at step 4
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return train_step(*args, **kw)

    train_step = trainer._train_step
    t2, s2 = fresh(0.1)
    monkeypatch.setattr(trainer, "_train_step", dies_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        distill(t2, s2, ws, tmp_path / "b", DistillConfig(**cfg))
    monkeypatch.setattr(trainer, "_train_step", train_step)
    manifest = next((tmp_path / "b").rglob("manifest.json"))  # (as an earlier bsbr wrote it: its log counted
    record = json.loads(manifest.read_text())  # from 0, where its messages and lines count from 1)
    assert [e["step"] for e in record["progress"]["log"]] == [1, 2, 3, 4]
    record["progress"]["log"] = [dict(e, step=e["step"] - 1) for e in record["progress"]["log"]]
    manifest.write_text(json.dumps(record))
    t3, s3 = fresh(0.1)
    resumed = distill(t3, s3, ws, tmp_path / "b", DistillConfig(**cfg), resume=True)
    assert [e["step"] for e in resumed["log"]] == list(range(1, 7))
    for (k, a), b in zip(s1.state_dict().items(), s3.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("params", ["all", "lora"])
def test_all_weights_with_their_own_learning_rate(tmp_path, params):
    """base_lr trains the source's weights (all) or the adapters merged into them (lora); lr the new pieces."""
    teacher, student = fresh(0.1)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    new = set(new_parameters(student))
    cfg = DistillConfig(steps=2, params=params, lr=1e-2, base_lr=1e-6, checkpoint_every=100)
    distill(teacher, student, windows(), tmp_path, cfg)
    moved = {k: float((v - before[k]).abs().max()) for k, v in student.state_dict().items()}
    assert max(moved[k] for k in new) > 1e-3  # Adam moves each weight by about its learning rate per step
    assert 0 < max(m for k, m in moved.items() if k not in new) < 1e-5


def test_a_student_with_peft_adapters_of_its_own_is_refused_before_training(tmp_path, caplog):
    """A PeftModel student trained, then its save wrote the adapters alone (no config.json: the new pieces lost); a
    student loaded from a folder that also holds an adapter trained, then failed at publishing."""
    peft = pytest.importorskip("peft")
    teacher, student = fresh(0.1)
    config = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    with pytest.raises(TypeError, match=r"student is a peft model: merge its adapters \(student.merge_and_unload"):
        distill(teacher, peft.get_peft_model(student, config), windows(), tmp_path / "a", DistillConfig(steps=1))
    _, student = fresh(0.1)
    student.save_pretrained(tmp_path / "s")
    peft.get_peft_model(student, config).save_pretrained(tmp_path / "s")  # adapter_config.json beside the model
    with caplog.at_level("WARNING"):
        loaded = load_bsbr_model(tmp_path / "s")
    if not getattr(loaded, "_hf_peft_config_loaded", False):
        pytest.skip("this transformers does not load the adapter with the model")
    assert "holds a peft adapter (adapter_config.json), which transformers applied" in caplog.text  # (eval, generate)
    with pytest.raises(ValueError, match=r"the student carries a peft adapter transformers loaded with it .*: move "
                                         r"the adapter's files out of the folder .* PeftModel.from_pretrained\("
                                         r"model, ADAPTER_DIR\).merge_and_unload\(\)\) and save the model"):
        distill(teacher, loaded, windows(), tmp_path / "b", DistillConfig(steps=1))
    # the advice, followed (merge_and_unload() then save_pretrained on what was loaded failed: "PEFT >= 0.22")
    (tmp_path / "adapter").mkdir()
    for f in (tmp_path / "s").glob("adapter_*"):
        f.rename(tmp_path / "adapter" / f.name)
    merged = peft.PeftModel.from_pretrained(load_bsbr_model(tmp_path / "s"), tmp_path / "adapter").merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    distill(teacher, load_bsbr_model(tmp_path / "merged"), windows(), tmp_path / "m", DistillConfig(steps=1))
    assert (tmp_path / "m" / "config.json").is_file()
    # params='lora' made its own adapters the active ones: the caller's were dropped when they were folded in
    _, student = fresh(0.1)
    peft.inject_adapter_in_model(config, student, adapter_name="mine")
    with pytest.raises(ValueError, match="params='lora' on a student that already carries adapters"):
        distill(teacher, student, windows(), tmp_path / "c", DistillConfig(steps=1, params="lora"))
    assert sorted({n.split(".")[-2] for n, _ in student.named_parameters() if "lora_" in n}) == ["mine"]
    assert not any((tmp_path / name).exists() for name in "abc")


def test_a_quantized_teacher_trains_and_a_quantized_or_float16_student_is_refused_in_one_line(tmp_path):
    # quantize_dynamic's teacher (a CPU-speed teacher) died in the run's fingerprint ('tuple' object has no attribute
    # 'detach'); a float16 student "diverged at step 1: lower the learning rate" at any rate (AdamW's eps is 0 there)
    from torch.ao.quantization import quantize_dynamic

    teacher, student = fresh(0.1)
    quantized = quantize_dynamic(teacher, {torch.nn.Linear}, dtype=torch.qint8)
    assert distill(quantized, student, windows(), tmp_path / "a", DistillConfig(steps=2))["step"] == 2
    with pytest.raises(TypeError, match="is a quantized module, which bfloat16 autocast \\(bf16\\) cannot run"):
        distill(quantized, fresh(0.1)[1], windows(), tmp_path / "d", DistillConfig(steps=1, bf16=True))
    _, student = fresh(0.1)
    with pytest.raises(TypeError, match=r"the student's model.layers.0.attn.q_proj is a quantized module: distill the "
                                        "float model"):
        distill(teacher, quantize_dynamic(student, {torch.nn.Linear}, dtype=torch.qint8), windows(), tmp_path / "b",
                DistillConfig(steps=1))
    with pytest.raises(TypeError, match=r"is float16, in which AdamW's eps \(1e-8\) is 0: distill student.float\(\)"):
        distill(teacher, student.half(), windows(), tmp_path / "c", DistillConfig(steps=1))
    assert not any((tmp_path / name).exists() for name in "bcd")


def test_lora_trains_adapters_and_new_pieces_then_merges_into_a_plain_checkpoint(tmp_path, monkeypatch):
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
    cfg = DistillConfig(steps=3, params="lora", lr=1e-2, checkpoint_every=100)
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


def test_bf16_autocast_trains_in_float32_weights(tmp_path, monkeypatch):
    import bsbr.distill.trainer as trainer

    teacher = make_source("llama")
    student = convert_to_bsbr(teacher, chunk_size=CHUNK, gate_init=0.1, retrieval_blocks=0)
    before = {k: v.clone() for k, v in new_parameters(student).items()}
    cfg = DistillConfig(steps=3, lr=1e-2, bf16=True, checkpoint_every=100)
    step, seen = trainer._train_step, []

    def recording_step(*args):  # each step runs under bfloat16 autocast
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return step(*args)

    monkeypatch.setattr(trainer, "_train_step", recording_step)
    progress = distill(teacher, student, windows(), tmp_path, cfg)
    assert seen == [(True, torch.bfloat16)] * 3
    assert all(torch.isfinite(torch.tensor(e["kl"])) for e in progress["log"])
    assert all(p.dtype == torch.float32 for p in student.parameters())
    assert any(not torch.equal(p, before[k]) for k, p in new_parameters(student).items())
    ids = windows(1)[0][None]
    torch.testing.assert_close(load_bsbr_model(tmp_path)(ids).logits, student(ids).logits)


def test_bad_config():
    with pytest.raises(ValueError, match="steps or minutes"):
        DistillConfig().validate()
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        DistillConfig(steps=0).validate()
    with pytest.raises(ValueError, match="params must be one of"):
        DistillConfig(steps=1, params="some").validate()
    with pytest.raises(ValueError, match="base_lr"):
        DistillConfig(steps=1, base_lr=1e-5).validate()  # "new" trains no source weight
    teacher, student = fresh()
    with pytest.raises(ValueError, match="no training windows"):
        distill(teacher, student, [], "/tmp/unused", DistillConfig(steps=1))
    for given in (None, 7, "some text"):  # (None: "'NoneType' object is not iterable", naming nothing)
        with pytest.raises(TypeError, match="windows must be a sequence of 1-D tensors of token ids, got"):
            distill(teacher, student, given, "/tmp/unused", DistillConfig(steps=1))


def _torchrun(out, *mode):
    """ddp_worker.py on 2 processes, writing into ``out``."""
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    assert torchrun, "torchrun not found next to the interpreter"
    tests_dir = str(Path(__file__).parents[1])
    worker = str(Path(__file__).with_name("ddp_worker.py"))
    tmp = Path(f"{out}_tmp")  # (torchrun leaves a torchelastic_* folder in TMPDIR)
    tmp.mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp)}
    subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", worker, str(out), tests_dir, *mode],
                   check=True, env=env, timeout=600)


@pytest.mark.slow
def test_torchrun_ranks_stop_together_on_a_time_budget(tmp_path):
    """Each rank read its own clock while rank 0 wrote checkpoints: one stopped, the other waited in its
    next step's all-reduce until gloo timed out."""
    _torchrun(tmp_path, "minutes")
    from safetensors.torch import load_file

    r0, r1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert all(torch.equal(r0[k], r1[k]) for k in r0)


@pytest.mark.slow
def test_torchrun_trains_all_weights_on_windows_within_the_exact_reach(tmp_path):
    """There the new pieces get no gradient: DDP without its unused-parameter search stopped with "Expected
    to have finished reduction in the prior iteration"."""
    _torchrun(tmp_path, "short")
    r0, r1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert all(torch.equal(r0[k], r1[k]) for k in r0)


@pytest.mark.slow
def test_torchrun_two_processes_gloo_equals_one_process_on_both_windows(tmp_path):
    _torchrun(tmp_path)
    r0, r1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k  # averaged gradients keep the replicas identical
    import json
    log = json.loads((tmp_path / "distill.json").read_text())
    assert log["world_size"] == 2 and len(log["log"]) == 4
    # one process, each step on both ranks' windows with the gradients averaged: the same weights
    from bsbr.distill.trainer import _trainable

    teacher = make_source("llama")
    student = convert_to_bsbr(teacher, chunk_size=8, gate_init=0.1, retrieval_blocks=2)  # as ddp_worker.py
    ws = [torch.randint(0, 97, (40,), generator=torch.Generator().manual_seed(i)) for i in range(8)]
    order = torch.randperm(len(ws), generator=torch.Generator().manual_seed(0))
    params, opt = _trainable(student, DistillConfig(steps=4, lr=1e-2))
    student.eval()
    for step in range(4):
        opt.zero_grad(set_to_none=True)
        kl = 0.0
        for rank in range(2):
            ids = ws[int(order[(step * 2 + rank) % len(ws)])][None]
            loss, k, _ = end_to_end_loss(student, teacher, ids, 0.0)
            (loss / 2).backward()
            kl += k / 2
        opt.step()
        assert log["log"][step]["kl"] == pytest.approx(kl, rel=1e-5)  # the log: both ranks' windows, not rank 0's
    for k, p in new_parameters(student).items():
        torch.testing.assert_close(r0[k], p.detach(), rtol=1e-5, atol=1e-6)


def test_cli_defaults_are_the_measured_recipe_and_bad_combinations_are_refused(capsys):
    from bsbr.cli import build_parser, main
    from bsbr.distill.cli import _plan

    args = build_parser().parse_args(["distill", "--student", "s", "--output", "o", "--minutes", "60"])
    assert (args.steps, args.params, args.lr, args.lm_weight, args.base_lr) == (None, "new", 3e-3, 0.0, None)
    cfg = _plan(args)
    assert (cfg.steps, cfg.minutes, cfg.params, cfg.lr, cfg.base_lr) == (None, 60.0, "new", 3e-3, None)
    assert cfg.lr == DistillConfig.lr and cfg.checkpoint_every == DistillConfig.checkpoint_every  # one set of defaults
    full = build_parser().parse_args(["distill", "--student", "s", "--output", "o", "--minutes", "60",
                                      "--params", "all"])
    assert _plan(full).base_lr == 6e-5  # (DistillConfig's default, for Python callers too: test below)
    assert main(["distill", "--student", "s", "--output", "o"]) == 2
    assert "nothing to train" in capsys.readouterr().err
    assert main(["distill", "--student", "s", "--output", "o", "--minutes", "1", "--params", "new",
                 "--base-lr", "1e-5"]) == 2
    err = capsys.readouterr().err
    assert "--base-lr applies only to --params all or lora" in err, err


def test_params_all_trains_the_sources_weights_at_the_base_lr_from_python_too(tmp_path):
    # DistillConfig(params="all") trained every weight at lr (3e-3, 50x the command line's 6e-5): the pretrained
    # weights' default lived in the command line alone
    from bsbr.distill.trainer import BASE_LR
    from bsbr.errors import CheckpointError

    teacher, student = fresh()
    cfg = DistillConfig(steps=1, params="all")
    log = distill(teacher, student, windows(2, 48), tmp_path / "a", cfg, progress=False)
    assert log["config"]["base_lr"] == BASE_LR == 6e-5 and cfg.base_lr is None  # (the caller's config as given)
    # a checkpoint Python wrote before (base_lr None: the source's weights trained at lr) resumes at that lr
    manifest = tmp_path / "b" / "checkpoint" / "manifest.json"
    distill(teacher, fresh()[1], windows(2, 48), tmp_path / "b", DistillConfig(steps=2, params="all",
                                                                              checkpoint_every=1), progress=False)
    saved = json.loads(manifest.read_text())
    saved["progress"]["config"]["base_lr"] = None
    manifest.write_text(json.dumps(saved))
    with pytest.raises(CheckpointError, match="base_lr: checkpoint 0.003, now 6e-05"):
        distill(teacher, fresh()[1], windows(2, 48), tmp_path / "b", DistillConfig(steps=3, params="all"),
                resume=True, progress=False)
    distill(teacher, fresh()[1], windows(2, 48), tmp_path / "b", DistillConfig(steps=3, params="all", base_lr=3e-3),
            resume=True, progress=False)


def test_new_pieces_on_windows_read_exactly_are_refused(tmp_path):
    # with K blocks covering every earlier chunk of a window, the new pieces cannot change the output
    teacher = make_source("llama")
    student = convert_to_bsbr(teacher, chunk_size=8, gate_init=0.1)  # local 2 + 8 blocks: exact up to 80 tokens
    # (a window's last token is only a target: 81 tokens train on the logits of tokens 0-79)
    ws = [torch.randint(0, 97, (81,), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with pytest.raises(ValueError, match="windows of 82 tokens or more can"):
        distill(teacher, student, ws, tmp_path / "out", DistillConfig(steps=1))
    assert not (tmp_path / "out").exists()
    # the same without blocks: the window alone (2 chunks) and the bounded mode read 16 tokens exactly
    for options in (dict(retrieval_blocks=0), dict(recall_tokens=4)):
        student = convert_to_bsbr(teacher, chunk_size=8, gate_init=0.1, **options)
        short = [w[:17] for w in ws]
        with pytest.raises(ValueError, match="windows of 18 tokens or more can"):
            distill(teacher, student, short, tmp_path / "out", DistillConfig(steps=1))
        # indeed nothing to learn there: float32 rounding only (1.7e-8 with transformers 5.24); one chunk
        # further, where the new pieces are read, the KL is 1e-2 to 1e-1
        assert float(kl(teacher, student, short)) < 1e-6


def test_distilling_exact_blocks_says_what_it_measured(caplog):
    from types import SimpleNamespace

    from bsbr.distill.cli import _check_new_pieces_matter

    args = SimpleNamespace(params="new", seq_len=4096)
    for blocks, warned in ((8, True), (0, False)):
        caplog.clear()
        student = convert_to_bsbr(make_source("llama"), chunk_size=CHUNK, retrieval_blocks=blocks,
                                  far_positions="window")
        with caplog.at_level("INFO", logger="bsbr.distill.cli"):
            _check_new_pieces_matter(student, args)
        assert ("check your own lengths with bsbr eval" in caplog.text) == warned, (blocks, caplog.text)
    # hybrid positions read every far key at its own position on windows within half the source's range:
    # the source itself, nothing to learn
    source = make_source("llama")
    own = source.config.max_position_embeddings // 2
    student = convert_to_bsbr(source, chunk_size=CHUNK, retrieval_blocks=2, far_positions="hybrid")
    config = student.config
    assert config.far_positions == "hybrid" and config.own_position_chunks() * CHUNK == own
    for seq_len, warned in ((own, True), (own + CHUNK, False)):
        caplog.clear()
        with caplog.at_level("INFO", logger="bsbr.distill.cli"):
            _check_new_pieces_matter(student, SimpleNamespace(params="new", seq_len=seq_len))
        assert ("the zero-shot conversion is the one to use" in caplog.text) == warned, (seq_len, caplog.text)
        assert ("check your own lengths with bsbr eval" in caplog.text) != warned, (seq_len, caplog.text)


@pytest.mark.parametrize("options", [dict(retrieval_blocks=2), dict(retrieval_blocks=0, recall_tokens=4),
                                     dict(retrieval_blocks=0)])
def test_every_new_piece_gets_a_gradient(options):
    """DistributedDataParallel (bsbr distill under torchrun) fails on a trained parameter without one."""
    teacher = make_source("llama")
    student = convert_to_bsbr(teacher, chunk_size=CHUNK, gate_init=0.1, **options)
    ids = windows(n=1, length=64)[0][None]
    end_to_end_loss(student, teacher, ids, 0.0)[0].backward()
    assert [n for n, p in new_parameters(student).items() if p.grad is None] == []


def test_bf16_warns_on_a_cpu_without_native_bfloat16(tmp_path, monkeypatch, caplog):
    from bsbr.distill import trainer

    monkeypatch.setattr(trainer, "_native_bf16", lambda: False)
    teacher, student = fresh(0.1)
    distill(teacher, student, windows(n=1), tmp_path / "out", DistillConfig(steps=1, bf16=True))
    assert "no native bfloat16 matrix multiply" in caplog.text and "drop --bf16" in caplog.text


def test_a_checkpoint_save_that_fails_leaves_the_previous_one(tmp_path, monkeypatch):
    """A full disk while a checkpoint was written left its first data file (no manifest): a --resume
    refused it as partial, a new run refused the folder as not empty. The failed save's files and the
    folders it made are removed; the previous checkpoint stays loadable."""
    import errno

    from bsbr.distill import checkpoint

    params = {"w": torch.nn.Parameter(torch.ones(3))}
    opt = torch.optim.AdamW(params.values(), lr=0.1)
    params["w"].sum().backward()
    opt.step()
    save_file_, calls = checkpoint.save_file, []

    def full_disk(tensors, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        save_file_(tensors, path)

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    fresh_dir = tmp_path / "out" / "checkpoint"
    with pytest.raises(OSError):
        checkpoint.save_checkpoint(fresh_dir, params, opt, dict(step=1))
    assert not (tmp_path / "out").exists()  # nothing left of a first save
    monkeypatch.setattr(checkpoint, "save_file", save_file_)
    checkpoint.save_checkpoint(fresh_dir, params, opt, dict(step=1))
    first = sorted(p.name for p in fresh_dir.iterdir())
    calls.clear()
    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    with pytest.raises(OSError):
        checkpoint.save_checkpoint(fresh_dir, params, opt, dict(step=2))
    assert sorted(p.name for p in fresh_dir.iterdir()) == first
    assert json.loads((fresh_dir / "manifest.json").read_text())["step"] == 1
    # the checkpoint folder itself cannot be made (no inode left) after its parent was: the parent was left
    monkeypatch.setattr(checkpoint, "save_file", save_file_)
    mkdir = Path.mkdir

    def no_inode_left(self, *a, **k):
        if self.name == "checkpoint":
            mkdir(self.parent, parents=True, exist_ok=True)
            raise OSError(errno.ENOSPC, "No space left on device")
        return mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", no_inode_left)
    with pytest.raises(OSError):
        checkpoint.save_checkpoint(tmp_path / "new" / "checkpoint", params, opt, dict(step=1))
    assert not (tmp_path / "new").exists()


def test_a_window_with_nothing_past_its_first_chunk_is_scored_whole():
    """A window of chunk_size + 1 tokens has no prediction past its first chunk: the loss divided by zero
    (a ZeroDivisionError in distill with params all); it is scored at every position, as a shorter one is."""
    teacher, student = fresh(0.3)
    ids = windows(n=1, length=CHUNK + 1)[0][None]
    _, kl_value, ce = end_to_end_loss(student, teacher, ids, 0.0)
    with torch.no_grad():
        s, t = (F.log_softmax(m(ids).logits[:, :-1], -1) for m in (student, teacher))
    assert kl_value == pytest.approx(float((t.exp() * (t - s)).sum(-1).mean()), abs=1e-6)
    assert ce == pytest.approx(float(F.nll_loss(s[0], ids[0, 1:])), rel=1e-5)
    with pytest.raises(ValueError, match="nothing to predict"):
        end_to_end_loss(student, teacher, ids[:, :1], 0.0)


@pytest.mark.parametrize("field", ["bf16", "activation_checkpointing", "seed"])
def test_distill_config_flags_must_be_of_their_type(field):
    with pytest.raises(TypeError, match=field):  # "no" is truthy: activation_checkpointing="no" turned it on
        DistillConfig(steps=1, **{field: "no"}).validate()


def test_an_interrupt_after_a_checkpoints_manifest_is_in_place_keeps_that_checkpoint(tmp_path, monkeypatch):
    """A second Ctrl-C that lands after the manifest's rename (while its folder is synced) made the
    failed-save clean-up delete the data files the new manifest names: no checkpoint was left."""
    from bsbr import outputs
    from bsbr.distill import checkpoint

    params = {"w": torch.nn.Parameter(torch.ones(3))}
    opt = torch.optim.AdamW(params.values(), lr=0.1)
    checkpoint.save_checkpoint(tmp_path, params, opt, dict(step=1))

    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(outputs, "_fsync_dir", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(tmp_path, params, opt, dict(step=2))
    named = {f["name"] for f in json.loads((tmp_path / "manifest.json").read_text())["files"].values()}
    assert all((tmp_path / n).is_file() and "-0000002-" in n for n in named)


def _first_change(a, b):
    """The first position whose logits differ (None: none)."""
    d = (a - b).abs().amax(-1)[0]
    changed = (d > 1e-4).nonzero()
    return int(changed[0]) if len(changed) else None


@pytest.mark.parametrize("family, options", [
    ("llama", dict(chunk_size=4)),  # the default: 8 blocks, window positions, 4 sinks
    ("llama", dict(chunk_size=4, retrieval_blocks=2, far_positions="absolute")),
    ("llama", dict(chunk_size=2, sink_tokens=5, retrieval_blocks=3, far_positions="absolute")),  # chunks of sinks
    ("llama", dict(chunk_size=4, recall_tokens=6, far_positions="absolute")),
    ("llama", dict(chunk_size=4, recall_tokens=6, sink_tokens=0, far_positions="absolute")),
    ("llama-small-positions", dict(chunk_size=2, retrieval_blocks=8, far_positions="hybrid")),
    ("gpt2", dict(chunk_size=4, local_chunks=1, retrieval_blocks=3)),
    ("gpt2", dict(chunk_size=3, recall_tokens=7, sink_tokens=0)),
])
def test_the_reaches_are_where_the_logits_first_change(family, options):
    """exact_reach: where the new pieces first change the logits; teacher_reach: where the student first
    differs from its teacher (closed and open gate). distill refused windows past them by one token too few
    (the last token is only a target) and counted neither a recall cache's size nor window positions."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from bsbr.distill.trainer import exact_reach, gate_open, teacher_reach
    from model_sources import randomize

    if family == "llama-small-positions":  # hybrid reads 8 chunks of 2 at their own positions (32 / 2 / 2)
        torch.manual_seed(0)
        teacher = randomize(LlamaForCausalLM(LlamaConfig(
            vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
            num_key_value_heads=2, max_position_embeddings=32)))
    else:
        teacher = make_source(family)
    ids = torch.randint(3, VOCAB, (1, 32), generator=torch.Generator().manual_seed(0))
    student = convert_to_bsbr(teacher, **options).eval()
    assert not gate_open(student)
    with torch.no_grad():
        t, s = teacher(ids).logits, student(ids).logits
        assert _first_change(t, s) == teacher_reach(student.config, False)
        gates = [p for name, p in student.named_parameters() if name.endswith("retrieval_gate")]
        if gates:  # one layer's gate opened is an open gate (its states are read)
            gates[0].add_(1.0)
            assert gate_open(student)
            gates[0].sub_(1.0)
            assert not gate_open(student)
        for p in new_parameters(student).values():  # open the gate, change the maps
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.5)
        assert gate_open(student)
        s_new = student(ids).logits
    assert _first_change(s, s_new) == exact_reach(student.config)
    assert _first_change(t, s_new) == teacher_reach(student.config, True)


def test_a_student_without_a_gate_reads_its_states_from_the_exact_reach():
    """gate_init=None builds no gate, so the states are always read: the window rule took it for a closed gate
    and refused windows that train (sinks filling chunks, absolute positions: 22 tokens asked for, 10 enough)."""
    from bsbr.distill.trainer import exact_reach, gate_open, shortest_window, teacher_reach

    teacher = make_source("llama")
    student = convert_to_bsbr(teacher, chunk_size=4, sink_tokens=8, retrieval_blocks=1, far_positions="absolute",
                              gate_init=None).eval()
    assert gate_open(student)
    ids = torch.randint(3, VOCAB, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert _first_change(teacher(ids).logits, student(ids).logits) == teacher_reach(student.config, True) == 8
    assert exact_reach(student.config) == 8 and shortest_window(student, "new") == shortest_window(student, "all") == 10


def test_processes_that_find_the_checkpoint_at_different_steps_are_refused_together(tmp_path, monkeypatch):
    # on several nodes with an --output on each node's own disk, one process resumed at step 2 and another
    # started fresh: their collectives stopped matching and the run hung until killed
    import types

    import torch.distributed as dist

    import bsbr.distill.trainer as trainer
    from bsbr.errors import CheckpointError

    def another_at_step_3(t, op=None):  # what the max over a process at step 3 gives
        t.copy_(torch.maximum(t, torch.tensor([3, -3])))

    monkeypatch.setattr(trainer, "dist", types.SimpleNamespace(
        is_available=lambda: True, is_initialized=lambda: True, get_rank=lambda: 0, get_world_size=lambda: 2,
        ReduceOp=dist.ReduceOp, all_reduce=another_at_step_3))
    teacher, student = fresh()
    with pytest.raises(CheckpointError, match="found .*checkpoint at different steps .0 to 3.: give an --output on "
                                              "storage every node shares"):
        distill(teacher, student, windows(2, 96), tmp_path / "out", DistillConfig(steps=1))


def test_a_resumes_data_record_keeps_each_earlier_record_once():
    # a second resume on the same data dropped the checkpoint's earlier records (eval of the files the first steps
    # read was no longer warned of); alternating resumes listed records twice and this run's own among them
    from bsbr.distill.trainer import _with_earlier_data

    a, b = dict(kind="text_files", files=["a.py"]), dict(kind="dataset", name="copy", files=["copy/a.txt"])
    second = _with_earlier_data(b, a)
    assert second == dict(b, earlier=[a])
    assert _with_earlier_data(b, second) == dict(b, earlier=[a])  # the same data again: a kept
    third = _with_earlier_data(a, second)
    assert third == dict(a, earlier=[b])  # (a, this run's own, not among them)
    assert _with_earlier_data(b, third) == dict(b, earlier=[a])
    assert _with_earlier_data(a, None) == a and _with_earlier_data(a, a) == a
    student = dict(b, earlier=[dict(kind="stdlib", split="train")])  # (the student's own distillations first)
    assert _with_earlier_data(student, a)["earlier"] == [dict(kind="stdlib", split="train"), a]


def test_a_step_predicted_past_the_time_budget_is_refused_before_training(tmp_path, monkeypatch):
    """A window longer than the calibration's is timed on its first tokens (16, or the 18 a step of the new
    pieces learns from) and scaled: a run whose first step would outlast --minutes is refused before any step
    (before, it ran the step, however long, then said that none fit), and the student is left as it came."""
    monkeypatch.setattr("bsbr.distill.budget.CALIBRATION_TOKENS", 16)
    teacher, student = fresh(0.1)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    with pytest.raises(ValueError, match=r"one training step on 40-token windows \(seq_len\) is predicted to take "
                       r"[\d.]+ s \(one on 18 tokens took [\d.]+ s\), longer than minutes=1e-06: give more --minutes"):
        distill(teacher, student, windows(), tmp_path / "o", DistillConfig(minutes=1e-6))
    assert not (tmp_path / "o" / "checkpoint").exists()
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())
    assert all(p.grad is None for p in student.parameters())
    from bsbr.distill.budget import check_step_fits

    with pytest.raises(ValueError, match=r"longer than minutes=1 \(0.1 s of it left\)"):  # a resumed run's budget
        check_step_fits(teacher, student, {}, SimpleNamespace(state={}), windows()[0], DistillConfig(minutes=1),
                        1e-9, 1, step=lambda ids: None, shortest=0)

    def another_process_predicts(t, op):  # every process of a run refuses alike: by the largest prediction
        assert op == torch.distributed.ReduceOp.MAX
        t[0] = 1e9
    monkeypatch.setattr("bsbr.distill.budget.dist.all_reduce", another_process_predicts)
    with pytest.raises(ValueError, match=r"predicted to take 1,000,000,000 s \(16,666,666.7 minutes\) .*, longer "
                       r"than minutes=1e\+06:"):
        check_step_fits(teacher, student, {}, SimpleNamespace(state={}), windows()[0], DistillConfig(minutes=1e6),
                        6e7, 2, step=lambda ids: None, shortest=0)


def test_a_step_predicted_past_memory_is_refused_and_the_prediction_changes_no_training(tmp_path, monkeypatch,
                                                                                        caplog):
    """The step's memory is predicted from the calibration's peak, linear in the window's length, for every
    process on the machine (torchrun's LOCAL_WORLD_SIZE); the calibration leaves the run's weights as a run
    without it reaches."""
    import bsbr.distill.budget as budget

    needs = []
    monkeypatch.setattr(budget, "memory_refusal", lambda need: needs.append(need) or None)
    monkeypatch.setattr(budget, "measure_peak", lambda fn: SimpleNamespace(extra_bytes=fn() or 10 ** 9))
    trained = []
    for calibration, length in ((20, 40), (1000, 40), (20, 80)):
        monkeypatch.setattr(budget, "CALIBRATION_TOKENS", calibration)
        teacher, student = fresh(0.1)
        with caplog.at_level("INFO", logger="bsbr.distill.budget"):
            distill(teacher, student, windows(2, length), tmp_path / f"{calibration}-{length}", DistillConfig(steps=2))
        trained.append(new_parameters(student))
    assert all(torch.equal(trained[0][k], trained[1][k]) for k in trained[0])
    assert len(needs) == 2 and needs[1] > needs[0] > 0  # (the 1000-token calibration was not run)
    assert "one training step on 40 tokens is predicted to take" in caplog.text
    monkeypatch.setattr(budget, "memory_refusal", lambda need: f"would need {need:g} bytes, more than there are")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"one training step on 40-token windows \(seq_len\), in 2 processes, would "
                       r"need [\d.e+]+ bytes, more than there are: give shorter windows \(--seq-len\), or run fewer "
                       r"than 2 processes on this machine$"):
        distill(*fresh(0.1), windows(2, 40), tmp_path / "refused", DistillConfig(steps=2))
    assert not (tmp_path / "refused" / "checkpoint").exists()


def test_the_calibration_is_scaled_by_the_steps_multiply_adds_from_a_length_the_step_learns_from(monkeypatch,
                                                                                                tmp_path):
    """The time of the calibration's step (here a clock that it moves by 1 s) times the ratio of the two lengths'
    multiply-adds (the teacher's attention quadratic); the calibration is as long as a step needs to reach what
    it trains (params='new' without activation checkpointing had no gradient at all on 1,024 tokens of the
    default conversion, whose new pieces are read from token 2,562: an internal error)."""
    import bsbr.distill.budget as budget
    from bsbr.numbers import duration

    monkeypatch.setattr(budget, "CALIBRATION_TOKENS", 16)
    clock = [0.0]
    lengths = []

    def step(ids):
        lengths.append(ids.shape[1])
        clock[0] += 1.0
    monkeypatch.setattr(budget.time, "perf_counter", lambda: clock[0])
    teacher, student = fresh(0.1)
    ratio = budget.step_macs(teacher, student, 400, True) / budget.step_macs(teacher, student, 20, True)
    assert budget.step_macs(teacher, student, 400, True) > 20 * budget.step_macs(teacher, student, 20, True)
    with pytest.raises(ValueError, match=rf"predicted to take {re.escape(duration(ratio))} \(one on 20 tokens took "
                       r"1.0 s\)"):
        budget.check_step_fits(teacher, student, {}, SimpleNamespace(state={}), windows(1, 400)[0],
                               DistillConfig(minutes=1e-3), 0.06, 1, step=step, shortest=20)
    assert lengths == [20]
    monkeypatch.undo()
    monkeypatch.setattr(budget, "CALIBRATION_TOKENS", 16)
    for params in ("new", "all"):  # the default conversion: closed gate, exact blocks (new pieces read from 82)
        student = convert_to_bsbr(make_source("llama"), chunk_size=CHUNK)
        cfg = DistillConfig(steps=1, params=params, activation_checkpointing=False)
        assert distill(make_source("llama"), student, windows(2, 100), tmp_path / params, cfg)["step"] == 1


def test_the_log_holds_each_steps_kl_and_ce_and_the_seconds_since_the_start(tmp_path):
    teacher, student = fresh(0.1)
    window = windows(1, 48)[0]
    kl, ce = end_to_end_loss(student, teacher, window[None], 0.0)[1:]  # the first step's, before any update
    progress = distill(teacher, student, [window], tmp_path, DistillConfig(steps=3))
    log = progress["log"]
    assert (log[0]["kl"], log[0]["ce"]) == pytest.approx((kl, ce), rel=1e-4)
    assert 0 < log[0]["seconds"] <= log[1]["seconds"] <= log[2]["seconds"] <= progress["elapsed"]


def test_minutes_stop_after_the_first_step_that_ends_past_them_and_a_resume_keeps_the_time_used(tmp_path):
    teacher, student = fresh(0.1)
    log = distill(teacher, student, windows(2, 40), tmp_path / "a", DistillConfig(minutes=0.05))["log"]
    # (seconds are logged to 1/100 s, read a little after the clock's check: a step that ended at 2.996 s logs 3.0)
    assert log[-2]["seconds"] <= 3.0 <= log[-1]["seconds"] and log[-1]["seconds"] > log[-2]["seconds"]
    teacher, student = fresh(0.1)
    used = distill(teacher, student, windows(2, 40), tmp_path / "b", DistillConfig(steps=20, checkpoint_every=5))
    minutes = (used["elapsed"] + 0.5) / 60
    teacher, student = fresh(0.1)
    start = time.monotonic()
    progress = distill(teacher, student, windows(2, 40), tmp_path / "b", DistillConfig(minutes=minutes,
                       checkpoint_every=5), resume=True)
    assert progress["elapsed"] >= minutes * 60 and progress["step"] > 20
    assert time.monotonic() - start < minutes * 60  # its last 0.5 s and a step, not another 60 x minutes


def test_a_resumed_runs_step_is_predicted_against_the_time_it_has_left(tmp_path, monkeypatch):
    monkeypatch.setattr("bsbr.distill.budget.CALIBRATION_TOKENS", 16)
    teacher, student = fresh(0.1)
    used = distill(teacher, student, windows(2, 40), tmp_path, DistillConfig(steps=6, checkpoint_every=1))
    teacher, student = fresh(0.1)
    with pytest.raises(ValueError, match=r"longer than minutes=[\d.e-]+ \(0.1 s of it left\)"):
        distill(teacher, student, windows(2, 40), tmp_path, DistillConfig(minutes=(used["elapsed"] + 0.001) / 60),
                resume=True)


@pytest.mark.parametrize("params", ["new", "lora"])
def test_the_seed_changes_what_is_trained(tmp_path, params):
    """--seed orders the windows (and initialises LoRA's adapters): two seeds train two models."""
    trained = []
    for seed in (0, 1):
        teacher, student = fresh(0.1)
        distill(teacher, student, windows(4, 40), tmp_path / str(seed), DistillConfig(steps=1, seed=seed,
                params=params, lr=1e-2))
        trained.append(student.state_dict())
    assert any(not torch.equal(v, trained[1][k]) for k, v in trained[0].items())


def test_the_memory_prediction_counts_the_optimizers_moments_and_every_process_on_the_machine(monkeypatch):
    import bsbr.distill.budget as budget

    needs = []
    monkeypatch.setattr(budget, "memory_refusal", lambda need: needs.append(need) or None)
    monkeypatch.setattr(budget, "measure_peak", lambda fn: SimpleNamespace(extra_bytes=fn() or 10 ** 6))
    monkeypatch.setattr(budget, "CALIBRATION_TOKENS", 16)
    teacher, student = fresh(0.1)
    trained = {"w": torch.nn.Parameter(torch.zeros(1000))}
    for state, local in (({}, None), ({"w": {}}, None), ({"w": {}}, "2")):
        if local:
            monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
        budget.check_step_fits(teacher, student, trained, SimpleNamespace(state=state), windows(1, 40)[0],
                               DistillConfig(steps=1), None, 1, step=lambda ids: None, shortest=0)
    assert needs[0] - needs[1] == 2 * 4000 and needs[2] == 2 * needs[1]  # (AdamW's two float32 moments)
    assert budget.step_macs(teacher, student, 40, True) > budget.step_macs(teacher, student, 40, False)


def test_the_training_curve_is_against_minutes_with_a_running_mean_of_the_last_steps(monkeypatch, tmp_path):
    import bsbr.distill.plots as plots

    drawn = {}
    monkeypatch.setattr(plots, "save_figure", lambda fig, path, dpi=None: drawn.update(fig=fig) or Path(path))
    log = [dict(step=i + 1, kl=float(i), ce=2.0 * i, seconds=60.0 * (i + 1)) for i in range(5)]
    plots.plot_progress({"log": log}, tmp_path / "d.png", smooth=2)
    kl_ax, ce_ax = drawn["fig"].axes
    raw, mean = kl_ax.get_lines()
    assert list(raw.get_xdata()) == [1.0, 2.0, 3.0, 4.0, 5.0] and kl_ax.get_xlabel() == "minutes"
    assert list(mean.get_ydata()) == [0.0, 0.5, 1.5, 2.5, 3.5] and mean.get_label() == "mean of last 2"
    assert list(ce_ax.get_lines()[1].get_ydata()) == [0.0, 1.0, 3.0, 5.0, 7.0]


def test_a_steps_multiply_adds_are_the_teachers_forward_and_the_students_forward_and_backward():
    from bsbr.distill.budget import step_macs
    from bsbr.macs import forward_macs

    teacher, student = fresh()
    c = student.config
    reach = c.chunk_size * c.local_chunks + c.sink_tokens  # the keys a token reads: its window and the sinks
    assert reach == 20
    for n, keys in ((16, 16), (400, 20)):
        # a backward is two forwards' multiply-adds; recomputing the activations is one more forward
        assert step_macs(teacher, student, n, False) == forward_macs(teacher, n) + 3 * forward_macs(student, n, keys)
        assert step_macs(teacher, student, n, True) == forward_macs(teacher, n) + 4 * forward_macs(student, n, keys)


def test_the_memory_prediction_scales_the_activations_not_the_gradients(monkeypatch):
    import bsbr.distill.budget as budget
    from bsbr.distill.trainer import _train_step

    needs = []
    monkeypatch.setattr(budget, "memory_refusal", lambda need: needs.append(need) or None)
    monkeypatch.setattr(budget, "measure_peak", lambda fn: SimpleNamespace(extra_bytes=fn() or 10 ** 7))
    monkeypatch.setattr(budget, "CALIBRATION_TOKENS", 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    teacher, student = fresh(0.1)
    trained = dict(student.named_parameters())
    cfg = DistillConfig(steps=1)
    budget.check_step_fits(teacher, student, trained, SimpleNamespace(state={"x": 1}), windows(1, 160)[0], cfg, None,
                           1, step=lambda ids: _train_step(teacher, student, ids, cfg), shortest=0)
    # the calibration step's float32 gradients are held once whatever the length (the prediction gives back the
    # .grad it found); the optimizer has state already, so no moments are added
    _train_step(teacher, student, windows(1, 16)[0][None], cfg)
    grads = sum(4 * p.numel() for p in trained.values() if p.grad is not None)
    assert grads > 0
    assert needs == [pytest.approx((10 ** 7 - grads) * 160 / 16 + grads)]


def test_a_stop_between_checkpoints_writes_one_at_the_step_it_stopped(tmp_path):
    from bsbr.distill.trainer import DistillInterrupted

    calls = []
    with pytest.raises(DistillInterrupted):
        distill(*fresh(gate_init=0.3), windows(4), tmp_path, DistillConfig(steps=5, checkpoint_every=10),
                progress=False, should_stop=lambda: calls.append(1) or len(calls) == 2)
    assert json.loads((tmp_path / "checkpoint" / "manifest.json").read_text())["step"] == 2


def test_a_resume_stopped_after_its_last_step_over_an_older_model_publishes_the_new_one(tmp_path):
    # an --overwrite run stopped after its last step but before publishing leaves the older model in place: its
    # resume with the same --steps must publish (the older model's config.json is not this checkpoint's model)
    ws = windows(4)
    distill(*fresh(), ws, tmp_path, DistillConfig(steps=2), progress=False)
    calls = []
    with pytest.raises(KeyboardInterrupt, match="before the model was published"):
        distill(*fresh(), ws, tmp_path, DistillConfig(steps=3), progress=False, overwrite=True,
                should_stop=lambda: calls.append(1) or len(calls) == 5)
    assert json.loads((tmp_path / "distill.json").read_text())["step"] == 2  # the older model, still there
    distill(*fresh(), ws, tmp_path, DistillConfig(steps=3), progress=False, resume=True)
    assert json.loads((tmp_path / "distill.json").read_text())["step"] == 3


def test_a_publish_that_fails_after_removing_older_files_leaves_no_loadable_mix(tmp_path, monkeypatch):
    import bsbr.distill.trainer as trainer

    ws = windows(2)
    distill(*fresh(), ws, tmp_path, DistillConfig(steps=1), progress=False)
    (tmp_path / "speed.json").write_text("{}")  # a file bsbr writes (demo) that the new run does not
    monkeypatch.setattr(trainer, "publish_files", lambda *a: (_ for _ in ()).throw(OSError("disk gone")))
    with pytest.raises(OSError, match="disk gone"):
        distill(*fresh(), ws, tmp_path, DistillConfig(steps=2), progress=False, overwrite=True)
    assert not (tmp_path / "speed.json").exists() and not (tmp_path / "config.json").exists()


def test_a_resume_records_the_stopping_rule_it_ran_under(tmp_path):
    ws = windows(2)
    distill(*fresh(), ws, tmp_path, DistillConfig(steps=2), progress=False)
    distill(*fresh(), ws, tmp_path, DistillConfig(steps=3), progress=False, resume=True)
    assert json.loads((tmp_path / "distill.json").read_text())["config"]["steps"] == 3
    manifest = json.loads((tmp_path / "checkpoint" / "manifest.json").read_text())
    assert manifest["progress"]["config"]["steps"] == 3


def test_a_weight_gone_inf_names_the_step_that_made_it_and_the_last_checkpoint_is_the_step_before(tmp_path):
    with pytest.raises(ValueError, match=r"training diverged at step (\d+): .* became inf or nan") as e:
        distill(*fresh(), windows(4), tmp_path, DistillConfig(steps=6, lr=1e30, checkpoint_every=1), progress=False)
    step = int(re.search(r"at step (\d+)", str(e.value)).group(1))
    manifest = json.loads((tmp_path / "checkpoint" / "manifest.json").read_text())
    assert step > 1 and manifest["progress"]["step"] == step - 1


def test_a_checkpoint_of_another_format_is_refused_by_its_number(tmp_path):
    from bsbr.distill.checkpoint import FORMAT, read_manifest

    distill(*fresh(), windows(2), tmp_path, DistillConfig(steps=1, checkpoint_every=1), progress=False)
    path = tmp_path / "checkpoint" / "manifest.json"
    m = json.loads(path.read_text())
    for other in (FORMAT - 1, FORMAT + 1, None):
        m["format"] = other
        path.write_text(json.dumps(m))
        with pytest.raises(CheckpointError, match=f"has format {other}, this bsbr reads {FORMAT}"):
            read_manifest(tmp_path / "checkpoint")
