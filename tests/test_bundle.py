"""`golf bundle`: import stripping, collisions, the self-extracting wrapper, and a run without golf."""

from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from golf.bundle import (
    BUNDLE_MODULES,
    READABLE_NAME,
    WRAPPER_NAME,
    BundleError,
    bundle,
    merge_sources,
    read_package_sources,
    top_level_bindings,
    verify_bundle,
)
from golf.config import load_config

PACKAGE = Path(__file__).resolve().parents[1] / "golf"

MOD_A = '''"""Module a: its docstring must go."""
from __future__ import annotations

import os
from typing import Any

LIMIT = 3


def helper(x: Any) -> int:
    """Docstring only."""
    return x + LIMIT
'''

MOD_B = '''from __future__ import annotations, division

import os
from typing import Any

from golf.a import (
    LIMIT,
    helper,
)


class Thing:
    """Only a docstring: the class body must keep a statement."""


def entry() -> int:
    from golf.a import helper
    return helper(LIMIT) + len(os.sep)


if __name__ == "__main__":
    raise SystemExit("module guards are dropped")
'''


def _no_golf_env(tmp_path: Path) -> dict[str, str]:
    """An environment where `import golf` fails: a fake golf package first on PYTHONPATH."""
    fake = tmp_path / "no_golf"
    (fake / "golf").mkdir(parents=True, exist_ok=True)
    (fake / "golf" / "__init__.py").write_text("raise ImportError('golf must not be needed by the bundle')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("GOLF_PRESET", "GOLF_OUT_DIR")}
    env["PYTHONPATH"] = str(fake)
    probe = subprocess.run([sys.executable, "-c", "import golf"], env=env, cwd=tmp_path, capture_output=True)
    assert probe.returncode != 0 and b"must not be needed" in probe.stderr
    return env


def test_merge_strips_sibling_imports_docstrings_and_guards():
    merged, names = merge_sources({"a": MOD_A, "b": MOD_B})
    tree = ast.parse(merged)
    assert merged.startswith("from __future__ import annotations, division\n")
    assert merged.count("from __future__") == 1
    imports = [ast.unparse(n) for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert imports and not any("golf" in line for line in imports)
    assert "docstring" not in merged.lower() and "__main__" not in merged
    assert {"LIMIT", "helper", "Thing", "entry", "os", "Any"} <= names
    namespace: dict = {"__name__": "__main__"}
    exec(compile(merged, "merged", "exec"), namespace)
    assert namespace["entry"]() == 7


@pytest.mark.parametrize("b_source, message", [
    ("def helper():\n    pass\n", "'helper' is bound in both golf/a.py and golf/b.py"),
    ("LIMIT: int = 4\n", "'LIMIT' is bound in both golf/a.py and golf/b.py"),
    ("try:\n    pass\nexcept ImportError:\n    helper = None\n", "'helper' is bound in both"),
    ("from collections import OrderedDict as Any\n", "'Any' is bound in both"),
    ("def reset():\n    global LIMIT\n    LIMIT = 0\n", "'LIMIT' is bound in both"),
])
def test_collisions_name_both_modules(b_source, message):
    with pytest.raises(BundleError, match=message):
        merge_sources({"a": MOD_A, "b": b_source})


def test_same_import_in_two_modules_is_not_a_collision():
    same = "import os\nfrom typing import Any\n"
    merged, _ = merge_sources({"a": same, "b": same})
    assert merged.count("import os") == 2


@pytest.mark.parametrize("b_source, message", [
    ("import golf.a\n", "golf/b.py:1: 'import golf.a' is not bundle-safe"),
    ("from . import a\n", "golf/b.py:1: relative imports"),
    ("from golf.a import helper as h\n", "golf/b.py:1: 'helper as h' renames"),
    ("x = 1\nfrom golf.a import nothing\n", "golf/b.py:2: golf/a.py has no top-level name 'nothing'"),
    ("from golf.download import fetch\n", "golf/b.py:1: imports from golf.download, which is not one of"),
    ("from golf import a\n", "golf/b.py:1: imports from golf, which is not one of"),
])
def test_unsafe_sibling_imports_are_refused(b_source, message):
    with pytest.raises(BundleError, match=message.replace("(", r"\(")):
        merge_sources({"a": MOD_A, "b": b_source})


def test_module_level_import_from_a_later_module_is_refused():
    with pytest.raises(BundleError, match="golf/a.py:1: imports golf.b at module level, which comes later"):
        merge_sources({"a": "from golf.b import y\n", "b": "y = 1\n"})
    merged, _ = merge_sources({"a": "def f():\n    from golf.b import y\n    return y\n", "b": "y = 1\n"})
    assert "def f():\n    return y" in merged  # a call-time import of a later module is fine


def test_real_package_bundles_without_collisions():
    merged, names = merge_sources(read_package_sources())
    assert {"run_from_env", "GPT", "Muon", "train", "load_config", "GolfError"} <= names
    compile(merged, "merged", "exec")
    for name in BUNDLE_MODULES:
        assert f"# ==== golf.{name} ====" in merged


def test_every_top_level_name_is_unique_across_the_package():
    owner: dict[str, tuple[str, str]] = {}
    for path in sorted(PACKAGE.glob("*.py")):
        if path.stem in ("__init__", "__main__"):
            continue
        for name, kind in top_level_bindings(ast.parse(path.read_text())).items():
            if kind.startswith("import:golf") or (name.startswith("__") and name.endswith("__")):
                continue
            prior = owner.setdefault(name, (path.name, kind))
            assert prior == (path.name, kind) or (prior[1] == kind and kind.startswith("import:")), (
                f"{name!r} is bound in both golf/{prior[0]} and golf/{path.name}")


def _fake_package(root: Path) -> Path:
    """The real config module plus stand-ins whose run_from_env echoes what it was given."""
    pkg = root / "pkg"
    pkg.mkdir()
    for name in BUNDLE_MODULES:
        path = pkg.joinpath(*name.split(".")).with_suffix(".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{name.upper().replace('.', '_')}_LOADED = True\n")
    (pkg / "config.py").write_text((PACKAGE / "config.py").read_text())
    (pkg / "run.py").write_text(
        "import hashlib, json, os, sys\nfrom golf.config import Config\n\n\n"
        "def run_from_env(embedded_config=None):\n"
        "    cfg = Config.from_dict(embedded_config)\n    cfg.apply_env()\n"
        "    code = hashlib.sha256(open(sys.modules['__main__'].__file__, 'rb').read()).hexdigest()\n"
        "    print('golf_result ' + json.dumps({'seed': cfg.train.seed, 'layers': cfg.model.num_layers,\n"
        "          'code_sha256': code, 'modules': OPTIM_LOADED and EVAL_LOADED}))\n")
    return pkg


def test_wrapper_decodes_exactly_runs_without_golf_and_refuses_clobbering(tmp_path):
    pkg = _fake_package(tmp_path)
    out = tmp_path / "out"
    cfg = load_config("tiny", ["num_layers=5", "parallel_from=3"], environ={})
    info = bundle(cfg, out, package_dir=pkg)
    wrapper = (out / WRAPPER_NAME).read_bytes()
    assert wrapper.startswith(b'import lzma,base64,linecache;s=lzma.decompress(base64.b85decode("')
    assert wrapper.endswith(b';exec(compile(s,"train_gpt.py","exec"))')
    assert info.code_bytes == len(wrapper) < info.readable_bytes == (out / READABLE_NAME).stat().st_size
    assert info.code_sha256 == hashlib.sha256(wrapper).hexdigest()
    readable = (out / READABLE_NAME).read_text()
    assert "EMBEDDED_CONFIG = {" in readable and readable.rstrip().endswith("run_from_env(EMBEDDED_CONFIG)")

    env = {**_no_golf_env(tmp_path), "SEED": "42"}
    run = subprocess.run([sys.executable, WRAPPER_NAME], cwd=out, env=env, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.split("golf_result ", 1)[1])
    assert result == {"seed": 42, "layers": 5, "code_sha256": info.code_sha256, "modules": True}

    assert bundle(cfg, out, package_dir=pkg) == info  # identical bytes: kept as they are
    with pytest.raises(BundleError, match="train_gpt_readable.py exists with different contents"):
        bundle(load_config("tiny", environ={}), out, package_dir=pkg)
    assert (out / WRAPPER_NAME).read_bytes() == wrapper
    bundle(load_config("tiny", environ={}), out, package_dir=pkg, overwrite=True)
    assert (out / WRAPPER_NAME).read_bytes() != wrapper

    (out / READABLE_NAME).write_text(readable + "# tampered\n")
    with pytest.raises(BundleError, match="does not decode to"):
        verify_bundle(out)
    (out / WRAPPER_NAME).write_bytes(wrapper.replace(b"exec(compile", b"print(compile"))
    with pytest.raises(BundleError, match="not a golf wrapper"):
        verify_bundle(out)


def test_bundle_ignores_the_bundling_shell_environment(tmp_path, monkeypatch):
    pkg = _fake_package(tmp_path)
    monkeypatch.setenv("SEED", "7")
    monkeypatch.setenv("NUM_LAYERS", "3")
    info = bundle(load_config("tiny", environ={}), tmp_path / "b", package_dir=pkg)
    embedded = info.readable.read_text().split("EMBEDDED_CONFIG = ", 1)[1].split("\nif __name__")[0]
    config = ast.literal_eval(embedded)
    assert config["train"]["seed"] == load_config("tiny", environ={}).train.seed
    assert config["model"]["num_layers"] == 6


def test_bundle_runs_tiny_preset_end_to_end_without_golf(tmp_path, tiny_data, tiny_tokenizer):
    out = tmp_path / "bundle"
    info = bundle(load_config("tiny", environ={}), out)
    env = {**_no_golf_env(tmp_path), "SEED": "42", "DATA_PATH": str(tiny_data),
           "TOKENIZER_PATH": str(tiny_tokenizer), "ITERATIONS": "4", "WARMUP_STEPS": "0",
           "TRAIN_BATCH_TOKENS": "1024", "OUT_DIR": str(tmp_path / "train"), "GPTQ_CALIB_BATCHES": "2",
           "TTT_CHUNK_TOKENS": "512"}  # the 8 validation documents are ~800 tokens: two TTT chunks
    run = subprocess.run([sys.executable, WRAPPER_NAME], cwd=out, env=env, capture_output=True, text=True,
                         timeout=300)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-3000:]
    assert f"Code size: {info.code_bytes} bytes" in log
    size_line = next(line for line in log.splitlines() if line.startswith("Total submission size"))
    result = json.loads(next(line for line in log.splitlines() if line.startswith("golf_result "))[12:])
    assert math.isfinite(result["final"]["val_bpb"]) and 0 < result["final"]["val_bpb"] < 20
    assert result["seed"] == 42 and result["steps"] == 4
    assert result["sliding"] is not None and result["ttt"] is not None and result["ttt_mode"] == "sgd"
    assert result["config"]["data"]["data_path"] == str(tiny_data)  # env overrides reach the embedded config
    assert result["code_sha256"] == info.code_sha256 and result["bytes_code"] == info.code_bytes
    artifact = out / "final_model.golf"
    assert artifact.exists() and result["bytes_model"] == artifact.stat().st_size
    assert size_line.endswith(f"{result['bytes_total']} bytes")
