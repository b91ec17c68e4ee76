//! Automated canary rollouts: the judge of each analysis window.

pub mod judge;
