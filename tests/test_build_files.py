"""The BUILD files keep up with the code: tools/build_check.py passes here and finds faults."""

import ast
import dataclasses
import importlib.util
import os
import pathlib
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_build_check():
    """tools/build_check.py as the module `build_check` (tools/ is no package)."""
    spec = importlib.util.spec_from_file_location(
        "build_check", os.path.join(ROOT, "tools", "build_check.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # Its dataclasses look their module up there.
    spec.loader.exec_module(module)
    return module


build_check = _load_build_check()

# A workspace with a library, a subpackage that its glob must leave out, and a test.
TREE = {
    "BUILD": "",
    "lib/BUILD": """\
        py_library(
            name = "lib",
            srcs = glob(["**/*.py"], exclude = ["scripts/*.py"]),
            imports = [".."],
        )
        [
            py_binary(name = name, srcs = ["tool.py"], main = main, deps = [":lib"])
            for name, main in [("tool", "tool.py"), ("gone", "gone.py")]
        ]
        py_binary(name = "other", srcs = ["core.py"], main = "tool.py", deps = [":lib"])
        """,
    "lib/__init__.py": "",
    "lib/core.py": "from lib import util\n",
    "lib/util.py": "",
    "lib/tool.py": "from . import core\n",
    "lib/scripts/stray.py": "",
    "lib/plugins/BUILD": 'py_library(name = "plugins", srcs = glob(["*.py"]))\n',
    "lib/plugins/__init__.py": "",
    "lib/plugins/extra.py": "",
    "checks/BUILD": """\
        py_test(
            name = "test_app",
            srcs = ["test_app.py"],
            data = ["notes.txt"],
            deps = DEPS,
        )
        """,
    "checks/notes.txt": "",
    "checks/test_app.py": """\
        import os
        import subprocess
        import sys

        from lib import core

        ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


        def test_app():
            subprocess.run([sys.executable, "-m", "lib.tool"], cwd=ROOT, check=True)
            subprocess.run([sys.executable, "-c", "import lib.plugins.extra"], check=True)
            assert open(os.path.join(ROOT, "checks", "notes.txt")).read() == ""
            assert open(os.path.join(ROOT, "guides/first.md")).read() == ""
        """,
    "guides/first.md": "",
}


def write_tree(root: pathlib.Path, deps: str) -> str:
    """Writes TREE under `root`, with `deps` as the test's deps; returns `root`."""
    for name, text in TREE.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).replace("DEPS", deps))
    return str(root)


def without(workspace, label: str, **removed: list[str]):
    """A copy of `workspace` whose target `label` lacks the `removed` labels (by attribute)."""
    target = workspace.targets[label]
    target = dataclasses.replace(target, **{
        attribute: tuple(item for item in getattr(target, attribute) if item not in labels)
        for attribute, labels in removed.items()})
    return dataclasses.replace(workspace, targets={**workspace.targets, label: target})


@pytest.fixture(scope="module")
def workspace():
    return build_check.load(ROOT)


def new_problems(workspace, changed) -> set:
    """The problems of the workspace `changed` that `workspace` does not have."""
    return set(build_check.check(changed)) - set(build_check.check(workspace))


def test_the_build_files_cover_the_code(workspace):
    problems = build_check.check(workspace)
    assert not problems, "the BUILD files fall behind the code:\n" + "\n".join(map(str, problems))


def test_this_target_holds_every_file_that_the_check_reads(workspace):
    # Under Bazel the check sees this target's runfiles only.
    needed = set(workspace.build_files) | set(workspace.modules)
    for label in workspace.targets:
        needed |= workspace.runfiles(label)
    assert sorted(needed - workspace.runfiles("//tests:test_build_files")) == []


