//! `mcchat`: parses arguments, sets up logging, runs, and maps errors to exit codes
//! (0 success, 1 error, 2 usage error from clap).

use std::io::Write as _;
use std::process::ExitCode;

use clap::Parser as _;
use mcchat::StdoutClosed;
use mcchat::cli::Cli;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default = match (cli.quiet, cli.verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, _) => "debug",
    };
    // RUST_LOG, when set and valid, overrides -v/-q.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(mcchat::log_writer)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();

    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = writeln!(
                std::io::stderr(),
                "mcchat: failed to start the async runtime: {e}"
            );
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(mcchat::run(cli));
    // A read of stdin may still block a runtime thread (it cannot be cancelled); exiting must
    // not wait for it.
    runtime.shutdown_background();
    // What the log queue holds (notes, warnings) is written before the last word.
    mcchat::flush_logs(std::time::Duration::from_millis(500));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<StdoutClosed>() => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "mcchat: {e:#}");
            ExitCode::FAILURE
        }
    }
}
