# Installs what hearth's tests need beside Rust, when it is missing, and exports where it is.
# Sourced by scripts/test. Debian packages come through apt-get; the apps' client libraries and
# PostgreSQL 16 (PyPI's pgserver) go into a tools directory outside the repository:
# ~/.cache/hearth/tools, or /var/cache/hearth/tools when run as root (the test PostgreSQL runs
# as the postgres user then, and must be able to read its binaries there).

tools_dir() {
    if [ -n "${HEARTH_TOOLS_DIR:-}" ]; then
        echo "$HEARTH_TOOLS_DIR"
    elif [ "$(id -u)" -eq 0 ]; then
        echo /var/cache/hearth/tools
    else
        echo "${XDG_CACHE_HOME:-$HOME/.cache}/hearth/tools"
    fi
}

have_postgres() {
    command -v initdb >/dev/null && return 0
    command -v pg_config >/dev/null && [ -x "$(pg_config --bindir)/initdb" ] && return 0
    compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null
}

install_debian_packages() {
    local missing=()
    have_postgres || missing+=(postgresql)
    command -v redis-server >/dev/null || missing+=(redis-server)
    command -v promtool >/dev/null || missing+=(prometheus)
    command -v chromium >/dev/null || missing+=(chromium)
    command -v python3 >/dev/null || missing+=(python3)
    python3 -m venv --help >/dev/null 2>&1 || missing+=(python3-venv)
    command -v node >/dev/null || missing+=(nodejs)
    command -v npm >/dev/null || missing+=(npm)
    command -v buildah >/dev/null || missing+=(buildah)
    command -v kubectl >/dev/null || missing+=(kubectl)
    command -v file >/dev/null || missing+=(file)
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "Installing what the tests need: ${missing[*]}"
        install_packages "${missing[@]}"
    fi
}

# What scripts/run needs: PostgreSQL and Redis to run, kubectl to read deploy/.
install_run_packages() {
    local missing=()
    have_postgres || missing+=(postgresql)
    command -v redis-server >/dev/null || missing+=(redis-server)
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "hearth runs a private PostgreSQL and Redis from this machine's binaries;"
        echo "installing them with apt-get: ${missing[*]}"
        install_packages "${missing[@]}"
    fi
    if ! command -v kubectl >/dev/null; then
        echo "kubectl is needed to read deploy/ (kubectl kustomize); trying apt-get install kubectl"
        if ! install_packages kubectl || ! command -v kubectl >/dev/null; then
            echo "kubectl is not in this machine's package sources; install it as" \
                "https://kubernetes.io/docs/tasks/tools/ says, then run this again" >&2
            exit 1
        fi
    fi
}

# apt-get install, as root or with sudo.
install_packages() {
    local sudo=()
    [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "$@"
}

# Runs "$@" only when the stamp differs from the checksum of the given input file.
changed() {
    local input=$1 stamp=$2
    [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$(sha256sum <"$input")" ] && return 1
    return 0
}

install_clients() {
    local tools clients
    tools=$(tools_dir)
    clients="$PWD/tests/clients"
    mkdir -p "$tools"
    chmod 755 "$tools"
    if changed "$clients/requirements.txt" "$tools/python.stamp"; then
        echo "Installing the apps' Python client libraries and PostgreSQL 16 into $tools/python"
        rm -rf "$tools/python"
        python3 -m venv "$tools/python"
        "$tools/python/bin/pip" install --quiet --disable-pip-version-check -r "$clients/requirements.txt"
        sha256sum <"$clients/requirements.txt" >"$tools/python.stamp"
    fi
    if changed "$clients/package-lock.json" "$tools/node.stamp"; then
        echo "Installing the apps' Node.js client libraries into $tools/node"
        rm -rf "$tools/node"
        mkdir -p "$tools/node"
        cp "$clients/package.json" "$clients/package-lock.json" "$tools/node/"
        (cd "$tools/node" && npm ci --silent --no-audit --no-fund)
        sha256sum <"$clients/package-lock.json" >"$tools/node.stamp"
    fi
    chmod -R a+rX "$tools"
    HEARTH_CLIENTS_PYTHON="$tools/python/bin/python"
    HEARTH_CLIENTS_NODE_PATH="$tools/node/node_modules"
    HEARTH_POSTGRES16_BINDIR=$(echo "$tools"/python/lib/python3*/site-packages/pgserver/pginstall/bin)
    export HEARTH_CLIENTS_PYTHON HEARTH_CLIENTS_NODE_PATH HEARTH_POSTGRES16_BINDIR
}
