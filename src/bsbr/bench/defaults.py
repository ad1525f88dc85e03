"""The benchmarks' defaults, in a module that imports nothing heavy: ``bsbr bench NAME --help`` shows them
without importing torch (:mod:`bsbr.bench.parsers`)."""
DEFAULT_THREADS = 1  # docs/findings.md, Speed: side-by-side ratios that hold on a shared machine
MAX_THREADS = 1024  # torch.set_num_threads overflows far above; no machine has more

DEFAULT_SEQ_LENS = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
DEFAULT_MODEL_SEQ_LENS = (8192, 16384, 32768, 65536)  # bench attention --model-scaling
CALIBRATION_LEN = 1024  # a baseline's first length past this is predicted from one call at this length
# bench converted, per prefill: the default run's longest (the source at 32k, ~11 min predicted) passes, 10x not
MAX_SECONDS = 7200.0

# bench models: every model of bsbr.bench.models.model_specs, and those run by default
SHELL_MODELS = ("standard", "bsbr", "bsbr_normalized", "bsbr_blocks4", "sliding_window", "linear", "deltanet",
                "hopfield", "gau")
DEFAULT_SHELL_MODELS = ("standard", "bsbr", "sliding_window", "linear", "deltanet", "hopfield", "gau")

# bench quality: every model of bsbr.bench.quality.quality_specs, those run by default, and run_quality's settings
QUALITY_MODELS = ("standard", "sliding_window", "bsbr", "bsbr_normalized", "bsbr_blocks2", "bsbr_compressed4",
                  "bsbr_gated", "bsbr_normalized_gated", "linear", "deltanet", "hopfield", "gau", "bsbr_chunk32",
                  "sliding_window_32", "bsbr_chunk128", "sliding_window_128")
DEFAULT_QUALITY_MODELS = ("standard", "sliding_window", "bsbr", "bsbr_normalized", "bsbr_blocks2", "bsbr_compressed4",
                          "linear", "deltanet", "hopfield", "gau")
QUALITY_TRAINING = dict(models=DEFAULT_QUALITY_MODELS, chunk_size=64, hidden=128, layers=2, heads=4, ff_dim=512,
                        seq_len=512, batch=8, steps=300, lr=2e-3, eval_windows=64, seed=0, corpus=None)
