// Shared pieces of the Switchyard k6 scenarios: configuration from the
// environment, the embedding request, per-pool accounting, timeline phases
// and the end-of-test summary.
//
// Every scenario reads the same variables (see loadtest/README.md):
//   TARGET          base URL of the proxy          (https://localhost:8443)
//   TARGETS         several proxies (comma-separated), one per VU in turn
//   REQUEST_PATH    embedding endpoint             (/v1/embeddings)
//   POOLS           pools to account for           (blue,green)
//   T0_MS           epoch ms that phase offsets count from; the driver sets
//                   it so its actions and k6's phases share one clock
//                   (default: the scenario's own start)
//   SUMMARY_JSON    also write k6's summary data to this file
// TLS trust comes from SSL_CERT_FILE (k6 uses Go's crypto/x509, which reads
// it on Linux); INSECURE=1 turns verification off and says so in the summary.

import http from 'k6/http';
import { check, sleep } from 'k6';
import exec from 'k6/execution';
import { Counter, Rate, Trend } from 'k6/metrics';

export function envStr(name, dflt) {
  const v = __ENV[name];
  return v === undefined || v === '' ? dflt : v;
}

export function envNum(name, dflt) {
  const raw = envStr(name, undefined);
  if (raw === undefined) return dflt;
  const n = Number(raw);
  if (!Number.isFinite(n)) throw new Error(`${name} must be a number, got '${raw}'`);
  return n;
}

// Durations are given in seconds ("20" or "20s") so the shell driver can do
// arithmetic on the same values.
export function envSecs(name, dflt) {
  const raw = envStr(name, undefined);
  if (raw === undefined) return dflt;
  const m = /^(\d+(?:\.\d+)?)s?$/.exec(raw.trim());
  if (!m) throw new Error(`${name} must be a number of seconds like 20 or 20s, got '${raw}'`);
  return Number(m[1]);
}

const NAME_RE = /^[A-Za-z0-9_]+$/;

// TARGETS (comma-separated) spreads the VUs over several proxy replicas,
// one replica per VU; TARGET is the single-proxy default.
const TARGETS = envStr('TARGETS', envStr('TARGET', 'https://localhost:8443'))
  .split(',').map((t) => t.trim().replace(/\/+$/, '')).filter(Boolean);

export const cfg = {
  target: TARGETS[0],
  targets: TARGETS,
  path: envStr('REQUEST_PATH', '/v1/embeddings'),
  pools: envStr('POOLS', 'blue,green').split(',').map((s) => s.trim()).filter(Boolean),
  targetBackend: envStr('TARGET_BACKEND', ''),
  // Share of requests whose input was never sent before (cache misses); the
  // rest repeat a small working set, which the Redis cache should absorb.
  uniqueShare: envNum('UNIQUE_SHARE', 0.5),
  inputsPerRequest: Math.max(1, Math.floor(envNum('INPUTS_PER_REQUEST', 1))),
  requestTimeout: envStr('REQUEST_TIMEOUT', '30s'),
  // Parsing every body would cost the load generator more CPU than the
  // proxy; one in N is enough to catch a proxy that mangles responses.
  bodyCheckEvery: envNum('BODY_CHECK_EVERY', 25),
  expectDims: envNum('EXPECT_DIMS', 384),
  insecure: envStr('INSECURE', '0') === '1',
  idempotencyKey: envStr('IDEMPOTENCY_KEY', '0') === '1',
  // Think time per VU between requests; 0 is a closed loop at full speed.
  paceMs: envNum('PACE_MS', 0),
};

for (const p of cfg.pools) {
  if (!NAME_RE.test(p)) throw new Error(`POOLS: pool name '${p}' must match ${NAME_RE}`);
}

// --- metrics ---------------------------------------------------------------

// Per-pool metrics are separate named metrics rather than tagged submetrics:
// k6 only reports a submetric that a threshold mentions, and the summary
// must show the split by pool in every scenario.
export const poolRequests = {};
export const poolLatency = {};
export const servedBy = {};
for (const p of cfg.pools) {
  poolRequests[p] = new Counter(`requests_pool_${p}`);
  poolLatency[p] = new Trend(`latency_pool_${p}`, true);
  servedBy[p] = new Rate(`served_by_${p}`);
}
export const unknownPool = new Rate('unknown_pool');
export const servedByTarget = new Rate('served_by_target_backend');
export const backendRequests = new Counter('requests_by_backend');

// --- request ---------------------------------------------------------------

const WORKING_SET = 64;
function inputText(unique) {
  if (unique) {
    return `switchyard load ${exec.vu.idInTest}-${exec.vu.iterationInScenario}-${Date.now()}-${Math.random()}`;
  }
  const i = Math.floor(Math.random() * WORKING_SET);
  return `switchyard cached sentence number ${i}: the quick brown fox jumps over the lazy dog`;
}

