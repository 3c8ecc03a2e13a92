//! The generated `kluis.v1` types and clients, with redacted `Debug` for every message that can
//! carry personal data or a token (build.rs withholds prost's derived `Debug` for them).

#![allow(clippy::all, missing_docs)]

tonic::include_proto!("kluis.v1");

/// The encoded descriptor set of `kluis.v1` (and its imports), for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("kluis_descriptor");

macro_rules! redacted_debug {
    ($($ty:ty),* $(,)?) => {$(
        impl std::fmt::Debug for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(concat!(stringify!($ty), "(redacted)"))
            }
        }
    )*};
}

redacted_debug!(
    Subject,
    Name,
    Address,
    Contact,
    IpAddressRecord,
    Billing,
    Payment,
    Profile,
    Account,
    ActivityEntry,
    CreateSubjectRequest,
    CreateSubjectResponse,
    GetSubjectResponse,
    UpdateSubjectRequest,
    UpdateSubjectResponse,
    FindSubjectsRequest,
    find_subjects_request::Key,
    BatchGetSubjectsResponse,
    BatchGetSubjectsResult,
    batch_get_subjects_result::Result,
    CreateCallerTokenResponse,
    MaskedValue,
    RecordActivityRequest,
    MarketingRecipient,
    ListMarketingAudienceResponse,
    RedeemUnsubscribeTokenRequest,
    RectifySubjectRequest,
    RectifySubjectResponse,
    ExportSubjectDataResponse,
    SetPasswordRequest,
    VerifyPasswordRequest,
    ChangePasswordRequest,
);
