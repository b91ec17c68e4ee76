//! Per-client rate and concurrency limits: [`gcra`] (the decision, a pure
//! function of one timestamp per key) and [`local`] (in-process state,
//! bounded, and the key hashing).

pub mod gcra;
pub mod local;

pub use gcra::{decide, Decision, Quota};
pub use local::{now_ns, stable_key, InflightGuard, InflightTable, KeyHasher, LocalStore};
