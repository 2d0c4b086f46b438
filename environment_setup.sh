#!/usr/bin/env bash
# Install the `vila` project (editable) together with a suitable PyTorch.
# Run ./environment_setup.sh --help for the options.
set -euo pipefail

PROG="$(basename "$0")"
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

usage() {
    cat <<EOF
Usage: ./$PROG [--venv [DIR]] [--dev] [--latest] [--help]

Installs the vila project in editable mode (pip install -e .), installing a
suitable PyTorch first so that the project's "torch>=2.4" requirement is
already satisfied and pip never pulls a CUDA build onto a CPU-only machine.

Where it installs:
  (no --venv)     Into the active Python environment: the activated venv
                  (\$VIRTUAL_ENV) or conda env (\$CONDA_PREFIX). If no
                  environment is active the script refuses to touch the
                  system Python and suggests --venv.
  --venv [DIR]    Create a virtual environment with 'python3 -m venv' in DIR
                  (default: .venv in the project folder; a relative DIR is
                  taken from the current directory) and install into it. An
                  existing venv in DIR is reused. Set PYTHON=/path/to/python
                  to create it with another interpreter (default: python3).

What it installs:
  --dev           Also install the development/test extras:
                  pip install -e ".[dev]" (pytest, ruff) instead of
                  pip install -e .
  --latest        Take the newest versions pyproject.toml allows instead of
                  the ones in constraints.txt (see below).
  -h, --help      Show this help and exit.

Which versions (everything but torch):
  By default the versions the test suite passed with, from constraints.txt:
  pip install -c constraints.txt -e ".[dev]". A new release of a dependency
  (transformers, say) then cannot break a fresh install overnight.
  --latest floats instead, within pyproject.toml's ranges; to move the pins,
  install with --latest, run the tests, then write the file anew with
  scripts/write_constraints.py (its header says how).

How PyTorch is chosen (before the project is installed):
  1. VILA_TORCH_SPEC set    -> pip install \$VILA_TORCH_SPEC, whatever is
                               installed. The value is split on spaces, so
                               pip options may follow, e.g.
                               VILA_TORCH_SPEC="torch==2.13.0"
                               VILA_TORCH_SPEC="torch==2.5.1 --index-url https://download.pytorch.org/whl/cu121"
  2. torch already installed -> kept as it is.
  3. 'nvidia-smi' works      -> pip install "torch>=2.4" (PyPI's default
                               CUDA build).
  4. macOS                   -> pip install torch
  5. otherwise (CPU-only Linux):
       pip install torch==2.13.0 if that version resolves to a CPU build
       (a "+cpu" wheel, e.g. one in a local wheelhouse); if not, the CPU
       wheel index: pip install "torch>=2.4" --index-url
       https://download.pytorch.org/whl/cpu
  The choice is printed.

At the end it prints how to activate the venv (if one was created) and a
one-line smoke test (vila-infer --help).

Examples:
  ./$PROG --venv --dev            # .venv with test tools, the usual dev setup
  ./$PROG --venv /tmp/v --dev --latest   # the newest dependencies, to test an update
  ./$PROG --venv /tmp/vila-env    # a venv elsewhere, runtime deps only
  source myenv/bin/activate && ./$PROG   # into an already active env
EOF
}

log() { printf '[environment_setup] %s\n' "$*"; }
die() { printf '[environment_setup] ERROR: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- arguments
USE_VENV=0
VENV_DIR=""
DEV=0
LATEST=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --dev) DEV=1; shift ;;
        --latest) LATEST=1; shift ;;
        --venv)
            USE_VENV=1; shift
            if [[ $# -gt 0 && "$1" != -* ]]; then VENV_DIR="$1"; shift; fi
            ;;
        --venv=*) USE_VENV=1; VENV_DIR="${1#--venv=}"; shift ;;
        *) printf 'Unknown option: %s\n\n' "$1" >&2; usage >&2; exit 2 ;;
    esac
done

START_TS=$(date +%s)

