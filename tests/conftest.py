"""The suite runs in two pytest-xdist workers (pyproject's addopts: ``-n 2``; ``-n 0`` runs it in one
process): each worker, and every command a test starts, computes on one thread so that the workers do
not oversubscribe the cores."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _hub_offline_mode_per_test(monkeypatch):
    """A command that finds the hub unreachable switches its process to the hub's offline mode (the
    variable and huggingface_hub's constant); tests run many commands in one process, so each test gets
    them back as they were."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", constants.HF_HUB_OFFLINE)
    monkeypatch.setenv("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE", ""))
    if not os.environ.get("HF_HUB_OFFLINE"):
        monkeypatch.delenv("HF_HUB_OFFLINE")


@pytest.fixture(autouse=True)
def _signal_handlers_are_restored():
    """A command run in-process must leave the process's SIGINT / SIGTERM handlers as it found them: a test
    that leaves them changed fails itself, not a later test that needs a Ctrl-C delivered."""
    import signal

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    after = {sig: signal.getsignal(sig) for sig in before}
    changed = [f"{sig.name}: {before[sig]!r} -> {after[sig]!r}" for sig in before if after[sig] != before[sig]]
    assert not changed, "signal handlers left changed: " + "; ".join(changed)
