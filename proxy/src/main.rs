//! The `switchyard` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use switchyard::config::Config;
use switchyard::server::{self, RunOptions};

// Every request allocates headers, buffers and futures; mimalloc's
// thread-local free lists cost a fraction of glibc malloc's locking.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Layer-7 TLS load balancer for ML inference fleets.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run {
        /// The TOML configuration file.
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// Take over the listening sockets of a running instance (started
        /// with the same config); send that instance SIGQUIT afterwards.
        #[arg(long)]
        upgrade: bool,
        /// Detach and run in the background (pid file in server.run_dir).
        #[arg(long)]
        daemon: bool,
    },
    /// Validate a configuration file and print what it sets up.
    Check {
        /// The TOML configuration file.
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
}

/// mimalloc advises its regions for transparent huge pages, so RSS grew in
/// 2 MiB steps that were never given back: 18 of a running proxy's 29 MiB,
/// and a peak of 33 MiB in the proxy bench against 18 without them
/// (docs/security.md). Applies to later faults in regions already mapped.
fn no_huge_pages() {
    // SAFETY: prctl with integer arguments only sets a flag on this process.
    let rc = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if rc != 0 {
        eprintln!(
            "switchyard: warning: could not turn off transparent huge pages: {}",
            std::io::Error::last_os_error()
        );
    }
}

fn main() -> ExitCode {
    no_huge_pages();
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Run {
            config,
            upgrade,
            daemon,
        } => {
            init_logging();
            match server::run(&config, RunOptions { upgrade, daemon }) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("switchyard: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    match Config::load(path) {
        Ok(config) => {
            print!("{}: ok\n{}", path.display(), config.summary());
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!("{errors}");
            ExitCode::FAILURE
        }
    }
}

/// JSON lines on stderr. `RUST_LOG` filters as usual; the access log is
/// the `switchyard::access` target (`RUST_LOG=info,switchyard::access=off`
/// silences it).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
