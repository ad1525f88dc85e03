"""What a user installing bsbr gets: declared dependencies that cover what the code and the loaders it calls
need, and a source distribution that carries the tests and the set-up its README's test command runs."""
import ast
import importlib.metadata
import re
import sys
import tarfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# packages no bsbr module imports, which the paths bsbr takes through transformers need
NEEDED_BY_TRANSFORMERS = {"accelerate": "transformers loads a .gguf source (the default model) only with it"}


def _declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(requirements):
        return {re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0].lower().replace("-", "_") for r in requirements}
    extras = project["optional-dependencies"].values()
    return names(project["dependencies"]), names(r for extra in extras for r in extra)


def test_every_package_the_code_imports_is_declared():
    # accelerate was needed for the default model and declared nowhere (a test extra's package brought it in CI);
    # packaging was imported and undeclared; datasets was named by an error message only
    required, optional = _declared()
    distributions = importlib.metadata.packages_distributions()
    undeclared = {}
    for f in sorted((ROOT / "src" / "bsbr").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            for top in {m.split(".")[0] for m in modules} - set(sys.stdlib_module_names) - {"bsbr"}:
                if not {d.lower().replace("-", "_") for d in distributions.get(top, [top])} & (required | optional):
                    undeclared.setdefault(top, str(f.relative_to(ROOT)))
    assert not undeclared, undeclared
    assert set(NEEDED_BY_TRANSFORMERS) <= required


def test_the_source_distribution_carries_the_tests_and_their_set_up(tmp_path, monkeypatch):
    # it held src/, README, LICENSE and pyproject alone: pytest in it found no tests, and the README's
    # scripts/setup.sh was missing
    import shutil

    import setuptools.build_meta

    project = tmp_path / "project"  # (a copy without the egg-info an earlier build left: setuptools reads its list)
    shutil.copytree(ROOT, project, ignore=shutil.ignore_patterns(".*", "*.egg-info", "__pycache__", "build", "dist"))
    monkeypatch.chdir(project)
    name = setuptools.build_meta.build_sdist(str(tmp_path))
    with tarfile.open(tmp_path / name) as sdist:
        files = {n.split("/", 1)[1] for n in sdist.getnames() if "/" in n}
    assert {"scripts/setup.sh", "tests/conftest.py", "tests/model_sources.py", "benchmarks/decode_context_ratio.py",
            "docs/design.md", "docs/findings.md", "CHANGELOG.md", "README.md", "src/bsbr/cli.py"} <= files
    assert {f for f in files if f.startswith("tests/cli/data/")} and not {f for f in files if "__pycache__" in f}
