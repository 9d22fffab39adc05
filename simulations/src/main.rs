//! `fedpref-sim`: parses the command line and calls the library.

use std::process::ExitCode;

use clap::Parser;
use fedpref_simulations::cli::Cli;
use fedpref_simulations::command::execute;

/// Simulated rounds allocate and free update-sized buffers at a high rate; mimalloc keeps
/// their pages instead of returning them to the kernel after each free (docs/performance.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match execute(&cli) {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
