//! Generates the gRPC services and clients and the descriptor set for server reflection from
//! `proto/`. The messages are not generated here: they come from `kluis_client::pb` (one set of
//! types, with the redacted `Debug` the client crate gives every message holding personal data).

use std::{env, error::Error, path::PathBuf};

fn main() -> Result<(), Box<dyn Error>> {
    // A fresh machine has no protoc: take the vendored one unless PROTOC points elsewhere.
    let protoc = match env::var_os("PROTOC") {
        Some(p) => PathBuf::from(p),
        None => protoc_bin_vendored::protoc_bin_path()?,
    };
    let include = protoc_bin_vendored::include_path()?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let protos = [
        "proto/kluis/v1/subject.proto",
        "proto/kluis/v1/admin.proto",
        "proto/kluis/v1/consent.proto",
        "proto/kluis/v1/audit.proto",
        "proto/kluis/v1/retention.proto",
        "proto/kluis/v1/rights.proto",
        "proto/kluis/v1/disclosure.proto",
        "proto/kluis/v1/credential.proto",
    ];

    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("kluis_descriptor.bin"))
        .extern_path(".kluis.v1", "::kluis_client::pb")
        .compile_with_config(
            config,
            &protos.map(PathBuf::from),
            &[PathBuf::from("proto"), include],
        )?;

    // tonic-prost-build no longer emits these itself.
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-env-changed=PROTOC");
    Ok(())
}
