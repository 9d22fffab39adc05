//! `uniffi-bindgen`, pinned to the UniFFI version that `fedpref-ffi` is built with (the
//! generated sources must match the scaffolding in the library):
//!
//! ```text
//! cargo run -p fedpref-uniffi-bindgen -- generate --library target/debug/libfedpref_ffi.so \
//!     --language kotlin --language swift --out-dir bindings
//! ```

fn main() {
    uniffi::uniffi_bindgen_main()
}
