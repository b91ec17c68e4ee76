# shellcheck shell=bash
# The local stack shared by scripts/demo and the load-test runners: Redis,
# blue-1 and blue-2 (pool blue), green-1 (pool green) and the TLS proxy on
# fixed loopback ports. Source it from the repository root after `set -euo
# pipefail`. Every process it starts is recorded in STACK_PIDS and stopped by
# stack_stop, so callers trap it on EXIT.

STACK_RUN=${STACK_RUN:-.run}
STACK_CONFIG=$STACK_RUN/switchyard.toml
STACK_PORTS=(6399 9101 9102 9201 8443 9901)
STACK_CERT_DIR=certs
STACK_PIDS=()
declare -A STACK_PID_OF=()
declare -A STACK_ADDR_OF=([blue-1]=127.0.0.1:9101 [blue-2]=127.0.0.1:9102 [green-1]=127.0.0.1:9201)
export SWITCHYARD_ADMIN_URL=http://127.0.0.1:9901
export SWITCHYARD_URL=https://localhost:8443
export SWITCHYARD_CA=certs/ca.pem

stack_log() { echo "stack: $*" >&2; }

# Refuses to start a second stack instead of failing later on busy ports.
stack_preflight() {
  if [[ -f $STACK_RUN/stack.pid ]] && kill -0 "$(cat "$STACK_RUN/stack.pid")" 2>/dev/null; then
    stack_log "already running (pid $(cat "$STACK_RUN/stack.pid")); use it, or press Ctrl-C in its terminal to stop it."
    return 1
  fi
  local port ports=("${STACK_PORTS[@]}")
  ((STACK_REPLICAS == 1)) || ports+=(8444 9902)
  for port in "${ports[@]}"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      stack_log "port $port is already in use by another program; stop it first (ss -ltnp 'sport = :$port')."
      return 1
    fi
  done
}

# Everything a fresh machine lacks: packages, model, release build, certs.
stack_prepare() {
  scripts/install-deps
  scripts/fetch-model
  cargo build --release --locked --bins
  certs/gen-dev-certs --quiet
}

# Appends to the log: an upgraded proxy or a restarted backend writes after
# the process it replaces. The proxy's pid lives in a file, not STACK_PIDS,
# because a graceful upgrade (possibly from another shell) replaces it.
stack_spawn() { # name, then the command
  local name=$1
  shift
  "$@" >>"$STACK_RUN/$name.log" 2>&1 &
  STACK_PID_OF[$name]=$!
  if [[ $name == proxy ]]; then
    echo $! >"$STACK_RUN/proxy.pid"
  else
    STACK_PIDS+=($!)
  fi
  stack_log "started $name (pid $!), log $STACK_RUN/$name.log"
}

# Prints nothing (and succeeds, for `set -e` callers) when no proxy runs.
stack_proxy_pid() {
  cat "$STACK_RUN/proxy.pid" 2>/dev/null || true
}

# Starts (or restarts, after a kill) one backend of the fixed fleet, with
# the extra arguments in STACK_BACKEND_ARGS[name], if any (a load scenario
# gives a canary a fault or another model).
declare -A STACK_BACKEND_ARGS=()
stack_backend() { # name
  local addr=${STACK_ADDR_OF[$1]:?unknown backend $1} extra=()
  read -r -a extra <<<"${STACK_BACKEND_ARGS[$1]:-}"
  stack_spawn "$1" target/release/switchyard-backend --listen "$addr" \
    --instance "$1" --version "${1%-*}-v1" --redis-url redis://127.0.0.1:6399 "${extra[@]}"
}

# The copy lives in another directory than config/, so its relative paths
# are made absolute: certificates from certs/, run files into STACK_RUN.
stack_copy_config() {
  sed -e "s#\"\.\./\.run#\"$PWD/$STACK_RUN#" -e "s#\"\.\./#\"$PWD/#" \
    config/switchyard.toml >"$STACK_CONFIG"
}

# With STACK_REPLICAS=2, both proxies share their drains through the
# stack's Redis ([replicas], docs/replicas.md), and a second proxy serves
# TLS on 8444 and its admin API on 9902, from its own copy of the file.
STACK_REPLICAS=${STACK_REPLICAS:-1}
stack_share_drains() {
  sed -i '/^\[limits\]/i [replicas]\nredis_url = "redis://127.0.0.1:6399"\n' "$STACK_CONFIG"
  sed -e 's/127.0.0.1:8443/127.0.0.1:8444/' -e 's/127.0.0.1:9901/127.0.0.1:9902/' \
    -e "s#\"$PWD/$STACK_RUN/state.json\"#\"$PWD/$STACK_RUN/replica-2/state.json\"#" \
    -e "s#\"$PWD/$STACK_RUN\"#\"$PWD/$STACK_RUN/replica-2\"#" \
    "$STACK_CONFIG" >"$STACK_RUN/switchyard-2.toml"
}