# ---------------------------------------------------------- the environment
if [[ $USE_VENV -eq 1 ]]; then
    if [[ -z "$VENV_DIR" ]]; then
        VENV_DIR="$REPO_DIR/.venv"
    elif [[ "$VENV_DIR" != /* ]]; then
        VENV_DIR="$(pwd)/$VENV_DIR"
    fi
    BASE_PY="${PYTHON:-python3}"
    if [[ -x "$VENV_DIR/bin/python" ]]; then
        log "Reusing the existing virtual environment $VENV_DIR"
    else
        command -v "$BASE_PY" >/dev/null 2>&1 || die "'$BASE_PY' not found; install Python 3 or set PYTHON=/path/to/python"
        log "Creating a virtual environment in $VENV_DIR with $("$BASE_PY" --version 2>&1)"
        "$BASE_PY" -m venv "$VENV_DIR" \
            || die "'$BASE_PY -m venv' failed (on Debian/Ubuntu: apt-get install python3-venv)"
    fi
    PY="$VENV_DIR/bin/python"
    ENV_DESC="venv $VENV_DIR (created/reused by this script)"
elif [[ -n "${VIRTUAL_ENV:-}" ]]; then
    PY="$VIRTUAL_ENV/bin/python"
    [[ -x "$PY" ]] || die "VIRTUAL_ENV=$VIRTUAL_ENV has no bin/python"
    ENV_DESC="active venv $VIRTUAL_ENV"
elif [[ -n "${CONDA_PREFIX:-}" ]]; then
    PY="$CONDA_PREFIX/bin/python"
    [[ -x "$PY" ]] || die "CONDA_PREFIX=$CONDA_PREFIX has no bin/python (run 'conda install python' in it)"
    ENV_DESC="active conda env ${CONDA_DEFAULT_ENV:-$CONDA_PREFIX}"
else
    cat >&2 <<EOF
[environment_setup] No active Python environment (neither a venv nor a conda env
is activated), and this script will not install into the system Python.
Either let it create a virtual environment:

    ./$PROG --venv          # creates .venv in the project folder
    ./$PROG --venv --dev    # ... with the test/dev tools

or activate one first (source <env>/bin/activate, or conda activate <env>)
and run ./$PROG again. See ./$PROG --help.
EOF
    exit 1
fi

log "Installing into: $ENV_DESC"
log "Python: $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
PIP=("$PY" -m pip)
"${PIP[@]}" --version >/dev/null 2>&1 || die "pip is not available in $PY (try: $PY -m ensurepip)"

torch_version() {
    "$PY" - <<'EOF' 2>/dev/null || true
import importlib.metadata as m
try:
    print(m.version("torch"))
except m.PackageNotFoundError:
    pass
EOF
}

# ------------------------------------------------------------------- torch
# Prints the version that "pip install SPEC" would pick, or nothing when it
# does not resolve (or this pip is too old for --dry-run --report).
resolve_torch() {
    local spec="$1" report out
    report="$(mktemp)"
    out=""
    if "${PIP[@]}" install --dry-run --no-deps --quiet --report "$report" "$spec" >/dev/null 2>&1; then
        out="$("$PY" - "$report" <<'EOF' 2>/dev/null || true
import json, sys
items = json.load(open(sys.argv[1])).get("install", [])
print(next((i["metadata"]["version"] for i in items
            if i["metadata"]["name"].lower() == "torch"), ""))
EOF
)"
    fi
    rm -f "$report"
    printf '%s' "$out"
}

CPU_INDEX="https://download.pytorch.org/whl/cpu"
TORCH_BEFORE="$(torch_version)"
TORCH_CMD=()
if [[ -n "${VILA_TORCH_SPEC:-}" ]]; then
    read -r -a spec_words <<<"$VILA_TORCH_SPEC"
    TORCH_CMD=("${spec_words[@]}")
    log "Torch: VILA_TORCH_SPEC is set -> pip install ${TORCH_CMD[*]}"
elif [[ -n "$TORCH_BEFORE" ]]; then
    log "Torch: torch $TORCH_BEFORE is already installed -> keeping it"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    TORCH_CMD=("torch>=2.4")
    log "Torch: an NVIDIA GPU answers nvidia-smi -> pip install \"torch>=2.4\" (PyPI's CUDA build)"
elif [[ "$(uname -s)" == "Darwin" ]]; then
    TORCH_CMD=("torch")
    log "Torch: macOS -> pip install torch"
else
    log "Torch: no NVIDIA GPU (nvidia-smi absent or failing) -> a CPU-only build"
    resolved="$(resolve_torch "torch==2.13.0")"
    if [[ "$resolved" == *+cpu ]]; then
        TORCH_CMD=("torch==$resolved")
        log "Torch: torch==2.13.0 resolves to the CPU build $resolved -> pip install torch==$resolved"
    else
        TORCH_CMD=("torch>=2.4" --index-url "$CPU_INDEX")
        if [[ -n "$resolved" ]]; then
            log "Torch: torch==2.13.0 resolves to $resolved, which is not a +cpu build"
        else
            log "Torch: torch==2.13.0 does not resolve here"
        fi
        log "Torch: -> pip install \"torch>=2.4\" --index-url $CPU_INDEX"
    fi
fi

if [[ ${#TORCH_CMD[@]} -gt 0 ]]; then
    "${PIP[@]}" install "${TORCH_CMD[@]}" || die "installing torch failed: pip install ${TORCH_CMD[*]} (set VILA_TORCH_SPEC to choose another torch, e.g. VILA_TORCH_SPEC=\"torch==2.13.0\")"
fi
TORCH_INSTALLED="$(torch_version)"
[[ -n "$TORCH_INSTALLED" ]] || die "torch is not installed after the torch step"
log "Torch: installed version $TORCH_INSTALLED"

# ----------------------------------------------------------------- project
if [[ $DEV -eq 1 ]]; then
    TARGET=".[dev]"
else
    TARGET="."
fi
[[ -f "$REPO_DIR/pyproject.toml" ]] || die "no pyproject.toml in $REPO_DIR"
CONSTRAINTS=""  # empty: the newest versions pyproject.toml allows
if [[ $LATEST -eq 1 ]]; then
    log "Versions: --latest -> the newest that pyproject.toml allows"
elif [[ -f "$REPO_DIR/constraints.txt" ]]; then
    CONSTRAINTS="constraints.txt"
    log "Versions: the ones the tests passed with, from constraints.txt (--latest to take the newest)"
else
    log "WARNING: no constraints.txt in $REPO_DIR -> the newest versions that pyproject.toml allows"
fi
if [[ -n "$CONSTRAINTS" ]]; then
    INSTALL_DESC="pip install -c $CONSTRAINTS -e \"$TARGET\""
    log "Installing the project: $INSTALL_DESC (in $REPO_DIR)"
    (cd "$REPO_DIR" && "${PIP[@]}" install -c "$CONSTRAINTS" -e "$TARGET") \
        || die "$INSTALL_DESC failed; if a pinned version does not install on this machine, rerun with --latest"
else
    INSTALL_DESC="pip install -e \"$TARGET\""
    log "Installing the project: $INSTALL_DESC (in $REPO_DIR)"
    (cd "$REPO_DIR" && "${PIP[@]}" install -e "$TARGET") || die "$INSTALL_DESC failed"
fi

TORCH_AFTER="$(torch_version)"
if [[ "$TORCH_AFTER" != "$TORCH_INSTALLED" ]]; then
    log "WARNING: the project install changed torch from $TORCH_INSTALLED to $TORCH_AFTER;"
    log "WARNING: rerun with VILA_TORCH_SPEC=\"torch==<version>\" to pin the build you want."
fi

# ------------------------------------------------------------------ finish
BIN_DIR="$(dirname "$PY")"
ELAPSED=$(( $(date +%s) - START_TS ))
echo
log "Done in ${ELAPSED}s: vila installed$([[ $DEV -eq 1 ]] && echo ' with the dev extras')$([[ -n "$CONSTRAINTS" ]] && echo ' (versions from constraints.txt)') into $ENV_DESC, torch $TORCH_AFTER."
if [[ -x "$BIN_DIR/vila-infer" ]]; then
    if "$BIN_DIR/vila-infer" --help >/dev/null 2>&1; then
        log "Smoke test passed: vila-infer --help"
    else
        log "WARNING: 'vila-infer --help' failed; run it to see why."
    fi
fi
echo
if [[ $USE_VENV -eq 1 ]]; then
    echo "Activate the environment with:"
    echo "    source \"$VENV_DIR/bin/activate\""
    echo
fi
echo "Smoke test:"
echo "    vila-infer --help"
