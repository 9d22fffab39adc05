//! `fedpref-coordinator`: parses the command line and hands it to [`fedpref_coordinator::cli`].

use clap::Parser;
use fedpref_coordinator::cli::{Cli, CliError, run};

fn main() {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(out) => println!("{out}"),
        Err(CliError::Usage(message)) => {
            use clap::CommandFactory;
            Cli::command()
                .error(clap::error::ErrorKind::ValueValidation, message)
                .exit()
        }
        Err(CliError::Verification(report)) => {
            println!("{report}");
            std::process::exit(1)
        }
        Err(CliError::Failed(message)) => {
            eprintln!("error: {message}");
            std::process::exit(1)
        }
    }
}
