//! `fedpref-sim`: parses the command line and calls the library.

use std::process::ExitCode;

use clap::Parser;
use fedpref_simulations::cli::Cli;
use fedpref_simulations::command::execute;

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
