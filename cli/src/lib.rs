//! The `lorafleet` command. Local commands (`train`, `eval`, `generate`, `quantize`,
//! `merge`, `bench`) run the engine in-process; remote commands (`submit`, `jobs`,
//! `status`, `watch`, `logs`, `cancel`, `checkpoints`, `fetch`, `workers`) talk to a
//! coordinator over gRPC; `dev` runs coordinator + worker + file storage embedded;
//! `serve` answers OpenAI API requests with a base model and many adapters.

use clap::{Parser, Subcommand};
use std::process::ExitCode;

pub mod local;
pub mod remote;
pub mod serve;

/// Fine-tune open LLMs on your own question/answer data with QLoRA.
///
/// Quick start (one machine, no setup):
///   lorafleet dev &                                # coordinator + CPU worker + file storage
///   lorafleet submit examples/faq.yaml --watch     # fine-tune the demo model
///   lorafleet fetch JOB -o out/adapter             # download the PEFT adapter
///   lorafleet generate --model M --adapter out/adapter --prompt "..."
#[derive(Debug, Parser)]
#[command(name = "lorafleet", version, about, long_about, verbatim_doc_comment)]
pub struct Cli {
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `lorafleet_engine=debug`.
    #[arg(long, global = true, env = "LORAFLEET_LOG", default_value = "warn")]
    pub log: String,
    /// Print logs as JSON lines.
    #[arg(long, global = true)]
    pub log_json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    #[command(flatten)]
    Local(local::LocalCommand),
    #[command(flatten)]
    Remote(remote::RemoteCommand),
    Serve(serve::ServeArgs),
}

pub fn init_tracing(filter: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = if json { builder.json().try_init() } else { builder.try_init() };
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(&cli.log, cli.log_json);
    // Commands that train or run a model load the BLAS now, while this is the only thread.
    if matches!(cli.command, Command::Local(_) | Command::Serve(_) | Command::Remote(remote::RemoteCommand::Dev(_))) {
        lorafleet_engine::blas::init_early();
    }
    let result = match cli.command {
        Command::Local(c) => local::run(c),
        Command::Remote(c) => remote::run(c),
        Command::Serve(a) => serve::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
