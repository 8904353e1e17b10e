"""The install: export/ becomes the package `mamlpp_tf_export`, and no top-level `export`."""

import ast
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

# Where each module imports from when `import NAME` runs (without importing it).
ORIGINS = r"""
import importlib.util, json, sys
print(json.dumps({name: importlib.util.find_spec(name).origin for name in sys.argv[1:]}))
"""


# `python -m export.X` strings: the modules of the export folder under its folder's name.
EXPORT_MODULES = {f"export.{name[:-3]}" for name in os.listdir(os.path.join(ROOT, "export"))
                  if name.endswith(".py")}


def _origins(names: list[str], cwd: str, path: str) -> dict[str, str]:
    """The files that `import NAME` would load in a new process, run in `cwd`."""
    result = subprocess.run([sys.executable, "-c", ORIGINS, *names], cwd=cwd,
                            env=dict(os.environ, PYTHONPATH=path), capture_output=True,
                            text=True, timeout=120, check=True)
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """`pip install --no-deps --target` of a copy of the sources (no build files in ROOT)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("setup.py", "README.md"):
        shutil.copy(os.path.join(ROOT, name), source)
    for folder in ("mamlpp_tf", "export"):
        shutil.copytree(os.path.join(ROOT, folder), source / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return target


def test_export_installs_as_mamlpp_tf_export_with_its_serving_files(installed):
    tops = {name for name in os.listdir(installed) if not name.endswith(".dist-info")}
    assert tops == {"mamlpp_tf", "mamlpp_tf_export"}
    package = installed / "mamlpp_tf_export"
    assert (package / "client.py").is_file() and (package / "__init__.py").is_file()
    assert sorted(os.listdir(package / "serving")) == sorted(
        os.listdir(os.path.join(ROOT, "export", "serving")))
    assert not (package / "from_checkout").exists()  # The checkout's stand-in stays there.


def test_an_install_wins_over_a_folder_named_mamlpp_tf_in_the_working_directory(
        installed, tmp_path):
    # The parent folder of a clone named mamlpp_tf: `mamlpp_tf/` without __init__.py,
    # a namespace package for Python, which a regular package later on sys.path beats.
    (tmp_path / "mamlpp_tf" / "export").mkdir(parents=True)
    origins = _origins(["mamlpp_tf", "mamlpp_tf_export"], str(tmp_path), str(installed))
    assert origins == {"mamlpp_tf": str(installed / "mamlpp_tf" / "__init__.py"),
                       "mamlpp_tf_export": str(installed / "mamlpp_tf_export" / "__init__.py")}


def test_the_checkouts_stand_in_loads_the_export_folder_as_mamlpp_tf_export(tmp_path):
    # A copy, so that the venv's install of this checkout cannot be what answers.
    shutil.copytree(os.path.join(ROOT, "export"), tmp_path / "export",
                    ignore=shutil.ignore_patterns("__pycache__"))
    stand_in = str(tmp_path / "export" / "from_checkout")
    code = ("import mamlpp_tf_export, mamlpp_tf_export.serving_requests as module; "
            "print(mamlpp_tf_export.__file__, module.__name__, module.__file__)")
    result = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path),
                            env=dict(os.environ, PYTHONPATH=stand_in), capture_output=True,
                            text=True, timeout=120, check=True)
    folder = tmp_path / "export"
    assert result.stdout.split() == [str(folder / "__init__.py"),
                                     "mamlpp_tf_export.serving_requests",
                                     str(folder / "serving_requests.py")]


def _top_level_export_imports(path: str) -> list[str]:
    """`import export...`, `from export...` and `-m export.X` strings in one module."""
    with open(path, encoding="utf-8") as stream:
        tree = ast.parse(stream.read(), path)
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
        elif isinstance(node, ast.Constant) and node.value in EXPORT_MODULES:
            names = [node.value]
        found += [f"{path}:{node.lineno}: {name}" for name in names
                  if name.split(".")[0] == "export"]
    return found


def test_no_module_imports_a_top_level_export_package():
    found = []
    for directory, folders, names in os.walk(ROOT):
        folders[:] = [f for f in folders if not f.startswith((".", "bazel-", "build"))
                      and not f.endswith(".egg-info") and f != "__pycache__"]
        found += [line for name in names if name.endswith(".py")
                  for line in _top_level_export_imports(os.path.join(directory, name))]
    assert not found, "export/ installs as mamlpp_tf_export:\n" + "\n".join(found)
