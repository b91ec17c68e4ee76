// canary-shift: under constant load, the driver rewrites the route's split
// in the proxy's TOML at each step (default 100/0 -> 50/50 -> 0/100; the
// proxy hot-reloads it). Passes when no request fails and, inside each step
// after SETTLE seconds, every pool's share matches that step's weights.
//
//   STEPS='blue=100,green=0;blue=50,green=50;blue=0,green=100' STEP=20 k6 run canary-shift.js
//   # meanwhile: lt_drive_canary_shift CONFIG   (loadtest/lib.sh; same STEPS, STEP, T0_MS)
//
// SETTLE covers the reload latency (the proxy promises < 2 s) plus clock
// slack between the driver and k6; weights of exactly 0 or 100 are asserted
// exactly, others within SPLIT_TOLERANCE.

import { envNum, envSecs, envStr, embed, parseSplit, splitThresholds, baseOptions, summaryOutputs, waitForT0 } from './lib/common.js';

const STEPS = envStr('STEPS', 'blue=100,green=0;blue=50,green=50;blue=0,green=100')
  .split(';').map((s) => s.trim()).filter(Boolean);
const STEP = envSecs('STEP', 20);
const SETTLE = envSecs('SETTLE', 4);
const TOL = envNum('SPLIT_TOLERANCE', 0.1);
const VUS = envNum('VUS', 8);

if (SETTLE >= STEP) throw new Error(`SETTLE (${SETTLE}) must be shorter than STEP (${STEP})`);

const PHASES = STEPS.map((_, i) => ({ name: `step${i}`, from: i * STEP + (i === 0 ? 0 : SETTLE), to: (i + 1) * STEP }));

const thresholds = { http_req_failed: ['rate==0'] };
STEPS.forEach((s, i) => {
  Object.assign(thresholds, splitThresholds(parseSplit(s, `STEPS[${i}]`), TOL, `step${i}`));
  thresholds[`http_reqs{phase:step${i}}`] = ['count>0'];
});

export const options = baseOptions({
  canary_shift: {
    executor: 'constant-vus',
    vus: VUS,
    duration: `${STEPS.length * STEP}s`,
    gracefulStop: '10s',
  },
}, thresholds);

export function setup() {
  waitForT0();
}

export default function () {
  embed(PHASES);
}

export function handleSummary(data) {
  return summaryOutputs('canary-shift', data);
}
