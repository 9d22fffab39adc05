//! How a run tells its user how far it got. The library ([`crate::cli::simulate`]) takes a
//! [`Progress`]; the command line passes a bar on the terminal (feature `progress-bar`), the
//! Python package and nested runs (sweeps, frontiers) pass [`Quiet`].

/// What a simulation reports while it works. Implementations must be shareable between the
/// worker threads of a sweep.
pub trait Progress: Sync {
    /// `done` steps (rounds, or runs of a sweep) are finished; `rmse` is the latest
    /// evaluation, when there was one.
    fn position(&self, done: u64, rmse: Option<f64>);
    /// One more step is finished (runs of a sweep finish on several threads).
    fn advance(&self);
    /// A line for the user (a guardrail alert, a warning), printed to stderr so that it does
    /// not garble a bar.
    fn say(&self, line: &str);
    /// The work is over: a bar is cleared.
    fn finish(&self) {}
}

/// Reports nothing but the lines ([`Progress::say`]) to stderr.
#[derive(Clone, Copy, Debug, Default)]
pub struct Quiet;

impl Progress for Quiet {
    fn position(&self, _done: u64, _rmse: Option<f64>) {}
    fn advance(&self) {}
    fn say(&self, line: &str) {
        eprintln!("{line}");
    }
}

/// A bar on stderr for `total` steps of `what` ("round" or "run"), or [`Quiet`] when `quiet`
/// is set, stderr is not a terminal, or the `progress-bar` feature is off.
pub fn bar(total: u64, what: &str, quiet: bool) -> Box<dyn Progress> {
    use std::io::IsTerminal;
    if quiet || !std::io::stderr().is_terminal() {
        return Box::new(Quiet);
    }
    terminal_bar(total, what)
}

#[cfg(feature = "progress-bar")]
fn terminal_bar(total: u64, what: &str) -> Box<dyn Progress> {
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{{elapsed_precise}} [{{bar:30}}] {what} {{pos}}/{{len}} {{msg}}"
        ))
        .expect("a valid template")
        .progress_chars("=> "),
    );
    Box::new(Bar(bar))
}

#[cfg(not(feature = "progress-bar"))]
fn terminal_bar(_total: u64, _what: &str) -> Box<dyn Progress> {
    Box::new(Quiet)
}

/// indicatif's bar.
#[cfg(feature = "progress-bar")]
struct Bar(indicatif::ProgressBar);

#[cfg(feature = "progress-bar")]
impl Progress for Bar {
    fn position(&self, done: u64, rmse: Option<f64>) {
        self.0.set_position(done);
        if let Some(rmse) = rmse {
            self.0.set_message(format!("rmse {rmse:.4}"));
        }
    }
    fn advance(&self) {
        self.0.inc(1);
    }
    fn say(&self, line: &str) {
        self.0.suspend(|| eprintln!("{line}"));
    }
    fn finish(&self) {
        self.0.finish_and_clear();
    }
}
