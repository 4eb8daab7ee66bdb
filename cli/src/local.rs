//! local commands (being written).
use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum LocalCommand {}

pub fn run(c: LocalCommand) -> anyhow::Result<()> {
    match c {}
}
