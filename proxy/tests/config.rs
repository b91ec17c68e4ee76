//! `switchyard check`: every invalid configuration is refused with a
//! message naming the file, the line and the key path, and a non-zero exit.

mod common;

use std::path::Path;
use std::process::{Command, Output};

fn check(config: &Path) -> Output {
    check_with_token(config, None)
}

/// `switchyard check` with `SWITCHYARD_ADMIN_TOKEN` set to `token` or unset.
fn check_with_token(config: &Path, token: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchyard"));
    match token {
        Some(t) => cmd.env("SWITCHYARD_ADMIN_TOKEN", t),
        None => cmd.env_remove("SWITCHYARD_ADMIN_TOKEN"),
    };
    cmd.arg("check")
        .arg("--config")
        .arg(config)
        .output()
        .expect("run switchyard check")
}

/// A valid configuration; the cases below edit it.
const BASE: &str = r#"[server]
grace_period = "10s"
run_dir = "run"

[listeners.https]
address = "127.0.0.1:8443"
cert = "cert.pem"
key = "key.pem"

[health]
interval = "1s"

[passive]
ejection_base = "5s"

[retry]
retries = 2

[pools.blue]
backends = [
  { address = "127.0.0.1:9101", weight = 1 },
  { address = "127.0.0.1:9102", weight = 1 },
]

[pools.green]
backends = [{ address = "127.0.0.1:9201" }]

[[routes]]
path_prefix = "/"
pool = "blue"
"#;

struct Case {
    name: &'static str,
    /// (text to replace in BASE, replacement)
    edit: (&'static str, &'static str),
    key: &'static str,
    /// The error's line is the first line of the edited file containing this.
    line_of: &'static str,
    message: &'static str,
}

