"""Usage: python benchmarks/chunk_size_sweep.py OUT.json

Chunk-size sweep of the zero-shot conversion (gate closed = chunk-local attention) vs full attention."""
from script_args import output_only

OUT = output_only(__doc__, "chunk_size_sweep.json")  # (checked before the model loads)

import json
from bsbr.convert import load_source, load_tokenizer, convert_to_bsbr
from bsbr.corpus import stdlib_texts, token_windows
from bsbr.evaluate import perplexity_past
from bsbr.results import write_json
tok = load_tokenizer(None); src = load_source(None).eval()
windows = token_windows(tok, stdlib_texts("heldout"), 2048, 3)
out = {}
full = perplexity_past(src, windows, 512)
for B in (64, 128, 256, 512):
    m = convert_to_bsbr(src, chunk_size=B, local_chunks=1, sink_tokens=0, retrieval_blocks=0)
    out[B] = dict(local_ppl_past_512=perplexity_past(m, windows, 512), extra_params_pct=m.conversion_summary["extra_params_pct"])
    print(B, out[B], flush=True)
res = dict(full_ppl_past_512=full, chunk_sizes=out, windows=len(windows), seq_len=2048,
           note="tokens at positions >= 512 of each window, so every chunk size is scored on the same tokens")
print(json.dumps(res, indent=1))
write_json(res, OUT)
