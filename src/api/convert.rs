//! Parsing at the edge: proto messages into validated domain values (violations name the field
//! path, never the value), and domain views back into proto messages.

use std::collections::BTreeMap;

use prost_types::{FieldMask, Timestamp};
use uuid::Uuid;

use super::pb;
use crate::domain::{
    ActivityRecord, DomainError, FieldChanges, FieldPath, FieldValue, IpRecord, StoredField,
    SubjectView, Violation,
    values::{self, CountryCode, Email, Iban, Phone, Username, ValueError},
    vault::LookupKey,
};

/// Most entries in `ip_addresses` or `activity_log`.
pub const MAX_LIST: usize = 1000;
/// Longest `source` a write may give.
const MAX_SOURCE: usize = 64;

pub fn subject_id(field: &str, text: &str) -> Result<Uuid, Violation> {
    Uuid::try_parse(text).map_err(|_| {
        let what = if text.is_empty() {
            "required"
        } else {
            "not a UUID"
        };
        Violation::new(field, what)
    })
}

pub fn source(text: &str) -> Result<Option<String>, DomainError> {
    if text.is_empty() {
        return Ok(None);
    }
    values::text(text, MAX_SOURCE)
        .map(Some)
        .map_err(|e| DomainError::invalid("source", e))
}

/// The leaves a mask names, each once, in contract order. `field` names the mask in violations.
pub fn mask_paths(mask: Option<&FieldMask>, field: &str) -> Result<Vec<FieldPath>, DomainError> {
    let mut paths = Vec::new();
    let mut violations = Vec::new();
    for (i, entry) in mask
        .map(|m| m.paths.as_slice())
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        match FieldPath::expand(entry) {
            Some(leaves) => paths.extend(leaves),
            None => violations.push(Violation::new(
                format!("{field}.paths[{i}]"),
                // The entry is not echoed: it is the caller's text, of any length.
                if entry.is_empty() {
                    "empty field path"
                } else {
                    "unknown field path: expected a field path such as name.given or a group such as billing.address"
                },
            )),
        }
    }
    if !violations.is_empty() {
        return Err(DomainError::InvalidArgument(violations));
    }
    paths.sort();
    paths.dedup();
    Ok(paths)
}

/// Every non-empty leaf of `subject`, validated; for CreateSubject.
pub fn subject_fields(
    subject: &pb::Subject,
) -> Result<BTreeMap<FieldPath, FieldValue>, DomainError> {
    let mut fields = BTreeMap::new();
    let mut violations = Vec::new();
    for path in FieldPath::ALL {
        match leaf(subject, *path, &|_| true) {
            Ok(Some(value)) => {
                fields.insert(*path, value);
            }
            Ok(None) => {}
            Err(mut v) => violations.append(&mut v),
        }
    }
    if violations.is_empty() {
        Ok(fields)
    } else {
        Err(DomainError::InvalidArgument(violations))
    }
}

/// The value of each leaf in `paths` (`None`: clear it); for UpdateSubject.
pub fn subject_changes(
    subject: &pb::Subject,
    paths: &[FieldPath],
) -> Result<FieldChanges, DomainError> {
    let mut changes = FieldChanges::new();
    let mut violations = Vec::new();
    for path in paths {
        match leaf(subject, *path, &|p| paths.contains(&p)) {
            Ok(value) => {
                changes.insert(*path, value);
            }
            Err(mut v) => violations.append(&mut v),
        }
    }
    if violations.is_empty() {
        Ok(changes)
    } else {
        Err(DomainError::InvalidArgument(violations))
    }
}

/// A FindSubjects key, parsed like the value it is compared with.
pub fn lookup_key(request: &pb::FindSubjectsRequest) -> Result<LookupKey, DomainError> {
    use pb::find_subjects_request::Key;
    let (path, parsed) = match &request.key {
        Some(Key::Email(v)) => (
            FieldPath::ContactEmail,
            Email::parse(v).map(Email::into_inner),
        ),
        Some(Key::Phone(v)) => (
            FieldPath::ContactPhone,
            Phone::parse(v).map(Phone::into_inner),
        ),
        Some(Key::Username(v)) => (
            FieldPath::AccountUsername,
            Username::parse(v).map(Username::into_inner),
        ),
        Some(Key::Iban(v)) => (FieldPath::PaymentIban, Iban::parse(v).map(Iban::into_inner)),
        None => {
            return Err(DomainError::invalid(
                "key",
                "set one of email, phone, username, iban",
            ));
        }
    };
    let value = parsed.map_err(|e| DomainError::invalid(path.as_str(), e))?;
    Ok(LookupKey { path, value })
}

