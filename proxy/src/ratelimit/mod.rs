//! Per-client rate and concurrency limits: [`gcra`] (the decision, a pure
//! function of one timestamp per key), [`local`] (in-process state, bounded,
//! and the key hashing) and [`shared`] (state in Redis, for limits that hold
//! across replicas, with a local fallback); [`rules`] runs a route's rules
//! on a request.

pub mod gcra;
pub mod local;
mod rules;
pub mod shared;

pub use gcra::{decide, Decision, Quota};
pub use local::{now_ns, stable_key, InflightGuard, InflightTable, KeyHasher, LocalStore};
pub use rules::{Limited, Limiters, Phase, RouteLimits, RuleState};
pub use shared::{SharedLimiter, SharedOptions, Via};
