"""Runs one pytest module as a Bazel `py_test` (the `main` of every target in tests/BUILD).

    python tests/pytest_main.py tests/test_layers.py [PYTEST ARGS...]

The test modules are pytest modules (no `__main__` block), so a `py_test` with the module as
`main` would run nothing and pass. This runner runs pytest on the module and exits with its
status. Like README's test command it deselects `@pytest.mark.slow` tests unless a `-m`
expression is given (`bazel test //tests:all --test_arg=-mslow`). A module that collects no
test at all fails; one whose tests are all deselected passes and says so.

After the run it checks that first-party code (`mamlpp_tf`, `mamlpp_tf_export`, the test
helpers) was imported from the runfiles tree, not from a checkout or an editable install that
happens to be on `sys.path`, so a missing `deps` entry fails instead of passing by accident.
"""

import os
import sys

FIRST_PARTY = ("mamlpp_tf", "mamlpp_tf_export", "conftest")


def _runfiles_root() -> str:
    """The workspace directory inside the runfiles tree (the test's cwd under Bazel)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _outside_runfiles(root: str) -> list[str]:
    """First-party modules loaded from anywhere but the runfiles tree."""
    bad = []
    for name, module in sorted(sys.modules.items()):
        if name.split(".")[0] not in FIRST_PARTY:
            continue
        path = getattr(module, "__file__", None)
        if path and not os.path.abspath(path).startswith(root + os.sep):
            bad.append(f"{name} from {path}")
    return bad


class _Counter:
    """Counts collected and deselected items to tell 'all slow' from 'nothing here'."""

    def __init__(self):
        self.selected = 0
        self.deselected = 0

    def pytest_deselected(self, items):
        self.deselected += len(items)

    def pytest_collection_finish(self, session):
        self.selected = len(session.items)


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    root = _runfiles_root()
    # Python puts the script's directory, symlinks resolved, first on sys.path: under Bazel
    # that is the source tree's tests/ folder, which must not shadow the runfiles copies.
    here = os.path.dirname(os.path.realpath(__file__))
    if here != os.path.dirname(os.path.abspath(__file__)):
        sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]

    import pytest  # pylint: disable=g-import-not-at-top

    module, extra = argv[0], argv[1:]
    args = [module, "-p", "no:cacheprovider", "-o", "console_output_style=classic"]
    tmp = os.environ.get("TEST_TMPDIR")
    if tmp:
        # Everything a test writes goes to Bazel's per-test temporary directory: tmp_path
        # (not /tmp/pytest-of-$USER, shared with every other pytest run on the machine),
        # Hypothesis' example database (else ./.hypothesis in the runfiles tree; pytest's
        # cache is switched off for the same reason) and matplotlib's config.
        if not any(a.startswith("--basetemp") for a in extra):
            args.append("--basetemp=" + os.path.join(tmp, "pytest"))
        os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(tmp, "hypothesis"))
        os.environ.setdefault("MPLCONFIGDIR", os.path.join(tmp, "matplotlib"))
    if not any(a == "-m" or a.startswith("-m") and not a.startswith("--") for a in extra):
        args += ["-m", "not slow"]
    xml = os.environ.get("XML_OUTPUT_FILE")
    if xml:
        args.append(f"--junitxml={xml}")
    print(f"pytest_main: {sys.executable} -m pytest {' '.join(args + extra)}", flush=True)
    counter = _Counter()
    status = int(pytest.main(args + extra, plugins=[counter]))

    if status == pytest.ExitCode.NO_TESTS_COLLECTED:
        if counter.deselected:
            print(f"pytest_main: all {counter.deselected} tests of {module} deselected by "
                  "the -m expression (README's default deselects slow tests)")
            status = 0
        else:
            print(f"pytest_main: {module} has no tests", file=sys.stderr)
    stray = _outside_runfiles(root)
    if stray:
        print("pytest_main: first-party modules imported from outside the runfiles tree "
              f"{root} (missing from the target's deps?):\n  " + "\n  ".join(stray),
              file=sys.stderr)
        status = status or 1
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
