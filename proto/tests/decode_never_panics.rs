//! Whatever bytes arrive, decoding a request never panics, and tensor
//! validation of whatever decoded never panics either. What decodes
//! re-encodes to a fixed point.

use fedpref_proto::prost::Message;
use fedpref_proto::v1::{
    AdvertiseKeysRequest, CheckInRequest, CreateRunRequest, DeclineTaskRequest,
    DownloadModelRequest, EnrollRequest, GetReportRequest, GetRunRequest, GetStageRequest,
    ListModelVersionsRequest, ListRunsRequest, ModelChunk, ModelSnapshot, NamedTensor,
    PauseRunRequest, ReadLedgerRequest, ReportMetricsRequest, ResumeRunRequest, RollbackRunRequest,
    ShareKeysRequest, StopRunRequest, UnmaskRequest, UploadUpdateRequest, VerifyLedgerRequest,
};
use proptest::prelude::*;

/// Decodes `bytes` as `M`; when that succeeds, encoding and decoding again
/// must reproduce the same bytes (comparing bytes, not values, so NaN doubles
/// cannot make equal messages look different).
fn decode_is_total<M: Message + Default>(bytes: &[u8]) {
    if let Ok(message) = M::decode(bytes) {
        let once = message.encode_to_vec();
        let again = M::decode(once.as_slice())
            .expect("a re-encoded message decodes")
            .encode_to_vec();
        assert_eq!(once, again);
    }
}

fn arbitrary_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..512)
}

/// Well-formed protobuf fields with random numbers, wire types and payloads,
/// which reach deeper into the decoders than uniformly random bytes do.
fn field_soup() -> impl Strategy<Value = Vec<u8>> {
    let field = (1u32..40, 0u8..6, prop::collection::vec(any::<u8>(), 0..24)).prop_map(
        |(number, wire_type, payload)| {
            let mut out = Vec::new();
            let wire_type = if wire_type == 3 || wire_type == 4 {
                2
            } else {
                wire_type
            };
            encode_varint(u64::from(number << 3 | u32::from(wire_type)), &mut out);
            match wire_type {
                0 => encode_varint(payload.iter().map(|&b| u64::from(b)).sum(), &mut out),
                1 => out.extend((0..8).map(|i| payload.get(i).copied().unwrap_or(0))),
                5 => out.extend((0..4).map(|i| payload.get(i).copied().unwrap_or(0))),
                _ => {
                    encode_varint(payload.len() as u64, &mut out);
                    out.extend(payload);
                }
            }
            out
        },
    );
    prop::collection::vec(field, 0..16).prop_map(|fields| fields.concat())
}

fn encode_varint(mut value: u64, out: &mut Vec<u8>) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn decode_every_request(bytes: &[u8]) {
    decode_is_total::<EnrollRequest>(bytes);
    decode_is_total::<CheckInRequest>(bytes);
    decode_is_total::<DownloadModelRequest>(bytes);
    decode_is_total::<UploadUpdateRequest>(bytes);
    decode_is_total::<DeclineTaskRequest>(bytes);
    decode_is_total::<ReportMetricsRequest>(bytes);
    decode_is_total::<CreateRunRequest>(bytes);
    decode_is_total::<GetRunRequest>(bytes);
    decode_is_total::<ListRunsRequest>(bytes);
    decode_is_total::<PauseRunRequest>(bytes);
    decode_is_total::<ResumeRunRequest>(bytes);
    decode_is_total::<StopRunRequest>(bytes);
    decode_is_total::<RollbackRunRequest>(bytes);
    decode_is_total::<ListModelVersionsRequest>(bytes);
    decode_is_total::<ReadLedgerRequest>(bytes);
    decode_is_total::<VerifyLedgerRequest>(bytes);
    decode_is_total::<GetReportRequest>(bytes);
    decode_is_total::<AdvertiseKeysRequest>(bytes);
    decode_is_total::<GetStageRequest>(bytes);
    decode_is_total::<ShareKeysRequest>(bytes);
    decode_is_total::<UnmaskRequest>(bytes);
    // What devices decode from the coordinator.
    decode_is_total::<ModelChunk>(bytes);
    decode_is_total::<ModelSnapshot>(bytes);
}

fn validate_whatever_decodes(bytes: &[u8]) {
    if let Ok(tensor) = NamedTensor::decode(bytes) {
        // Errors are fine; panics are not.
        let _ = tensor.validate();
        let _ = tensor.to_f64_vec();
        let _ = tensor.to_f32_vec();
        let _ = tensor.element_count();
    }
}

proptest! {
    #[test]
    fn decoding_arbitrary_bytes_into_any_request_never_panics(bytes in arbitrary_bytes()) {
        decode_every_request(&bytes);
    }

    #[test]
    fn decoding_well_formed_random_fields_into_any_request_never_panics(bytes in field_soup()) {
        decode_every_request(&bytes);
    }

    #[test]
    fn validating_an_arbitrary_decoded_tensor_never_panics(bytes in field_soup()) {
        validate_whatever_decodes(&bytes);
    }

    #[test]
    fn validating_a_tensor_with_arbitrary_shape_and_bytes_never_panics(
        shape in prop::collection::vec(any::<u64>(), 0..4),
        dtype in -1i32..5,
        data in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let tensor = NamedTensor { name: "item_factors".into(), shape, dtype, data };
        let _ = tensor.validate();
        let _ = tensor.to_f64_vec();
    }

    #[test]
    fn finite_f64_values_survive_the_tensor_round_trip_bit_for_bit(
        values in prop::collection::vec(
            any::<f64>().prop_filter("finite", |v| v.is_finite()), 0..64),
        rows in 1u64..4,
    ) {
        let cols = values.len() as u64;
        let repeated: Vec<f64> = (0..rows).flat_map(|_| values.iter().copied()).collect();
        let tensor = NamedTensor::from_f64("item_factors", vec![rows, cols], &repeated).unwrap();
        let wire = tensor.encode_to_vec();
        let back = NamedTensor::decode(wire.as_slice()).unwrap().to_f64_vec().unwrap();
        prop_assert_eq!(
            back.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            repeated.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
    }

    #[test]
    fn finite_f32_values_survive_the_tensor_round_trip(
        values in prop::collection::vec(
            any::<f32>().prop_filter("finite", |v| v.is_finite()), 0..64),
    ) {
        let tensor = NamedTensor::from_f32("item_biases", vec![values.len() as u64], &values).unwrap();
        let back = tensor.to_f32_vec().unwrap();
        prop_assert_eq!(
            back.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            values.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
    }
}
