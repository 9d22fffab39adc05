//! # fedpref-engine
//!
//! The pure core of fedpref, with no sockets, no database and no async runtime: what a run
//! is ([`manifest`], [`distributed`]), what a round does ([`engine`], the sans-IO round
//! engine, with [`secure_round`] for distributed mode; [`protocol`] holds the events, actions,
//! tasks and rejections it speaks, and [`accounting`] what a run spends), how updates become a model
//! ([`aggregation`], [`model`]), what the privacy ledger records and how it is verified
//! ([`ledger`], [`checkpoint`]), what a task entitles a device to ([`grants`]) and the
//! guardrail metrics of federated evaluation ([`guardrail`]).
//!
//! The coordinator (`fedpref-coordinator`) drives the engine with real time, a database and
//! gRPC; the simulator (`fedpref-simulations`) drives it in-process. Both re-use everything
//! here, so a simulated run computes exactly what a served run computes.
//!
//! Architecture invariant (ARCHITECTURE.md): this crate's normal dependencies contain no
//! tokio, tonic, hyper, axum, h2, rustls, rusqlite, postgres, rcgen, indicatif or plotters
//! (`doc-check/tests/dependencies.rs`). No module imports itself through others
//! (`doc-check/tests/import_cycles.rs`).

pub mod accounting;
pub mod aggregation;
pub mod checkpoint;
pub mod distributed;
pub mod engine;
pub mod grants;
pub mod guardrail;
pub mod ledger;
pub mod manifest;
pub mod model;
pub mod protocol;
pub mod secure_round;

/// Lower-case hex of a byte string.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn hex_is_lower_case_two_digits_per_byte_as_format_writes_them() {
        let bytes: Vec<u8> = (0..=255).collect();
        let expected: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(super::hex(&bytes), expected);
        assert_eq!(super::hex(&[]), "");
    }
}
