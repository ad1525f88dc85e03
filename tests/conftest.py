"""The suite runs in two pytest-xdist workers (pyproject's addopts: ``-n 2``; ``-n 0`` runs it in one
process): each worker, and every command a test starts, computes on one thread so that the workers do
not oversubscribe the cores."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
