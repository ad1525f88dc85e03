"""``bsbr demo`` (the README's main command) end to end on a tiny local llama: exit status, every
output file, the summary, and no overwrite of a non-empty --output."""
import json

from cli_checks import one_error_line, tree_hash

from bsbr.cli import main


def test_demo_writes_model_eval_and_speed(models, tmp_path, capsys):
    source, _, _ = models
    out = tmp_path / "demo"
    args = ["demo", "--source", str(source), "--output", str(out), "--chunk-size", "8", "--seq-len", "160",
            "--max-windows", "1", "--speed-lens", "32", "--decode-contexts", "24", "--repeats", "1"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "=== summary ===" in text and "gap closed" in text and "decode at" in text
    for name in ("eval.json", "eval.png", "speed.json", "speed.png", "model/config.json", "model/model.safetensors"):
        assert (out / name).is_file(), name
    ev = json.loads((out / "eval.json").read_text())
    assert set(ev["passkey"]["models"]) == {"source", "window", "bsbr"}
    assert json.loads((out / "model" / "config.json").read_text())["retrieval_blocks"] > 0
    before = tree_hash(out)
    assert main(args) == 2  # a second run does not replace the first without --overwrite
    assert "--overwrite" in one_error_line(capsys.readouterr().err, "demo")
    assert tree_hash(out) == before