fn blank(s: &str) -> bool {
    s.trim().is_empty()
}

fn text_leaf(
    path: FieldPath,
    raw: &str,
    parse: impl Fn(&str) -> Result<String, ValueError>,
) -> Result<Option<FieldValue>, Vec<Violation>> {
    if blank(raw) {
        return Ok(None);
    }
    parse(raw)
        .map(|v| Some(FieldValue::Text(v)))
        .map_err(|e| vec![Violation::new(path.as_str(), e)])
}

fn enum_leaf(path: FieldPath, raw: i32, known: bool) -> Result<Option<FieldValue>, Vec<Violation>> {
    match (raw, known) {
        (0, _) => Ok(None),
        (n, true) => Ok(Some(FieldValue::Enum(n))),
        (_, false) => Err(vec![Violation::new(path.as_str(), "unknown enum value")]),
    }
}

/// `country_written`: whether the request also writes this address's country, so a postcode can
/// be checked against it here, together with every other field (the domain checks it again
/// against the country stored).
fn address_leaf(
    path: FieldPath,
    address: Option<&pb::Address>,
    part: AddressPart,
    country_written: bool,
) -> Result<Option<FieldValue>, Vec<Violation>> {
    let Some(a) = address else { return Ok(None) };
    match part {
        AddressPart::Street => text_leaf(path, &a.street, |v| values::text(v, values::MAX_LINE)),
        AddressPart::HouseNumber => text_leaf(path, &a.house_number, |v| {
            values::text(v, values::MAX_SHORT)
        }),
        AddressPart::Addition => text_leaf(path, &a.house_number_addition, |v| {
            values::text(v, values::MAX_SHORT)
        }),
        AddressPart::PostalCode => {
            let country = country_written
                .then(|| CountryCode::parse(&a.country).ok())
                .flatten();
            text_leaf(path, &a.postal_code, |v| {
                values::postal_code(v, country.as_ref().map(CountryCode::as_str))
            })
        }
        AddressPart::City => text_leaf(path, &a.city, |v| values::text(v, values::MAX_LINE)),
        AddressPart::Country => text_leaf(path, &a.country, |v| {
            CountryCode::parse(v).map(CountryCode::into_inner)
        }),
    }
}

/// The twelve address leaves, as one pattern: they are handled through [`address_part`] before
/// the per-path matches, which list them once with this macro to stay exhaustive.
macro_rules! address_leaves {
    () => {
        FieldPath::AddressStreet
            | FieldPath::AddressHouseNumber
            | FieldPath::AddressHouseNumberAddition
            | FieldPath::AddressPostalCode
            | FieldPath::AddressCity
            | FieldPath::AddressCountry
            | FieldPath::BillingAddressStreet
            | FieldPath::BillingAddressHouseNumber
            | FieldPath::BillingAddressHouseNumberAddition
            | FieldPath::BillingAddressPostalCode
            | FieldPath::BillingAddressCity
            | FieldPath::BillingAddressCountry
    };
}

/// Which address of the subject a path belongs to.
#[derive(Clone, Copy)]
enum Side {
    Home,
    Billing,
}

/// The address and the part of it a path names, for the twelve address leaves.
fn address_part(path: FieldPath) -> Option<(Side, AddressPart)> {
    use AddressPart as A;
    use FieldPath as P;
    Some(match path {
        P::AddressStreet => (Side::Home, A::Street),
        P::AddressHouseNumber => (Side::Home, A::HouseNumber),
        P::AddressHouseNumberAddition => (Side::Home, A::Addition),
        P::AddressPostalCode => (Side::Home, A::PostalCode),
        P::AddressCity => (Side::Home, A::City),
        P::AddressCountry => (Side::Home, A::Country),
        P::BillingAddressStreet => (Side::Billing, A::Street),
        P::BillingAddressHouseNumber => (Side::Billing, A::HouseNumber),
        P::BillingAddressHouseNumberAddition => (Side::Billing, A::Addition),
        P::BillingAddressPostalCode => (Side::Billing, A::PostalCode),
        P::BillingAddressCity => (Side::Billing, A::City),
        P::BillingAddressCountry => (Side::Billing, A::Country),
        _ => return None,
    })
}

#[derive(Clone, Copy)]
enum AddressPart {
    Street,
    HouseNumber,
    Addition,
    PostalCode,
    City,
    Country,
}

