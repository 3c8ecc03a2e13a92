//! The field-path vocabulary (DESIGN.md §2): every leaf kluis stores, its category, and its index.
//!
//! A path is bound into the associated data of every ciphertext, so a released path is never
//! renamed; new leaves are only ever added.

use std::fmt;

macro_rules! field_paths {
    ($($variant:ident => $path:literal, $category:literal;)*) => {
        /// One stored leaf. `as_str` gives the path as it appears in masks, audit and exports.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum FieldPath { $($variant),* }

        impl FieldPath {
            /// Every leaf, in the order of the contract.
            pub const ALL: &'static [FieldPath] = &[$(FieldPath::$variant),*];

            pub fn as_str(self) -> &'static str {
                match self { $(FieldPath::$variant => $path),* }
            }

            /// The category of the privacy policy the leaf belongs to.
            pub fn category(self) -> &'static str {
                match self { $(FieldPath::$variant => $category),* }
            }

            /// The leaf named exactly `path`, if any.
            pub fn from_leaf(path: &str) -> Option<FieldPath> {
                match path { $($path => Some(FieldPath::$variant),)* _ => None }
            }
        }
    };
}

field_paths! {
    NameGiven => "name.given", "naw";
    NameFamily => "name.family", "naw";
    AddressStreet => "address.street", "naw";
    AddressHouseNumber => "address.house_number", "naw";
    AddressHouseNumberAddition => "address.house_number_addition", "naw";
    AddressPostalCode => "address.postal_code", "naw";
    AddressCity => "address.city", "naw";
    AddressCountry => "address.country", "naw";
    ContactEmail => "contact.email", "contact";
    ContactPhone => "contact.phone", "contact";
    IpAddresses => "ip_addresses", "network";
    BillingCompanyName => "billing.company_name", "billing";
    BillingVatNumber => "billing.vat_number", "billing";
    BillingAddressStreet => "billing.address.street", "billing";
    BillingAddressHouseNumber => "billing.address.house_number", "billing";
    BillingAddressHouseNumberAddition => "billing.address.house_number_addition", "billing";
    BillingAddressPostalCode => "billing.address.postal_code", "billing";
    BillingAddressCity => "billing.address.city", "billing";
    BillingAddressCountry => "billing.address.country", "billing";
    PaymentIban => "payment.iban", "payment";
    PaymentAccountHolder => "payment.account_holder", "payment";
    PaymentPspToken => "payment.psp_token", "payment";
    PaymentMethod => "payment.method", "payment";
    ProfileGender => "profile.gender", "profile";
    AccountUsername => "account.username", "account";
    ActivityLog => "activity_log", "activity";
}

impl FieldPath {
    /// Expands a mask entry — a leaf (`name.given`) or a group (`name`, `billing.address`) — to its
    /// leaves. `None` for anything that names no leaf.
    pub fn expand(entry: &str) -> Option<Vec<FieldPath>> {
        if let Some(leaf) = FieldPath::from_leaf(entry) {
            return Some(vec![leaf]);
        }
        if entry.is_empty() {
            return None;
        }
        let leaves: Vec<FieldPath> = FieldPath::ALL
            .iter()
            .copied()
            .filter(|p| {
                p.as_str()
                    .strip_prefix(entry)
                    .is_some_and(|rest| rest.starts_with('.'))
            })
            .collect();
        (!leaves.is_empty()).then_some(leaves)
    }

    /// Whether the leaf has a blind index for equality lookup, and whether it must be unique.
    pub fn index(self) -> Option<IndexKind> {
        match self {
            FieldPath::ContactEmail | FieldPath::ContactPhone | FieldPath::PaymentIban => {
                Some(IndexKind::Lookup)
            }
            FieldPath::AccountUsername => Some(IndexKind::Unique),
            _ => None,
        }
    }
}

/// How a blind-indexed leaf may be looked up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexKind {
    /// Many subjects may share the value (an e-mail address of a family, an IBAN).
    Lookup,
    /// At most one subject holds the value (`account.username`).
    Unique,
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn every_leaf_parses_back_from_its_path() {
        for p in FieldPath::ALL {
            assert_eq!(FieldPath::from_leaf(p.as_str()), Some(*p));
        }
        assert_eq!(FieldPath::ALL.len(), 26);
    }

    #[test]
    fn groups_expand_to_their_leaves_only() {
        assert_eq!(FieldPath::expand("name").unwrap().len(), 2);
        assert_eq!(FieldPath::expand("address").unwrap().len(), 6);
        assert_eq!(FieldPath::expand("billing").unwrap().len(), 8);
        assert_eq!(FieldPath::expand("billing.address").unwrap().len(), 6);
        assert_eq!(
            FieldPath::expand("ip_addresses").unwrap(),
            vec![FieldPath::IpAddresses]
        );
    }

    #[test]
    fn partial_and_unknown_names_expand_to_nothing() {
        for entry in [
            "",
            "nam",
            "name.",
            "address.post",
            "billing.addr",
            "password",
            "name.given.x",
        ] {
            assert!(FieldPath::expand(entry).is_none(), "{entry}");
        }
    }
}
