"""Checks, without Bazel, that the BUILD files keep up with the code.

    python tools/build_check.py [WORKSPACE]   # one line per problem; exit status 1 if any

Evaluates every BUILD file of the workspace as Python, with stubs for the rules they use, and
reports:

- a first-party module (a `.py` file under a top-level directory with a BUILD file) in the
  srcs of no py_library, py_binary or py_test;
- a py target whose runfiles (srcs, data and deps, transitively) lack a first-party module
  that its sources import, transitively: by `import` and `from` statements, in `python -c`
  programs and as dotted names in string literals (`"-m", "mamlpp_tf.train"`), a package
  of `PACKAGE_DIRS` resolved to its folder;
- a py_test whose runfiles lack a workspace file, or a directory's files, that its own
  package's sources name: as a string literal (`"export/saved_models.py"`) or a path built
  of literals (`os.path.join(ROOT, "flags", "*.cfg")`, `pathlib.Path(__file__).parent /
  "fixtures"`, where ROOT is the workspace);
- a py_binary or py_test whose main is missing or not in its srcs, and a label that names
  no target or file.

tests/test_build_files.py runs the check in the default test suite.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterator
import dataclasses
import itertools
import os
import posixpath
import re
import sys

BUILD_NAMES = ("BUILD", "BUILD.bazel")
PY_RULES = ("py_library", "py_binary", "py_test")
# Calls whose result is a path built of their arguments (and object, for pathlib's methods),
# or their first argument's path.
_PATH_METHODS = {"joinpath", "resolve", "absolute"}
_JOIN_CALLS = {"os.path.join", "posixpath.join", "pathlib.Path", "Path", "joinpath"}
_SAME_CALLS = {"os.path.abspath", "os.path.realpath", "os.path.normpath", "os.fspath", "str",
               "resolve", "absolute"}
_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")
# Packages imported under another name than their folder's (setup.py's `package_dir`); under
# Bazel, export/from_checkout/mamlpp_tf_export/__init__.py loads the folder under that name.
PACKAGE_DIRS = {"mamlpp_tf_export": "export"}


@dataclasses.dataclass(frozen=True)
class Target:
    """One rule of a BUILD file, its labels absolute (`//pkg:name`).

    Attributes:
        label: The target's label.
        kind: The rule, e.g. "py_test".
        srcs: Labels of its srcs.
        deps: Labels of its deps.
        data: Labels of its data.
        main: Label of a py_binary's or py_test's main file, else None.
        imports: Its `imports` directories, workspace-relative.
        actual: Label of an alias' target, else None.
    """

    label: str
    kind: str
    srcs: tuple[str, ...] = ()
    deps: tuple[str, ...] = ()
    data: tuple[str, ...] = ()
    main: str | None = None
    imports: tuple[str, ...] = ()
    actual: str | None = None


@dataclasses.dataclass(frozen=True)
class Problem:
    """A way in which the BUILD files fall behind the code.

    Attributes:
        target: The target at fault, or the package of a module in no target.
        subject: The module or file concerned (workspace-relative) or the bad label.
        message: A readable line naming both.
    """

    target: str
    subject: str
    message: str

    def __str__(self) -> str:
        return self.message


@dataclasses.dataclass(frozen=True)
class Workspace:
    """The evaluated BUILD files of a workspace.

    Attributes:
        root: The workspace directory.
        targets: Every target by label.
        build_files: The BUILD files, workspace-relative.
        modules: The first-party modules, workspace-relative.
        ignored: The directories that .bazelignore names.
    """

    root: str
    targets: dict[str, Target]
    build_files: tuple[str, ...]
    modules: tuple[str, ...]
    ignored: frozenset[str]

    def runfiles(self, label: str) -> set[str]:
        """The workspace files of a target's srcs, data and deps, transitively.

        Args:
            label: A target's label, or a file's (its runfiles are the file).

        Returns:
            Workspace-relative paths.
        """
        files, seen, stack = set(), set(), [label]
        while stack:
            current = stack.pop()
            if current in seen:
                continue
            seen.add(current)
            target = self.targets.get(current)
            if target is None:
                if not current.startswith("@"):
                    files.add(label_path(current))
                continue
            stack += target.srcs + target.deps + target.data
            if target.actual:
                stack.append(target.actual)
        return files

    def exists(self, path: str) -> bool:
        """Whether `path` (workspace-relative) is a file of the workspace."""
        return os.path.isfile(os.path.join(self.root, path))


def label_path(label: str) -> str:
    """The workspace-relative path of a source file's label (`//pkg:dir/name`)."""
    package, _, name = label[2:].partition(":")
    return posixpath.join(package, name)


