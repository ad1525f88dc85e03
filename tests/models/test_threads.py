"""A server's threads load models and generate with a seed at once: transformers' loading swaps a global (two
loads left weight tying off for the process), and a seed sets the process's generator."""
import io
import sys
import threading

import torch
from model_sources import make_source
from word_tokenizer import build_word_tokenizer

from bsbr import convert_to_bsbr
from bsbr.cli import main
from bsbr.models import load_bsbr_model


def run_in_threads(fn, n=4):
    errors = []

    def guarded(i):
        try:
            fn(i)
        except Exception as e:  # (reported below)
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=(i,), name=f"t{i}") for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_loads_and_seeded_generation_in_threads_are_each_as_alone(tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    tying = PreTrainedModel.tie_weights
    convert_to_bsbr(make_source("gpt2"), chunk_size=4).save_pretrained(tmp_path / "m")  # (tied embeddings)
    build_word_tokenizer().save_pretrained(tmp_path / "m")
    ids = torch.randint(3, 90, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = load_bsbr_model(tmp_path / "m")(ids).logits
    with torch.no_grad():
        run_in_threads(lambda i: [torch.testing.assert_close(load_bsbr_model(tmp_path / "m")(ids).logits, want)
                                  for _ in range(4)])
    assert PreTrainedModel.tie_weights is tying

    printed = {}

    class PerThread(io.TextIOBase):  # (each thread's stdout apart)
        def write(self, text):
            printed.setdefault(threading.current_thread().name, []).append(text)
            return len(text)

    monkeypatch.setattr(sys, "stdout", PerThread())
    argv = ["generate", str(tmp_path / "m"), "--prompt", "def f", "--temperature", "1", "--seed", "7",
            "--max-new-tokens", "12"]
    run_in_threads(lambda i: main(argv), n=1)
    alone = "".join(printed.pop("t0"))
    run_in_threads(lambda i: [main(argv) for _ in range(3)])
    assert all("".join(texts) == alone * 3 for texts in printed.values()), (alone, printed)


def test_an_unseeded_or_greedy_call_of_main_leaves_the_process_generator_to_move_on(tmp_path, monkeypatch):
    # main gave back the generator it found: unseeded sampling repeated one text call after call, and a greedy call
    # rewound the draws another thread made meanwhile
    convert_to_bsbr(make_source("gpt2"), chunk_size=4).save_pretrained(tmp_path / "m")
    build_word_tokenizer().save_pretrained(tmp_path / "m")
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    argv = ["generate", str(tmp_path / "m"), "--prompt", "def f", "--max-new-tokens", "12"]
    torch.manual_seed(0)
    for _ in range(3):
        main(argv + ["--temperature", "1"])
    texts = sys.stdout.getvalue().splitlines()
    assert len(texts) == 3 and len(set(texts)) > 1, texts
    before = torch.get_rng_state()
    main(argv + ["--temperature", "1"])
    assert not torch.equal(torch.get_rng_state(), before)  # (it drew from the process's generator, as generate does)
    torch.manual_seed(0)
    drawn = torch.rand(1)
    torch.manual_seed(0)
    main(argv)  # greedy: draws nothing
    torch.rand(1)  # (another thread's draw, once the call is over: the call must not take it back)
    assert not torch.equal(torch.rand(1), drawn)


def test_a_seeding_command_gives_the_caller_its_generator_back(tmp_path, monkeypatch):
    convert_to_bsbr(make_source("gpt2"), chunk_size=4).save_pretrained(tmp_path / "m")
    build_word_tokenizer().save_pretrained(tmp_path / "m")
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    torch.manual_seed(3)
    want = torch.rand(4)
    torch.manual_seed(3)
    main(["generate", str(tmp_path / "m"), "--prompt", "def f", "--max-new-tokens", "4", "--temperature", "1",
          "--seed", "7"])
    torch.testing.assert_close(torch.rand(4), want)


def test_only_commands_that_seed_give_the_generator_back():
    # eval --seed seeds its own generators: handing torch's back rewound the draws other threads made meanwhile
    import argparse

    from bsbr.cli import _generator_kept

    for command, seed, kept in (("eval", 3, False), ("generate", None, False), ("generate", 3, True),
                                ("bench", None, True)):
        before = torch.get_rng_state()
        with _generator_kept(argparse.Namespace(command=command, seed=seed, temperature=1.0)):
            torch.rand(3)
        assert torch.equal(torch.get_rng_state(), before) == kept, command


def test_a_seeded_call_in_a_program_without_torch_leaves_a_generator_seeded_at_random(tmp_path):
    # it was given a fresh Generator's state (torch's fixed default seed): every run's later sampling was the same
    import subprocess

    convert_to_bsbr(make_source("gpt2"), chunk_size=4).save_pretrained(tmp_path / "m")
    build_word_tokenizer().save_pretrained(tmp_path / "m")
    code = ("import sys\nfrom bsbr.cli import main\nassert 'torch' not in sys.modules\n"
            "argv = ['generate', sys.argv[1], '--prompt', 'def f', '--max-new-tokens', '2', '--temperature', '1']\n"
            "assert main(argv + ['--seed', '7']) == 0\n"
            "import torch\nprint(repr(torch.rand(1).item()))\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m")], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.split()[-1]) != torch.rand(1, generator=torch.Generator()).item()


