//! A differential conformance suite for the HTTP/1.1 front end: each
//! shape below is a request as an attacker or a broken client writes it,
//! with the answer RFC 9112 (or the stricter of nginx and HAProxy, where
//! the RFC lets a server choose) calls for. Every case is checked twice,
//! on the plain and on the TLS listener, and for what the upstream
//! received as well as for what the client saw: a refused request must
//! not reach the backend at all, and a forwarded one must arrive in the
//! shape stated.
//!
//! All failures are collected and reported together, so one run shows the
//! whole table.

mod common;

use std::time::Duration;

use common::raw::*;
use common::Proxy;

/// What the proxy must do with a shape.
enum Want {
    /// Answer this status with the JSON error body and an `x-request-id`;
    /// the backend sees nothing.
    Refused(u16),
    /// Forward it once, with the backend's view passing the check.
    Forwarded(fn(&Received) -> Result<(), String>),
}

struct Case {
    name: &'static str,
    /// The bytes after the request line's method and path prefix; `{path}`
    /// is replaced by a path naming the case.
    request: String,
    want: Want,
}

fn case(name: &'static str, request: impl Into<String>, want: Want) -> Case {
    Case {
        name,
        request: request.into(),
        want,
    }
}

/// `POST {path}` with `headers` and `body` as written.
fn post(headers: &[&str], body: &str) -> String {
    let mut text = "POST {path} HTTP/1.1\r\nHost: t\r\n".to_string();
    for h in headers {
        text.push_str(h);
        text.push_str("\r\n");
    }
    text + "\r\n" + body
}

/// `GET {path}` with `headers` as written (and no Host unless given).
fn get_without_host(headers: &[&str]) -> String {
    let mut text = "GET {path} HTTP/1.1\r\n".to_string();
    for h in headers {
        text.push_str(h);
        text.push_str("\r\n");
    }
    text + "\r\n"
}

fn body_is(got: &Received, want: &str) -> Result<(), String> {
    if got.body == want.as_bytes() {
        Ok(())
    } else {
        Err(format!(
            "body {:?}, want {want:?}",
            String::from_utf8_lossy(&got.body)
        ))
    }
}

/// The backend got exactly one Host, `want`.
fn host_is(got: &Received, want: &str) -> Result<(), String> {
    match got.head.all("host").collect::<Vec<_>>()[..] {
        [h] if h == want => Ok(()),
        ref other => Err(format!("Host {other:?}, want [{want:?}]")),
    }
}

/// Transfer codings the proxy does not implement: RFC 9112 §6.1 asks for
/// 501, as nginx answers. Each was once de-chunked and forwarded as plain.
fn transfer_codings() -> Vec<Case> {
    let te = |v: &str| format!("Transfer-Encoding: {v}");
    let chunk = "5\r\nhello\r\n0\r\n\r\n";
    vec![
        case(
            "te-gzip-chunked",
            post(&[&te("gzip, chunked")], chunk),
            Want::Refused(501),
        ),
        case(
            "te-identity-chunked",
            post(&[&te("identity, chunked")], chunk),
            Want::Refused(501),
        ),
        case(
            "te-leading-comma",
            post(&[&te(",chunked")], chunk),
            Want::Refused(501),
        ),
        case(
            "te-chunked-twice",
            post(&[&te("chunked, chunked")], chunk),
            Want::Refused(501),
        ),
        case(
            "te-two-lines",
            post(&[&te("gzip"), &te("chunked")], chunk),
            Want::Refused(501),
        ),
        case(
            "te-gzip-alone",
            post(&[&te("gzip")], "hello"),
            Want::Refused(501),
        ),
        case(
            "te-xchunked",
            post(&[&te("xchunked")], chunk),
            Want::Refused(501),
        ),
        case(
            "te-chunked",
            post(&[&te("chunked")], chunk),
            Want::Forwarded(|r| body_is(r, "hello")),
        ),
        case(
            "te-chunked-uppercase",
            post(&[&te("CHUNKED")], chunk),
            Want::Forwarded(|r| body_is(r, "hello")),
        ),
    ]
}