def _absolute(package: str, label: str) -> str:
    """`label`, written in `package`'s BUILD file, as `//pkg:name`."""
    if label.startswith("@"):
        return label
    if label.startswith("//"):
        name_package, colon, name = label[2:].partition(":")
        return f"//{name_package}:{name if colon else name_package.rsplit('/', 1)[-1]}"
    return f"//{package}:{label.removeprefix(':')}"


def _normalized(path: str) -> str:
    """`path` normalized; "" for the workspace itself."""
    path = posixpath.normpath(path)
    return "" if path == "." else path


def _glob_regex(pattern: str) -> re.Pattern:
    """A regex that matches `path + "/"` for the paths that Bazel's glob `pattern` matches."""
    parts = []
    for segment in pattern.split("/"):
        if segment == "**":
            parts.append("(?:[^/]+/)*")
        else:
            parts.append(re.escape(segment).replace(r"\*", "[^/]*").replace(r"\?", "[^/]") + "/")
    return re.compile("".join(parts))


def _files(root: str, top: str, ignored: frozenset[str], packages: bool) -> Iterator[str]:
    """The workspace-relative files under `top`, as Bazel's globs see them.

    Python caches and hidden, ignored or nested-workspace directories are left out, and other
    packages' directories too unless `packages`.
    """
    for directory, dirnames, filenames in os.walk(os.path.join(root, top)):
        relative = _normalized(os.path.relpath(directory, root))
        kept = []
        for name in sorted(dirnames):
            path = posixpath.join(relative, name)
            marks = set(os.listdir(os.path.join(directory, name)))
            if (name == "__pycache__" or name.startswith(".") or path in ignored
                    or path == "external" or marks & {"WORKSPACE", "WORKSPACE.bazel"}
                    or not packages and marks & set(BUILD_NAMES)):
                continue
            kept.append(name)
        dirnames[:] = kept
        yield from (posixpath.join(relative, name) for name in sorted(filenames))


def _evaluate(root: str, build: str, ignored: frozenset[str], targets: dict[str, Target]):
    """Adds the targets of the BUILD file `build` (workspace-relative) to `targets`."""
    package = posixpath.dirname(build)

    def labels(values) -> tuple[str, ...]:
        return tuple(_absolute(package, value) for value in values)

    def add(kind: str, name: str, **attributes) -> None:
        label = f"//{package}:{name}"
        targets[label] = Target(label=label, kind=kind, **attributes)

    def py_rule(kind: str) -> Callable:
        def rule(name, srcs=(), deps=(), data=(), main=None, imports=(), **_):
            if main is None and kind != "py_library":
                main = name + ".py"
            add(kind, name, srcs=labels(srcs), deps=labels(deps), data=labels(data),
                main=None if main is None else _absolute(package, main),
                imports=tuple(_normalized(posixpath.join(package, i)) for i in imports))
        return rule

    def glob(include, exclude=(), **_) -> list[str]:
        included = [_glob_regex(pattern) for pattern in include]
        excluded = [_glob_regex(pattern) for pattern in exclude]
        found = []
        for path in _files(root, package, ignored, packages=False):
            name = posixpath.relpath(path, package or ".") + "/"
            if (any(r.fullmatch(name) for r in included)
                    and not any(r.fullmatch(name) for r in excluded)):
                found.append(name[:-1])
        return found

    stubs = {kind: py_rule(kind) for kind in PY_RULES}
    stubs.update(
        package=lambda **_: None,
        exports_files=lambda *_, **__: None,
        filegroup=lambda name, srcs=(), data=(), **_: add(
            "filegroup", name, srcs=labels(srcs), data=labels(data)),
        alias=lambda name, actual, **_: add("alias", name, actual=_absolute(package, actual)),
        glob=glob,
    )
    with open(os.path.join(root, build), encoding="utf-8") as stream:
        exec(compile(stream.read(), os.path.join(root, build), "exec"), stubs)


def load(root: str) -> Workspace:
    """Evaluates the BUILD files of the workspace `root`.

    Args:
        root: The workspace directory (the one with WORKSPACE, or a runfiles tree's).

    Returns:
        Its targets, BUILD files and first-party modules.
    """
    ignored = frozenset()
    if os.path.isfile(os.path.join(root, ".bazelignore")):
        with open(os.path.join(root, ".bazelignore"), encoding="utf-8") as stream:
            ignored = frozenset(_normalized(line.strip()) for line in stream
                                if line.strip() and not line.startswith("#"))
    files = list(_files(root, "", ignored, packages=True))
    build_files = tuple(path for path in files if posixpath.basename(path) in BUILD_NAMES)
    targets = {}
    for build in build_files:
        _evaluate(root, build, ignored, targets)
    tops = {path.split("/")[0] for path in build_files if "/" in path}
    modules = tuple(path for path in files
                    if path.endswith(".py") and "/" in path and path.split("/")[0] in tops)
    return Workspace(root=root, targets=targets, build_files=build_files, modules=modules,
                     ignored=ignored)