function header(res, name) {
  const want = name.toLowerCase();
  for (const k of Object.keys(res.headers)) {
    if (k.toLowerCase() === want) return res.headers[k];
  }
  return undefined;
}

function t0() {
  const fromEnv = envNum('T0_MS', 0);
  return fromEnv > 0 ? fromEnv : exec.scenario.startTime;
}

// Scenarios export this as setup(): the load starts exactly at T0_MS, so
// the scenario's duration and the driver's timeline cover the same span.
export function waitForT0() {
  const fromEnv = envNum('T0_MS', 0);
  if (fromEnv <= 0) return;
  const wait = fromEnv - Date.now();
  if (wait > 60000) throw new Error(`T0_MS is ${Math.round(wait / 1000)}s in the future`);
  if (wait > 0) sleep(wait / 1000);
}

export function elapsedSecs() {
  return (Date.now() - t0()) / 1000;
}

// phases: [{name, from, to}] in seconds since T0; the first that contains
// the current time names the phase, else 'between'.
export function phaseAt(phases, secs) {
  for (const ph of phases) {
    if (secs >= ph.from && secs < ph.to) return ph.name;
  }
  return 'between';
}

// The JSON body of an embedding request: INPUTS_PER_REQUEST inputs, of
// which UNIQUE_SHARE were never sent before.
export function embeddingBody() {
  const n = cfg.inputsPerRequest;
  const inputs = [];
  for (let i = 0; i < n; i++) inputs.push(inputText(Math.random() < cfg.uniqueShare));
  return JSON.stringify({ input: n === 1 ? inputs[0] : inputs });
}

// One embedding request, checked and accounted per pool. `extra.headers`
// and `extra.tags` are added to the request's own (a client's API key, say).
export function embed(phases, extra = {}) {
  const phase = phases ? phaseAt(phases, elapsedSecs()) : 'all';
  const tags = Object.assign({ phase }, extra.tags);
  const n = cfg.inputsPerRequest;
  const headers = Object.assign({ 'content-type': 'application/json' }, extra.headers);
  if (cfg.idempotencyKey) headers['idempotency-key'] = `${exec.vu.idInTest}-${exec.vu.iterationInScenario}`;

  const target = cfg.targets[exec.vu.idInTest % cfg.targets.length];
  const res = http.post(`${target}${cfg.path}`, embeddingBody(), {
    headers,
    tags,
    timeout: cfg.requestTimeout,
  });

  const pool = header(res, 'x-switchyard-pool');
  const backend = header(res, 'x-switchyard-backend');
  const ok = res.status === 200;
  const checks = {
    'status is 200': (r) => r.status === 200,
    'x-switchyard-pool names a known pool': () => !ok || cfg.pools.includes(pool),
  };
  if (ok && cfg.bodyCheckEvery > 0 && exec.vu.iterationInScenario % cfg.bodyCheckEvery === 0) {
    checks[`body holds ${n} embedding(s) of ${cfg.expectDims} dims`] = (r) => {
      try {
        const body = r.json();
        return Array.isArray(body.data) && body.data.length === n &&
          body.data.every((d) => Array.isArray(d.embedding) && d.embedding.length === cfg.expectDims);
      } catch (_) {
        return false;
      }
    };
  }
  check(res, checks, tags);

  if (ok) {
    unknownPool.add(!cfg.pools.includes(pool), tags);
    for (const p of cfg.pools) servedBy[p].add(pool === p, tags);
    if (cfg.pools.includes(pool)) {
      poolRequests[pool].add(1, tags);
      poolLatency[pool].add(res.timings.duration, tags);
    }
    if (backend) backendRequests.add(1, { backend, phase });
    if (cfg.targetBackend) {
      // Without the header every answer would count as "not the target",
      // and a drained target's zero would pass without testing anything.
      if (!backend) {
        exec.test.abort('TARGET_BACKEND is set but the proxy sends no x-switchyard-backend; ' +
          'turn it on with [response_headers] backend = true');
      }
      servedByTarget.add(backend === cfg.targetBackend, tags);
    }
  }
  if (cfg.paceMs > 0) sleep(cfg.paceMs / 1000);
  return res;
}

// --- thresholds ------------------------------------------------------------

// "blue=90,green=10" -> {blue: 0.9, green: 0.1}
export function parseSplit(text, what) {
  const out = {};
  let total = 0;
  for (const part of text.split(',').map((s) => s.trim()).filter(Boolean)) {
    const m = /^([A-Za-z0-9_]+)=(\d+(?:\.\d+)?)$/.exec(part);
    if (!m) throw new Error(`${what}: '${part}' is not pool=weight`);
    out[m[1]] = Number(m[2]);
    total += Number(m[2]);
  }
  if (total <= 0) throw new Error(`${what}: weights must add up to more than 0`);
  for (const k of Object.keys(out)) out[k] /= total;
  return out;
}

