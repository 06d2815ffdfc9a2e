//! `mcchatd`: parses flags, sets up logging, runs the relay, maps errors to exit codes
//! (0 success, 1 error, 2 usage).

use std::io::Write as _;
use std::process::ExitCode;

use clap::Parser as _;
use mcchatd::cli::{Cli, LogFormat};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.check_config {
        return match mcchatd::driver::check_config(&cli) {
            Ok(summary) => {
                let _ = writeln!(std::io::stdout(), "{summary}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                let _ = writeln!(std::io::stderr(), "mcchatd: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let default = match (cli.quiet, cli.verbose) {
        (true, _) => "warn",
        (false, 0) => "info",
        (false, 1) => "debug",
        (false, _) => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    // journald adds its own timestamps; a terminal wants them. Colour only on a terminal.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    match cli.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.with_ansi(ansi).init(),
    }

    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "failed to start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(mcchatd::driver::run(cli, CancellationToken::new()));
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "mcchatd: {e:#}");
            ExitCode::FAILURE
        }
    }
}
