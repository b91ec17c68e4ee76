//! The protocol matrix: a per-request rule is tested over each way a
//! client reaches the proxy. [`matrix!`] expands one test body into a
//! module holding one test per [`Proto`]; [`Via`] is a client speaking one
//! of them, whose every response must have come over that protocol, so a
//! silent downgrade (h2 to HTTP/1.1) fails the test.

use std::time::Duration;

use reqwest::{RequestBuilder, Response, Version};

use super::Proxy;

/// How a client reaches the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    /// HTTP/1.1 on the plain listener (`[listeners.http] mode = "serve"`).
    H1,
    /// HTTP/1.1 over TLS, offered alone in ALPN.
    H1Tls,
    /// h2 over TLS, chosen by ALPN.
    H2,
}

/// The plain listener of every matrix proxy: all three protocols run
/// against the same configuration.
const PLAIN_LISTENER: &str =
    "[listeners.http]\naddress = \"127.0.0.1:{http_port}\"\nmode = \"serve\"\n\n";

impl Proto {
    /// The proxy with `body` (see [`Proxy::start`]) and a serving plain
    /// listener, which rewrites keep.
    pub async fn start(self, body: &str) -> Proxy {
        Proxy::start_with(PLAIN_LISTENER, body).await
    }

    /// The version every response must carry.
    pub fn version(self) -> Version {
        match self {
            Proto::H1 | Proto::H1Tls => Version::HTTP_11,
            Proto::H2 => Version::HTTP_2,
        }
    }

    /// The `X-Forwarded-Proto` the backend is told.
    pub fn scheme(self) -> &'static str {
        match self {
            Proto::H1 => "http",
            Proto::H1Tls | Proto::H2 => "https",
        }
    }
}

/// A client of one protocol with its own connections, and the proxy's
/// address for that protocol.
#[derive(Clone)]
pub struct Via {
    pub proto: Proto,
    client: reqwest::Client,
    /// Scheme, host and port.
    base: String,
}

impl Proxy {
    /// A new client reaching this proxy over `proto`.
    pub fn via(&self, proto: Proto) -> Via {
        let (client, base) = match proto {
            Proto::H1 => {
                let plain = self
                    .http
                    .expect("a plain listener (start with Proto::start)");
                let client = reqwest::Client::builder()
                    .http1_only()
                    .timeout(Duration::from_secs(10))
                    .build()
                    .expect("client");
                (client, format!("http://{plain}"))
            }
            Proto::H1Tls => (self.client_h1(), self.url("")),
            Proto::H2 => (self.client(), self.url("")),
        };
        Via {
            proto,
            client,
            base,
        }
    }
}

impl Via {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn get(&self, path: &str) -> RequestBuilder {
        self.client.get(self.url(path))
    }

    pub fn post(&self, path: &str) -> RequestBuilder {
        self.client.post(self.url(path))
    }

    /// Sends `req` (built by this `Via`); fails the test on a transport
    /// error or a response over another protocol.
    pub async fn send(&self, req: RequestBuilder) -> Response {
        let proto = self.proto;
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("{proto:?} request failed: {e:?}"));
        assert_eq!(
            resp.version(),
            proto.version(),
            "{proto:?} answered over another protocol"
        );
        resp
    }

    /// A small JSON POST to `path`, as the load runs send it; a response
    /// over another protocol is an error.
    pub async fn outcome(&self, path: &str) -> Result<Outcome, String> {
        let resp = self
            .post(path)
            .header("content-type", "application/json")
            .body(r#"{"input":"hello"}"#)
            .send()
            .await
            .map_err(|e| format!("{e:?}"))?;
        if resp.version() != self.proto.version() {
            return Err(format!(
                "{:?} answered over {:?}",
                self.proto,
                resp.version()
            ));
        }
        let status = resp.status().as_u16();
        let instance = resp
            .headers()
            .get("x-switchyard-instance")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        resp.bytes().await.map_err(|e| format!("{e:?}"))?;
        Ok(Outcome { status, instance })
    }

    /// Sends `total` [`Via::outcome`] POSTs to `path` from `concurrency`
    /// tasks sharing this client.
    pub async fn load(
        &self,
        path: &str,
        concurrency: usize,
        total: usize,
    ) -> Vec<Result<Outcome, String>> {
        let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..concurrency {
            let (via, path, next) = (self.clone(), path.to_string(), next.clone());
            tasks.spawn(async move {
                let mut out = Vec::new();
                while next.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < total {
                    out.push(via.outcome(&path).await);
                }
                out
            });
        }
        let mut all = Vec::new();
        while let Some(batch) = tasks.join_next().await {
            all.extend(batch.expect("load task"));
        }
        all
    }
}

/// Runs a [`matrix!`] body; the bound types the closure's argument.
pub async fn run<F, Fut>(proto: Proto, body: F)
where
    F: FnOnce(Proto) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    body(proto).await
}

/// What one request of a load run saw.
#[derive(Debug)]
pub struct Outcome {
    pub status: u16,
    pub instance: String,
}

/// Asserts that every request of a load run got a 200.
pub fn assert_all_200(results: &[Result<Outcome, String>]) {
    let bad: Vec<_> = results
        .iter()
        .filter(|r| !r.as_ref().is_ok_and(|o| o.status == 200))
        .collect();
    // Each distinct failure once, with its count: a burst of one kind
    // (a whole first round of connections, say) reads differently from a
    // scatter of kinds.
    let mut kinds: Vec<(String, usize)> = Vec::new();
    for r in &bad {
        let kind = match r {
            Ok(o) => format!("status {} from '{}'", o.status, o.instance),
            Err(e) => e.clone(),
        };
        match kinds.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, n)) => *n += 1,
            None => kinds.push((kind, 1)),
        }
    }
    assert!(
        bad.is_empty(),
        "{} of {} requests failed: {kinds:#?}",
        bad.len(),
        results.len(),
    );
}

/// `matrix!(name, |proto| async move { ... })` makes a module `name` with
/// the tests `h1` (plain listener), `h1_tls` and `h2`, each running the
/// body with its [`Proto`]. A protocol the current engine fails is marked
/// after the body, e.g. `h2 = "h2: what differs"`, which ignores that
/// expansion with the reason given.
#[allow(unused_macros)] // only the test files with a matrix use it
macro_rules! matrix {
    (
        $name:ident,
        $body:expr
        $(, h1 = $h1:literal)?
        $(, h1_tls = $h1_tls:literal)?
        $(, h2 = $h2:literal)?
        $(,)?
    ) => {
        mod $name {
            use super::*;

            async fn run(proto: crate::common::Proto) {
                crate::common::matrix::run(proto, $body).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            $(#[ignore = $h1])?
            async fn h1() {
                run(crate::common::Proto::H1).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            $(#[ignore = $h1_tls])?
            async fn h1_tls() {
                run(crate::common::Proto::H1Tls).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            $(#[ignore = $h2])?
            async fn h2() {
                run(crate::common::Proto::H2).await
            }
        }
    };
}
#[allow(unused_imports)] // likewise
pub(crate) use matrix;
