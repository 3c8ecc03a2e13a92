//! Generates the client side of `kluis.v1` (no server traits) from the service's `proto/`.

use std::{env, error::Error, path::PathBuf};

/// Messages that carry personal data or secrets, as in the service's build.rs: prost derives no
/// `Debug` for them, so a stray `{:?}` in a caller cannot print a value; `src/pb.rs` gives each a
/// redacted `Debug` instead.
const REDACTED: &[&str] = &[
    ".kluis.v1.Subject",
    ".kluis.v1.Name",
    ".kluis.v1.Address",
    ".kluis.v1.Contact",
    ".kluis.v1.IpAddressRecord",
    ".kluis.v1.Billing",
    ".kluis.v1.Payment",
    ".kluis.v1.Profile",
    ".kluis.v1.Account",
    ".kluis.v1.ActivityEntry",
    ".kluis.v1.CreateSubjectRequest",
    ".kluis.v1.CreateSubjectResponse",
    ".kluis.v1.GetSubjectResponse",
    ".kluis.v1.UpdateSubjectRequest",
    ".kluis.v1.UpdateSubjectResponse",
    ".kluis.v1.FindSubjectsRequest",
    ".kluis.v1.FindSubjectsRequest.key",
    ".kluis.v1.BatchGetSubjectsResponse",
    ".kluis.v1.BatchGetSubjectsResult",
    ".kluis.v1.BatchGetSubjectsResult.result",
    ".kluis.v1.CreateCallerTokenResponse",
    ".kluis.v1.MaskedValue",
    ".kluis.v1.RecordActivityRequest",
    ".kluis.v1.MarketingRecipient",
    ".kluis.v1.ListMarketingAudienceResponse",
    ".kluis.v1.RedeemUnsubscribeTokenRequest",
    ".kluis.v1.RectifySubjectRequest",
    ".kluis.v1.RectifySubjectResponse",
    ".kluis.v1.ExportSubjectDataResponse",
    ".kluis.v1.SetPasswordRequest",
    ".kluis.v1.VerifyPasswordRequest",
    ".kluis.v1.ChangePasswordRequest",
];

fn main() -> Result<(), Box<dyn Error>> {
    // A fresh machine has no protoc: take the vendored one unless PROTOC points elsewhere.
    let protoc = match env::var_os("PROTOC") {
        Some(p) => PathBuf::from(p),
        None => protoc_bin_vendored::protoc_bin_path()?,
    };
    let include = protoc_bin_vendored::include_path()?;
    let protos = [
        "../proto/kluis/v1/subject.proto",
        "../proto/kluis/v1/admin.proto",
        "../proto/kluis/v1/consent.proto",
        "../proto/kluis/v1/audit.proto",
        "../proto/kluis/v1/retention.proto",
        "../proto/kluis/v1/rights.proto",
        "../proto/kluis/v1/disclosure.proto",
        "../proto/kluis/v1/credential.proto",
    ];

    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .skip_debug(REDACTED.iter().copied())
        .compile_with_config(
            config,
            &protos.map(PathBuf::from),
            &[PathBuf::from("../proto"), include],
        )?;

    // tonic-prost-build no longer emits these itself.
    println!("cargo:rerun-if-changed=../proto");
    println!("cargo:rerun-if-env-changed=PROTOC");
    Ok(())
}
