//! Attempts and their judgement: which backend goes next, what is
//! retried, what counts against a backend's health, which status a
//! failure becomes; then the relay of the answer that stands.

use std::sync::Arc;

use super::answer::{self, Refusal};
use super::attempt::{attempt, Failure};
use super::headers::Wire;
use super::mirror;
use super::{Call, Front, Head as _};
use crate::codec::body::RelayError;
use crate::codec::head::{Known, ResponseHead};
use crate::config::Config;
use crate::routing::{clock, parse_load_report, Backend, Pool};
use crate::upstream::Conn;

/// Attempts on backends until one answers or the retry rule says stop.
pub async fn forward<F: Front>(
    front: &mut F,
    call: &mut Call<F::Head>,
    wire: Wire,
    replayable: bool,
) where
    F::Head: Send + Sync,
{
    let active = call.active.clone();
    let config = &active.config;
    let mut pool = call.pool.clone().expect("picked before forwarding");
    loop {
        let Some(left) = config.timeouts.total.checked_sub(call.start.elapsed()) else {
            return answer::refuse(front, call, Refusal::TimeBudget).await;
        };
        let backend = pool.members[call.member.expect("picked")].backend.clone();
        call.tried.push(backend.addr);
        call.attempts += 1;
        let head_request = call.head.is_head();
        let tried = attempt(
            &backend,
            &wire,
            &config.timeouts,
            left,
            head_request,
            replayable,
        );
        let Some(outcome) = front.unless_cancelled(tried).await else {
            call.keep = false;
            call.error = Some("the client cancelled the request".to_string());
            return;
        };
        match outcome {
            Ok((conn, resp)) => {
                let retry_after = resp.fields.get("retry-after").is_some();
                record_answer(&backend, config, resp.status, retry_after);
                record_load(&backend, &resp);
                // 503 and 429 are how backends say "full" (TEI answers 429):
                // another backend may have room.
                let full = matches!(resp.status, 429 | 503);
                if !(full && may_retry(call, &pool, replayable)) {
                    match to_baseline(call, resp.status >= 500, replayable) {
                        Some(baseline) => pool = baseline,
                        None => return relay(front, call, conn, resp, wire).await,
                    }
                }
            }
            Err((failure, reused)) => {
                if !judge_failure(call, &backend, &pool, &failure, reused, replayable) {
                    match to_baseline(call, true, replayable) {
                        Some(baseline) => pool = baseline,
                        None => return fail(front, call, &failure).await,
                    }
                }
            }
        }
        let Some((next, lease)) = pool.lease(&call.tried) else {
            let refusal = Refusal::none_left(&pool, &call.tried);
            return answer::refuse(front, call, refusal).await;
        };
        pool.metrics.retries.inc();
        call.lease = Some(lease);
        call.member = Some(next);
    }
}

/// A request the canary of a rollout failed goes once more, to the
/// baseline (`rollout.retry_on_baseline`), so that a bad canary's blast
/// radius is what the retry cannot save. The canary's window counts the
/// failure now, and the request leaves the windows.
fn to_baseline<H>(call: &mut Call<H>, failed: bool, replayable: bool) -> Option<Arc<Pool>> {
    let (windows, arm) = call.arm.as_ref()?;
    if !failed || *arm != 1 || !windows.retry_on_baseline {
        return None;
    }
    let baseline = call.active.pools.get(&windows.pools[0])?.clone();
    if !may_retry(call, &baseline, replayable) {
        return None;
    }
    let ms = call.start.elapsed().as_secs_f64() * 1000.0;
    windows.arms[1].record(true, ms);
    call.arm = None;
    call.pool = Some(baseline.clone());
    Some(baseline)
}

/// Counts a failed attempt against the backend where it says something
/// about it; whether the request goes to another backend.
fn judge_failure<H>(
    call: &Call<H>,
    backend: &Backend,
    pool: &Pool,
    failure: &Failure,
    reused: bool,
    replayable: bool,
) -> bool {
    let timed_out = matches!(failure, Failure::TimedOut);
    let answered = matches!(failure, Failure::Answered(_));
    let connecting = matches!(failure, Failure::Connect(_));
    // A pooled connection the backend already closed says nothing about
    // the backend's health.
    if connecting || !reused {
        let what = match failure {
            Failure::Connect(e) => format!("connect failed: {e}"),
            f => format!("proxying failed: {}", f.describe()),
        };
        backend.record_failure(&call.config().passive, what);
    }
    // Inference calls are idempotent, so a request nothing answered may go
    // elsewhere, whatever its method. A timeout after connecting is not
    // retried: it would only double the load.
    (connecting || !(timed_out || answered)) && may_retry(call, pool, replayable)
}

