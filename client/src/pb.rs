//! The generated `kluis.v1` messages and client stubs (no server side), with a redacted `Debug`
//! for every message that can carry personal data or a secret (build.rs withholds prost's
//! derived `Debug` for them), so `{:?}` in a caller's log line prints the type, never a value.

#![allow(clippy::all, missing_docs)]

tonic::include_proto!("kluis.v1");

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_of_a_message_with_personal_data_prints_the_type_not_the_values() {
        let subject = Subject {
            contact: Some(Contact {
                email: "jan.jansen@example.nl".into(),
                phone: String::new(),
            }),
            ..Default::default()
        };
        let request = CreateSubjectRequest {
            subject: Some(subject.clone()),
            ..Default::default()
        };
        for printed in [format!("{subject:?}"), format!("{request:?}")] {
            assert!(!printed.contains("jan.jansen"), "{printed}");
            assert!(printed.ends_with("(redacted)"), "{printed}");
        }
    }

    #[test]
    fn debug_of_a_message_without_personal_data_stays_readable() {
        let request = GetSubjectRequest {
            id: "sub_1".into(),
            ..Default::default()
        };
        assert!(format!("{request:?}").contains("sub_1"));
    }
}
