//! Compiles `fedpref/v1/*.proto` with protox (pure Rust: no system `protoc`),
//! generates prost messages and tonic clients and servers with
//! tonic-prost-build, and writes the encoded `FileDescriptorSet` to `OUT_DIR`
//! for gRPC reflection.

use std::env;
use std::error::Error;
use std::fs;
use std::path::{Path, PathBuf};

use protox::prost::Message as _;

/// Directory of the protocol's files, relative to the crate root (which is
/// also the include root, so imports read `fedpref/v1/common.proto`).
const PROTO_DIR: &str = "fedpref/v1";

/// File name, inside `OUT_DIR`, of the encoded descriptor set that
/// `src/lib.rs` embeds as `FILE_DESCRIPTOR_SET`.
const DESCRIPTOR_FILE: &str = "fedpref_v1_descriptor.bin";

fn main() -> Result<(), Box<dyn Error>> {
    let crate_root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);

    let protos = proto_files(&crate_root)?;
    // A new or removed file changes the directory; an edited file changes itself.
    println!("cargo:rerun-if-changed={PROTO_DIR}");
    for proto in &protos {
        println!("cargo:rerun-if-changed={}", proto.display());
    }

    let descriptors = protox::compile(&protos, [&crate_root])
        // protox's Debug form reads `file.proto:line:col: problem`; Display omits the place.
        .map_err(|e| format!("compiling the fedpref.v1 protocol failed: {e:?}"))?;

    fs::write(out_dir.join(DESCRIPTOR_FILE), descriptors.encode_to_vec())?;

    // The services and clients only with the `grpc` feature; the messages always.
    let grpc = env::var_os("CARGO_FEATURE_GRPC").is_some();
    tonic_prost_build::configure()
        .build_client(grpc)
        .build_server(grpc)
        .build_transport(grpc)
        // An update's chunks are `Bytes`: the server decodes them as slices of the receive
        // buffer instead of copying every byte of every upload into a fresh `Vec`.
        .bytes(".fedpref.v1.TensorChunk.content")
        .compile_fds(descriptors)?;
    Ok(())
}

/// The `.proto` files of fedpref.v1, relative to the crate root, sorted so the
/// generated code does not depend on directory order.
fn proto_files(crate_root: &Path) -> Result<Vec<PathBuf>, Box<dyn Error>> {
    let mut protos = Vec::new();
    for entry in fs::read_dir(crate_root.join(PROTO_DIR))? {
        let path = entry?.path();
        if path.extension().is_some_and(|ext| ext == "proto") {
            let file_name = path.file_name().ok_or("a .proto path has no file name")?;
            protos.push(Path::new(PROTO_DIR).join(file_name));
        }
    }
    if protos.is_empty() {
        return Err(format!("no .proto files in {PROTO_DIR}").into());
    }
    protos.sort();
    Ok(protos)
}
