//! Automated canary rollouts: the judge of each analysis window
//! ([`judge`]), where a rollout stands ([`status`]), and the loop that
//! judges windows and moves the canary's weight ([`controller`]).

pub mod controller;
pub mod judge;
pub mod status;

pub use status::{Phase, Rollout};
