"""README.md's runnable code blocks work as written, so the README cannot drift.

A block preceded by `<!-- readme-test -->` is run verbatim in a scratch folder
(with `flags/` linked in, so relative run directories land there): bash blocks
command by command, Python blocks as a script. Training commands get a few
flags appended that shrink the run (given later, they override the flagfile's);
nothing else is changed. A block marked `<!-- readme-test slow -->` runs with
the slow tests (a path the default suite already runs by itself).
"""

import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

MARK = re.compile(r"<!-- readme-test( slow)? -->")
# Appended to every `python -m mamlpp_tf.train` command: one short epoch.
SHRINK = ("--epochs=1", "--iterations_per_epoch=4", "--val_tasks=4", "--test_tasks=4",
          "--ensemble_top_k=1")


def marked_blocks() -> list[tuple[int, str, str, bool]]:
    """`(line, language, code, slow)` of every fenced block right after a mark."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as stream:
        text = stream.read()
    pattern = re.compile(MARK.pattern + r"\n```(\w+)\n(.*?)\n```", re.S)
    return [(text[:m.start()].count("\n") + 1, m.group(2), m.group(3), bool(m.group(1)))
            for m in pattern.finditer(text)]


def commands(code: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", code)
    return [line.strip() for line in joined.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def test_the_readme_marks_its_runnable_blocks():
    languages = [language for _, language, _, _ in marked_blocks()]
    assert languages.count("bash") >= 2 and languages.count("python") >= 1, languages


@pytest.mark.parametrize("line,language,code", [
    pytest.param(line, language, code, marks=[pytest.mark.slow] if slow else [],
                 id=f"README.md:{line}") for line, language, code, slow in marked_blocks()])
def test_marked_block_runs_as_written(line, language, code, tmp_path):
    os.symlink(os.path.join(ROOT, "flags"), tmp_path / "flags")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    if language == "python":
        script = tmp_path / "snippet.py"
        script.write_text(code)
        runs = [[sys.executable, str(script)]]
    else:
        assert language == "bash", f"README.md:{line}: cannot run {language} blocks"
        # `python` is this interpreter (the README assumes the activated virtualenv).
        runs = [["bash", "-c",
                 re.sub(r"^python ", f"{sys.executable} ", command) +
                 (" " + " ".join(SHRINK) if "mamlpp_tf.train" in command else "")]
                for command in commands(code)]
    for command in runs:
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True,
                                text=True, timeout=600, check=False)
        assert result.returncode == 0, (f"README.md:{line}: {command[-1]}",
                                        result.stderr[-3000:])


def _installs(commands: list[str]) -> list[str]:
    """The `pip install` commands among `commands`, without `python -m` and `--quiet`."""
    installs = []
    for command in commands:
        words = command.split()
        if words[:3] == ["python", "-m", "pip"]:
            words = words[2:]
        if words[:2] == ["pip", "install"] and "--upgrade" not in words:
            installs.append(" ".join(word for word in words if word != "--quiet"))
    return installs


def test_ci_installs_exactly_what_the_readme_set_up_command_installs():
    """.ci/run evals README's set-up command less its main job, and installs nothing else."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as stream:
        readme = stream.read()
    setup = re.search(r"<!-- setup-command -->\n```bash\n(.*?)\n```", readme, re.S).group(1)
    assert setup.endswith(" && python -m mamlpp_tf.train --flagfile=flags/omniglot.cfg"), setup
    # One pip install with every dependency resolved: no --no-deps side installs.
    installs = _installs([part.strip() for part in setup.split("&&")])
    assert len(installs) == 1 and "--no-deps" not in installs[0], installs
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as stream:
        ci = stream.read()
    assert "<!-- setup-command -->" in ci and 'eval "$install_command"' in ci
    assert _installs([line.strip() for line in ci.splitlines()]) == []
