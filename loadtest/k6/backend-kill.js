// backend-kill: under constant load, the driver SIGKILLs TARGET_BACKEND,
// leaves it dead, then restarts it. Passes when:
//   - fewer than MAX_FAILED (0.5%) of all requests fail;
//   - failures happen only in the RECOVERY window (3 s) right after the
//     kill: the proxy must stop choosing the dead backend within it;
//   - the dead backend serves nothing while dead;
//   - after the restart it passes its health checks and serves again
//     within REJOIN seconds, without failing requests.
//
//   TARGET_BACKEND=127.0.0.1:9102 BEFORE=15 KILLED=20 AFTER=30 k6 run backend-kill.js
//   # meanwhile: lt_drive_backend_kill PID|PIDFILE [READY_URL] -- RESTART_CMD...   (loadtest/lib.sh)

import { cfg, envNum, envSecs, embed, baseOptions, summaryOutputs, waitForT0 } from './lib/common.js';

if (!cfg.targetBackend) throw new Error('TARGET_BACKEND is required (the address in x-switchyard-backend)');

const BEFORE = envSecs('BEFORE', 15);
const KILLED = envSecs('KILLED', 20);
const AFTER = envSecs('AFTER', 30);
const RECOVERY = envSecs('RECOVERY', 3);
// Restart to first traffic: process start and model load, then `rise`
// passing health checks.
const REJOIN = envSecs('REJOIN', 15);
const VUS = envNum('VUS', 8);

if (REJOIN >= AFTER) throw new Error(`REJOIN (${REJOIN}) must be shorter than AFTER (${AFTER})`);
if (RECOVERY >= KILLED) throw new Error(`RECOVERY (${RECOVERY}) must be shorter than KILLED (${KILLED})`);

const kill = BEFORE;
const restart = BEFORE + KILLED;
const PHASES = [
  { name: 'before', from: 0, to: kill },
  { name: 'recovering', from: kill, to: kill + RECOVERY },
  { name: 'killed', from: kill + RECOVERY, to: restart },
  { name: 'rejoining', from: restart, to: restart + REJOIN },
  { name: 'after', from: restart + REJOIN, to: restart + AFTER + 60 },
];

export const options = baseOptions({
  backend_kill: {
    executor: 'constant-vus',
    vus: VUS,
    duration: `${BEFORE + KILLED + AFTER}s`,
    gracefulStop: '10s',
  },
}, {
  http_req_failed: [`rate<${envNum('MAX_FAILED', 0.005)}`],
  'http_req_failed{phase:before}': ['rate==0'],
  'http_req_failed{phase:killed}': ['rate==0'],
  'http_req_failed{phase:rejoining}': ['rate==0'],
  'http_req_failed{phase:after}': ['rate==0'],
  'served_by_target_backend{phase:before}': ['rate>0'],
  'served_by_target_backend{phase:killed}': ['rate==0'],
  'served_by_target_backend{phase:after}': ['rate>0'],
});

export function setup() {
  waitForT0();
}

export default function () {
  embed(PHASES);
}

export function handleSummary(data) {
  return summaryOutputs('backend-kill', data);
}