/// The validated value of one leaf of `s`; `None` when it is empty.
/// `writes` tells which leaves the request writes (all of them for a create, the mask for an update).
fn leaf(
    s: &pb::Subject,
    path: FieldPath,
    writes: &dyn Fn(FieldPath) -> bool,
) -> Result<Option<FieldValue>, Vec<Violation>> {
    use FieldPath as P;
    let name = s.name.as_ref();
    let contact = s.contact.as_ref();
    let billing = s.billing.as_ref();
    let payment = s.payment.as_ref();
    let text = |raw: Option<&String>, max: usize| {
        text_leaf(path, raw.map_or("", |v| v.as_str()), |v| {
            values::text(v, max)
        })
    };
    if let Some((side, part)) = address_part(path) {
        let (address, country) = match side {
            Side::Home => (s.address.as_ref(), P::AddressCountry),
            Side::Billing => (
                billing.and_then(|b| b.address.as_ref()),
                P::BillingAddressCountry,
            ),
        };
        return address_leaf(path, address, part, writes(country));
    }
    match path {
        P::NameGiven => text(name.map(|n| &n.given), values::MAX_NAME),
        P::NameFamily => text(name.map(|n| &n.family), values::MAX_NAME),
        P::ContactEmail => text_leaf(path, contact.map_or("", |c| &c.email), |v| {
            Email::parse(v).map(Email::into_inner)
        }),
        P::ContactPhone => text_leaf(path, contact.map_or("", |c| &c.phone), |v| {
            Phone::parse(v).map(Phone::into_inner)
        }),
        P::IpAddresses => ip_addresses(&s.ip_addresses),
        P::BillingCompanyName => text(billing.map(|b| &b.company_name), values::MAX_LINE),
        P::BillingVatNumber => text_leaf(
            path,
            billing.map_or("", |b| &b.vat_number),
            values::vat_number,
        ),
        P::PaymentIban => text_leaf(path, payment.map_or("", |p| &p.iban), |v| {
            Iban::parse(v).map(Iban::into_inner)
        }),
        P::PaymentAccountHolder => text(payment.map(|p| &p.account_holder), values::MAX_NAME),
        P::PaymentPspToken => text(payment.map(|p| &p.psp_token), values::MAX_TOKEN),
        P::PaymentMethod => {
            let raw = payment.map_or(0, |p| p.method);
            enum_leaf(path, raw, pb::PaymentMethod::try_from(raw).is_ok())
        }
        P::ProfileGender => {
            let raw = s.profile.as_ref().map_or(0, |p| p.gender);
            enum_leaf(path, raw, pb::Gender::try_from(raw).is_ok())
        }
        P::AccountUsername => {
            text_leaf(path, s.account.as_ref().map_or("", |a| &a.username), |v| {
                Username::parse(v).map(Username::into_inner)
            })
        }
        P::ActivityLog => activity_log(&s.activity_log),
        // Handled above through address_part.
        address_leaves!() => Ok(None),
    }
}

fn too_many(path: FieldPath, len: usize) -> Option<Vec<Violation>> {
    (len > MAX_LIST).then(|| {
        vec![Violation::new(
            path.as_str(),
            format!("at most {MAX_LIST} entries"),
        )]
    })
}

/// A repeated leaf: empty is no value, more than [`MAX_LIST`] entries is refused, and every bad
/// entry is reported by its index (`ip_addresses[2].address`).
fn list_leaf<T, U>(
    path: FieldPath,
    list: &[T],
    parse: impl Fn(&dyn Fn(&str) -> String, &T) -> Result<U, Vec<Violation>>,
    wrap: impl FnOnce(Vec<U>) -> FieldValue,
) -> Result<Option<FieldValue>, Vec<Violation>> {
    if list.is_empty() {
        return Ok(None);
    }
    if let Some(v) = too_many(path, list.len()) {
        return Err(v);
    }
    let mut out = Vec::with_capacity(list.len());
    let mut violations = Vec::new();
    for (i, item) in list.iter().enumerate() {
        match parse(&|part| format!("{path}[{i}].{part}"), item) {
            Ok(value) => out.push(value),
            Err(mut v) => violations.append(&mut v),
        }
    }
    if violations.is_empty() {
        Ok(Some(wrap(out)))
    } else {
        Err(violations)
    }
}

/// Collects the errors of several parts of one list entry.
fn all_errors<const N: usize>(parts: [Option<Violation>; N]) -> Vec<Violation> {
    parts.into_iter().flatten().collect()
}

