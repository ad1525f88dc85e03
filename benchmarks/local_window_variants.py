"""Usage: python benchmarks/local_window_variants.py OUT.json

Zero-shot perplexity of SmolLM2-135M under local attention patterns, set with an additive 4-D
attention mask on the source model itself (no conversion, no training): full causal attention, the
chunk-local pattern BSBR keeps (chunk 256), the chunk plus an exact "halo" of the previous chunk's
last W tokens, a sliding window, and each of these with the sequence's first tokens kept visible
("attention sinks"). Tokens past the first chunk of 6 held-out 2,048-token windows.
(The exact-window rows of docs/findings.md, "Ruled out".)"""
import sys

from script_args import output_only

OUT = output_only(__doc__, "local_window_variants.json")  # (checked before the model loads)

import torch

from bsbr.convert import load_source, load_tokenizer
from bsbr.corpus import stdlib_texts, token_windows
from bsbr.evaluate import perplexity_past
from bsbr.results import write_json

N, B = 2048, 256
tok, src = load_tokenizer(None), load_source(None).eval()
windows = token_windows(tok, stdlib_texts("heldout"), N, 6)
i, j = torch.arange(N)[:, None], torch.arange(N)[None]
patterns = {
    "full causal": j <= i,
    "chunk-local (BSBR's local part)": (j <= i) & (j >= i // B * B),
    **{f"chunk + previous {w} tokens": (j <= i) & (j >= i // B * B - w) for w in (16, 64, 128)},
    "sliding window 256": (j <= i) & (j > i - B),
    # StreamingLLM-style attention sinks: the sequence's first S tokens stay visible to every query.
    **{f"sliding window 256 + {s} sinks": (j <= i) & ((j > i - B) | (j < s)) for s in (1, 4)},
    "chunk-local + 4 sinks": (j <= i) & ((j >= i // B * B) | (j < 4)),
    "chunk + previous chunk": (j <= i) & (j >= (i // B - 1) * B),
    "chunk + previous chunk + 4 sinks": (j <= i) & ((j >= (i // B - 1) * B) | (j < 4)),
}
out = {}
for name, allowed in patterns.items():
    mask = torch.zeros(N, N).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]
    out[name] = perplexity_past(src, windows, B, attention_mask=mask)
    print(f"{name:<36} ppl {out[name]:.3f}", flush=True)
write_json(dict(windows=len(windows), seq_len=N, chunk_size=B, ppl_past_first_chunk=out,
                command="python benchmarks/local_window_variants.py " + " ".join(sys.argv[1:])), OUT)
