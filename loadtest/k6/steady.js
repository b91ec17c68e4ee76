// steady: ramp up to VUS, hold, and check that the proxy keeps the
// configured split with no failures and a bounded p99.
//
//   VUS=8 RAMP=30 HOLD=60 EXPECT_SPLIT=blue=90,green=10 k6 run steady.js
//
// EXPECT_SPLIT   split the route is configured with; empty skips the check
// SPLIT_TOLERANCE allowed absolute deviation of each pool's share (0.05)
// MAX_FAILED     highest acceptable failed-request rate (0)
// P99_MS         p99 latency bound in ms (2000; size it to your hardware)

import { envNum, envSecs, envStr, embed, parseSplit, splitThresholds, baseOptions, summaryOutputs, waitForT0 } from './lib/common.js';

const VUS = envNum('VUS', 8);
const RAMP = envSecs('RAMP', 30);
const HOLD = envSecs('HOLD', 60);
const EXPECT = envStr('EXPECT_SPLIT', '');
const TOL = envNum('SPLIT_TOLERANCE', 0.05);

// Latency and split are judged on the hold only: during the ramp the first
// TLS handshakes and cold caches dominate.
const PHASES = [
  { name: 'ramp', from: 0, to: RAMP },
  { name: 'hold', from: RAMP, to: RAMP + HOLD + 60 },
];

const thresholds = {
  http_req_failed: [`rate<=${envNum('MAX_FAILED', 0)}`],
  'http_req_duration{phase:hold}': [`p(99)<${envNum('P99_MS', 2000)}`],
  'http_reqs{phase:hold}': ['count>0'],
};
if (EXPECT) Object.assign(thresholds, splitThresholds(parseSplit(EXPECT, 'EXPECT_SPLIT'), TOL, 'hold'));

export const options = baseOptions({
  steady: {
    executor: 'ramping-vus',
    startVUs: 1,
    stages: [
      { duration: `${RAMP}s`, target: VUS },
      { duration: `${HOLD}s`, target: VUS },
    ],
    gracefulRampDown: '10s',
  },
}, thresholds);

export function setup() {
  waitForT0();
}

export default function () {
  embed(PHASES);
}

export function handleSummary(data) {
  return summaryOutputs('steady', data);
}