// Thresholds asserting that pool shares match a split within a tolerance,
// optionally for one phase. A share of exactly 0 or 1 is asserted exactly:
// "no request reached green" must not hide behind a tolerance.
export function splitThresholds(split, tolerance, phase) {
  const t = {};
  const sel = phase ? `{phase:${phase}}` : '';
  for (const p of cfg.pools) {
    const share = split[p] || 0;
    const key = `served_by_${p}${sel}`;
    if (share === 0) t[key] = ['rate==0'];
    else if (share === 1) t[key] = ['rate==1'];
    else t[key] = [`rate>=${(share - tolerance).toFixed(4)}`, `rate<=${(share + tolerance).toFixed(4)}`];
  }
  for (const p of Object.keys(split)) {
    if (!cfg.pools.includes(p)) throw new Error(`split names pool '${p}', which is not in POOLS=${cfg.pools.join(',')}`);
  }
  return t;
}

export function baseOptions(scenarios, thresholds) {
  return {
    scenarios,
    thresholds: Object.assign({
      // A response from no known pool means the header contract broke.
      unknown_pool: ['rate==0'],
      checks: ['rate>0.99'],
    }, thresholds),
    insecureSkipTLSVerify: cfg.insecure,
    summaryTrendStats: ['avg', 'min', 'med', 'p(90)', 'p(95)', 'p(99)', 'max'],
    // Keep one TLS session per VU, as a real client pool would.
    noConnectionReuse: false,
    discardResponseBodies: false,
  };
}

// --- summary ---------------------------------------------------------------

function fmtMs(v) {
  if (v === undefined || v === null || Number.isNaN(v)) return '-';
  return v >= 1000 ? `${(v / 1000).toFixed(2)}s` : `${v.toFixed(1)}ms`;
}

export function summarize(name, data) {
  const m = data.metrics;
  const reqs = m.http_reqs ? m.http_reqs.values.count : 0;
  const failedRate = m.http_req_failed ? m.http_req_failed.values.rate : 0;
  const failed = m.http_req_failed ? m.http_req_failed.values.passes : 0;
  const d = m.http_req_duration ? m.http_req_duration.values : {};
  const lines = [];
  lines.push(`== ${name}: ${cfg.targets.join(' + ')}${cfg.path}${cfg.insecure ? '  (TLS verification OFF: INSECURE=1)' : ''}`);
  lines.push(`requests: ${reqs}   failed: ${failed} (${(failedRate * 100).toFixed(3)}%)   ` +
    `rate: ${m.http_reqs ? m.http_reqs.values.rate.toFixed(1) : 0}/s`);
  lines.push(`latency:  p50 ${fmtMs(d.med)}   p95 ${fmtMs(d['p(95)'])}   p99 ${fmtMs(d['p(99)'])}   max ${fmtMs(d.max)}`);
  const served = cfg.pools.reduce((acc, p) => acc + (m[`requests_pool_${p}`] ? m[`requests_pool_${p}`].values.count : 0), 0);
  for (const p of cfg.pools) {
    const c = m[`requests_pool_${p}`] ? m[`requests_pool_${p}`].values.count : 0;
    const l = m[`latency_pool_${p}`] ? m[`latency_pool_${p}`].values : {};
    const share = served ? ((100 * c) / served).toFixed(1) : '0.0';
    lines.push(`pool ${p.padEnd(8)} ${String(c).padStart(8)} (${share.padStart(5)}%)   p50 ${fmtMs(l.med)}   p99 ${fmtMs(l['p(99)'])}`);
  }
  const failedThresholds = [];
  let total = 0;
  for (const [metric, v] of Object.entries(m)) {
    if (!v.thresholds) continue;
    for (const [expr, r] of Object.entries(v.thresholds)) {
      total += 1;
      if (!r.ok) {
        const val = v.values.rate !== undefined ? `rate=${v.values.rate.toFixed(4)}` :
          v.values.count !== undefined ? `count=${v.values.count}` : JSON.stringify(v.values);
        failedThresholds.push(`  FAIL ${metric}: ${expr} (${val})`);
      }
    }
  }
  lines.push(failedThresholds.length ? `thresholds: ${failedThresholds.length} of ${total} FAILED` : `thresholds: all ${total} passed`);
  lines.push(...failedThresholds);
  return lines.join('\n') + '\n';
}

export function summaryOutputs(name, data) {
  const out = { stdout: summarize(name, data) };
  const file = envStr('SUMMARY_JSON', '');
  if (file) out[file] = JSON.stringify(data, null, 1);
  return out;
}