fn ip_addresses(list: &[pb::IpAddressRecord]) -> Result<Option<FieldValue>, Vec<Violation>> {
    list_leaf(
        FieldPath::IpAddresses,
        list,
        |field, r| {
            let address =
                values::ip_address(&r.address).map_err(|e| Violation::new(field("address"), e));
            let first = timestamp(r.first_seen.as_ref())
                .map_err(|e| Violation::new(field("first_seen"), e));
            let last =
                timestamp(r.last_seen.as_ref()).map_err(|e| Violation::new(field("last_seen"), e));
            match (address, first, last) {
                (Ok(address), Ok(first_seen_us), Ok(last_seen_us)) => Ok(IpRecord {
                    address,
                    first_seen_us,
                    last_seen_us,
                }),
                (a, f, l) => Err(all_errors([a.err(), f.err(), l.err()])),
            }
        },
        FieldValue::IpAddresses,
    )
}

/// The subject and the changes an update-shaped request (UpdateSubject, RectifySubject) names:
/// `subject.id`, a non-empty mask whose paths must all be inside the caller's write grant (refused
/// whole, before any value is looked at), and the values at those paths.
pub fn subject_update(
    access: &crate::domain::access::Access,
    subject: &pb::Subject,
    mask: Option<&FieldMask>,
    draft: &mut crate::domain::call::Draft,
) -> Result<(Uuid, FieldChanges), DomainError> {
    let id =
        subject_id("subject.id", &subject.id).map_err(|v| DomainError::InvalidArgument(vec![v]))?;
    let paths = mask_paths(mask, "update_mask")?;
    if paths.is_empty() {
        return Err(DomainError::invalid(
            "update_mask",
            "name at least one field path to set",
        ));
    }
    access.check_write(paths.iter().copied(), draft)?;
    Ok((id, subject_changes(subject, &paths)?))
}

/// One activity entry (RecordActivity), checked like an entry of `activity_log`.
pub fn activity_entry(entry: Option<&pb::ActivityEntry>) -> Result<ActivityRecord, DomainError> {
    let Some(entry) = entry else {
        return Err(DomainError::invalid("entry", "required"));
    };
    match &activity_log(std::slice::from_ref(entry)).map_err(DomainError::InvalidArgument)? {
        Some(FieldValue::Activity(list)) => list
            .first()
            .cloned()
            .ok_or_else(|| DomainError::invalid("entry", "required")),
        _ => Err(DomainError::invalid("entry", "required")),
    }
}

fn activity_log(list: &[pb::ActivityEntry]) -> Result<Option<FieldValue>, Vec<Violation>> {
    list_leaf(
        FieldPath::ActivityLog,
        list,
        |field, a| {
            let action = values::text(&a.action, values::MAX_LINE)
                .map_err(|e| Violation::new(field("action"), e));
            let time = timestamp(a.time.as_ref()).map_err(|e| Violation::new(field("time"), e));
            let ip = if blank(&a.ip_address) {
                Ok(None)
            } else {
                values::ip_address(&a.ip_address)
                    .map(Some)
                    .map_err(|e| Violation::new(field("ip_address"), e))
            };
            match (action, time, ip) {
                (Ok(action), Ok(time_us), Ok(ip)) => Ok(ActivityRecord {
                    action,
                    time_us,
                    ip,
                }),
                (a, t, i) => Err(all_errors([a.err(), t.err(), i.err()])),
            }
        },
        FieldValue::Activity,
    )
}

/// Years 1 to 9999, as google.protobuf.Timestamp allows.
pub fn timestamp(ts: Option<&Timestamp>) -> Result<Option<i64>, &'static str> {
    let Some(ts) = ts else { return Ok(None) };
    if !(-62_135_596_800..=253_402_300_799).contains(&ts.seconds)
        || !(0..1_000_000_000).contains(&ts.nanos)
    {
        return Err("timestamp out of range");
    }
    Ok(Some(ts.seconds * 1_000_000 + i64::from(ts.nanos / 1000)))
}

pub fn to_timestamp(us: i64) -> Timestamp {
    Timestamp {
        seconds: us.div_euclid(1_000_000),
        nanos: (us.rem_euclid(1_000_000) * 1000) as i32,
    }
}

/// Whether a read asked for `field_metadata`; an unknown view number is refused.
pub fn full_view(view: i32) -> Result<bool, DomainError> {
    match pb::SubjectView::try_from(view) {
        Ok(pb::SubjectView::Full) => Ok(true),
        Ok(pb::SubjectView::Basic | pb::SubjectView::Unspecified) => Ok(false),
        Err(_) => Err(DomainError::invalid("view", "unknown view")),
    }
}

