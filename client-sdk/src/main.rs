//! `fedpref-device`: parses the command line and hands it to [`fedpref_client_sdk::cli`].

use clap::Parser;
use fedpref_client_sdk::cli::{Cli, CliError, run};

fn main() {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(out) => println!("{out}"),
        Err(CliError::Usage(message)) => {
            use clap::CommandFactory;
            Cli::command()
                .error(clap::error::ErrorKind::MissingRequiredArgument, message)
                .exit()
        }
        Err(CliError::Failed(message)) => {
            eprintln!("error: {message}");
            std::process::exit(1)
        }
    }
}
