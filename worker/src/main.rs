use clap::Parser;
use lorafleet_worker::{EngineTrainer, Worker, WorkerArgs, WorkerConfig};
use std::process::ExitCode;
use std::sync::Arc;

fn main() -> ExitCode {
    let args = WorkerArgs::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("LORAFLEET_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    // Before the runtime starts its threads (see lorafleet_engine::blas::init_early).
    lorafleet_engine::blas::init_early();
    match tokio::runtime::Runtime::new() {
        Ok(rt) => rt.block_on(run(args)),
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: WorkerArgs) -> ExitCode {
    let cfg = match WorkerConfig::from_args(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let worker = match Worker::new(cfg, Arc::new(EngineTrainer)).await {
        Ok(w) => w,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    match worker.run(shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