/// Body framing: lengths, chunk syntax and trailers.
fn framing() -> Vec<Case> {
    vec![
        case(
            "cl-and-te",
            post(
                &["Content-Length: 3", "Transfer-Encoding: chunked"],
                "5\r\nhello\r\n0\r\n\r\n",
            ),
            Want::Refused(400),
        ),
        case(
            "cl-twice-different",
            post(&["Content-Length: 5", "Content-Length: 6"], "hello!"),
            Want::Refused(400),
        ),
        case(
            "cl-plus-sign",
            post(&["Content-Length: +5"], "hello"),
            Want::Refused(400),
        ),
        case(
            "cl-hex",
            post(&["Content-Length: 0x5"], "hello"),
            Want::Refused(400),
        ),
        case(
            "cl-negative",
            post(&["Content-Length: -1"], ""),
            Want::Refused(400),
        ),
        case(
            "cl-overflow",
            post(&["Content-Length: 99999999999999999999999"], ""),
            Want::Refused(400),
        ),
        case(
            "cl-plain",
            post(&["Content-Length: 5"], "hello"),
            Want::Forwarded(|r| body_is(r, "hello")),
        ),
        case(
            "chunk-size-overflow",
            post(
                &["Transfer-Encoding: chunked"],
                "fffffffffffffffffff\r\nx\r\n0\r\n\r\n",
            ),
            Want::Refused(400),
        ),
        case(
            "chunk-size-junk",
            post(&["Transfer-Encoding: chunked"], "5x\r\nhello\r\n0\r\n\r\n"),
            Want::Refused(400),
        ),
        case(
            "chunk-no-crlf-after-data",
            post(&["Transfer-Encoding: chunked"], "3\r\nhello\r\n0\r\n\r\n"),
            Want::Refused(400),
        ),
        case(
            "chunk-extension",
            post(
                &["Transfer-Encoding: chunked"],
                "5;name=value\r\nhello\r\n0\r\n\r\n",
            ),
            Want::Forwarded(|r| body_is(r, "hello")),
        ),
        case(
            "trailer-valid",
            post(
                &["Transfer-Encoding: chunked"],
                "5\r\nhello\r\n0\r\nX-Sum: 1\r\n\r\n",
            ),
            Want::Forwarded(|r| body_is(r, "hello")),
        ),
        case(
            "trailer-no-colon",
            post(
                &["Transfer-Encoding: chunked"],
                "5\r\nhello\r\n0\r\nbroken\r\n\r\n",
            ),
            Want::Refused(400),
        ),
        case(
            "trailer-bad-name",
            post(
                &["Transfer-Encoding: chunked"],
                "5\r\nhello\r\n0\r\nX Sum: 1\r\n\r\n",
            ),
            Want::Refused(400),
        ),
        case(
            "trailer-control-char",
            post(
                &["Transfer-Encoding: chunked"],
                "5\r\nhello\r\n0\r\nX-Sum: a\x01b\r\n\r\n",
            ),
            Want::Refused(400),
        ),
    ]
}

/// Field syntax, counts and the Connection header.
fn fields() -> Vec<Case> {
    let tokens = |n: usize| {
        let list: Vec<String> = (0..n).map(|i| format!("x-t{i}")).collect();
        format!("Connection: {}", list.join(", "))
    };
    let many_headers: Vec<String> = (0..101).map(|i| format!("X-H{i}: v")).collect();
    let many_headers: Vec<&str> = many_headers.iter().map(String::as_str).collect();
    vec![
        case(
            "space-before-colon",
            post(&["Transfer-Encoding : chunked"], ""),
            Want::Refused(400),
        ),
        case(
            "obs-fold",
            post(&["X-A: one", " two"], ""),
            Want::Refused(400),
        ),
        case(
            "name-with-space",
            post(&["Bad Name: x"], ""),
            Want::Refused(400),
        ),
        case("nul-in-value", post(&["X-A: a\0b"], ""), Want::Refused(400)),
        case(
            "too-many-headers",
            post(&many_headers, ""),
            Want::Refused(431),
        ),
        case(
            "huge-head",
            post(&[&format!("X-Big: {}", "a".repeat(70_000))], ""),
            Want::Refused(431),
        ),
        case(
            "connection-33-tokens",
            post(&[&tokens(33)], ""),
            Want::Refused(400),
        ),
        case(
            "connection-names-host",
            post(&["Connection: Host"], ""),
            Want::Forwarded(|r| host_is(r, "t")),
        ),
        case(
            "connection-names-content-length",
            post(
                &["Connection: content-length", "Content-Length: 5"],
                "hello",
            ),
            Want::Forwarded(|r| body_is(r, "hello")),
        ),
        case(
            "connection-names-custom",
            post(&["Connection: x-secret", "X-Secret: 1", "X-Kept: 2"], ""),
            Want::Forwarded(|r| match (r.head.get("x-secret"), r.head.get("x-kept")) {
                (None, Some("2")) => Ok(()),
                other => Err(format!("x-secret/x-kept {other:?}")),
            }),
        ),
        case(
            "underscore-name-dropped",
            post(&["X_Tenant: evil", "X-Tenant: good"], ""),
            Want::Forwarded(|r| match (r.head.get("x_tenant"), r.head.get("x-tenant")) {
                (None, Some("good")) => Ok(()),
                other => Err(format!("x_tenant/x-tenant {other:?}")),
            }),
        ),
    ]
}

