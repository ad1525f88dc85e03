"""Usage: python benchmarks/zero_shot_variants.py OUT.json

Zero-shot perplexity (no training) of SmolLM2-135M converted with different retrieval variants and
gate settings, on tokens past the first chunk (chunk 256) of held-out 2,048-token windows.
docs/findings/zero_shot_variants.json also has two rows of options since retired (the elu feature map,
top-k over chunk states), measured with this script at commit 6314032
(``git show 6314032:benchmarks/zero_shot_variants.py``)."""
from script_args import output_only

OUT = output_only(__doc__, "zero_shot_variants.json")  # (checked before the model loads)

import torch

from bsbr.convert import convert_to_bsbr, load_source, load_tokenizer
from bsbr.corpus import stdlib_texts, token_windows
from bsbr.evaluate import perplexity_past
from bsbr.results import write_json

torch.set_num_threads(1)
tok, src = load_tokenizer(None), load_source(None).eval()
windows = token_windows(tok, stdlib_texts("heldout"), 2048, 2)


def ppl(model):
    return perplexity_past(model, windows, 256)


variants = {
    "full attention (source)": None,
    "normalized+hedgehog, gate closed (default)": dict(),
    "normalized+hedgehog, gate 1 (open)": dict(gate_init=1.0),
    "additive (seed formula), no gate": dict(retrieval="additive", feature_map="identity", gate_init=None),
}
out = {}
for name, opts in variants.items():
    # these variants were measured with the one-chunk exact window (local_chunks=1, no sinks, no blocks)
    m = src if opts is None else convert_to_bsbr(src, chunk_size=256, local_chunks=1, sink_tokens=0,
                                                 retrieval_blocks=0, **opts)
    out[name] = ppl(m)
    print(f"{name:<48} ppl {out[name]:.3f}", flush=True)
write_json(dict(windows=len(windows), seq_len=2048, chunk_size=256, ppl_past_first_chunk=out), OUT)
