"""Evaluation runs models in eval mode and gives them back as it found them."""
from __future__ import annotations

import functools
from collections.abc import Mapping


def in_eval_mode(fn):
    """Run ``fn`` with the modules it is given (as arguments or the values of a mapping argument) in eval mode,
    and put each of their submodules' mode back after it (a model evaluated between training steps kept its
    dropout off; one in train mode was measured with dropout on)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import torch

        given = [v for a in (*args, *kwargs.values()) for v in (a.values() if isinstance(a, Mapping) else [a])]
        models = [a for a in given if isinstance(a, torch.nn.Module)]
        modes = [(m, m.training) for a in models for m in a.modules()]  # (the models themselves first)
        try:
            for a in models:
                a.eval()
            return fn(*args, **kwargs)
        finally:
            for a in models:
                a.train(dict(modes)[a])
            for m, training in modes:  # (a submodule may have been in the other mode)
                m.training = training
    return wrapper
