// proxy-upgrade: under constant load, the driver performs a graceful binary
// upgrade of the proxy (start the new binary with --upgrade, SIGQUIT the
// old one; the listening sockets pass over). Passes when no request fails,
// traffic keeps flowing after the old process has exited, and the split is
// the same on both sides of the upgrade.
//
//   BEFORE=15 AFTER=30 EXPECT_SPLIT=blue=90,green=10 k6 run proxy-upgrade.js
//   # meanwhile: lt_drive_proxy_upgrade OLD_PID [HEALTH_URL] -- NEW_CMD...   (loadtest/lib.sh)

import { envNum, envSecs, envStr, embed, parseSplit, splitThresholds, baseOptions, summaryOutputs, waitForT0 } from './lib/common.js';

const BEFORE = envSecs('BEFORE', 15);
const AFTER = envSecs('AFTER', 30);
// The handover itself plus the old process's grace period.
const UPGRADE = envSecs('UPGRADE', 15);
const VUS = envNum('VUS', 8);
const EXPECT = envStr('EXPECT_SPLIT', '');
const TOL = envNum('SPLIT_TOLERANCE', 0.1);

if (UPGRADE >= AFTER) throw new Error(`UPGRADE (${UPGRADE}) must be shorter than AFTER (${AFTER})`);

const PHASES = [
  { name: 'before', from: 0, to: BEFORE },
  { name: 'upgrading', from: BEFORE, to: BEFORE + UPGRADE },
  { name: 'after', from: BEFORE + UPGRADE, to: BEFORE + AFTER + 60 },
];

const thresholds = {
  http_req_failed: ['rate==0'],
  'http_reqs{phase:before}': ['count>0'],
  'http_reqs{phase:upgrading}': ['count>0'],
  'http_reqs{phase:after}': ['count>0'],
};
if (EXPECT) {
  const split = parseSplit(EXPECT, 'EXPECT_SPLIT');
  Object.assign(thresholds, splitThresholds(split, TOL, 'before'), splitThresholds(split, TOL, 'after'));
}

export const options = baseOptions({
  proxy_upgrade: {
    executor: 'constant-vus',
    vus: VUS,
    duration: `${BEFORE + AFTER}s`,
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
  return summaryOutputs('proxy-upgrade', data);
}
