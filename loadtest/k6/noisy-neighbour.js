// noisy-neighbour: CALM_CLIENTS well-behaved clients, each with its own
// x-api-key, at CALM_RATE requests/s each (under the per-key LIMIT), and one
// noisy client sending NOISY times LIMIT under a single key, for DURATION
// seconds, both open-loop. The route must carry a per-key rule of LIMIT
// requests/s (loadtest/run appends it). NOISY=0 runs the calm clients alone:
// the baseline that loadtest/run compares the calm p99 against.
//
// Thresholds: no calm request fails (a 429 is a failure for them); the
// noisy client gets nothing but 200s and 429s, and about 1 - 1/NOISY of its
// requests are refused: it is limited, to its limit and not below.
//
//   LIMIT=4 CALM_CLIENTS=10 CALM_RATE=2 NOISY=10 DURATION=60 k6 run noisy-neighbour.js

import http from 'k6/http';
import exec from 'k6/execution';
import { Rate, Trend } from 'k6/metrics';
import { cfg, envNum, envSecs, embed, embeddingBody, baseOptions, summaryOutputs, waitForT0 } from './lib/common.js';

const LIMIT = envNum('LIMIT', 4);
const CALM_CLIENTS = envNum('CALM_CLIENTS', 10);
const CALM_RATE = envNum('CALM_RATE', LIMIT / 2);
const NOISY = envNum('NOISY', 10);
const DURATION = envSecs('DURATION', 60);

const calmLatency = new Trend('latency_calm', true);
const noisyLimited = new Rate('noisy_limited');
// For the noisy client a 429 is the expected answer, not a failure.
const limitedIsExpected = http.expectedStatuses(200, 429);

// An open-loop scenario of `rate` requests/s running `fn`.
function arrivals(rate, fn) {
  return {
    executor: 'constant-arrival-rate',
    exec: fn,
    rate,
    timeUnit: '1s',
    duration: `${DURATION}s`,
    preAllocatedVUs: Math.max(4, Math.ceil(rate / 10)),
    maxVUs: Math.max(8, Math.ceil(rate / 2)),
    gracefulStop: '10s',
  };
}

const scenarios = { calm: arrivals(CALM_CLIENTS * CALM_RATE, 'calm') };
const thresholds = {
  'http_req_failed{client:calm}': ['rate==0'],
  dropped_iterations: [`count<=${Math.ceil((CALM_CLIENTS * CALM_RATE + NOISY * LIMIT) * DURATION * 0.01)}`],
};
if (NOISY > 0) {
  scenarios.noisy = arrivals(NOISY * LIMIT, 'noisy');
  const refused = 1 - 1 / NOISY;
  thresholds['http_req_failed{client:noisy}'] = ['rate==0'];
  thresholds.noisy_limited = [`rate>=${(refused - 0.1).toFixed(3)}`, `rate<=${(refused + 0.05).toFixed(3)}`];
}

export const options = baseOptions(scenarios, thresholds);

export function setup() {
  waitForT0();
}

// The calm keys take turns, so each gets CALM_RATE requests/s, evenly spaced.
export function calm() {
  const key = `calm-${exec.scenario.iterationInTest % CALM_CLIENTS}`;
  const res = embed(null, { headers: { 'x-api-key': key }, tags: { client: 'calm' } });
  calmLatency.add(res.timings.duration);
}

export function noisy() {
  const res = http.post(`${cfg.target}${cfg.path}`, embeddingBody(), {
    headers: { 'content-type': 'application/json', 'x-api-key': 'noisy' },
    tags: { client: 'noisy' },
    timeout: cfg.requestTimeout,
    responseCallback: limitedIsExpected,
  });
  noisyLimited.add(res.status === 429);
}

export function handleSummary(data) {
  return summaryOutputs(NOISY > 0 ? 'noisy-neighbour' : 'noisy-neighbour (calm only)', data);
}