class _Sources:
    """The workspace's Python sources: what each imports and names, parsed once."""

    def __init__(self, workspace: Workspace):
        self._workspace = workspace
        self._roots = sorted({""} | {i for target in workspace.targets.values()
                                     for i in target.imports})
        self._trees: dict[str, ast.Module] = {}
        self._imports: dict[str, list[tuple[str, list[str]]]] = {}
        self._named: dict[str, set[str]] = {}
        self._evaluating: set[tuple[str, str]] = set()

    def tree(self, path: str) -> ast.Module:
        """The syntax tree of the module `path` (empty if it does not exist)."""
        if path not in self._trees:
            text = ""
            if self._workspace.exists(path):
                with open(os.path.join(self._workspace.root, path), encoding="utf-8") as stream:
                    text = stream.read()
            self._trees[path] = ast.parse(text, path)
        return self._trees[path]

    def _isfile(self, path: str) -> bool:
        return self._workspace.exists(path)

    def _isdir(self, path: str) -> bool:
        return os.path.isdir(os.path.join(self._workspace.root, path))

    def _package(self, path: str) -> tuple[str, list[str]]:
        """The directory above the top package of module `path`, and the module's name parts."""
        directory, parts = posixpath.dirname(path), []
        if posixpath.basename(path) != "__init__.py":
            parts.append(posixpath.basename(path)[:-len(".py")])
        while directory and self._isfile(posixpath.join(directory, "__init__.py")):
            directory, name = posixpath.split(directory)
            parts.insert(0, name)
        return directory, parts

    def _resolve(self, name: str, roots: list[str]) -> list[str] | None:
        """The files that `import name` loads, or None if it is no first-party module."""
        parts = name.split(".")
        if parts[0] in PACKAGE_DIRS:
            folder = PACKAGE_DIRS[parts[0]]
            roots, parts = [posixpath.dirname(folder)], [posixpath.basename(folder), *parts[1:]]
        for root in roots:
            files, directory = [], root
            for index, part in enumerate(parts):
                directory = posixpath.join(directory, part)
                last = index == len(parts) - 1
                if self._isfile(posixpath.join(directory, "__init__.py")):
                    files.append(posixpath.join(directory, "__init__.py"))
                elif last and self._isfile(directory + ".py"):
                    files.append(directory + ".py")
                elif not self._isdir(directory):  # Else a namespace package.
                    break
            else:
                return files
        return None

    def imports(self, path: str) -> list[tuple[str, list[str]]]:
        """The first-party modules that module `path` imports.

        Args:
            path: A workspace-relative `.py` file.

        Returns:
            `(module name, [its files and its packages' __init__.py])` pairs.
        """
        if path in self._imports:
            return self._imports[path]
        roots, directory = [], posixpath.dirname(path)
        # sys.path: the directories of scripts and of pytest's test modules and conftest.py
        # files (those not in a package), the workspace, the `imports` of targets and, for
        # relative imports, the directory of the module's top package.
        while directory and not self._isfile(posixpath.join(directory, "__init__.py")):
            roots.append(directory)
            directory = posixpath.dirname(directory)
        roots += self._roots + [self._package(path)[0]]
        found = self._imports[path] = []
        for name, fallback in self._import_names(self.tree(path), path):
            files = self._resolve(name, roots)
            if files is None and fallback:
                name, files = fallback, self._resolve(fallback, roots)
            if files is not None:
                found.append((name, files))
        return found

    def _import_names(self, tree: ast.AST, path: str) -> Iterator[tuple[str, str | None]]:
        """`(module name, name to try if it is no module)` for each import in `tree`."""
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                yield from ((alias.name, None) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = self._package(path)[1]
                    parts = parts[:len(parts) - node.level + (path.endswith("__init__.py"))]
                    base = ".".join(parts + ([base] if base else []))
                for alias in node.names:
                    yield (f"{base}.{alias.name}" if base else alias.name), base or None
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                if _DOTTED.fullmatch(node.value):
                    yield node.value, None
                elif "import" in node.value:  # Maybe a `python -c` program.
                    try:
                        program = ast.parse(node.value)
                    except SyntaxError:
                        continue
                    yield from self._import_names(program, path)

    def named(self, path: str) -> set[str]:
        """The workspace files that module `path` names: files, globs' and directories' files.

        Args:
            path: A workspace-relative `.py` file.

        Returns:
            Workspace-relative files (BUILD files of named directories left out).
        """
        if path in self._named:
            return self._named[path]
        found = self._named[path] = set()
        parts = set()
        for node in ast.walk(self.tree(path)):
            if (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div)
                    or isinstance(node, ast.Call) and _call_name(node) in _JOIN_CALLS):
                value, bare = self._value(path, node), False
                # The literals of a path expression name nothing alone.
                parts.update(id(child) for child in ast.iter_child_nodes(node))
            elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
                  and id(node) not in parts):
                value, bare = node.value, True
            else:
                continue
            if not value or "\n" in value or "\0" in value or value.startswith(("/", "-", "@")):
                continue
            value = _normalized(value)
            if value == "" or value.startswith("../") or value == "..":
                continue
            if bare and "/" not in value and not self._isfile(value):
                continue
            if any(mark in value for mark in "*?["):
                found.update(self._glob(value))
            elif self._isfile(value):
                found.add(value)
            elif self._isdir(value):
                found.update(file for file in _files(self._workspace.root, value,
                                                     self._workspace.ignored, packages=True)
                             if posixpath.basename(file) not in BUILD_NAMES)
        return found

    def _glob(self, pattern: str) -> set[str]:
        """The workspace files that the shell-style `pattern` matches."""
        fixed = posixpath.join("", *itertools.takewhile(
            lambda part: not any(mark in part for mark in "*?["), pattern.split("/")[:-1]))
        if not self._isdir(fixed):
            return set()
        regex = _glob_regex(pattern)
        return {file for file in _files(self._workspace.root, fixed, self._workspace.ignored,
                                        packages=True) if regex.fullmatch(file + "/")}

    def _value(self, path: str, node: ast.AST) -> str | None:
        """The workspace-relative path of expression `node` of module `path`, or None.

        As far as literals, `__file__`, module-level names and path calls tell.
        """
        if isinstance(node, ast.Constant):
            return node.value if isinstance(node.value, str) else None
        if isinstance(node, ast.Name):
            return path if node.id == "__file__" else self._global(path, node.id)
        if isinstance(node, ast.Attribute) and node.attr == "parent":
            value = self._value(path, node.value)
            return None if value is None else posixpath.dirname(value)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            parts = [self._value(path, node.left), self._value(path, node.right)]
        elif isinstance(node, ast.Call):
            name = _call_name(node)
            args = list(node.args)
            if name in _PATH_METHODS:
                args.insert(0, node.func.value)
            if name in _SAME_CALLS and args:
                args = args[:1]
            elif name == "os.path.dirname" and args:
                value = self._value(path, args[0])
                return None if value is None else posixpath.dirname(value)
            elif name not in _JOIN_CALLS:
                return None
            parts = [self._value(path, arg) for arg in args]
        else:
            return None
        if not parts or None in parts:
            return None
        return posixpath.join(*parts)

    def _global(self, path: str, name: str) -> str | None:
        """The path of module `path`'s global `name`, assigned or imported there, or None."""
        if (path, name) in self._evaluating:
            return None
        self._evaluating.add((path, name))
        try:
            for node in self.tree(path).body:
                if (isinstance(node, ast.Assign)
                        and any(isinstance(t, ast.Name) and t.id == name for t in node.targets)
                        or isinstance(node, ast.AnnAssign) and node.value is not None
                        and isinstance(node.target, ast.Name) and node.target.id == name):
                    return self._value(path, node.value)
                if isinstance(node, ast.ImportFrom) and not node.level and node.module:
                    for alias in node.names:
                        if (alias.asname or alias.name) == name:
                            for module, files in self.imports(path):
                                if module == node.module and files:
                                    return self._global(files[-1], alias.name)
            return None
        finally:
            self._evaluating.discard((path, name))