def test_a_dep_removed_from_a_test_that_imports_it_is_reported(workspace):
    label = "//tests:test_files"  # It imports mamlpp_tf_export.saved_models.
    problems = new_problems(workspace, without(workspace, label, deps=["//export:export"]))
    assert {p.target for p in problems} == {label}
    subjects = {p.subject for p in problems}
    assert {"export/__init__.py", "export/saved_models.py"} <= subjects
    assert subjects <= workspace.runfiles("//export:export")
    assert any("tests/test_files.py imports mamlpp_tf_export.saved_models" in str(p)
               for p in problems)


@pytest.mark.parametrize("label, entry, files", [
    ("//tests:test_runs", "//export:export", {"export/saved_models.py", "export/warmup.py"}),
    ("//tests:test_readme", "//:README.md", {"README.md"}),
])
def test_a_data_entry_removed_from_a_test_that_reads_it_is_reported(workspace, label, entry,
                                                                    files):
    problems = new_problems(workspace, without(workspace, label, data=[entry]))
    assert {(p.target, p.subject) for p in problems} == {(label, file) for file in files}


def test_glob_follows_bazel(tmp_path):
    targets = build_check.load(write_tree(tmp_path, "[]")).targets
    # Recursive, with the exclusion, without the subpackage lib/plugins.
    assert targets["//lib:lib"].srcs == tuple(
        f"//lib:{name}.py" for name in ("__init__", "core", "tool", "util"))
    assert targets["//lib:lib"].imports == ("",)
    assert targets["//lib/plugins:plugins"].srcs == ("//lib/plugins:__init__.py",
                                                     "//lib/plugins:extra.py")


def test_every_kind_of_fault_is_reported(tmp_path):
    problems = build_check.check(build_check.load(write_tree(tmp_path, '["//nothing"]')))
    assert {(p.target, p.subject) for p in problems} == {
        ("//lib", "lib/scripts/stray.py"),  # In no target.
        ("//lib:gone", "lib/gone.py"),  # A main that does not exist...
        ("//lib:other", "lib/tool.py"),  # ...or is not in srcs.
        ("//checks:test_app", "//nothing:nothing"),  # A dep that names nothing.
        # What the test imports, directly or not, runs with -m or -c, or reads.
        *(("//checks:test_app", f"lib/{name}.py") for name in (
            "__init__", "core", "util", "tool", "plugins/__init__", "plugins/extra")),
        ("//checks:test_app", "guides/first.md"),
    }
    messages = "\n".join(map(str, problems))
    assert "//lib: lib/scripts/stray.py is in the srcs of no py_library" in messages
    assert "checks/test_app.py imports lib.core, but lib/core.py is not" in messages
    assert "lib/core.py imports lib.util, but lib/util.py is not" in messages
    assert "checks/test_app.py names guides/first.md, which is not" in messages


def test_a_fixed_workspace_has_no_fault(tmp_path):
    root = write_tree(tmp_path, '["//lib", "//lib/plugins"]')
    (tmp_path / "lib" / "scripts" / "stray.py").unlink()
    for build, old, new in [
            ("lib/BUILD", '"gone.py"', '"tool.py"'),
            ("lib/BUILD", '["core.py"]', '["core.py", "tool.py"]'),
            ("checks/BUILD", '["notes.txt"]', '["notes.txt", "//:guides/first.md"]')]:
        path = tmp_path / build
        path.write_text(path.read_text().replace(old, new))
    assert build_check.check(build_check.load(root)) == []


def _setup_keyword(name: str):
    """The literal value of keyword `name` of setup.py's `setuptools.setup(...)` call."""
    with open(os.path.join(ROOT, "setup.py"), encoding="utf-8") as stream:
        tree = ast.parse(stream.read())
    call = next(node for node in ast.walk(tree) if isinstance(node, ast.Call)
                and ast.unparse(node.func) == "setuptools.setup")
    return ast.literal_eval(next(k.value for k in call.keywords if k.arg == name))


def test_setup_and_the_build_check_map_the_same_folders():
    """setup.py installs export/ as the package the build check resolves imports to."""
    assert _setup_keyword("package_dir") == build_check.PACKAGE_DIRS