const CASES: &[Case] = &[
    Case {
        name: "unknown key",
        edit: ("interval = \"1s\"", "interval = \"1s\"\nintervall = \"2s\""),
        key: "health.intervall",
        line_of: "intervall",
        message: "unknown field `intervall`",
    },
    Case {
        name: "unknown section",
        edit: ("[retry]", "[retries]"),
        key: "retries",
        line_of: "[retries]",
        message: "unknown field `retries`",
    },
    Case {
        name: "duration without unit",
        edit: ("interval = \"1s\"", "interval = \"5\""),
        key: "health.interval",
        line_of: "interval",
        message: "invalid duration \"5\"",
    },
    Case {
        name: "duration as a number",
        edit: ("grace_period = \"10s\"", "grace_period = 10"),
        key: "server.grace_period",
        line_of: "grace_period",
        message: "expected a duration string",
    },
    Case {
        name: "duplicate backend",
        edit: ("9102", "9101"),
        key: "pools.blue.backends[1].address",
        line_of: "9101\", weight = 1 },\n]",
        message: "duplicate backend 127.0.0.1:9101 in pool 'blue'",
    },
    Case {
        name: "negative weight",
        edit: ("9101\", weight = 1", "9101\", weight = -1"),
        key: "pools.blue.backends[0].weight",
        line_of: "weight = -1",
        message: "invalid value: integer `-1`",
    },
    Case {
        name: "all weights zero",
        edit: (
            "{ address = \"127.0.0.1:9201\" }",
            "{ address = \"127.0.0.1:9201\", weight = 0 }",
        ),
        key: "pools.green.backends[0].weight",
        line_of: "weight = 0",
        message: "needs at least one backend with weight > 0",
    },
    Case {
        name: "pool with neither backends nor dns",
        edit: (
            "backends = [{ address = \"127.0.0.1:9201\" }]",
            "max_in_flight = 4",
        ),
        key: "pools.green.backends",
        line_of: "[pools.green]",
        message: "pool 'green' has no backends and no dns",
    },
    Case {
        name: "dns without a port",
        edit: ("[pools.green]\n", "[pools.green]\ndns = \"backends.internal\"\n"),
        key: "pools.green.dns",
        line_of: "dns = ",
        message: "'backends.internal' is neither host:port",
    },
    Case {
        name: "SRV name without a domain",
        edit: ("[pools.green]\n", "[pools.green]\ndns = \"_api._tcp\"\n"),
        key: "pools.green.dns",
        line_of: "dns = ",
        message: "nor an SRV name (like '_api._tcp.backends.internal')",
    },
    Case {
        name: "discovery min_ttl of zero",
        edit: ("[retry]", "[discovery]\nmin_ttl = \"0s\"\n\n[retry]"),
        key: "discovery.min_ttl",
        line_of: "min_ttl",
        message: "must be greater than 0",
    },
    Case {
        name: "discovery max_ttl below min_ttl",
        edit: (
            "[retry]",
            "[discovery]\nmin_ttl = \"5s\"\nmax_ttl = \"2s\"\n\n[retry]",
        ),
        key: "discovery.max_ttl",
        line_of: "max_ttl",
        message: "must be at least min_ttl",
    },
    Case {
        name: "judge lease shorter than two resyncs",
        edit: (
            "[retry]",
            "[replicas]\nresync_interval = \"1s\"\njudge_lease = \"1500ms\"\n\n[retry]",
        ),
        key: "replicas.judge_lease",
        line_of: "judge_lease",
        message: "must be at least twice resync_interval",
    },
    Case {
        name: "zero max_in_flight on a pool",
        edit: ("[pools.green]\n", "[pools.green]\nmax_in_flight = 0\n"),
        key: "pools.green.max_in_flight",
        line_of: "max_in_flight = 0",
        message: "must be at least 1",
    },
    Case {
        name: "zero max_connecting on a backend",
        edit: (
            "{ address = \"127.0.0.1:9201\" }",
            "{ address = \"127.0.0.1:9201\", max_connecting = 0 }",
        ),
        key: "pools.green.backends[0].max_connecting",
        line_of: "max_connecting = 0",
        message: "must be at least 1",
    },
    Case {
        name: "backend without port",
        edit: ("127.0.0.1:9201", "127.0.0.1"),
        key: "pools.green.backends[0].address",
        line_of: "\"127.0.0.1\"",
        message: "needs a port",
    },
    Case {
        name: "unknown pool in route",
        edit: ("pool = \"blue\"", "pool = \"purple\""),
        key: "routes[0].pool",
        line_of: "purple",
        message: "unknown pool 'purple'",
    },
    Case {
        name: "unknown pool in split",
        edit: ("pool = \"blue\"", "split = { blue = 90, purple = 10 }"),
        key: "routes[0].split.purple",
        line_of: "purple",
        message: "unknown pool 'purple'",
    },
    Case {
        name: "pool and split together",
        edit: ("pool = \"blue\"", "pool = \"blue\"\nsplit = { blue = 100 }"),
        key: "routes[0].split",
        line_of: "split",
        message: "set either 'pool' or 'split'",
    },
    Case {
        name: "route without pool",
        edit: ("pool = \"blue\"", ""),
        key: "routes[0]",
        line_of: "[[routes]]",
        message: "route needs 'pool' or 'split'",
    },
    Case {
        name: "rollout canary outside the split",
        edit: (
            "pool = \"blue\"\n",
            "name = \"r\"\nsplit = { blue = 100, green = 0 }\n[routes.rollout]\ncanary = \"red\"\nsteps = [5, 100]\n",
        ),
        key: "routes[0].rollout.canary",
        line_of: "canary = \"red\"",
        message: "is not a pool of this route's split",
    },
    Case {
        name: "rollout steps not ending at 100",
        edit: (
            "pool = \"blue\"\n",
            "name = \"r\"\nsplit = { blue = 100, green = 0 }\n[routes.rollout]\ncanary = \"green\"\nsteps = [5, 50]\n",
        ),
        key: "routes[0].rollout.steps",
        line_of: "steps = [5, 50]",
        message: "end at 100",
    },
    Case {
        name: "rollout on an unnamed route",
        edit: (
            "pool = \"blue\"\n",
            "split = { blue = 100, green = 0 }\n[routes.rollout]\ncanary = \"green\"\nsteps = [5, 100]\n",
        ),
        key: "routes[0].rollout",
        line_of: "[routes.rollout]",
        message: "needs a 'name'",
    },
    Case {
        name: "rate limit with an unknown key",
        edit: (
            "pool = \"blue\"\n",
            "pool = \"blue\"\n[[routes.rate_limits]]\nname = \"k\"\nkey = \"token\"\nrate = 1\n",
        ),
        key: "routes[0].rate_limits[0].key",
        line_of: "key = \"token\"",
        message: "is not a key: use \"ip\"",
    },
    Case {
        name: "rate limit with a zero burst",
        edit: (
            "pool = \"blue\"\n",
            "pool = \"blue\"\n[[routes.rate_limits]]\nname = \"k\"\nkey = \"ip\"\nrate = 1\nburst = 0\n",
        ),
        key: "routes[0].rate_limits[0].burst",
        line_of: "burst = 0",
        message: "must be at least 1",
    },
    Case {
        name: "shared rate limit without redis",
        edit: (
            "pool = \"blue\"\n",
            "pool = \"blue\"\n[[routes.rate_limits]]\nname = \"k\"\nkey = \"ip\"\nrate = 1\nshared = true\n",
        ),
        key: "routes[0].rate_limits[0].shared",
        line_of: "shared = true",
        message: "needs [rate_limits] redis_url",
    },
    Case {
        name: "shed default not among the classes",
        edit: (
            "pool = \"blue\"\n",
            "pool = \"blue\"\n[routes.shed]\ndefault = \"gold\"\nclasses = { bulk = 0.8 }\n",
        ),
        key: "routes[0].shed.default",
        line_of: "default = \"gold\"",
        message: "is not one of the classes",
    },
    Case {
        name: "no routes",
        edit: ("[[routes]]\npath_prefix = \"/\"\npool = \"blue\"\n", ""),
        key: "",
        line_of: "[server]",
        message: "missing field `routes`",
    },
    Case {
        name: "bad listen address",
        edit: ("127.0.0.1:8443", "localhost"),
        key: "listeners.https.address",
        line_of: "address = \"localhost\"",
        message: "invalid socket address",
    },
    Case {
        name: "missing certificate",
        edit: ("cert.pem", "nope.pem"),
        key: "listeners.https.cert",
        line_of: "nope.pem",
        message: "cannot read certificate",
    },
    Case {
        name: "certificate file is not PEM",
        edit: ("cert = \"cert.pem\"", "cert = \"garbage.pem\""),
        key: "listeners.https.cert",
        line_of: "garbage.pem",
        message: "no PEM certificate found",
    },
    Case {
        name: "key does not match the certificate",
        edit: ("key = \"key.pem\"", "key = \"other/key.pem\""),
        key: "listeners.https.key",
        line_of: "other/key.pem",
        message: "does not fit certificate",
    },
    Case {
        name: "ejection max below base",
        edit: (
            "ejection_base = \"5s\"",
            "ejection_base = \"5s\"\nejection_max = \"1s\"",
        ),
        key: "passive.ejection_max",
        line_of: "ejection_max",
        message: "must not be shorter than passive.ejection_base",
    },
    Case {
        name: "bad host pattern",
        edit: (
            "path_prefix = \"/\"",
            "path_prefix = \"/\"\nhost = \"api.example.com:443\"",
        ),
        key: "routes[0].host",
        line_of: "host =",
        message: "must be a host name",
    },
    Case {
        name: "path prefix without slash",
        edit: ("path_prefix = \"/\"", "path_prefix = \"v1\""),
        key: "routes[0].path_prefix",
        line_of: "path_prefix",
        message: "must start with '/'",
    },
    Case {
        name: "unknown http mode",
        edit: (
            "[health]",
            "[listeners.http]\naddress = \"127.0.0.1:8080\"\nmode = \"both\"\n\n[health]",
        ),
        key: "listeners.http.mode",
        line_of: "mode = \"both\"",
        message: "unknown variant `both`",
    },
    Case {
        name: "zero rise",
        edit: ("interval = \"1s\"", "interval = \"1s\"\nrise = 0"),
        key: "health.rise",
        line_of: "rise = 0",
        message: "must be at least 1",
    },
    Case {
        name: "admin API on a public address without a token",
        edit: ("[health]", "[admin]\naddress = \"0.0.0.0:9901\"\n\n[health]"),
        key: "admin.address",
        line_of: "0.0.0.0:9901",
        message: "needs a token: set SWITCHYARD_ADMIN_TOKEN, token_env or token_file",
    },
    Case {
        name: "admin token variable not set",
        edit: ("[health]", "[admin]\ntoken_env = \"SWITCHYARD_TEST_UNSET_VARIABLE\"\n\n[health]"),
        key: "admin.token_env",
        line_of: "token_env",
        message: "environment variable SWITCHYARD_TEST_UNSET_VARIABLE is not set",
    },
    Case {
        name: "sticky with header and cookie",
        edit: ("pool = \"blue\"", "pool = \"blue\"\nsticky = { header = \"x-user\", cookie = \"sid\" }"),
        key: "routes[0].sticky",
        line_of: "sticky",
        message: "set exactly one of 'header' and 'cookie'",
    },
    Case {
        name: "forced pool not defined",
        edit: ("pool = \"blue\"", "pool = \"blue\"\nforce = { header = \"x-switchyard-pool\", allow = [\"green\", \"red\"] }"),
        key: "routes[0].force.allow[1]",
        line_of: "force",
        message: "unknown pool 'red'",
    },
    Case {
        name: "toml syntax error",
        edit: ("retries = 2", "retries = = 2"),
        key: "retry.retries",
        line_of: "retries = = 2",
        message: "invalid",
    },
];

