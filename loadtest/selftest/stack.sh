# shellcheck shell=bash
# The fake stack for loadtest/run (STACK_LIB=loadtest/selftest/stack.sh):
# the same functions as scripts/lib/stack.sh over fakestack.py, to test the
# harness itself. Ports: SELFTEST_PORT_BASE (default 18400) +43 proxy TLS,
# +91 admin, +1/+2 blue backends, +11 green backend.

SELFTEST_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SELFTEST_BASE="${SELFTEST_PORT_BASE:-18400}"
STACK_RUN="$(mktemp -d "${TMPDIR:-/tmp}/switchyard-selftest.XXXXXX")"
STACK_CONFIG=$STACK_RUN/switchyard.toml
STACK_CERT_DIR=$STACK_RUN/certs
STACK_PIDS=()
declare -A STACK_PID_OF=()
declare -A STACK_ADDR_OF=(
    [blue-1]=127.0.0.1:$((SELFTEST_BASE + 1))
    [blue-2]=127.0.0.1:$((SELFTEST_BASE + 2))
    [green-1]=127.0.0.1:$((SELFTEST_BASE + 11))
)
SELFTEST_PROXY=127.0.0.1:$((SELFTEST_BASE + 43))
SELFTEST_ADMIN=127.0.0.1:$((SELFTEST_BASE + 91))
export SWITCHYARD_ADMIN_URL=http://$SELFTEST_ADMIN
export SWITCHYARD_URL=https://localhost:$((SELFTEST_BASE + 43))
export SWITCHYARD_CA=$STACK_CERT_DIR/ca.pem
FAKE=(python3 "$SELFTEST_DIR/fakestack.py")

stack_preflight() {
    local hp
    for hp in "$SELFTEST_PROXY" "$SELFTEST_ADMIN" "${STACK_ADDR_OF[@]}"; do
        if (exec 3<>"/dev/tcp/${hp%:*}/${hp#*:}") 2>/dev/null; then
            echo "selftest: port $hp is already in use; set SELFTEST_PORT_BASE" >&2
            return 2
        fi
    done
}

stack_prepare() {
    certs/gen-dev-certs --quiet --out "$STACK_CERT_DIR"
}

stack_spawn() { # name, then the command
    local name=$1
    shift
    "$@" >>"$STACK_RUN/$name.log" 2>&1 &
    STACK_PIDS+=($!)
    STACK_PID_OF[$name]=$!
}

stack_backend() { # name
    stack_spawn "$1" "${FAKE[@]}" backend --listen "${STACK_ADDR_OF[$1]}" --instance "$1" \
        --version "${1%-*}-v1"
}

stack_proxy() { # extra arguments (e.g. --upgrade)
    stack_spawn proxy "${FAKE[@]}" proxy --listen "$SELFTEST_PROXY" --admin "$SELFTEST_ADMIN" \
        --config "$STACK_CONFIG" --cert "$STACK_CERT_DIR/server.pem" \
        --key "$STACK_CERT_DIR/server.key" --upgrade-sock "$STACK_RUN/upgrade.sock" "$@"
}

stack_start() {
    [[ -f $STACK_CONFIG ]] || cat >"$STACK_CONFIG" <<TOML
[pools.blue]
backends = [{ address = "${STACK_ADDR_OF[blue-1]}", weight = 1 }, { address = "${STACK_ADDR_OF[blue-2]}", weight = 1 }]

[pools.green]
backends = [{ address = "${STACK_ADDR_OF[green-1]}", weight = 1 }]

[[routes]]
path_prefix = "/"
split = { blue = 90, green = 10 }
TOML
    local name a
    for name in blue-1 blue-2 green-1; do stack_backend "$name"; done
    stack_proxy
    for a in "${STACK_ADDR_OF[@]}"; do lt_wait_http "http://$a/health/ready" 15; done
    lt_wait_http "$SWITCHYARD_ADMIN_URL/metrics" 15
    lt_wait_http "$SWITCHYARD_URL/v1/embeddings" 15 -X POST -d '{"input":"warm"}' \
        -H 'content-type: application/json' --cacert "$SWITCHYARD_CA"
}

stack_stop() {
    local pid
    for pid in "${STACK_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${STACK_PIDS[@]}"; do lt_wait_pid_exit "$pid" 5 || kill -KILL "$pid" 2>/dev/null || true; done
    STACK_PIDS=()
}

stack_proxy_pid() {
    echo "${STACK_PID_OF[proxy]}"
}
