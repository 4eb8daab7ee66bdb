//! remote commands (being written).
use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum RemoteCommand {}

pub fn run(c: RemoteCommand) -> anyhow::Result<()> {
    match c {}
}
