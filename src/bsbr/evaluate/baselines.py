"""The models a converted model is measured between: its source restricted to chunk-local attention
(the lower bound) or to the converted model's exact window (what retrieval adds on top of)."""
from __future__ import annotations


def has_wide_window(model) -> bool:
    """Whether a BSBR model's exact window reaches past its own chunk (earlier chunks or sinks)."""
    cfg = getattr(model, "config", None)
    return getattr(cfg, "local_chunks", 1) > 1 or getattr(cfg, "sink_tokens", 0) > 0


def local_baseline(reference, chunk_size: int, like=None, same_window: bool = False):
    """The chunk-local baseline: ``reference`` converted with ``chunk_size`` and a closed retrieval
    gate (``gate_init=0``), which makes BSBR exactly chunk-local softmax attention. The other
    conversion options are copied from ``like`` (the evaluated model's config) where it has them,
    so positions past the source's table are assigned the same way. ``same_window=True`` also
    copies ``like``'s exact window (``local_chunks``, ``sink_tokens``): the source restricted to
    what the model sees exactly, so that only retrieval separates the two."""
    from ..convert import convert_to_bsbr

    opts = {}
    cfg = getattr(like, "config", None)
    if cfg is not None and getattr(cfg, "model_type", None) == "bsbr":
        opts = dict(compression_factor=cfg.compression_factor, retrieval=cfg.retrieval,
                    feature_map=cfg.feature_map, far_positions=cfg.far_positions,
                    position_scheme=cfg.position_scheme)
    # chunk-local, whatever the converter's defaults; no exact blocks either way
    window = dict(local_chunks=1, sink_tokens=0, retrieval_blocks=0)
    if same_window and cfg is not None:
        window.update(local_chunks=cfg.local_chunks, sink_tokens=cfg.sink_tokens)
    return convert_to_bsbr(reference, chunk_size=chunk_size, **{**opts, **window, "gate_init": 0.0})
