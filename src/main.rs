//! The `pier` command: `serve` and `check-config`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pier::config::Config;

#[derive(Parser)]
#[command(
    name = "pier",
    version,
    about = "A pull-through container-image registry mirror"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the mirror.
    Serve {
        /// Configuration file (TOML). Without one, built-in defaults apply.
        #[arg(long, short, env = "PIER_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Load and validate a configuration, print it with secrets masked.
    CheckConfig {
        #[arg(env = "PIER_CONFIG")]
        file: Option<PathBuf>,
    },
}

fn load(path: Option<&PathBuf>) -> Result<Config, ExitCode> {
    Config::load(path.map(PathBuf::as_path), std::env::vars()).map_err(|e| {
        eprintln!("pier: invalid configuration:");
        for p in &e.problems {
            eprintln!("  {p}");
        }
        ExitCode::from(2)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { file } => match load(file.as_ref()) {
            Ok(c) => {
                print!("{}", c.to_masked_toml());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Serve { config } => {
            let config = match load(config.as_ref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            pier::telemetry::init(config.log_format);
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("pier: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let result = runtime.block_on(async {
                let listener = tokio::net::TcpListener::bind(config.listen)
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
                pier::server::serve(&config, listener, pier::server::shutdown_signal()).await
            });
            pier::telemetry::shutdown();
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("pier: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
