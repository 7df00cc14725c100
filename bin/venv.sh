# Sourced by bin/demo and bin/test: make sure $VENV holds the project (with the
# extras in $1: "" or "test"). pip runs only when needed: the venv is missing, or
# pyproject.toml changed since the last set-up (a stamp in the venv holds its hash
# and the extras installed); the install is editable, so code changes need nothing.
ensure_venv() {
    local extras=$1 stamp="$VENV/.postdeploy-setup" want have=""
    want=$(python3 -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' pyproject.toml)
    if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ]; then
        have=$(cat "$stamp")
    fi
    # A venv set up for the tests has everything the demo needs too.
    if [ "$have" = "$want test" ] || [ "$have" = "$want $extras" ]; then
        return 0
    fi
    echo "== setting up $VENV (pip; again only when pyproject.toml changes)" >&2
    if [ ! -x "$VENV/bin/python" ]; then
        python3 -m venv "$VENV"
    fi
    rm -f "$stamp"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -e ".${extras:+[$extras]}"
    echo "$want $extras" > "$stamp"
}