def _call_name(node: ast.Call) -> str:
    """The called name: dotted for functions, the method name for path methods."""
    if isinstance(node.func, ast.Attribute) and node.func.attr in _PATH_METHODS:
        return node.func.attr
    return ast.unparse(node.func)


def _bad_labels(workspace: Workspace, target: Target) -> Iterator[Problem]:
    """Labels of `target` that name no target (deps, actual) or no target or file."""
    references = [("deps", label) for label in target.deps]
    references += [(kind, label) for kind in ("srcs", "data") for label in getattr(target, kind)]
    if target.actual:
        references.append(("actual", target.actual))
    for kind, label in references:
        if label.startswith("@") or label in workspace.targets:
            continue
        if kind in ("deps", "actual"):
            yield Problem(target.label, label, f"{target.label}: {kind} entry {label} names "
                                               "no target")
        elif not workspace.exists(label_path(label)):
            yield Problem(target.label, label, f"{target.label}: {kind} entry {label} names "
                                               "no target or file")


def _bad_main(workspace: Workspace, target: Target) -> Iterator[Problem]:
    """A py_binary's or py_test's main that is missing or not in its srcs."""
    path = label_path(target.main)
    if not workspace.exists(path):
        yield Problem(target.label, path, f"{target.label}: main {path} does not exist")
    elif target.main not in target.srcs:
        yield Problem(target.label, path, f"{target.label}: main {path} is not in its srcs")


