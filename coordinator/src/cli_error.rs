//! How a `fedpref-coordinator` command fails, and with which exit code. Its own module so
//! that the command line ([`crate::cli`]) and the admin client it dispatches to
//! ([`crate::admin_client`]) share it without depending on each other.

/// Why a command did not produce output.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The flags are inconsistent (exit code 2, like a parse error).
    #[error("{0}")]
    Usage(String),
    /// The command ran and failed (exit code 1).
    #[error("{0}")]
    Failed(String),
    /// Verification found a problem: print the report, exit code 1.
    #[error("{0}")]
    Verification(String),
}
