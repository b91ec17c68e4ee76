//! Switchyard: a Pingora-based TLS load balancer for inference fleets.
//!
//! Modules, in request order: [`config`] (the TOML file), [`tls`] (the
//! public listener's key pair), [`listener`] (connection cap, ALPN
//! dispatch), the front ends [`h1`] and [`h2`] (they move bytes),
//! [`request`] (the core: every rule of a request, once), [`routing`]
//! (routes, splits, weighted least-connections, readiness reports),
//! [`upstream`] (connections to backends, kept idle for reuse) and
//! [`codec`] (HTTP/1.1 on the wire, both directions); beside them
//! [`health`] (active checks), [`metrics`], [`admin`] (the admin
//! listener) and [`probes`] (the proxy's own health on it), [`reload`]
//! (file watch, SIGHUP), [`state`] (persisted drains), [`replicas`]
//! (drains shared through Redis), [`rollout`] (canary analysis),
//! [`ratelimit`] (per-client rate and concurrency limits, local or shared
//! through Redis), [`shared`] (the state they share) and [`server`]
//! (wiring).
//! `docs/request-path.md` walks one request through them.

pub mod admin;
pub mod codec;
pub mod config;
pub mod discovery;
/// Properties the fuzz targets and the corpus replay assert.
#[doc(hidden)]
pub mod fuzzing;
pub mod h1;
pub mod h2;
pub mod health;
pub mod listener;
pub mod metrics;
pub mod probes;
pub mod ratelimit;
pub mod reload;
pub mod replicas;
pub mod request;
pub mod rollout;
pub mod routing;
pub mod server;
pub mod shared;
pub mod state;
pub mod tls;
pub mod upstream;
