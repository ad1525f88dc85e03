"""The models a converted model is measured between: its source restricted to chunk-local attention
(the lower bound) or to the converted model's exact window (what retrieval adds on top of), and the
loading of a saved model beside them (``bsbr eval``)."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from ..notes import first_time

logger = logging.getLogger(__name__)


def has_wide_window(config: dict) -> bool:
    """Whether a BSBR model's exact window reaches past its own chunk (earlier chunks or sinks), from its
    config as a dict (``model.config.to_dict()`` or its config.json; a key it lacks takes BSBRConfig's default)."""
    from ..models.bsbr.configuration_bsbr import missing_defaults

    filled = {**config, **missing_defaults(config)}
    return filled["local_chunks"] > 1 or filled["sink_tokens"] > 0


def local_baseline(reference, chunk_size: int, like=None, same_window: bool = False):
    """The chunk-local baseline: ``reference`` converted with ``chunk_size``, a one-chunk window, no sinks,
    no exact blocks and a closed gate (``gate_init=0``): exactly chunk-local softmax attention. The other
    conversion options are copied from ``like`` (the evaluated model, or its config) where it has them,
    so positions past the source's table are assigned the same way. ``same_window=True`` also
    copies ``like``'s exact window (``local_chunks``, ``sink_tokens``): the model's exact window alone
    (its sinks read at the far positions the model reads them at), so that only retrieval separates the two."""
    from ..convert import convert_to_bsbr
    from ..convert.converter import as_baseline

    # chunk-local, whatever the converter's defaults; no exact blocks either way
    opts = dict(local_chunks=1, sink_tokens=0, retrieval_blocks=0, gate_init=0.0)
    cfg = like if getattr(like, "model_type", None) == "bsbr" else getattr(like, "config", None)  # (a config: read)
    if like is not None and getattr(cfg, "model_type", None) != "bsbr":  # (a model or config of another kind was
        raise TypeError(f"like must be a BSBR model or its config, got {type(like).__name__}")  # ignored silently)
    if cfg is not None:
        # ('hybrid' with no chunk within its reach computes what 'window' does: a model saved so before the
        # converter refused it is compared as that)
        far = "window" if cfg.far_positions == "hybrid" and not cfg.own_position_chunks() else cfg.far_positions
        opts.update(compression_factor=cfg.compression_factor, retrieval=cfg.retrieval, feature_map=cfg.feature_map,
                    far_positions=far, position_scheme=cfg.position_scheme)
    if same_window and cfg is not None:
        opts.update(local_chunks=cfg.local_chunks, sink_tokens=cfg.sink_tokens)
    with as_baseline():
        return convert_to_bsbr(reference, chunk_size=chunk_size, **opts)


def load_eval_tokenizer(model_dir: os.PathLike, reference=None):
    """The tokenizer saved next to the model, else the reference's (None: the bundled SmolLM2)."""
    from transformers import AutoTokenizer

    from ..convert import load_tokenizer

    files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any((Path(model_dir) / f).is_file() for f in files):  # (save_pretrained writes the model alone)
        why = "it has no tokenizer files"
    else:
        try:
            return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
        except Exception as e:  # (unreadable: tokenizers raises its own kind for a newer format)
            why = f"its tokenizer does not load: {' '.join(str(e).split())}"
    said = f"{model_dir}: {why}; using the reference's"
    if first_time(said):  # (eval loads it for its checks, its models and its pass-key prompts)
        logger.info("%s", said)
    tokenizer = load_tokenizer(reference)
    if tokenizer is None:
        raise ValueError(f"{model_dir} has no tokenizer and the reference gives none")
    tokenizer.bsbr_from_reference = True  # (its code, if any, said not to run once the reference has loaded)
    return tokenizer


def load_saved_models(model_dir: os.PathLike, reference=None, check_reference=None, only=None):
    """``(models, tokenizer, config)`` for the saved BSBR model in ``model_dir``: ``models`` holds it
    (``"bsbr"``), its ``reference`` (``"source"``: a directory, ``.gguf`` file, hub id, or None for the
    bundled SmolLM2-135M-Instruct), the chunk-local baseline (``"local"``) and, for a model whose exact
    window reaches past its own chunk, the source restricted to that window (``"window"``). The
    tokenizer is :func:`load_eval_tokenizer`'s; ``config`` what a result records of the run.
    ``check_reference(source_model)``, if given, runs right after the reference is loaded (``bsbr
    eval`` refuses there a reference that is not the model's source). ``only``: the names of the models to
    build (None: all); the reference is not loaded when none of them needs it."""
    from ..models import load_bsbr_model
    from ..models.bsbr.loading import check_unchanged, folder_identity
    from ..arguments import load_model_arg, source_label, source_name, warn_ignored_code, weights_fingerprint
    from ..errors import UserError
    from ..results import software

    model_dir = Path(model_dir)
    logger.info("loading %s", model_dir)
    before = folder_identity(model_dir)  # (its records are read after the reference loads: from the same model)
    model = load_bsbr_model(model_dir).eval()
    tokenizer = load_eval_tokenizer(model_dir, reference)
    chunk = int(model.config.chunk_size)
    wanted = {"bsbr", "source", "local", *(["window"] if has_wide_window(model.config.to_dict()) else [])}
    wanted &= set(wanted if only is None else only)
    models = {"bsbr": model} if "bsbr" in wanted else {}
    if wanted - {"bsbr"}:
        logger.info("loading the reference %s", source_label(reference))
        source = load_model_arg(reference, "--reference")  # (refused as convert refuses its SOURCE)
        if check_reference is not None:
            check_reference(source)
        if "source" in wanted:
            models["source"] = source
        for name, same_window in (("local", False), ("window", True)):
            if name in wanted:
                try:
                    models[name] = local_baseline(source, chunk, like=model, same_window=same_window)
                except ValueError as e:  # (a config the converter refuses: named as convert names its SOURCE)
                    raise UserError(f"--reference {source_label(reference)} cannot be converted: {e}") from e
    if getattr(tokenizer, "bsbr_from_reference", False):  # (once the reference, where needed, was not refused)
        warn_ignored_code(reference, "--reference", "tokenizer_config.json")
    check_unchanged(model_dir, before)
    # what identifies the run: the model's attention options and weights, the software, the machine
    options = ("local_chunks", "sink_tokens", "retrieval_blocks", "recall_tokens", "far_positions", "retrieval",
               "feature_map", "compression_factor", "position_scheme")
    config = dict(model_dir=str(Path(model_dir).resolve()), reference=source_name(reference), chunk_size=chunk,
                  **{k: getattr(model.config, k, None) for k in options}, weights=weights_fingerprint(model),
                  dtype=str(model.dtype).removeprefix("torch."), **software())
    return models, tokenizer, config
