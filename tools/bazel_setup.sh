#!/usr/bin/env bash
# Prepares an offline Bazel build with Debian's bazel-bootstrap (Bazel 4.2.3).
#
#   apt-get install bazel-bootstrap bazel-rules-cc bazel-rules-java \
#     bazel-skylib bazel-platforms
#   python3 -m venv .venv && .venv/bin/pip install -e ".[test]"
#   bash tools/bazel_setup.sh
#   bazel build //:tf1hess && bazel test //...
#
# Bazel would download rules_cc, rules_java, skylib, platforms and its coverage
# tools. This points each at Debian's packaged copy instead (rules_cc patched
# for Bazel 4.2.3's @bazel_tools, which lacks `use_cpp_toolchain`; coverage
# tools replaced by empty targets, since coverage is not collected), and runs
# Python targets with the virtualenv's interpreter, where TensorFlow, numpy and
# absl are installed. The generated files are .bazel_deps/ and .bazelrc.local.
set -euo pipefail
cd "$(dirname "$0")/.."
top="$PWD"
deps="$top/.bazel_deps"
python="${TF1HESS_PYTHON:-$top/.venv/bin/python}"

for dir in /usr/share/bazel/rules/cc /usr/share/bazel/rules/java \
    /usr/share/bazel/tools/skylib /usr/share/bazel/tools/platforms; do
  if [ ! -d "$dir" ]; then
    echo "bazel_setup: error: $dir is missing; apt-get install bazel-bootstrap" \
      "bazel-rules-cc bazel-rules-java bazel-skylib bazel-platforms" >&2
    exit 1
  fi
done
if [ ! -x "$python" ]; then
  echo "bazel_setup: error: no Python at $python; create the virtualenv first" \
    "(python3 -m venv .venv && .venv/bin/pip install -e '.[test]')" >&2
  exit 1
fi

rm -rf "$deps"
mkdir -p "$deps"
cp -r /usr/share/bazel/rules/cc "$deps/rules_cc"
chmod -R u+w "$deps/rules_cc"
sed -i 's/, "use_cpp_toolchain")/)/; s#use_cpp_toolchain()#["@bazel_tools//tools/cpp:toolchain_type"]#' \
  "$deps/rules_cc/cc/private/rules_impl/compiler_flag.bzl" \
  "$deps/rules_cc/cc/private/rules_impl/cc_flags_supplier.bzl"

mkdir -p "$deps/remote_coverage_tools"
echo 'workspace(name = "remote_coverage_tools")' \
  > "$deps/remote_coverage_tools/WORKSPACE"
cat > "$deps/remote_coverage_tools/BUILD" <<'BUILD'
package(default_visibility = ["//visibility:public"])

filegroup(name = "coverage_report_generator", srcs = [])

filegroup(name = "lcov_merger", srcs = [])
BUILD

# The virtualenv's interpreter as the Python toolchain (with
# --incompatible_use_python_toolchains, on by default, --python_path is
# ignored).
mkdir -p "$deps/venv_python"
echo 'workspace(name = "venv_python")' > "$deps/venv_python/WORKSPACE"
cat > "$deps/venv_python/BUILD" <<BUILD
load("@bazel_tools//tools/python:toolchain.bzl", "py_runtime_pair")

py_runtime(
    name = "py3",
    interpreter_path = "$python",
    python_version = "PY3",
)

py_runtime_pair(name = "pair", py3_runtime = ":py3")

toolchain(
    name = "toolchain",
    toolchain = ":pair",
    toolchain_type = "@bazel_tools//tools/python:toolchain_type",
)
BUILD

cat > "$top/.bazelrc.local" <<RC
build --override_repository=rules_cc=$deps/rules_cc
build --override_repository=rules_java=/usr/share/bazel/rules/java
build --override_repository=bazel_skylib=/usr/share/bazel/tools/skylib
build --override_repository=platforms=/usr/share/bazel/tools/platforms
build --override_repository=remote_coverage_tools=$deps/remote_coverage_tools
build --override_repository=venv_python=$deps/venv_python
build --extra_toolchains=@venv_python//:toolchain
RC
echo "bazel_setup: wrote .bazelrc.local; run: bazel build //:tf1hess && bazel test //..."
