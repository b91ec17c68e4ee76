//! Output agreement for a route under rollout: a sampled share of its
//! requests (`compare.sample`, at most `MAX_MIRRORS` in flight per route)
//! is sent again, in the background, to the other arm, and the two
//! answers' embedding vectors are compared. The client gets only its own
//! answer; the mirror never delays it beyond reading that answer whole
//! before relaying it (one Content-Length body of at most 1 MiB, which an
//! embeddings backend writes at once).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::attempt::attempt;
use super::headers::Wire;
use crate::codec::body;
use crate::codec::head::{Framing, ResponseHead};
use crate::routing::{MirrorSlot, RouteWindows};
use crate::shared::Active;
use crate::upstream::Conn;

/// Largest request body mirrored; larger ones are skipped.
pub const MAX_MIRRORED_BODY: usize = 64 * 1024;
/// Largest answer read whole for a comparison.
const MAX_ANSWER: usize = 1024 * 1024;

/// One request chosen for mirroring: its slot, its route's windows and
/// the arm that served it.
pub struct Mirror {
    slot: MirrorSlot,
    windows: Arc<RouteWindows>,
    arm: usize,
}

/// Whether this answer is mirrored: a 200 on a comparing route, drawn at
/// the sample rate, with a slot free and a small enough request body.
pub fn choose(
    arm: Option<&(Arc<RouteWindows>, usize)>,
    resp: &ResponseHead,
    wire: &Wire,
) -> Option<Mirror> {
    let (windows, arm) = arm?;
    if resp.status != 200 || wire.body_len() > MAX_MIRRORED_BODY {
        return None;
    }
    Some(Mirror {
        slot: windows.mirror_slot()?,
        windows: windows.clone(),
        arm: *arm,
    })
}

/// A Content-Length answer read whole into `conn.buf` (where the relay
/// then finds it), and a copy of it.
pub async fn read_answer(conn: &mut Conn, resp: &ResponseHead, wait: Duration) -> Option<Bytes> {
    let Framing::Length(n) = resp.framing else {
        return None;
    };
    let n = usize::try_from(n).ok().filter(|n| *n <= MAX_ANSWER)?;
    while conn.buf.len() < n {
        body::read_more(&mut conn.io, &mut conn.buf, wait)
            .await
            .ok()?;
    }
    Some(Bytes::copy_from_slice(&conn.buf[..n]))
}

impl Mirror {
    /// Sends `wire` to the other arm in the background and records how
    /// its answer agrees with `answer`.
    pub fn spawn(self, active: Arc<Active>, wire: Wire, answer: Bytes) {
        tokio::spawn(async move {
            let Mirror {
                slot: _slot,
                windows,
                arm,
            } = self;
            let Some(pool) = active.pools.get(&windows.pools[1 - arm]) else {
                return;
            };
            // The mirror is load like any other request on that backend.
            let Some((member, _lease)) = pool.lease(&[]) else {
                return;
            };
            let backend = pool.members[member].backend.clone();
            let timeouts = &active.config.timeouts;
            let tried = attempt(&backend, &wire, timeouts, timeouts.total, false, true).await;
            let Ok((mut conn, resp)) = tried else {
                return;
            };
            if resp.status != 200 {
                return;
            }
            let Some(theirs) = read_answer(&mut conn, &resp, timeouts.read).await else {
                return;
            };
            if let Some(cosine) = agreement(&answer, &theirs) {
                windows.record_agreement(cosine);
            }
        });
    }
}

/// The lowest cosine between the embeddings of two OpenAI-shaped answers
/// (`data[i].embedding`, float arrays); `None` when either is not one, or
/// they differ in shape (base64 answers are not compared).
fn agreement(a: &[u8], b: &[u8]) -> Option<f64> {
    let (a, b) = (vectors(a)?, vectors(b)?);
    if a.len() != b.len() || a.is_empty() {
        return None;
    }
    a.iter()
        .zip(&b)
        .map(|(x, y)| cosine(x, y))
        .try_fold(1.0f64, |lowest, c| Some(lowest.min(c?)))
}

fn vectors(answer: &[u8]) -> Option<Vec<Vec<f64>>> {
    let json: serde_json::Value = serde_json::from_slice(answer).ok()?;
    json.get("data")?
        .as_array()?
        .iter()
        .map(|item| {
            let values = item.get("embedding")?.as_array()?;
            values.iter().map(serde_json::Value::as_f64).collect()
        })
        .collect()
}

fn cosine(x: &[f64], y: &[f64]) -> Option<f64> {
    if x.len() != y.len() {
        return None;
    }
    let dot: f64 = x.iter().zip(y).map(|(a, b)| a * b).sum();
    let norms =
        x.iter().map(|a| a * a).sum::<f64>().sqrt() * y.iter().map(|b| b * b).sum::<f64>().sqrt();
    (norms > 0.0).then(|| dot / norms)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(vectors: &[&[f64]]) -> Vec<u8> {
        let data: Vec<_> = vectors
            .iter()
            .enumerate()
            .map(|(i, v)| serde_json::json!({"object": "embedding", "index": i, "embedding": v}))
            .collect();
        serde_json::to_vec(&serde_json::json!({"object": "list", "data": data})).expect("json")
    }

    #[test]
    fn agreement_is_the_lowest_cosine_over_the_inputs() {
        let a = answer(&[&[1.0, 0.0], &[0.0, 2.0]]);
        assert_eq!(agreement(&a, &a), Some(1.0));
        let b = answer(&[&[1.0, 0.0], &[1.0, 1.0]]);
        let got = agreement(&a, &b).expect("comparable");
        assert!(
            (got - std::f64::consts::FRAC_1_SQRT_2).abs() < 1e-12,
            "{got}"
        );
        assert_eq!(
            agreement(&a, &answer(&[&[1.0, 0.0]])),
            None,
            "shapes differ"
        );
        assert_eq!(
            agreement(&a, b"{\"data\":[{\"embedding\":\"AAA=\"}]}"),
            None
        );
        assert_eq!(agreement(&a, b"not json"), None);
    }
}