def test_a_call_of_main_in_a_thread_leaves_the_unraisable_hook_as_it_finds_it_at_its_end(tmp_path, monkeypatch):
    # a call in a thread (which installs nothing) put back the hook it found at its start: a main-thread call's,
    # after that call had ended
    import bsbr.models

    convert_to_bsbr(make_source("gpt2"), chunk_size=4).save_pretrained(tmp_path / "m")
    build_word_tokenizer().save_pretrained(tmp_path / "m")
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
    meanwhile = lambda u: None  # noqa: E731 - (as the main thread's call, ending meanwhile, sets it back)
    load = bsbr.models.load_bsbr_model

    def loading(*args, **kwargs):
        sys.unraisablehook = meanwhile
        return load(*args, **kwargs)

    monkeypatch.setattr(bsbr.models, "load_bsbr_model", loading)
    run_in_threads(lambda i: main(["generate", str(tmp_path / "m"), "--prompt", "def f", "--max-new-tokens", "2"]),
                   n=1)
    assert sys.unraisablehook is meanwhile


def test_a_seeded_generation_is_the_same_while_other_threads_sample_unseeded(tmp_path, monkeypatch):
    convert_to_bsbr(make_source("gpt2"), chunk_size=4).save_pretrained(tmp_path / "m")
    build_word_tokenizer().save_pretrained(tmp_path / "m")
    printed = {}

    class PerThread(io.TextIOBase):
        def write(self, text):
            printed.setdefault(threading.current_thread().name, []).append(text)
            return len(text)

    monkeypatch.setattr(sys, "stdout", PerThread())
    argv = ["generate", str(tmp_path / "m"), "--prompt", "def f", "--temperature", "1", "--max-new-tokens", "24"]
    run_in_threads(lambda i: main(argv + ["--seed", "7"]), n=1)
    alone = "".join(printed.pop("t0"))
    run_in_threads(lambda i: [main(argv + (["--seed", "7"] if i == 0 else [])) for _ in range(3)], n=3)
    assert "".join(printed["t0"]) == alone * 3


def test_a_seeding_command_leaves_no_seed_of_its_own_queued_for_cuda(tmp_path, monkeypatch):
    # CUDA's generators, seeded lazily when CUDA starts, were left the command's seed
    tracker = getattr(torch.cuda, "_lazy_seed_tracker", None)
    if tracker is None or not hasattr(tracker, "get_calls"):
        import pytest

        pytest.skip("this torch queues CUDA seeds otherwise")
    convert_to_bsbr(make_source("gpt2"), chunk_size=4).save_pretrained(tmp_path / "m")
    build_word_tokenizer().save_pretrained(tmp_path / "m")
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    main(["generate", str(tmp_path / "m"), "--prompt", "def f", "--temperature", "1", "--seed", "7",
          "--max-new-tokens", "2"])
    queued = tracker.get_calls()[1]  # (the seed every device's generator takes when CUDA starts)
    seeds = [c.cell_contents for c in (queued[0].__closure__ or ()) if isinstance(c.cell_contents, int)] \
        if queued else []
    assert 7 not in seeds, seeds
