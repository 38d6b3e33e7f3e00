//! Compiles `nebula/v1/*.proto` without a system `protoc`: protox parses the
//! files into a descriptor set, which tonic-prost-build turns into Rust.

use std::{env, fs, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "nebula/v1/control.proto",
        "nebula/v1/peer.proto",
        "nebula/v1/local.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["."])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    // Served by the reflection service, so grpcurl can list and call every RPC.
    fs::write(
        out.join("nebula_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        // Chunk payloads and bitmaps stay `bytes::Bytes`: slices of the receive
        // buffer, never copied into a fresh Vec.
        .bytes(".nebula.v1")
        .compile_fds(descriptors)?;
    Ok(())
}
