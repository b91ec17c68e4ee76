// spike: a calm baseline, a sudden jump to SPIKE_VUS, then back down.
// Passes when the spike itself stays under MAX_FAILED (backends shed load
// with 503 + Retry-After and the proxy retries on a sibling) and the
// recovery phase is failure-free with a bounded p99.
//
//   BASE_VUS=2 SPIKE_VUS=32 BASE=20 SPIKE_RAMP=5 SPIKE_HOLD=20 RECOVER=20 k6 run spike.js

import { envNum, envSecs, embed, baseOptions, summaryOutputs, waitForT0 } from './lib/common.js';

const BASE_VUS = envNum('BASE_VUS', 2);
const SPIKE_VUS = envNum('SPIKE_VUS', 32);
const BASE = envSecs('BASE', 20);
const SPIKE_RAMP = envSecs('SPIKE_RAMP', 5);
const SPIKE_HOLD = envSecs('SPIKE_HOLD', 20);
const RECOVER = envSecs('RECOVER', 20);
// Queues drain for a few seconds after the load drops; judge recovery after.
const SETTLE = envSecs('SETTLE', 5);

const spikeStart = BASE;
const spikeEnd = BASE + SPIKE_RAMP + SPIKE_HOLD + SPIKE_RAMP;
const PHASES = [
  { name: 'base', from: 0, to: spikeStart },
  { name: 'spike', from: spikeStart, to: spikeEnd + SETTLE },
  { name: 'recover', from: spikeEnd + SETTLE, to: spikeEnd + RECOVER + 60 },
];

export const options = baseOptions({
  spike: {
    executor: 'ramping-vus',
    startVUs: BASE_VUS,
    stages: [
      { duration: `${BASE}s`, target: BASE_VUS },
      { duration: `${SPIKE_RAMP}s`, target: SPIKE_VUS },
      { duration: `${SPIKE_HOLD}s`, target: SPIKE_VUS },
      { duration: `${SPIKE_RAMP}s`, target: BASE_VUS },
      { duration: `${RECOVER}s`, target: BASE_VUS },
    ],
    gracefulRampDown: '10s',
  },
}, {
  http_req_failed: [`rate<=${envNum('MAX_FAILED', 0.01)}`],
  'http_req_failed{phase:base}': ['rate==0'],
  'http_req_failed{phase:recover}': ['rate==0'],
  'http_req_duration{phase:recover}': [`p(99)<${envNum('P99_MS', 2000)}`],
  'http_reqs{phase:recover}': ['count>0'],
});

export function setup() {
  waitForT0();
}

export default function () {
  embed(PHASES);
}

export function handleSummary(data) {
  return summaryOutputs('spike', data);
}
