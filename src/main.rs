//! The `understudy` command line: parse arguments, load the environment file, hand it to
//! `failover`, and turn the outcome into an exit status. No logic a test would want to reach
//! lives here.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use failover::config::Environment;
use failover::fault::Fault;
use failover::supervisor::{run_environment, GuestEnd, RunError};

/// Exit status when the environment file or the command line is invalid; nothing started.
const EXIT_INVALID_INPUT: u8 = 2;
/// Exit status when a guest failed (triple fault, panic, KVM error...).
const EXIT_GUEST_FAILED: u8 = 3;
/// Exit status when the host could not run a guest (no KVM, out of memory...).
const EXIT_HOST_ERROR: u8 = 4;

/// A KVM hypervisor whose guests survive failures.
#[derive(Parser)]
#[command(name = "understudy", version, about)]
struct Cli {
    /// Log filter (tracing `EnvFilter` syntax, e.g. `info`, `debug`, `vmm_core=debug`);
    /// RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start every guest the environment file declares and wait until all have ended.
    Run {
        /// The environment file (TOML).
        env: PathBuf,
        /// Inject a fault: GUEST:KIND@MILLIS, KIND one of kill, hang, mce, panic, MILLIS after
        /// the guests started. Repeatable.
        #[arg(long = "fault", value_name = "GUEST:KIND@MILLIS")]
        faults: Vec<Fault>,
    },
    /// Validate the environment file and print it resolved, with every default filled in.
    Check {
        /// The environment file (TOML).
        env: PathBuf,
    },
}

fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(filter))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

fn load(path: &Path) -> Result<Environment, ExitCode> {
    Environment::load(path).map_err(|err| {
        eprintln!("understudy: {err}");
        ExitCode::from(EXIT_INVALID_INPUT)
    })
}

fn run(path: &Path, faults: &[Fault]) -> ExitCode {
    let env = match load(path) {
        Ok(env) => env,
        Err(code) => return code,
    };
    let outcomes = match run_environment(&env, faults) {
        Ok(outcomes) => outcomes,
        Err(err @ RunError::UnknownFaultGuest(_)) => {
            eprintln!("understudy: {err}");
            return ExitCode::from(EXIT_INVALID_INPUT);
        }
        Err(err) => {
            eprintln!("understudy: {err}");
            return ExitCode::from(EXIT_HOST_ERROR);
        }
    };
    for outcome in &outcomes {
        if let GuestEnd::Down { reason } = &outcome.end {
            eprintln!("understudy: guest {} is down: {reason}", outcome.name);
        }
    }
    if outcomes
        .iter()
        .any(|o| matches!(o.end, GuestEnd::Down { .. }))
    {
        return ExitCode::from(EXIT_GUEST_FAILED);
    }
    match outcomes.as_slice() {
        // The process exit status holds 8 bits, as with QEMU's isa-debug-exit.
        [only] => match only.end {
            GuestEnd::Exited { code } => ExitCode::from(code as u8),
            _ => ExitCode::SUCCESS,
        },
        _ => ExitCode::SUCCESS,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log);
    match &cli.command {
        Command::Run { env, faults } => run(env, faults),
        Command::Check { env } => match load(env) {
            Ok(env) => {
                print!("{}", env.to_toml());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
    }
}
