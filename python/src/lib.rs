//! # fedpref-python
//!
//! The native part of the `fedpref` Python package (`fedpref._native`), for notebooks:
//!
//! - the privacy accountant ([`accountant`], PLD by default or RDP): ε for a schedule, δ for an ε, σ for a target,
//!   with the semantics and the JSON keys of `fedpref-coordinator accountant … --json`;
//! - the simulator ([`simulate`]): a `fedpref-sim run` from a dictionary of its `--config`
//!   settings, in-process, writing no files; the same seed gives the same numbers as the
//!   command line;
//! - the ledger reader ([`ledger`]): a coordinator store's runs and hash-chained ledger,
//!   opened read-only and verified with the coordinator's own `ledger::verify`.
//!
//! Each returns a JSON document (the Python side parses it), so the keys and numbers are
//! exactly those the command lines print. Bad input is refused with an error naming the
//! argument or key; the Python functions raise it as `ValueError`, and a failure that is not
//! the caller's input (an unreadable store, a failed run) as `fedpref.FedprefError`.
//!
//! ```
//! // One Gaussian release, σ = 1, δ = 1e-5: the exact ε (PLD), and RDP's looser bound.
//! let out = _native::accountant::epsilon(1.0, 1e-5, 1, 1.0, "central", "pld").unwrap();
//! let v: serde_json::Value = serde_json::from_str(&out).unwrap();
//! assert_eq!(v["mode"], "central");
//! assert_eq!(v["accountant"], "pld");
//! assert!((v["epsilon"].as_f64().unwrap() - 4.377178095681137).abs() < 1e-6);
//! let out = _native::accountant::epsilon(1.0, 1e-5, 1, 1.0, "central", "rdp").unwrap();
//! let v: serde_json::Value = serde_json::from_str(&out).unwrap();
//! assert!((v["epsilon"].as_f64().unwrap() - 4.728507067217623).abs() < 1e-6);
//! ```

use numpy::IntoPyArray;
use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

pub mod accountant;
pub mod ledger;
pub mod simulate;

/// Why a call failed: the caller's input, or something else.
#[derive(Debug, PartialEq, Eq)]
pub enum Error {
    /// A bad argument or configuration value; the message names it.
    Invalid(String),
    /// Anything else (an unreadable store, a failed run); the message says what.
    Failed(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Invalid(m) | Self::Failed(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Error {}

pyo3::create_exception!(
    _native,
    FedprefError,
    PyException,
    "A fedpref failure that is not a bad argument: an unreadable store, a failed run."
);

impl From<Error> for PyErr {
    fn from(e: Error) -> Self {
        match e {
            Error::Invalid(m) => PyValueError::new_err(m),
            Error::Failed(m) => FedprefError::new_err(m),
        }
    }
}

/// `epsilon(noise_multiplier, delta, rounds, sampling_rate, mode, accountant) -> str` (JSON).
#[pyfunction]
#[pyo3(name = "epsilon")]
fn py_epsilon(
    py: Python<'_>,
    noise_multiplier: f64,
    delta: f64,
    rounds: u64,
    sampling_rate: f64,
    mode: &str,
    accountant: &str,
) -> PyResult<String> {
    let mode = mode.to_owned();
    let accountant = accountant.to_owned();
    Ok(py.detach(|| {
        accountant::epsilon(
            noise_multiplier,
            delta,
            rounds,
            sampling_rate,
            &mode,
            &accountant,
        )
    })?)
}

/// `delta(noise_multiplier, epsilon, rounds, sampling_rate, mode, accountant) -> str` (JSON).
#[pyfunction]
#[pyo3(name = "delta")]
fn py_delta(
    py: Python<'_>,
    noise_multiplier: f64,
    epsilon: f64,
    rounds: u64,
    sampling_rate: f64,
    mode: &str,
    accountant: &str,
) -> PyResult<String> {
    let mode = mode.to_owned();
    let accountant = accountant.to_owned();
    Ok(py.detach(|| {
        accountant::delta(
            noise_multiplier,
            epsilon,
            rounds,
            sampling_rate,
            &mode,
            &accountant,
        )
    })?)
}

/// `calibrate(target_epsilon, delta, rounds, sampling_rate, mode, accountant) -> str` (JSON).
#[pyfunction]
#[pyo3(name = "calibrate")]
fn py_calibrate(
    py: Python<'_>,
    target_epsilon: f64,
    delta: f64,
    rounds: u64,
    sampling_rate: f64,
    mode: &str,
    accountant: &str,
) -> PyResult<String> {
    let mode = mode.to_owned();
    let accountant = accountant.to_owned();
    Ok(py.detach(|| {
        accountant::calibrate(
            target_epsilon,
            delta,
            rounds,
            sampling_rate,
            &mode,
            &accountant,
        )
    })?)
}

/// `simulate(config_json) -> (str, dict)`: the result object as JSON, and its arrays —
/// `model` (None, or a dict of `item_factors` items × k, `item_biases`, `global_offset`) and
/// `columns` (name → one value per round). The arrays' memory is the buffers the simulator
/// filled, handed to NumPy without a copy.
#[pyfunction]
#[pyo3(name = "simulate")]
fn py_simulate<'py>(py: Python<'py>, config_json: &str) -> PyResult<(String, Bound<'py, PyDict>)> {
    let config = config_json.to_owned();
    let (text, arrays) = py.detach(|| simulate::simulate_json(&config))?;
    let out = PyDict::new(py);
    match arrays.model {
        None => out.set_item("model", py.None())?,
        Some((factors, biases, offset)) => {
            let model = PyDict::new(py);
            model.set_item("item_factors", factors.into_pyarray(py))?;
            model.set_item("item_biases", biases.into_pyarray(py))?;
            model.set_item("global_offset", offset)?;
            out.set_item("model", model)?;
        }
    }
    let columns = PyDict::new(py);
    for (name, column) in arrays.columns {
        match column {
            simulate::Column::Integers(a) => columns.set_item(name, a.into_pyarray(py))?,
            simulate::Column::Floats(a) => columns.set_item(name, a.into_pyarray(py))?,
        }
    }
    out.set_item("columns", columns)?;
    Ok((text, out))
}

/// `ledger(db_path) -> str` (JSON).
#[pyfunction]
#[pyo3(name = "ledger")]
fn py_ledger(py: Python<'_>, db_path: std::path::PathBuf) -> PyResult<String> {
    Ok(py.detach(|| ledger::read(&db_path))?)
}

/// The extension module `fedpref._native`.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(py_epsilon, m)?)?;
    m.add_function(wrap_pyfunction!(py_delta, m)?)?;
    m.add_function(wrap_pyfunction!(py_calibrate, m)?)?;
    m.add_function(wrap_pyfunction!(py_simulate, m)?)?;
    m.add_function(wrap_pyfunction!(py_ledger, m)?)?;
    m.add("FedprefError", m.py().get_type::<FedprefError>())?;
    Ok(())
}
