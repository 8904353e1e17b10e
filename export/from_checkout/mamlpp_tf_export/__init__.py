"""`import mamlpp_tf_export` from a checkout: loads the export/ folder, as an install does.

setup.py installs the export/ folder as the package `mamlpp_tf_export`
(`package_dir`), so that no generic top-level `export` lands on a user's path.
Code that runs from the source tree without that install puts the folder of
this stand-in on `sys.path`: Bazel (//export's `imports`, so that tests and
their subprocesses, which inherit PYTHONPATH, load the package from the
runfiles tree) and benchmarks/serving_latency.py. It loads export/__init__.py
as `mamlpp_tf_export`, with export/ as the package's path, so every module of
the folder imports as `mamlpp_tf_export.<module>`.
"""

import importlib.util
import os
import sys

_FOLDER = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_SPEC = importlib.util.spec_from_file_location(
    __name__, os.path.join(_FOLDER, "__init__.py"), submodule_search_locations=[_FOLDER])
_PACKAGE = importlib.util.module_from_spec(_SPEC)
# The import statement returns what sys.modules holds once this module has run.
sys.modules[__name__] = _PACKAGE
_SPEC.loader.exec_module(_PACKAGE)
