//! Generates the tonic/prost code for `lorafleet.v1` with the vendored protoc (no
//! system protoc needed) and writes a file descriptor set for gRPC reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment here.
    unsafe { std::env::set_var("PROTOC", protoc) };

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let proto = "proto/lorafleet/v1/lorafleet.proto";
    println!("cargo:rerun-if-changed={proto}");

    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("lorafleet_v1_descriptor.bin"))
        .compile_protos(&[proto], &["proto"])?;
    Ok(())
}
