#!/bin/sh
echo "bazel coverage is not supported by this offline workspace (tools/bazel/coverage_tools)" >&2
exit 1
