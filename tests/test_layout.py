"""The layout: model/, ingest/ and migrations/ install as memstore.model, memstore.ingest and
memstore.migrations, so a user's own model.py or ingest/ never shadows them; the storage layer
imports nothing above it."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMPORTS = ("import memstore, memstore.model.generate, memstore.ingest.pipeline, memstore.store, "
           "memstore.cli, memstore.server; from memstore.store import db; "
           "print(memstore.model.generate.__name__, db.MIGRATIONS_DIR.joinpath('env.py').is_file())")


def _shadowing_dir(tmp_path: Path) -> Path:
    """A working directory like an ML project's: its own model.py and ingest/ package."""
    work = tmp_path / "project"
    (work / "ingest").mkdir(parents=True)
    (work / "model.py").write_text("raise SystemExit('the user model.py was imported')\n")
    (work / "ingest" / "__init__.py").write_text("raise SystemExit('the user ingest/ was imported')\n")
    return work


def test_imports_from_a_directory_holding_model_py(tmp_path):
    work = _shadowing_dir(tmp_path)
    out = subprocess.run([sys.executable, "-c", IMPORTS], cwd=work, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["memstore.model.generate", "True"]


def test_wheel_installs_every_layer_under_memstore(tmp_path):
    source = tmp_path / "source"  # a copy: building in the checkout would leave build/ behind
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "bench", ".*cache",
                                                                "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(source)],
                   check=True, capture_output=True, timeout=600)
    [wheel] = (tmp_path / "dist").glob("memstore-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"memstore"}
    for needed in ("memstore/model/generate.py", "memstore/ingest/loaders.py", "memstore/store/lexical.py",
                   "memstore/migrations/env.py", "memstore/migrations/script.py.mako",
                   "memstore/migrations/versions/0001_initial_schema.py", "memstore/static/index.html"):
        assert needed in names, needed
    # installed in a fresh environment (dependencies from this one) and imported beside a user's model.py
    env = tmp_path / "venv"
    venv.create(env, system_site_packages=True, with_pip=True)
    python = env / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True,
                   capture_output=True, timeout=300)
    out = subprocess.run([str(python), "-c", IMPORTS + "; print(memstore.__file__)"], cwd=_shadowing_dir(tmp_path),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert str(env) in out.stdout.split()[-1]  # the wheel's copy, not this checkout's


LAYERS = {  # folder -> memstore packages it must not import
    ROOT / "memstore" / "store": ("memstore.model", "memstore.ingest", "memstore.api", "memstore.cli",
                                  "memstore.server", "memstore.demo"),
    ROOT / "model": ("memstore.ingest", "memstore.api", "memstore.cli", "memstore.server"),
    ROOT / "ingest": ("memstore.model", "memstore.api", "memstore.cli", "memstore.server"),
}


@pytest.mark.parametrize("folder", list(LAYERS), ids=lambda p: p.name)
def test_imports_run_one_way(folder):
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert not name.startswith(LAYERS[folder]), f"{path.relative_to(ROOT)} imports {name}"
