// drain: under constant load, the driver drains TARGET_BACKEND through the
// admin API (POST .../drain?wait=...), holds it drained, then undrains it.
// Passes when no request fails, the drained backend serves nothing while
// drained, and it serves again after the undrain.
//
//   TARGET_BACKEND=127.0.0.1:9101 BEFORE=15 DRAINED=20 AFTER=15 k6 run drain.js
//   # meanwhile: lt_drive_drain ADMIN_URL 127.0.0.1:9101   (loadtest/lib.sh; same timings, T0_MS)
//
// TARGET_BACKEND is the value the proxy puts in x-switchyard-backend.

import { cfg, envNum, envSecs, embed, baseOptions, summaryOutputs, waitForT0 } from './lib/common.js';

if (!cfg.targetBackend) throw new Error('TARGET_BACKEND is required (the address in x-switchyard-backend)');

const BEFORE = envSecs('BEFORE', 15);
const DRAINED = envSecs('DRAINED', 20);
const AFTER = envSecs('AFTER', 15);
// In-flight requests that started before the drain may still finish on
// the drained backend; a drain acknowledged by the admin API covers them.
const SETTLE = envSecs('SETTLE', 2);
const VUS = envNum('VUS', 8);

const PHASES = [
  { name: 'before', from: 0, to: BEFORE },
  { name: 'drained', from: BEFORE + SETTLE, to: BEFORE + DRAINED },
  { name: 'after', from: BEFORE + DRAINED + SETTLE, to: BEFORE + DRAINED + AFTER + 60 },
];

export const options = baseOptions({
  drain: {
    executor: 'constant-vus',
    vus: VUS,
    duration: `${BEFORE + DRAINED + AFTER}s`,
    gracefulStop: '10s',
  },
}, {
  http_req_failed: ['rate==0'],
  'served_by_target_backend{phase:before}': ['rate>0'],
  'served_by_target_backend{phase:drained}': ['rate==0'],
  'served_by_target_backend{phase:after}': ['rate>0'],
  'http_reqs{phase:drained}': ['count>0'],
});

export function setup() {
  waitForT0();
}

export default function () {
  embed(PHASES);
}

export function handleSummary(data) {
  return summaryOutputs('drain', data);
}