/// A directory with `cert.pem`/`key.pem`, a non-PEM `garbage.pem` and an
/// unrelated key in `other/key.pem`.
fn workdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    common::generate_certs(dir.path());
    std::fs::write(dir.path().join("garbage.pem"), "not a certificate\n").expect("write");
    let other = dir.path().join("other");
    std::fs::create_dir(&other).expect("mkdir");
    common::generate_certs(&other);
    dir
}

#[test]
fn base_config_is_valid() {
    let dir = workdir();
    let path = dir.path().join("ok.toml");
    std::fs::write(&path, BASE).expect("write");
    let out = check(&path);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("pool blue: 2 backend(s)"), "{stdout}");
    assert!(
        stdout.contains("route host=* path_prefix=/ -> blue=100"),
        "{stdout}"
    );
}

#[test]
fn every_invalid_config_is_refused_with_file_line_and_key() {
    let dir = workdir();
    let mut failures = Vec::new();
    for (i, case) in CASES.iter().enumerate() {
        let (from, to) = case.edit;
        assert!(BASE.contains(from), "case '{}' edits nothing", case.name);
        let text = BASE.replacen(from, to, 1);
        let path = dir.path().join(format!("case{i}.toml"));
        std::fs::write(&path, &text).expect("write case");
        let line = text
            .find(case.line_of)
            .map(|at| text[..at].matches('\n').count() + 1)
            .unwrap_or_else(|| panic!("case '{}': marker not in text", case.name));
        let prefix = match case.key {
            "" => format!("{}:{line}: ", path.display()),
            key => format!("{}:{line}: {key}: ", path.display()),
        };
        let out = check(&path);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let found = stderr
            .lines()
            .any(|l| l.starts_with(&prefix) && l.contains(case.message));
        if out.status.success() || !found {
            failures.push(format!(
                "case '{}': want a line starting {prefix:?} containing {:?}, exit non-zero; \
                 got exit {:?}, stderr:\n{stderr}",
                case.name,
                case.message,
                out.status.code()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn a_public_admin_address_takes_the_token_from_the_environment() {
    let dir = workdir();
    let path = dir.path().join("public-admin.toml");
    let text = BASE.replacen(
        "[health]",
        "[admin]\naddress = \"0.0.0.0:9901\"\n\n[health]",
        1,
    );
    std::fs::write(&path, text).expect("write");
    assert!(!check_with_token(&path, None).status.success());
    let out = check_with_token(&path, Some("secret"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_missing_file_is_reported() {
    let out = check(Path::new("/nonexistent/switchyard.toml"));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent/switchyard.toml: cannot read config file"));
}

#[test]
fn the_annotated_example_is_valid() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (config, certs) = (dir.path().join("config"), dir.path().join("certs"));
    std::fs::create_dir_all(&config).expect("mkdir");
    std::fs::create_dir_all(&certs).expect("mkdir");
    let generated = common::generate_certs(&certs);
    std::fs::rename(&generated.cert, certs.join("server.pem")).expect("rename");
    std::fs::rename(&generated.key, certs.join("server.key")).expect("rename");
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/switchyard.toml");
    std::fs::copy(&example, config.join("switchyard.toml")).expect("copy example");
    // The annotated example reads its admin token from this variable.
    let out = check_with_token(&config.join("switchyard.toml"), Some("example"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
