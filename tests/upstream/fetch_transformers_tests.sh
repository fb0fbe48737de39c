#!/usr/bin/env bash
# Fetch transformers' common test mixins (tests/test_*_common.py) for the INSTALLED transformers version into
# .upstream/transformers-tests/<version>/, where tests/test_transformers_conformance.py looks for them.
#
# They come from the transformers source distribution on the package index (an install step, like pip install;
# the tests themselves never touch the network). Usage: tests/upstream/fetch_transformers_tests.sh [python]
# (default: python on PATH; pass the interpreter of the environment whose transformers should be matched).
set -euo pipefail
cd "$(dirname "$0")/../.."
python_bin="${1:-python}"
version="$("$python_bin" -c 'import transformers; print(transformers.__version__)')"
dest=".upstream/transformers-tests/$version"
if [ -f "$dest/test_modeling_common.py" ]; then
    echo "transformers $version common tests already in $dest"
    exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$python_bin" -m pip download -q --no-deps --no-binary :all: "transformers==$version" -d "$work"
tar xzf "$work/transformers-$version.tar.gz" -C "$work" "transformers-$version/tests"
mkdir -p "$dest"
cp "$work/transformers-$version/tests/"*.py "$dest/"
# The repository's tests/ is a package (an empty __init__.py the sdist leaves out); ConfigTester imports it.
touch "$dest/__init__.py"
echo "transformers $version common tests written to $dest"
