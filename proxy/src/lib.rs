//! Switchyard: a Pingora-based TLS load balancer for inference fleets.
//!
//! Modules, in request order: [`config`] (the TOML file), [`tls`] (the
//! public listener's key pair), [`listener`] (connection cap, ALPN
//! dispatch), [`h1`] (the HTTP/1.x engine), [`proxy`] (the `ProxyHttp`
//! hooks, for h2), [`request`] (what both engines share), [`routing`]
//! (routes, splits, weighted least-connections, readiness reports),
//! [`upstream`] (connections to backends, kept idle for reuse); beside
//! them [`health`] (active checks), [`metrics`] and [`admin`] (the admin
//! listener), [`reload`] (file watch, SIGHUP), [`state`] (persisted
//! drains), [`shared`] (the state they share) and [`server`] (wiring).

pub mod admin;
pub mod config;
/// Properties the fuzz targets and the corpus replay assert.
#[doc(hidden)]
pub mod fuzzing;
pub mod h1;
pub mod health;
pub mod listener;
pub mod metrics;
pub mod proxy;
pub mod reload;
pub mod request;
pub mod routing;
pub mod server;
pub mod shared;
pub mod state;
pub mod tls;
pub mod upstream;
