# Sourced by bin/serve and bin/test: make .venv and install the project into it,
# again only when pyproject.toml has changed since the last install.
ensure_venv() {
    local extra="$1" python="${PYTHON:-python3}"
    if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo "vero-bridge needs Python 3.11 or newer as '$python' (set PYTHON to choose one)" >&2
        exit 1
    fi
    [ -x .venv/bin/python ] || "$python" -m venv .venv
    local stamp=".venv/.installed${extra:+-$extra}" wanted
    wanted=$(cat pyproject.toml | cksum)
    if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
        .venv/bin/python -m pip install --quiet --upgrade pip
        .venv/bin/python -m pip install --quiet -e ".${extra:+[$extra]}"
        echo "$wanted" > "$stamp"
    fi
}