def _missing_imports(workspace: Workspace, sources: _Sources, target: Target,
                     runfiles: set[str]) -> tuple[list[Problem], set[str]]:
    """The first-party modules that `target`'s sources import, transitively, and it lacks.

    Returns:
        Their problems, and the modules of that import closure.
    """
    entries = {path for label in target.srcs for path in workspace.runfiles(label)
               if path.endswith(".py")}
    if target.kind == "py_test":  # pytest loads the conftest.py files above its modules.
        for path in list(entries):
            while path:
                path = posixpath.dirname(path)
                if workspace.exists(posixpath.join(path, "conftest.py")):
                    entries.add(posixpath.join(path, "conftest.py"))
    entries = sorted(entries)
    importer: dict[str, tuple[str, str]] = {}
    closure, queue = set(entries), list(entries)
    while queue:
        path = queue.pop(0)
        for name, files in sources.imports(path):
            for file in files:
                if file not in closure:
                    closure.add(file)
                    importer[file] = (path, name)
                    queue.append(file)
    problems = [Problem(target.label, file,
                        f"{target.label}: {importer[file][0]} imports {importer[file][1]}, "
                        f"but {file} is not in the target's srcs or deps (transitively)")
                for file in sorted(importer) if file not in runfiles]
    return problems, closure


def _missing_files(sources: _Sources, target: Target, modules: set[str],
                   runfiles: set[str]) -> Iterator[Problem]:
    """Workspace files named by the `modules` of `target`'s package that its runfiles lack."""
    package = target.label[2:].partition(":")[0]
    for module in sorted(modules):
        if not package or module.startswith(package + "/"):
            for file in sorted(sources.named(module) - runfiles):
                yield Problem(target.label, file,
                              f"{target.label}: {module} names {file}, which is not in the "
                              "target's srcs, data or deps (transitively)")


def check(workspace: Workspace) -> list[Problem]:
    """Where the BUILD files of `workspace` fall behind its code.

    Args:
        workspace: What `load` returned, possibly with targets changed.

    Returns:
        The problems, sorted by target and subject; none if the BUILD files are right.
    """
    sources = _Sources(workspace)
    problems = []
    py_targets = [t for t in workspace.targets.values() if t.kind in PY_RULES]
    in_srcs = {path for target in py_targets for label in target.srcs
               for path in workspace.runfiles(label)}
    for module in workspace.modules:
        if module not in in_srcs:
            package = posixpath.dirname(module)
            while package and not any(posixpath.join(package, name) in workspace.build_files
                                      for name in BUILD_NAMES):
                package = posixpath.dirname(package)
            problems.append(Problem(f"//{package}", module, f"//{package}: {module} is in the "
                                    "srcs of no py_library, py_binary or py_test"))
    for target in workspace.targets.values():
        problems += _bad_labels(workspace, target)
    for target in py_targets:
        runfiles = workspace.runfiles(target.label)
        missing, closure = _missing_imports(workspace, sources, target, runfiles)
        problems += missing
        if target.kind == "py_test":
            problems += _missing_files(sources, target, closure, runfiles)
        if target.main is not None:
            problems += _bad_main(workspace, target)
    return sorted(problems, key=lambda p: (p.target, p.subject, p.message))


def main(argv: list[str]) -> int:
    """Prints the problems of the workspace `argv[0]` (default: this file's); 1 if any."""
    root = argv[0] if argv else os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    workspace = load(root)
    problems = check(workspace)
    for problem in problems:
        print(problem)
    print(f"build_check: {len(workspace.targets)} targets, {len(workspace.modules)} modules, "
          f"{len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
