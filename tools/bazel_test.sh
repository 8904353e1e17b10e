#!/usr/bin/env bash
# `bazel test //...` offline with Debian's Bazel 4.2.3 (bazel-bootstrap); see README.md, "Bazel".
#
#   tools/bazel_test.sh                       # every target, the default (not slow) tests
#   tools/bazel_test.sh //tests:test_learner  # some targets; other bazel test flags go too
#
# Installs bazel-bootstrap, bazel-platforms and bazel-rules-java with apt-get if missing
# (WORKSPACE points at their /usr/share/bazel copies), then runs the tests with Bazel's
# output root in a temporary directory, deleted at the end (set BAZEL_OUTPUT_USER_ROOT to
# keep and reuse one). Python and its packages are not Bazel's: the tests run on the
# `python3` of PATH, so activate the project's virtualenv first (this script activates
# ./.venv when no virtualenv is active and it exists).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)

packages=(bazel-bootstrap bazel-platforms bazel-rules-java)
missing=()
for package in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$package")
  fi
done
if [ "${#missing[@]}" -gt 0 ]; then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  echo "+ apt-get install ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
if ! python3 -c "import tensorflow, keras, pytest, hypothesis" >/dev/null 2>&1; then
  echo "$(command -v python3 || echo 'no python3 on PATH') lacks the test dependencies:" \
       "activate the project's virtualenv (README.md: pip install -e \".[test]\")" >&2
  exit 1
fi
echo "Python for the tests: $(command -v python3) ($(python3 --version 2>&1))"

if [ -n "${BAZEL_OUTPUT_USER_ROOT:-}" ]; then
  root="$BAZEL_OUTPUT_USER_ROOT"
  keep=1
else
  root=$(mktemp -d "${TMPDIR:-/tmp}/mamlpp_bazel.XXXXXX")
  keep=0
fi
bazel=(bazel "--output_user_root=$root" --max_idle_secs=120)
cleanup() {
  "${bazel[@]}" shutdown >/dev/null 2>&1 || true
  if [ "$keep" -eq 0 ]; then
    chmod -R u+w "$root" 2>/dev/null || true
    rm -rf "$root"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --symlink_prefix=/: no bazel-* links in the checkout (they would point into $root).
args=("$@")
targets=0
for arg in "$@"; do
  case "$arg" in -*) ;; *) targets=1 ;; esac
done
if [ "$targets" -eq 0 ]; then args+=("//..."); fi
status=0
"${bazel[@]}" test --symlink_prefix=/ "${args[@]}" || status=$?
echo "bazel test finished with status $status in $(( $(date +%s) - start ))s"
exit "$status"
