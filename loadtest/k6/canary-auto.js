// canary-auto: an open-loop load at RATE requests/s for DURATION seconds
// while the driver starts an automated rollout of the green pool
// (lt_drive_rollout in loadtest/lib.sh) and waits for its verdict. k6
// judges what the clients saw: the failed share over the whole run, which
// spans the rollout, must stay at or under MAX_FAILED (0 means none may
// fail). The driver judges the verdict itself and how fast it came.
//
//   RATE=100 DURATION=60 MAX_FAILED=0.001 k6 run canary-auto.js

import { envNum, envSecs, embed, baseOptions, summaryOutputs, waitForT0 } from './lib/common.js';

const RATE = envNum('RATE', 100);
const DURATION = envSecs('DURATION', 60);
const MAX_FAILED = envNum('MAX_FAILED', 0.001);

export const options = baseOptions({
  canary_auto: {
    executor: 'constant-arrival-rate',
    rate: RATE,
    timeUnit: '1s',
    duration: `${DURATION}s`,
    preAllocatedVUs: Math.max(4, Math.ceil(RATE / 10)),
    maxVUs: Math.max(8, Math.ceil(RATE / 2)),
    gracefulStop: '10s',
  },
}, {
  http_req_failed: [MAX_FAILED > 0 ? `rate<=${MAX_FAILED}` : 'rate==0'],
  // An open-loop run that could not keep its rate would judge less load
  // than it claims.
  dropped_iterations: [`count<=${Math.ceil(RATE * DURATION * 0.01)}`],
});

export function setup() {
  waitForT0();
}

export default function () {
  embed(null);
}

export function handleSummary(data) {
  return summaryOutputs('canary-auto', data);
}