/// Passive health from a backend's answer. An overload 503 (with
/// Retry-After) is load shedding, not a fault: ejecting for it would push
/// more load onto the siblings.
fn record_answer(backend: &Backend, config: &Config, status: u16, retry_after: bool) {
    let overloaded = status == 503 && retry_after;
    if status >= 500 && !overloaded {
        backend.record_failure(&config.passive, format!("answered {status}"));
    } else {
        backend.record_success();
    }
}

/// The backend's in-band load report, if its answer carries one: fresher
/// than the readiness poll, so the next pick sees the queue as it is now.
fn record_load(backend: &Backend, resp: &ResponseHead) {
    let mut fields = resp.fields.iter();
    if let Some((_, value, _)) = fields.find(|f| f.2 == Known::LoadReport) {
        if let Some((depth, capacity)) = parse_load_report(value) {
            backend.set_queue(depth, capacity, clock::now_ms());
        }
    }
}

/// Whether another attempt is allowed: retries left, time left, the body
/// replayable (`retry.buffer_body_max`), and an untried eligible backend.
fn may_retry<H>(call: &Call<H>, pool: &Pool, replayable: bool) -> bool {
    let config = call.config();
    call.attempts <= config.retry.retries
        && call.start.elapsed() < config.timeouts.total
        && replayable
        && pool.pick(&call.tried).is_some()
}

/// A failed attempt that stands: 504 for a timeout, else 502.
async fn fail<F: Front>(front: &mut F, call: &mut Call<F::Head>, failure: &Failure)
where
    F::Head: Send + Sync,
{
    let name = call.backend_name().to_string();
    let (status, msg) = match failure {
        Failure::TimedOut => (504, format!("backend {name} timed out")),
        Failure::Connect(e) if e.kind() == std::io::ErrorKind::TimedOut => {
            (504, format!("backend {name} timed out"))
        }
        f => (502, format!("backend {name} failed: {}", f.describe())),
    };
    let kind = if status == 504 {
        "upstream_timeout"
    } else {
        "upstream_error"
    };
    call.error = Some(msg.clone());
    answer::respond(front, call, status, kind, &msg).await;
}

/// Sends the backend's answer on to the client, then gives the backend
/// connection back to the idle set when it can carry another request.
pub async fn relay<F: Front>(
    front: &mut F,
    call: &mut Call<F::Head>,
    mut conn: Conn,
    resp: ResponseHead,
    wire: Wire,
) where
    F::Head: Send + Sync,
{
    call.keep &= !front.closing();
    call.status = resp.status;
    let config = call.active.config.clone();
    let mirror = mirror::choose(call.arm.as_ref(), &resp, &wire);
    let answer = match &mirror {
        Some(_) => mirror::read_answer(&mut conn, &resp, config.timeouts.read).await,
        None => None,
    };
    match front.relay(call, &mut conn, &resp).await {
        Ok(done) => {
            call.bytes_out = done.bytes_out;
            if let (Some(mirror), Some(answer)) = (mirror, answer) {
                mirror.spawn(call.active.clone(), wire, answer);
            }
            if conn.reusable && resp.keep_alive() && conn.buf.is_empty() {
                let backend = call.lease.as_ref().expect("leased").backend();
                backend.idle.put(conn, config.timeouts.upstream_idle);
            }
        }
        Err((RelayError::Upstream(e), done)) => {
            call.keep = false;
            call.bytes_out = done.bytes_out;
            let backend = call.lease.as_ref().expect("leased").backend().clone();
            if !conn.reused {
                backend.record_failure(&config.passive, format!("proxying failed: {e}"));
            }
            if done.untouched {
                fail(front, call, &Failure::from_body(e)).await;
            } else {
                call.error = Some(format!("backend {} failed mid-body: {e}", backend.name));
            }
        }
        Err((RelayError::Client(e), done)) => {
            call.keep = false;
            call.bytes_out = done.bytes_out;
            call.error = Some(format!("client went away: {e}"));
        }
    }
}
