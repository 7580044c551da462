# shellcheck shell=bash
# Shared by scripts/run and scripts/test: the repository root and its virtualenv.
# Source it; it defines REPO_ROOT, VENV, die and ensure_venv.

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO_ROOT/.venv"
REQUIREMENTS="$REPO_ROOT/requirements.txt"
REQUIREMENTS_STAMP="$VENV/requirements.sha256"

die() {
    echo "error: $*" >&2
    exit 1
}

# True when the interpreter given is Python 3.11 or newer.
python_is_recent() {
    "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
}

find_python() {
    local candidate
    for candidate in python3.11 python3; do
        if command -v "$candidate" >/dev/null 2>&1 && python_is_recent "$candidate"; then
            echo "$candidate"
            return 0
        fi
    done
    local found
    found="$(python3 --version 2>&1 || echo "no python3")"
    die "Python 3.11 or newer is needed (found: $found); install it and run this again"
}

# Create .venv if missing and install requirements.txt when it changed since the last install.
ensure_venv() {
    # Lock on requirements.txt so two scripts started at once do not install over each other.
    local lock_fd
    exec {lock_fd}<"$REQUIREMENTS"
    if command -v flock >/dev/null 2>&1; then
        flock "$lock_fd"
    fi

    if [[ ! -x "$VENV/bin/python" ]]; then
        local python
        python="$(find_python)"
        echo "Creating .venv with $("$python" --version 2>&1)" >&2
        "$python" -m venv "$VENV" || die "could not create .venv (on Debian/Ubuntu: apt-get install python3-venv)"
    fi
    python_is_recent "$VENV/bin/python" ||
        die ".venv holds $("$VENV/bin/python" --version 2>&1); Python 3.11 or newer is needed: delete .venv and run this again"

    local wanted
    wanted="$("$VENV/bin/python" -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$REQUIREMENTS")"
    if [[ "$(cat "$REQUIREMENTS_STAMP" 2>/dev/null)" != "$wanted" ]]; then
        echo "Installing requirements.txt into .venv" >&2
        "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQUIREMENTS" ||
            die "installing requirements.txt failed"
        echo "$wanted" >"$REQUIREMENTS_STAMP"
    fi

    exec {lock_fd}<&-
}