stack_proxy() { # extra switchyard run arguments (e.g. --upgrade)
  stack_spawn proxy target/release/switchyard run --config "$STACK_CONFIG" "$@"
}

# Starts the new binary with --upgrade, waits until it listens on the
# upgrade socket, then SIGQUITs the old one, which hands over its listening
# sockets, finishes its in-flight requests and exits.
stack_upgrade_proxy() {
  local old sock=$STACK_RUN/upgrade.sock
  old=$(stack_proxy_pid)
  kill -0 "$old" 2>/dev/null || { stack_log "no running proxy to upgrade"; return 1; }
  rm -f "$sock"
  stack_proxy --upgrade
  stack_wait "the new proxy's upgrade socket" 60 test -S "$sock" || return 1
  kill -QUIT "$old"
  stack_wait "the old proxy (pid $old) to finish" 60 bash -c '! kill -0 "$1" 2>/dev/null' _ "$old" || return 1
  stack_log "upgraded: proxy pid $old -> $(stack_proxy_pid)"
}

stack_start() {
  mkdir -p "$STACK_RUN"
  echo $$ >"$STACK_RUN/stack.pid"
  rm -f "$STACK_RUN"/*.log
  stack_spawn redis redis-server --port 6399 --bind 127.0.0.1 --save "" --appendonly no
  stack_backend blue-1
  stack_backend blue-2
  stack_backend green-1
  if [[ -f $STACK_CONFIG ]]; then
    stack_log "using the existing $STACK_CONFIG (delete it to start again from config/switchyard.toml)"
  else
    stack_copy_config
    ((STACK_REPLICAS == 1)) || stack_share_drains
  fi
  [[ -f $STACK_RUN/admin-token ]] || (umask 077 && openssl rand -hex 16 >"$STACK_RUN/admin-token")
  SWITCHYARD_ADMIN_TOKEN=$(cat "$STACK_RUN/admin-token")
  export SWITCHYARD_ADMIN_TOKEN
  stack_proxy
  if ((STACK_REPLICAS > 1)); then
    mkdir -p "$STACK_RUN/replica-2"
    stack_spawn proxy-2 target/release/switchyard run --config "$STACK_RUN/switchyard-2.toml"
  fi
  local addr
  for addr in "${STACK_ADDR_OF[@]}"; do
    stack_wait "backend $addr" 180 curl -sf "http://$addr/health/ready"
  done
  stack_wait "the proxy" 60 curl -sf --cacert "$SWITCHYARD_CA" "$SWITCHYARD_URL/v1/embeddings" \
    -H 'content-type: application/json' -d '{"input":"hello"}'
  if ((STACK_REPLICAS > 1)); then
    stack_wait "the second proxy" 60 curl -sf --cacert "$SWITCHYARD_CA" https://localhost:8444/v1/embeddings \
      -H 'content-type: application/json' -d '{"input":"hello"}'
  fi
}

stack_alive() {
  local pid
  for pid in "${STACK_PIDS[@]}" $(stack_proxy_pid); do kill -0 "$pid" 2>/dev/null || return 1; done
}

stack_wait() { # what, seconds, command...
  local what=$1 limit=$2
  shift 2
  for _ in $(seq $((limit * 5))); do
    "$@" >/dev/null 2>&1 && return 0
    stack_alive || { stack_log "a process died while waiting for $what; see $STACK_RUN/*.log"; return 1; }
    sleep 0.2
  done
  stack_log "$what not ready after ${limit}s; see $STACK_RUN/*.log"
  return 1
}

# The proxy goes first, so no request is sent to a backend already stopping.
stack_stop() {
  local i pid alive all
  all=("${STACK_PIDS[@]}" $(stack_proxy_pid))
  ((${#all[@]})) || return 0
  stack_log "stopping ${#all[@]} processes"
  for ((i = ${#all[@]} - 1; i >= 0; i--)); do kill -TERM "${all[i]}" 2>/dev/null || true; done
  for _ in $(seq 75); do
    alive=0
    for pid in "${all[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    ((alive)) || break
    sleep 0.2
  done
  for pid in "${all[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  STACK_PIDS=()
  rm -f "$STACK_RUN/stack.pid" "$STACK_RUN/proxy.pid"
}