/// The proto subject of a view: only the leaves the view holds are set; `field_metadata` only
/// when `with_metadata`.
pub fn subject_message(view: &SubjectView, with_metadata: bool) -> pb::Subject {
    let mut s = pb::Subject {
        id: view.id.to_string(),
        version: view.version,
        create_time: Some(to_timestamp(view.created_at_us)),
        update_time: Some(to_timestamp(view.updated_at_us)),
        ..Default::default()
    };
    for (path, stored) in &view.fields {
        put(&mut s, *path, stored);
        if !with_metadata {
            continue;
        }
        s.field_metadata.push(pb::FieldMetadata {
            path: path.as_str().to_owned(),
            update_time: Some(to_timestamp(stored.updated_at_us)),
            source: stored.source.clone(),
        });
    }
    s
}

fn put(s: &mut pb::Subject, path: FieldPath, stored: &StoredField) {
    use FieldPath as P;
    let text = || stored.value.as_text().unwrap_or_default().to_owned();
    let number = || match &stored.value {
        FieldValue::Enum(n) => *n,
        _ => 0,
    };
    if let Some((side, part)) = address_part(path) {
        let address = match side {
            Side::Home => s.address.get_or_insert_with(Default::default),
            Side::Billing => billing_address(s),
        };
        let slot = match part {
            AddressPart::Street => &mut address.street,
            AddressPart::HouseNumber => &mut address.house_number,
            AddressPart::Addition => &mut address.house_number_addition,
            AddressPart::PostalCode => &mut address.postal_code,
            AddressPart::City => &mut address.city,
            AddressPart::Country => &mut address.country,
        };
        *slot = text();
        return;
    }
    match path {
        P::NameGiven => s.name.get_or_insert_with(Default::default).given = text(),
        P::NameFamily => s.name.get_or_insert_with(Default::default).family = text(),
        P::ContactEmail => s.contact.get_or_insert_with(Default::default).email = text(),
        P::ContactPhone => s.contact.get_or_insert_with(Default::default).phone = text(),
        P::IpAddresses => {
            if let FieldValue::IpAddresses(list) = &stored.value {
                s.ip_addresses = list
                    .iter()
                    .map(|r| pb::IpAddressRecord {
                        address: r.address.to_string(),
                        first_seen: r.first_seen_us.map(to_timestamp),
                        last_seen: r.last_seen_us.map(to_timestamp),
                    })
                    .collect();
            }
        }
        P::BillingCompanyName => {
            s.billing.get_or_insert_with(Default::default).company_name = text()
        }
        P::BillingVatNumber => s.billing.get_or_insert_with(Default::default).vat_number = text(),
        P::PaymentIban => s.payment.get_or_insert_with(Default::default).iban = text(),
        P::PaymentAccountHolder => {
            s.payment
                .get_or_insert_with(Default::default)
                .account_holder = text()
        }
        P::PaymentPspToken => s.payment.get_or_insert_with(Default::default).psp_token = text(),
        P::PaymentMethod => s.payment.get_or_insert_with(Default::default).method = number(),
        P::ProfileGender => s.profile.get_or_insert_with(Default::default).gender = number(),
        P::AccountUsername => s.account.get_or_insert_with(Default::default).username = text(),
        P::ActivityLog => {
            if let FieldValue::Activity(list) = &stored.value {
                s.activity_log = list
                    .iter()
                    .map(|a| pb::ActivityEntry {
                        action: a.action.clone(),
                        time: a.time_us.map(to_timestamp),
                        ip_address: a.ip.map(|ip| ip.to_string()).unwrap_or_default(),
                    })
                    .collect();
            }
        }
        // Set above through address_part.
        address_leaves!() => {}
    }
}

fn billing_address(s: &mut pb::Subject) -> &mut pb::Address {
    s.billing
        .get_or_insert_with(Default::default)
        .address
        .get_or_insert_with(Default::default)
}

/// The masked part of an answer.
pub fn masked_values(shown: &crate::domain::vault::Shown) -> Vec<pb::MaskedValue> {
    shown
        .masked
        .iter()
        .map(|(path, masked)| pb::MaskedValue {
            path: path.as_str().to_owned(),
            masked: masked.clone(),
        })
        .collect()
}

/// Field paths as the API lists them.
pub fn path_names(paths: crate::policy::PathSet) -> Vec<String> {
    paths.iter().map(|p| p.as_str().to_owned()).collect()
}
