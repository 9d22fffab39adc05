//! The fedpref.v1 wire protocol: the messages and gRPC services that devices,
//! the coordinator and operators speak, generated from `proto/fedpref/v1/*.proto`.
//!
//! The `.proto` files are the API reference: every message and field carries a
//! doc comment, which the generated Rust items below repeat. This crate adds
//! what both sides need on top of the generated code:
//!
//! - [`v1`]: messages, [`v1::device_service_client`] /
//!   [`v1::device_service_server`], [`v1::admin_service_client`] /
//!   [`v1::admin_service_server`], and
//!   [`v1::secure_aggregation_service_client`] /
//!   [`v1::secure_aggregation_service_server`];
//! - [`FILE_DESCRIPTOR_SET`], the encoded descriptors for gRPC server
//!   reflection;
//! - checked conversions between [`v1::NamedTensor`] and `&[f64]` / `&[f32]`
//!   (see [`TensorError`]), and [`require_specified`] for enum fields;
//! - the [`metadata`] keys that carry device and admin credentials.
//!
//! **Architecture invariant.** No message carries a user's private parameters
//! (user factor, user bias), raw events, or identity beyond an opaque device
//! id. `tests/invariant.rs` walks [`FILE_DESCRIPTOR_SET`] and fails on any name
//! that looks like personal data.
//!
//! # Example
//!
//! A device builds the header and first chunk of an upload; the coordinator
//! decodes them and reads the tensor back, checked.
//!
//! ```
//! use fedpref_proto::prost::Message;
//! use fedpref_proto::v1::{
//!     upload_update_request::Part, NamedTensor, PrivacyMode, TaskRef, TensorChunk,
//!     UpdateHeader, UploadUpdateRequest,
//! };
//!
//! // Device side: a 2 x 3 update to the item factors, already clipped and noised.
//! let update = NamedTensor::from_f64("item_factors", vec![2, 3], &[0.1, -0.2, 0.0, 0.3, 0.05, -0.1])?;
//! let header = UploadUpdateRequest {
//!     part: Some(Part::Header(UpdateHeader {
//!         task: Some(TaskRef { run_id: "run-1".into(), round_id: 7, task_token: "t0k3n".into() }),
//!         base_model_version: 6,
//!         tensors: vec![update.spec()],
//!         privacy_mode: PrivacyMode::Local as i32,
//!         clip_norm: 1.0,
//!         noise_multiplier: 0.8,
//!         ..Default::default()
//!     })),
//! };
//! let chunk = UploadUpdateRequest {
//!     part: Some(Part::Chunk(TensorChunk { tensor_index: 0, offset: 0, content: update.data.clone().into() })),
//! };
//! let wire = [header.encode_to_vec(), chunk.encode_to_vec()];
//!
//! // Coordinator side: decode, then rebuild and check the tensor.
//! let Some(Part::Header(header)) = UploadUpdateRequest::decode(&wire[0][..])?.part else {
//!     panic!("the first message must be the header");
//! };
//! let Some(Part::Chunk(chunk)) = UploadUpdateRequest::decode(&wire[1][..])?.part else {
//!     panic!("later messages are chunks");
//! };
//! let spec = &header.tensors[0];
//! let received = NamedTensor {
//!     name: spec.name.clone(),
//!     shape: spec.shape.clone(),
//!     dtype: spec.dtype,
//!     data: chunk.content.into(),
//! };
//! assert_eq!(received.to_f64_vec()?, vec![0.1, -0.2, 0.0, 0.3, 0.05, -0.1]);
//!
//! // A truncated payload is refused, naming the tensor and the problem.
//! let truncated = NamedTensor { data: received.data[..40].to_vec(), ..received };
//! assert_eq!(
//!     truncated.to_f64_vec().unwrap_err().to_string(),
//!     "tensor `item_factors`: data is 40 bytes but shape [2, 3] of DTYPE_F64 needs 48",
//! );
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod enums;
mod tensor;

pub use enums::{EnumError, require_specified};
pub use tensor::{TensorElement, TensorError};

/// The prost version the generated code uses, so callers need not pin it.
pub use prost;
/// Well-known types (`Timestamp`, `Duration`) as the generated code uses them.
pub use prost_types;

/// The generated fedpref.v1 messages, enums, clients and servers.
///
/// Documentation of each item comes from the `.proto` files.
#[allow(missing_docs)]
#[allow(clippy::all, clippy::pedantic)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/fedpref.v1.rs"));
}

/// The encoded `google.protobuf.FileDescriptorSet` of fedpref.v1, with its
/// imports (the well-known types) and source comments, for gRPC server
/// reflection (`tonic_reflection::server::Builder::configure()
/// .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)`) and for tests
/// that inspect the protocol.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/fedpref_v1_descriptor.bin"));

/// The names of the tensors that fedpref.v1 messages carry (`common.proto`'s
/// `MatrixFactorizationSpec`, `secagg.proto`'s masked upload). Model snapshots and updates
/// name their tensors with these, in this order.
pub mod tensor_names {
    /// The item factor matrix, shape `[item_count, factor_dimension]`.
    pub const ITEM_FACTORS: &str = "item_factors";
    /// The per-item biases, shape `[item_count]`.
    pub const ITEM_BIASES: &str = "item_biases";
    /// The global offset, a scalar (shape `[]`).
    pub const GLOBAL_OFFSET: &str = "global_offset";
    /// A distributed round's one uploaded tensor: the three above flattened in order,
    /// clipped, encoded in fixed point, noised and masked (`DTYPE_U32`, shape `[d]`).
    pub const MASKED_UPDATE: &str = "masked_update";
}

/// Length in bytes of every SHA-256 digest in the protocol.
pub const SHA256_LEN: usize = 32;

/// gRPC metadata that carries credentials.
///
/// Every `DeviceService` and `SecureAggregationService` call except `Enroll`
/// sends the device token from `EnrollResponse` as
/// `authorization: Bearer <device_token>`; every `AdminService` call sends the
/// admin token the same way. The coordinator answers a missing or unknown token
/// with `UNAUTHENTICATED`, and a device token on the admin service with
/// `PERMISSION_DENIED`.
pub mod metadata {
    /// The metadata key (lower case, as gRPC requires).
    pub const AUTHORIZATION: &str = "authorization";
    /// The scheme that prefixes the token in the value, followed by one space.
    pub const BEARER: &str = "Bearer";

    /// The metadata value for a token: `Bearer <token>`.
    ///
    /// ```
    /// assert_eq!(fedpref_proto::metadata::bearer("abc"), "Bearer abc");
    /// ```
    pub fn bearer(token: &str) -> String {
        format!("{BEARER} {token}")
    }

    /// The token in an `authorization` value, if it uses the `Bearer` scheme
    /// (the scheme is matched case-insensitively, as HTTP does) and the token
    /// is non-empty.
    ///
    /// ```
    /// use fedpref_proto::metadata::bearer_token;
    /// assert_eq!(bearer_token("Bearer abc"), Some("abc"));
    /// assert_eq!(bearer_token("bearer abc"), Some("abc"));
    /// assert_eq!(bearer_token("Basic abc"), None);
    /// assert_eq!(bearer_token("Bearer "), None);
    /// ```
    pub fn bearer_token(value: &str) -> Option<&str> {
        let (scheme, token) = value.split_once(' ')?;
        let token = token.trim();
        (scheme.eq_ignore_ascii_case(BEARER) && !token.is_empty()).then_some(token)
    }
}
