"""The research scripts in benchmarks/ refuse bad arguments in one line, before a model loads (a run of
minutes ended in a traceback, wrote a file named --json, or replaced a Python file with JSON)."""
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.slow
@pytest.mark.parametrize("argv, words", [
    (["zero_shot_variants.py", "--json", "out.json"], "unrecognized arguments: --json"),
    (["decode_context_ratio.py", "--contexts", "16", "32", "--rounds", "0"], "argument --rounds: must be an integer"),
    (["modes_speed.py", "--models", "exact", "exact"], "--models exact is given twice"),
    (["router_oracle_probe.py", "--select", "router", "--seq-len", "3000"], "--seq-len"),
    (["score_dtype_probe.py", "--json", "script.py"], "--json"),
    (["passkey_spots.py", "model", "--length", "100", "--depth", "0.5", "--json", "notlist.json"],
     "holds no JSON list to append to"),
    (["needle_selection_probe.py", "missing", "--length", "100", "--depth", "0.5"], "model missing does not exist"),
    (["recall_selection_probe.py", "missing", "0.5", "out.json"], "MODEL_DIR missing does not exist"),
    (["passkey_spots.py", "model", "--length", "100", "--depth", "1.5"], "depth must lie in [0, 1], got 1.5"),
    (["recall_oracle_probe.py", "--length", "600", "--depths", "1.5"], "depth must lie in [0, 1], got 1.5"),
    (["needle_rank_probe.py", "--depths", "-0.1"], "depth must lie in [0, 1], got -0.1"),
    (["recall_head_budget_probe.py", "--depths", "2"], "depth must lie in [0, 1], got 2"),
    (["needle_selection_probe.py", "model", "--length", "100", "--depth", "x"], "must be a number in [0, 1]"),
    (["recall_selection_probe.py", "model", "0.5,1.5", "out.json"], "depth must lie in [0, 1], got 1.5"),
])
def test_a_script_refuses_a_bad_argument_before_loading(tmp_path, argv, words):
    (tmp_path / "model").mkdir()  # (what the checks read of a saved BSBR model)
    (tmp_path / "model" / "config.json").write_text('{"model_type": "bsbr"}')
    (tmp_path / "model" / "model.safetensors").write_bytes(b"")  # (its weights are there: checked by name)
    (tmp_path / "notlist.json").write_text('{"a": 1}')
    (tmp_path / "script.py").write_text("print('mine')\n")
    run = subprocess.run([sys.executable, str(SCRIPTS / argv[0]), *argv[1:]], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2, run.stderr[-2000:]
    last = run.stderr.strip().splitlines()[-1]
    assert words in last and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert (tmp_path / "script.py").read_text() == "print('mine')\n" and not (tmp_path / "out.json").exists()