/// The request line, Host and absolute-form targets.
fn targets() -> Vec<Case> {
    vec![
        case("no-host", get_without_host(&[]), Want::Refused(400)),
        case(
            "two-hosts",
            get_without_host(&["Host: a", "Host: b"]),
            Want::Refused(400),
        ),
        case(
            "host-with-space",
            get_without_host(&["Host: a b"]),
            Want::Refused(400),
        ),
        case(
            "host-with-slash",
            get_without_host(&["Host: a/b"]),
            Want::Refused(400),
        ),
        case(
            "host-with-comma",
            get_without_host(&["Host: a, b"]),
            Want::Refused(400),
        ),
        case(
            "host-with-userinfo",
            get_without_host(&["Host: u@a"]),
            Want::Refused(400),
        ),
        case(
            "host-bad-port",
            get_without_host(&["Host: a:b"]),
            Want::Refused(400),
        ),
        case(
            "host-ipv6",
            get_without_host(&["Host: [::1]:8080"]),
            Want::Forwarded(|r| host_is(r, "[::1]:8080")),
        ),
        case(
            "absolute-userinfo",
            "GET http://user:pw@other:99{path} HTTP/1.1\r\nHost: t\r\n\r\n",
            Want::Refused(400),
        ),
        case(
            "absolute-empty-authority",
            "GET http://{path} HTTP/1.1\r\nHost: t\r\n\r\n",
            Want::Refused(400),
        ),
        case(
            "absolute-form",
            "GET http://target.example:8080{path} HTTP/1.1\r\nHost: other\r\n\r\n",
            Want::Forwarded(|r| host_is(r, "target.example:8080")),
        ),
        case(
            "target-not-a-path",
            "GET nowhere HTTP/1.1\r\nHost: t\r\n\r\n",
            Want::Refused(400),
        ),
        case(
            "space-in-target",
            "GET /a b{path} HTTP/1.1\r\nHost: t\r\n\r\n",
            Want::Refused(400),
        ),
        case(
            "bad-version",
            "GET {path} HTTP/1.x\r\nHost: t\r\n\r\n",
            Want::Refused(400),
        ),
    ]
}

/// Every case, named uniquely.
fn table() -> Vec<Case> {
    let all: Vec<Case> = [transfer_codings(), framing(), fields(), targets()]
        .into_iter()
        .flatten()
        .collect();
    let mut names: Vec<&str> = all.iter().map(|c| c.name).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), all.len(), "case names must be unique");
    all
}

/// Runs one case on a fresh connection; `Err` says how it went wrong.
async fn run(case: &Case, mut client: Client, backend: &Backend, tag: &str) -> Result<(), String> {
    let path = format!("/c/{tag}/{}", case.name);
    let before = backend.requests().len();
    client.send(case.request.replace("{path}", &path)).await;
    let Some(head) = client.head_or_close().await else {
        return Err("closed without an answer".into());
    };
    let body = read_body(&mut client.io, response_framing(&head, "POST"))
        .await
        .map_err(|e| format!("reading the answer's body: {e}"))?;
    // Anything the backend got in the meantime came from this case.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let reached: Vec<Received> = backend.requests().split_off(before);
    match case.want {
        Want::Refused(status) => {
            if head.status() != status {
                return Err(format!("answered {}, want {status}", head.status()));
            }
            let json: serde_json::Value = serde_json::from_slice(&body)
                .map_err(|e| format!("error body is not JSON ({e}): {body:?}"))?;
            if !json["error"]["message"].is_string() || head.get("x-request-id").is_none() {
                return Err(format!("no JSON error or x-request-id: {head:?} {json}"));
            }
            if !reached.is_empty() {
                return Err(format!("refused, yet the backend got {reached:?}"));
            }
            Ok(())
        }
        Want::Forwarded(check) => {
            if head.status() != 200 {
                return Err(format!("answered {}, want 200", head.status()));
            }
            match &reached[..] {
                [one] => check(one),
                other => Err(format!("backend got {} requests: {other:?}", other.len())),
            }
        }
    }
}

/// Runs the table over connections `connect` opens; panics with every
/// failure at once.
async fn run_table<F, Fut>(connect: F, backend: &Backend, tag: &str)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Client>,
{
    let mut failures = Vec::new();
    for case in table() {
        if let Err(why) = run(&case, connect().await, backend, tag).await {
            failures.push(format!("{tag} {}: {why}", case.name));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_shape_gets_the_stated_answer_on_the_plain_listener() {
    let backend = reached_backend().await;
    let proxy = proxy_for(&backend, "").await;
    run_table(|| Client::connect(&proxy), &backend, "plain").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_shape_gets_the_stated_answer_on_the_tls_listener() {
    let backend = reached_backend().await;
    let proxy: Proxy = proxy_for(&backend, "").await;
    run_table(|| Client::connect_tls(&proxy), &backend, "tls").await;
}
