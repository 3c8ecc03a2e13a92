//! Field paths of a subject message (DESIGN.md §2): which leaves a read or write returned, so
//! callers can log and check *which* paths they got without touching the values.

use crate::pb;

/// Every leaf field path kluis knows, in proto order.
pub const ALL_PATHS: &[&str] = &[
    "name.given",
    "name.family",
    "address.street",
    "address.house_number",
    "address.house_number_addition",
    "address.postal_code",
    "address.city",
    "address.country",
    "contact.email",
    "contact.phone",
    "ip_addresses",
    "billing.company_name",
    "billing.vat_number",
    "billing.address.street",
    "billing.address.house_number",
    "billing.address.house_number_addition",
    "billing.address.postal_code",
    "billing.address.city",
    "billing.address.country",
    "payment.iban",
    "payment.account_holder",
    "payment.psp_token",
    "payment.method",
    "profile.gender",
    "account.username",
    "activity_log",
];

/// The leaf paths that carry a value in `subject` (a blank value is no value, as in kluis), in
/// proto order. Ids, versions and times are not field paths.
pub fn present_paths(subject: &pb::Subject) -> Vec<&'static str> {
    let mut out = Vec::new();
    let mut leaf = |path: &'static str, present: bool| {
        if present {
            out.push(path);
        }
    };
    if let Some(n) = &subject.name {
        leaf("name.given", !n.given.is_empty());
        leaf("name.family", !n.family.is_empty());
    }
    address(&mut leaf, "address", subject.address.as_ref());
    if let Some(c) = &subject.contact {
        leaf("contact.email", !c.email.is_empty());
        leaf("contact.phone", !c.phone.is_empty());
    }
    leaf("ip_addresses", !subject.ip_addresses.is_empty());
    if let Some(b) = &subject.billing {
        leaf("billing.company_name", !b.company_name.is_empty());
        leaf("billing.vat_number", !b.vat_number.is_empty());
        address(&mut leaf, "billing.address", b.address.as_ref());
    }
    if let Some(p) = &subject.payment {
        leaf("payment.iban", !p.iban.is_empty());
        leaf("payment.account_holder", !p.account_holder.is_empty());
        leaf("payment.psp_token", !p.psp_token.is_empty());
        leaf("payment.method", p.method != 0);
    }
    if let Some(p) = &subject.profile {
        leaf("profile.gender", p.gender != 0);
    }
    if let Some(a) = &subject.account {
        leaf("account.username", !a.username.is_empty());
    }
    leaf("activity_log", !subject.activity_log.is_empty());
    out
}

fn address(
    leaf: &mut impl FnMut(&'static str, bool),
    prefix: &'static str,
    address: Option<&pb::Address>,
) {
    let Some(a) = address else { return };
    let billing = prefix == "billing.address";
    let fields: [(&'static str, &'static str, &str); 6] = [
        (
            "address.street",
            "billing.address.street",
            a.street.as_str(),
        ),
        (
            "address.house_number",
            "billing.address.house_number",
            a.house_number.as_str(),
        ),
        (
            "address.house_number_addition",
            "billing.address.house_number_addition",
            a.house_number_addition.as_str(),
        ),
        (
            "address.postal_code",
            "billing.address.postal_code",
            a.postal_code.as_str(),
        ),
        ("address.city", "billing.address.city", a.city.as_str()),
        (
            "address.country",
            "billing.address.country",
            a.country.as_str(),
        ),
    ];
    for (own, of_billing, value) in fields {
        leaf(if billing { of_billing } else { own }, !value.is_empty());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr() -> pb::Address {
        pb::Address {
            street: "s".into(),
            house_number: "1".into(),
            house_number_addition: "a".into(),
            postal_code: "p".into(),
            city: "c".into(),
            country: "NL".into(),
        }
    }

    #[test]
    fn a_full_subject_has_every_path_and_an_empty_one_none() {
        let full = pb::Subject {
            id: "id".into(),
            version: 3,
            name: Some(pb::Name {
                given: "g".into(),
                family: "f".into(),
            }),
            address: Some(addr()),
            contact: Some(pb::Contact {
                email: "e".into(),
                phone: "p".into(),
            }),
            ip_addresses: vec![pb::IpAddressRecord::default()],
            billing: Some(pb::Billing {
                company_name: "c".into(),
                vat_number: "v".into(),
                address: Some(addr()),
            }),
            payment: Some(pb::Payment {
                iban: "i".into(),
                account_holder: "h".into(),
                psp_token: "t".into(),
                method: 1,
            }),
            profile: Some(pb::Profile { gender: 1 }),
            account: Some(pb::Account {
                username: "u".into(),
            }),
            activity_log: vec![pb::ActivityEntry::default()],
            ..Default::default()
        };
        assert_eq!(present_paths(&full), ALL_PATHS);
        assert!(present_paths(&pb::Subject::default()).is_empty());
        let partial = pb::Subject {
            billing: Some(pb::Billing {
                vat_number: "v".into(),
                address: Some(pb::Address {
                    city: "c".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            present_paths(&partial),
            ["billing.vat_number", "billing.address.city"]
        );
    }
}
