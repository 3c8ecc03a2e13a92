//! Parse-at-the-edge newtypes for personal-data values: validated and normalised once, on entry.
//!
//! Every parser in this module is pure (no I/O) and follows the same rules:
//!
//! * surrounding whitespace is trimmed before validation;
//! * the returned value is in a single canonical form, so equal inputs compare equal;
//! * a [`ValueError`] describes *what* is wrong, never *which* value was wrong, because the
//!   value itself is personal data and errors end up in logs and gRPC statuses;
//! * the newtypes' `Debug` output is redacted (`Email(***)`) for the same reason.

use std::fmt;
use std::net::IpAddr;

/// Why a value was refused. Messages and `Debug` output never contain the refused value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    /// Nothing left after trimming surrounding whitespace.
    #[error("value is empty")]
    Empty,
    /// More Unicode scalar values (characters) than allowed.
    #[error("longer than {max} characters")]
    TooLong {
        /// The maximum number of characters accepted.
        max: usize,
    },
    /// A control character (including newline, tab and NUL) inside the value.
    #[error("contains a control character")]
    ControlCharacter,
    /// Not an acceptable e-mail address.
    #[error("not a valid e-mail address")]
    InvalidEmail,
    /// Not an international (E.164) phone number.
    #[error("not a valid international phone number (expected + and 8 to 15 digits)")]
    InvalidPhone,
    /// Not a valid IBAN; the payload says which check failed.
    #[error("not a valid IBAN: {0}")]
    InvalidIban(&'static str),
    /// Not an officially assigned ISO 3166-1 alpha-2 country code.
    #[error("not an ISO 3166-1 alpha-2 country code")]
    InvalidCountry,
    /// Not a valid postal code (for the given country).
    #[error("not a valid postal code")]
    InvalidPostalCode,
    /// Not an IPv4 or IPv6 address.
    #[error("not a valid IP address")]
    InvalidIp,
    /// Not an acceptable username.
    #[error(
        "not a valid username (3 to 64 characters of A-Z a-z 0-9 . _ @ + -, starting with a letter or digit)"
    )]
    InvalidUsername,
    /// Not a syntactically valid VAT identification number.
    #[error("not a valid VAT number")]
    InvalidVatNumber,
}

/// Maximum characters for a person's or organisation's name.
pub const MAX_NAME: usize = 200;
/// Maximum characters for a single address line or similar one-line field.
pub const MAX_LINE: usize = 200;
/// Maximum characters for short codes and labels.
pub const MAX_SHORT: usize = 32;
/// Maximum characters for opaque tokens and identifiers supplied by callers.
pub const MAX_TOKEN: usize = 512;

/// General single-line free text.
///
/// Trims surrounding whitespace and returns the trimmed string. Refuses:
/// * an empty (after trimming) value — [`ValueError::Empty`];
/// * more than `max_chars` Unicode scalar values — [`ValueError::TooLong`];
/// * any control character (`\n`, `\t`, `\r`, U+0000, …) — [`ValueError::ControlCharacter`],
///   because stored values are rendered in single-line contexts and must not smuggle
///   line breaks or terminal escapes into logs or exports.
pub fn text(value: &str, max_chars: usize) -> Result<String, ValueError> {
    let trimmed = value.trim();
    if trimmed.is_empty() {
        return Err(ValueError::Empty);
    }
    if trimmed.chars().any(char::is_control) {
        return Err(ValueError::ControlCharacter);
    }
    if trimmed.chars().count() > max_chars {
        return Err(ValueError::TooLong { max: max_chars });
    }
    Ok(trimmed.to_owned())
}

/// Writes `Name(***)`: the value of a personal-data newtype never reaches `Debug` output.
fn redacted(f: &mut fmt::Formatter<'_>, name: &str) -> fmt::Result {
    write!(f, "{name}(***)")
}

// ---------------------------------------------------------------------------------------------
// E-mail
// ---------------------------------------------------------------------------------------------

/// An e-mail address in a deliberately conservative, ASCII-only form.
///
/// Accepts `local@domain` after trimming, at most 254 characters in total (the SMTP path
/// limit), with:
/// * exactly one `@`;
/// * a local part of 1 to 64 printable, non-space ASCII characters, excluding
///   `< > ( ) [ ] \ , ; : "` (no quoted local parts); dots are allowed but not at the start,
///   the end, or doubled;
/// * a domain of at least two dot-separated labels, each 1 to 63 characters of
///   `A-Z a-z 0-9 -` not starting or ending with `-`, whose last label (the TLD) is
///   alphabetic and at least two characters long, or an already punycoded `xn--` label.
///
/// Unicode (internationalised) addresses must be sent punycoded. The case is kept as
/// given (local parts are case-sensitive in theory); [`Email::index_key`] gives the
/// lower-cased form used for look-ups and uniqueness.
#[derive(Clone, PartialEq, Eq)]
pub struct Email(String);

impl Email {
    /// Maximum length of a whole address.
    pub const MAX_LEN: usize = 254;
    /// Maximum length of the local part (before `@`).
    pub const MAX_LOCAL_LEN: usize = 64;

    /// Validates `value` as described on [`Email`].
    pub fn parse(value: &str) -> Result<Self, ValueError> {
        let trimmed = value.trim();
        if trimmed.is_empty() {
            return Err(ValueError::Empty);
        }
        if trimmed.chars().count() > Self::MAX_LEN {
            return Err(ValueError::TooLong { max: Self::MAX_LEN });
        }
        if !trimmed.is_ascii() {
            return Err(ValueError::InvalidEmail);
        }
        let mut parts = trimmed.split('@');
        let (Some(local), Some(domain), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(ValueError::InvalidEmail);
        };
        if !valid_local_part(local) || !valid_domain(domain) {
            return Err(ValueError::InvalidEmail);
        }
        Ok(Self(trimmed.to_owned()))
    }

    /// The address as given (trimmed).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The address as given (trimmed).
    pub fn into_inner(self) -> String {
        self.0
    }

    /// The whole address in lower case: the key for look-ups and uniqueness.
    pub fn index_key(&self) -> String {
        self.0.to_ascii_lowercase()
    }
}

impl fmt::Debug for Email {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        redacted(f, "Email")
    }
}

fn valid_local_part(local: &str) -> bool {
    const FORBIDDEN: &[u8] = b"<>()[]\\,;:\"@";
    !local.is_empty()
        && local.len() <= Email::MAX_LOCAL_LEN
        && !local.starts_with('.')
        && !local.ends_with('.')
        && !local.contains("..")
        && local
            .bytes()
            .all(|b| b.is_ascii_graphic() && !FORBIDDEN.contains(&b))
}

fn valid_domain(domain: &str) -> bool {
    let labels: Vec<&str> = domain.split('.').collect();
    if labels.len() < 2 || !labels.iter().all(|l| valid_dns_label(l)) {
        return false;
    }
    match labels.last() {
        Some(tld) => {
            let lower = tld.to_ascii_lowercase();
            (tld.len() >= 2 && tld.bytes().all(|b| b.is_ascii_alphabetic()))
                || (lower.starts_with("xn--") && lower.len() > 4)
        }
        None => false,
    }
}

fn valid_dns_label(label: &str) -> bool {
    (1..=63).contains(&label.len())
        && !label.starts_with('-')
        && !label.ends_with('-')
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

// ---------------------------------------------------------------------------------------------
// Phone
// ---------------------------------------------------------------------------------------------

/// A phone number in international E.164 form.
///
/// The usual visual separators (space, `-`, `.`, `(`, `)`) are removed; what remains must be
/// `+` followed by 8 to 15 ASCII digits, the first of which (the country code) is 1–9.
/// National forms (`085 …`, `0031 …`) are refused because they are ambiguous without a
/// country. Stored normalised, e.g. `+31853033451`, which is also the [`Phone::index_key`].
#[derive(Clone, PartialEq, Eq)]
pub struct Phone(String);

impl Phone {
    /// Validates and normalises `value` as described on [`Phone`].
    pub fn parse(value: &str) -> Result<Self, ValueError> {
        let trimmed = value.trim();
        if trimmed.is_empty() {
            return Err(ValueError::Empty);
        }
        let compact: String = trimmed
            .chars()
            .filter(|c| !matches!(c, ' ' | '-' | '.' | '(' | ')'))
            .collect();
        let Some(digits) = compact.strip_prefix('+') else {
            return Err(ValueError::InvalidPhone);
        };
        let ok = (8..=15).contains(&digits.len())
            && digits.bytes().all(|b| b.is_ascii_digit())
            && !digits.starts_with('0');
        if !ok {
            return Err(ValueError::InvalidPhone);
        }
        Ok(Self(compact))
    }

    /// The normalised number, e.g. `+31853033451`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The normalised number.
    pub fn into_inner(self) -> String {
        self.0
    }

    /// The normalised number: the key for look-ups and uniqueness.
    pub fn index_key(&self) -> String {
        self.0.clone()
    }
}

impl fmt::Debug for Phone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        redacted(f, "Phone")
    }
}

// ---------------------------------------------------------------------------------------------
// IBAN
// ---------------------------------------------------------------------------------------------

/// IBAN lengths per country, from the SWIFT IBAN registry (sorted by country code).
const IBAN_LENGTHS: &[(&str, usize)] = &[
    ("AD", 24),
    ("AE", 23),
    ("AL", 28),
    ("AT", 20),
    ("AZ", 28),
    ("BA", 20),
    ("BE", 16),
    ("BG", 22),
    ("BH", 22),
    ("BI", 27),
    ("BR", 29),
    ("BY", 28),
    ("CH", 21),
    ("CR", 22),
    ("CY", 28),
    ("CZ", 24),
    ("DE", 22),
    ("DJ", 27),
    ("DK", 18),
    ("DO", 28),
    ("EE", 20),
    ("EG", 29),
    ("ES", 24),
    ("FI", 18),
    ("FK", 18),
    ("FO", 18),
    ("FR", 27),
    ("GB", 22),
    ("GE", 22),
    ("GI", 23),
    ("GL", 18),
    ("GR", 27),
    ("GT", 28),
    ("HR", 21),
    ("HU", 28),
    ("IE", 22),
    ("IL", 23),
    ("IQ", 23),
    ("IS", 26),
    ("IT", 27),
    ("JO", 30),
    ("KW", 30),
    ("KZ", 20),
    ("LB", 28),
    ("LC", 32),
    ("LI", 21),
    ("LT", 20),
    ("LU", 20),
    ("LV", 21),
    ("LY", 25),
    ("MC", 27),
    ("MD", 24),
    ("ME", 22),
    ("MK", 19),
    ("MN", 20),
    ("MR", 27),
    ("MT", 31),
    ("MU", 30),
    ("NI", 28),
    ("NL", 18),
    ("NO", 15),
    ("OM", 23),
    ("PK", 24),
    ("PL", 28),
    ("PS", 29),
    ("PT", 25),
    ("QA", 29),
    ("RO", 24),
    ("RS", 22),
    ("RU", 33),
    ("SA", 24),
    ("SC", 31),
    ("SD", 18),
    ("SE", 24),
    ("SI", 19),
    ("SK", 24),
    ("SM", 27),
    ("SO", 23),
    ("ST", 25),
    ("SV", 28),
    ("TL", 23),
    ("TN", 24),
    ("TR", 26),
    ("UA", 29),
    ("VA", 22),
    ("VG", 24),
    ("XK", 20),
    ("YE", 30),
];

/// An International Bank Account Number.
///
/// All whitespace is removed and letters are upper-cased. The result must be two letters
/// (country), two digits (check digits) and 11 to 30 letters or digits; for countries in the
/// IBAN registry the total length must match that country's length exactly. Finally the
/// ISO 13616 mod-97 check must hold (computed digit by digit, no big integers), which
/// catches all single-character typos and most transpositions. Stored in the compact,
/// upper-case electronic form (`NL91ABNA0417164300`), which is also the
/// [`Iban::index_key`].
#[derive(Clone, PartialEq, Eq)]
pub struct Iban(String);

impl Iban {
    /// Validates and normalises `value` as described on [`Iban`].
    pub fn parse(value: &str) -> Result<Self, ValueError> {
        let compact: String = value
            .chars()
            .filter(|c| !c.is_whitespace())
            .map(|c| c.to_ascii_uppercase())
            .collect();
        if compact.is_empty() {
            return Err(ValueError::Empty);
        }
        if !compact.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(ValueError::InvalidIban(
                "contains characters other than letters and digits",
            ));
        }
        let bytes = compact.as_bytes();
        if bytes.len() < 4
            || !bytes[..2].iter().all(u8::is_ascii_alphabetic)
            || !bytes[2..4].iter().all(u8::is_ascii_digit)
        {
            return Err(ValueError::InvalidIban(
                "must start with a two-letter country code and two check digits",
            ));
        }
        if !(15..=34).contains(&bytes.len()) {
            return Err(ValueError::InvalidIban("wrong length"));
        }
        let country = &compact[..2];
        let expected = IBAN_LENGTHS
            .binary_search_by(|(c, _)| (*c).cmp(country))
            .ok()
            .and_then(|i| IBAN_LENGTHS.get(i))
            .map(|&(_, len)| len);
        if let Some(len) = expected
            && len != bytes.len()
        {
            return Err(ValueError::InvalidIban("wrong length for its country"));
        }
        if matches!(&compact[2..4], "00" | "01" | "99") {
            return Err(ValueError::InvalidIban("check digits out of range"));
        }
        if iban_mod97(bytes) != 1 {
            return Err(ValueError::InvalidIban("checksum (mod-97) fails"));
        }
        Ok(Self(compact))
    }

    /// The compact, upper-case IBAN.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The compact, upper-case IBAN.
    pub fn into_inner(self) -> String {
        self.0
    }

    /// The compact, upper-case IBAN: the key for look-ups and uniqueness.
    pub fn index_key(&self) -> String {
        self.0.clone()
    }
}

impl fmt::Debug for Iban {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        redacted(f, "Iban")
    }
}

/// ISO 13616 check: move the first four characters to the end, replace letters by 10..=35
/// and reduce modulo 97, one character at a time. `iban` must be upper-case alphanumeric.
fn iban_mod97(iban: &[u8]) -> u32 {
    let (head, tail) = iban.split_at(4.min(iban.len()));
    tail.iter().chain(head).fold(0u32, |rem, &b| {
        if b.is_ascii_digit() {
            (rem * 10 + u32::from(b - b'0')) % 97
        } else {
            (rem * 100 + u32::from(b - b'A') + 10) % 97
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Country
// ---------------------------------------------------------------------------------------------

/// The 249 officially assigned ISO 3166-1 alpha-2 codes, sorted for binary search.
const COUNTRY_CODES: [&str; 249] = [
    "AD", "AE", "AF", "AG", "AI", "AL", "AM", "AO", "AQ", "AR", "AS", "AT", "AU", "AW", "AX", "AZ",
    "BA", "BB", "BD", "BE", "BF", "BG", "BH", "BI", "BJ", "BL", "BM", "BN", "BO", "BQ", "BR", "BS",
    "BT", "BV", "BW", "BY", "BZ", "CA", "CC", "CD", "CF", "CG", "CH", "CI", "CK", "CL", "CM", "CN",
    "CO", "CR", "CU", "CV", "CW", "CX", "CY", "CZ", "DE", "DJ", "DK", "DM", "DO", "DZ", "EC", "EE",
    "EG", "EH", "ER", "ES", "ET", "FI", "FJ", "FK", "FM", "FO", "FR", "GA", "GB", "GD", "GE", "GF",
    "GG", "GH", "GI", "GL", "GM", "GN", "GP", "GQ", "GR", "GS", "GT", "GU", "GW", "GY", "HK", "HM",
    "HN", "HR", "HT", "HU", "ID", "IE", "IL", "IM", "IN", "IO", "IQ", "IR", "IS", "IT", "JE", "JM",
    "JO", "JP", "KE", "KG", "KH", "KI", "KM", "KN", "KP", "KR", "KW", "KY", "KZ", "LA", "LB", "LC",
    "LI", "LK", "LR", "LS", "LT", "LU", "LV", "LY", "MA", "MC", "MD", "ME", "MF", "MG", "MH", "MK",
    "ML", "MM", "MN", "MO", "MP", "MQ", "MR", "MS", "MT", "MU", "MV", "MW", "MX", "MY", "MZ", "NA",
    "NC", "NE", "NF", "NG", "NI", "NL", "NO", "NP", "NR", "NU", "NZ", "OM", "PA", "PE", "PF", "PG",
    "PH", "PK", "PL", "PM", "PN", "PR", "PS", "PT", "PW", "PY", "QA", "RE", "RO", "RS", "RU", "RW",
    "SA", "SB", "SC", "SD", "SE", "SG", "SH", "SI", "SJ", "SK", "SL", "SM", "SN", "SO", "SR", "SS",
    "ST", "SV", "SX", "SY", "SZ", "TC", "TD", "TF", "TG", "TH", "TJ", "TK", "TL", "TM", "TN", "TO",
    "TR", "TT", "TV", "TW", "TZ", "UA", "UG", "UM", "US", "UY", "UZ", "VA", "VC", "VE", "VG", "VI",
    "VN", "VU", "WF", "WS", "YE", "YT", "ZA", "ZM", "ZW",
];

/// An ISO 3166-1 alpha-2 country code.
///
/// Only the 249 officially assigned codes are accepted (no user-assigned or reserved codes
/// such as `XK`, `EU` or `UK`), so the value can be relied on for postal-code rules and
/// reporting. Input is trimmed and case-insensitive; stored upper-case (`NL`).
#[derive(Clone, PartialEq, Eq)]
pub struct CountryCode(String);

impl CountryCode {
    /// Validates and normalises `value` as described on [`CountryCode`].
    pub fn parse(value: &str) -> Result<Self, ValueError> {
        let trimmed = value.trim();
        if trimmed.is_empty() {
            return Err(ValueError::Empty);
        }
        if trimmed.len() != 2 || !trimmed.bytes().all(|b| b.is_ascii_alphabetic()) {
            return Err(ValueError::InvalidCountry);
        }
        let upper = trimmed.to_ascii_uppercase();
        if COUNTRY_CODES.binary_search(&upper.as_str()).is_err() {
            return Err(ValueError::InvalidCountry);
        }
        Ok(Self(upper))
    }

    /// The upper-case code, e.g. `NL`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The upper-case code.
    pub fn into_inner(self) -> String {
        self.0
    }
}

impl fmt::Debug for CountryCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        redacted(f, "CountryCode")
    }
}

// ---------------------------------------------------------------------------------------------
// Postal code
// ---------------------------------------------------------------------------------------------

/// Maximum characters of a postal code for countries without a specific rule.
const MAX_POSTAL_CODE: usize = 16;

/// A postal code, validated for `country` where a rule is known.
///
/// `country` is an already parsed, upper-case [`CountryCode`] string.
/// * `NL`: four digits (the first not `0`), an optional single space, two letters other than
///   `SA`, `SD` and `SS` (never issued); case-insensitive; normalised to `1234 AB`.
/// * any other or unknown country: general [`text`] of at most 16 characters consisting only
///   of `A-Z a-z 0-9`, space and `-`, kept as given (trimmed).
pub fn postal_code(value: &str, country: Option<&str>) -> Result<String, ValueError> {
    if country == Some("NL") {
        return dutch_postcode(value);
    }
    let code = text(value, MAX_POSTAL_CODE)?;
    if !code
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b' ' || b == b'-')
    {
        return Err(ValueError::InvalidPostalCode);
    }
    Ok(code)
}

fn dutch_postcode(value: &str) -> Result<String, ValueError> {
    let trimmed = value.trim();
    if trimmed.is_empty() {
        return Err(ValueError::Empty);
    }
    let bytes = trimmed.as_bytes();
    let (digits, letters) = match bytes.len() {
        6 => (&bytes[..4], &bytes[4..]),
        7 if bytes[4] == b' ' => (&bytes[..4], &bytes[5..]),
        _ => return Err(ValueError::InvalidPostalCode),
    };
    if !digits.iter().all(u8::is_ascii_digit) || digits[0] == b'0' {
        return Err(ValueError::InvalidPostalCode);
    }
    if !letters.iter().all(u8::is_ascii_alphabetic) {
        return Err(ValueError::InvalidPostalCode);
    }
    let letters = [
        letters[0].to_ascii_uppercase(),
        letters[1].to_ascii_uppercase(),
    ];
    if matches!(&letters, b"SA" | b"SD" | b"SS") {
        return Err(ValueError::InvalidPostalCode);
    }
    let mut out = String::with_capacity(7);
    out.extend(digits.iter().map(|&b| char::from(b)));
    out.push(' ');
    out.extend(letters.iter().map(|&b| char::from(b)));
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Username
// ---------------------------------------------------------------------------------------------

/// A login name.
///
/// After trimming: 3 to 64 characters of `A-Z a-z 0-9 . _ @ + -`, the first a letter or
/// digit (so an e-mail address works as a username, but option-like or hidden names such as
/// `-x` or `.x` do not). The case is kept for display; [`Username::index_key`] is the
/// lower-cased form, so `Alice` and `alice` are the same user.
#[derive(Clone, PartialEq, Eq)]
pub struct Username(String);

impl Username {
    /// Minimum length in characters.
    pub const MIN_LEN: usize = 3;
    /// Maximum length in characters.
    pub const MAX_LEN: usize = 64;

    /// Validates `value` as described on [`Username`].
    pub fn parse(value: &str) -> Result<Self, ValueError> {
        let trimmed = value.trim();
        if trimmed.is_empty() {
            return Err(ValueError::Empty);
        }
        if trimmed.chars().count() > Self::MAX_LEN {
            return Err(ValueError::TooLong { max: Self::MAX_LEN });
        }
        let bytes = trimmed.as_bytes();
        let ok = bytes.len() >= Self::MIN_LEN
            && bytes[0].is_ascii_alphanumeric()
            && bytes.iter().all(|&b| {
                b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'@' | b'+' | b'-')
            });
        if !ok {
            return Err(ValueError::InvalidUsername);
        }
        Ok(Self(trimmed.to_owned()))
    }

    /// The username as given (trimmed).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The username as given (trimmed).
    pub fn into_inner(self) -> String {
        self.0
    }

    /// The lower-cased username: the key for look-ups and uniqueness.
    pub fn index_key(&self) -> String {
        self.0.to_ascii_lowercase()
    }
}

impl fmt::Debug for Username {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        redacted(f, "Username")
    }
}

// ---------------------------------------------------------------------------------------------
// VAT number, IP address
// ---------------------------------------------------------------------------------------------

/// A VAT identification number, checked for shape only.
///
/// Spaces and dots are removed and letters upper-cased; the result must be a two-letter
/// country prefix followed by 2 to 13 letters or digits (e.g. `NL123456789B01`). Country
/// specific check digits are not verified: that needs VIES, which is not this module's job.
pub fn vat_number(value: &str) -> Result<String, ValueError> {
    let compact: String = value
        .chars()
        .filter(|c| !matches!(c, ' ' | '.'))
        .map(|c| c.to_ascii_uppercase())
        .collect();
    let compact = compact.trim();
    if compact.is_empty() {
        return Err(ValueError::Empty);
    }
    let bytes = compact.as_bytes();
    let ok = (4..=15).contains(&bytes.len())
        && bytes[..2].iter().all(u8::is_ascii_alphabetic)
        && bytes[2..].iter().all(u8::is_ascii_alphanumeric);
    if !ok {
        return Err(ValueError::InvalidVatNumber);
    }
    Ok(compact.to_owned())
}

/// An IPv4 or IPv6 address in any form the standard library parses (after trimming).
pub fn ip_address(value: &str) -> Result<IpAddr, ValueError> {
    let trimmed = value.trim();
    if trimmed.is_empty() {
        return Err(ValueError::Empty);
    }
    trimmed.parse::<IpAddr>().map_err(|_| ValueError::InvalidIp)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    // --- text ---

    #[test]
    fn text_is_trimmed() {
        assert_eq!(
            text("  Jan de Vries \u{a0}", MAX_NAME).unwrap(),
            "Jan de Vries"
        );
    }

    #[test]
    fn text_that_is_only_whitespace_is_empty() {
        assert_eq!(text(" \t\n ", MAX_NAME), Err(ValueError::Empty));
        assert_eq!(text("", MAX_NAME), Err(ValueError::Empty));
    }

    #[test]
    fn text_counts_characters_not_bytes() {
        assert_eq!(text("ééé", 3).unwrap(), "ééé");
        assert_eq!(text("éééé", 3), Err(ValueError::TooLong { max: 3 }));
    }

    #[test]
    fn text_with_control_characters_is_refused() {
        for bad in [
            "a\nb",
            "a\tb",
            "a\0b",
            "a\rb",
            "a\u{1b}[31mb",
            "a\u{7f}b",
            "a\u{85}b",
        ] {
            assert_eq!(
                text(bad, MAX_LINE),
                Err(ValueError::ControlCharacter),
                "{bad:?}"
            );
        }
    }

    // --- e-mail ---

    #[test]
    fn email_keeps_case_and_index_key_is_lowercase() {
        let e = Email::parse("  Jan.de.Vries+kluis@Example.NL ").unwrap();
        assert_eq!(e.as_str(), "Jan.de.Vries+kluis@Example.NL");
        assert_eq!(e.index_key(), "jan.de.vries+kluis@example.nl");
        assert_eq!(e.into_inner(), "Jan.de.Vries+kluis@Example.NL");
    }

    #[test]
    fn email_accepts_common_shapes() {
        for ok in [
            "a@b.co",
            "first_last-1@sub.domain.example.org",
            "o'brien@example.ie",
            "x{y}|z~!#$%&*=?^`@example.com",
            "user@xn--80ak6aa92e.xn--p1ai",
            "user@123.example.com",
        ] {
            assert!(Email::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn email_with_malformed_parts_is_refused() {
        for bad in [
            "plainaddress",
            "a@@b.nl",
            "a@b@c.nl",
            "@example.nl",
            "jan@",
            "jan@localhost",
            "jan@example.n",
            "jan@example.123",
            "jan@-example.nl",
            "jan@example-.nl",
            "jan@exa_mple.nl",
            "jan@example..nl",
            "jan@example.nl.",
            "jan@.example.nl",
            ".jan@example.nl",
            "jan.@example.nl",
            "j..an@example.nl",
            "jan de vries@example.nl",
            "jan<x>@example.nl",
            "\"jan\"@example.nl",
            "jan,x@example.nl",
            "jan@exämple.nl",
            "jän@example.nl",
            "jan\n@example.nl",
            "jan@[127.0.0.1]",
        ] {
            assert_eq!(Email::parse(bad), Err(ValueError::InvalidEmail), "{bad:?}");
        }
    }

    #[test]
    fn email_length_limits_are_enforced() {
        let local64 = "a".repeat(64);
        assert!(Email::parse(&format!("{local64}@example.nl")).is_ok());
        let local65 = "a".repeat(65);
        assert_eq!(
            Email::parse(&format!("{local65}@example.nl")),
            Err(ValueError::InvalidEmail)
        );
        let label63 = "b".repeat(63);
        assert!(Email::parse(&format!("a@{label63}.nl")).is_ok());
        let label64 = "b".repeat(64);
        assert_eq!(
            Email::parse(&format!("a@{label64}.nl")),
            Err(ValueError::InvalidEmail)
        );
        // "a@" + 3 labels of 63 + 3 dots + a 60-letter TLD = 254 exactly.
        let at_limit = format!("a@{label63}.{label63}.{label63}.{}", "c".repeat(60));
        assert_eq!(at_limit.len(), 254);
        assert!(Email::parse(&at_limit).is_ok());
        let over = format!("{at_limit}c");
        assert_eq!(Email::parse(&over), Err(ValueError::TooLong { max: 254 }));
    }

    #[test]
    fn empty_email_is_empty() {
        assert_eq!(Email::parse("   "), Err(ValueError::Empty));
    }

    // --- phone ---

    #[test]
    fn phone_with_separators_is_normalised() {
        let p = Phone::parse(" +31 (85) 303-34.51 ").unwrap();
        assert_eq!(p.as_str(), "+31853033451");
        assert_eq!(p.index_key(), "+31853033451");
        assert_eq!(p.into_inner(), "+31853033451");
    }

    #[test]
    fn phone_digit_count_bounds_are_8_to_15() {
        assert!(Phone::parse("+12345678").is_ok());
        assert!(Phone::parse("+123456789012345").is_ok());
        assert_eq!(Phone::parse("+1234567"), Err(ValueError::InvalidPhone));
        assert_eq!(
            Phone::parse("+1234567890123456"),
            Err(ValueError::InvalidPhone)
        );
    }

    #[test]
    fn national_or_malformed_phone_is_refused() {
        for bad in [
            "0853033451",
            "0031853033451",
            "+0853033451",
            "+31 85 303 345x",
            "++31853033451",
            "31+853033451",
            "+",
            "+٣١٨٥٣٠٣٣٤٥١",
            "+31/853033451",
        ] {
            assert_eq!(Phone::parse(bad), Err(ValueError::InvalidPhone), "{bad:?}");
        }
        assert_eq!(Phone::parse(""), Err(ValueError::Empty));
    }

    // --- IBAN ---

    #[test]
    fn real_ibans_are_accepted() {
        for ok in [
            "NL91ABNA0417164300",
            "DE89370400440532013000",
            "GB82WEST12345698765432",
            "BE68539007547034",
            "FR1420041010050500013M02606",
            "CH9300762011623852957",
            "NO9386011117947",
            "AT611904300234573201",
        ] {
            assert_eq!(Iban::parse(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn iban_with_spaces_and_lower_case_is_compacted() {
        let i = Iban::parse(" nl91 abna 0417\t1643 00 ").unwrap();
        assert_eq!(i.as_str(), "NL91ABNA0417164300");
        assert_eq!(i.index_key(), "NL91ABNA0417164300");
        assert_eq!(i.into_inner(), "NL91ABNA0417164300");
    }

    #[test]
    fn iban_with_wrong_checksum_is_refused() {
        assert_eq!(
            Iban::parse("NL91ABNA0417164301"),
            Err(ValueError::InvalidIban("checksum (mod-97) fails"))
        );
        assert_eq!(
            Iban::parse("DE89370400440532013001"),
            Err(ValueError::InvalidIban("checksum (mod-97) fails"))
        );
        // Transposition of two digits.
        assert_eq!(
            Iban::parse("GB82WEST12345698765423"),
            Err(ValueError::InvalidIban("checksum (mod-97) fails"))
        );
    }

    #[test]
    fn iban_with_wrong_length_for_its_country_is_refused() {
        assert_eq!(
            Iban::parse("NL91ABNA04171643000"),
            Err(ValueError::InvalidIban("wrong length for its country"))
        );
        assert_eq!(
            Iban::parse("BE6853900754703"),
            Err(ValueError::InvalidIban("wrong length for its country"))
        );
    }

    #[test]
    fn iban_of_unlisted_country_is_checked_by_checksum_only() {
        // "ZZ" is not in the length table: generic shape plus mod-97.
        let body = "1234567890123";
        let check = 98 - iban_mod97(format!("ZZ00{body}").as_bytes());
        let iban = format!("ZZ{check:02}{body}");
        assert!(Iban::parse(&iban).is_ok());
    }

    #[test]
    fn malformed_iban_is_refused() {
        assert!(matches!(
            Iban::parse("NL91-ABNA-0417-1643-00"),
            Err(ValueError::InvalidIban(_))
        ));
        assert!(matches!(
            Iban::parse("1291ABNA0417164300"),
            Err(ValueError::InvalidIban(_))
        ));
        assert!(matches!(
            Iban::parse("NLA1ABNA0417164300"),
            Err(ValueError::InvalidIban(_))
        ));
        assert!(matches!(
            Iban::parse("NL91"),
            Err(ValueError::InvalidIban(_))
        ));
        assert!(matches!(
            Iban::parse("NL91ABNÄ0417164300"),
            Err(ValueError::InvalidIban(_))
        ));
        assert_eq!(Iban::parse(" \t "), Err(ValueError::Empty));
    }

    #[test]
    fn iban_length_table_is_sorted_and_within_bounds() {
        assert!(IBAN_LENGTHS.windows(2).all(|w| w[0].0 < w[1].0));
        assert!(IBAN_LENGTHS.iter().all(|(_, n)| (15..=34).contains(n)));
    }

    // --- country ---

    #[test]
    fn country_code_is_case_insensitive_and_stored_upper() {
        assert_eq!(CountryCode::parse(" nl ").unwrap().as_str(), "NL");
        assert_eq!(CountryCode::parse("De").unwrap().into_inner(), "DE");
    }

    #[test]
    fn unassigned_country_code_is_refused() {
        for bad in ["UK", "EU", "XK", "ZZ", "NLD", "N", "N1", "ÑL"] {
            assert_eq!(
                CountryCode::parse(bad),
                Err(ValueError::InvalidCountry),
                "{bad}"
            );
        }
        assert_eq!(CountryCode::parse(""), Err(ValueError::Empty));
    }

    #[test]
    fn country_table_has_249_sorted_codes() {
        assert_eq!(COUNTRY_CODES.len(), 249);
        assert!(COUNTRY_CODES.windows(2).all(|w| w[0] < w[1]));
        assert!(
            COUNTRY_CODES
                .iter()
                .all(|c| c.len() == 2 && c.bytes().all(|b| b.is_ascii_uppercase()))
        );
        for c in COUNTRY_CODES {
            assert!(CountryCode::parse(c).is_ok());
        }
    }

    // --- postal code ---

    #[test]
    fn dutch_postcode_without_space_is_normalised() {
        assert_eq!(postal_code("1234ab", Some("NL")).unwrap(), "1234 AB");
        assert_eq!(postal_code(" 1234 Ab ", Some("NL")).unwrap(), "1234 AB");
        assert_eq!(postal_code("9999 ZZ", Some("NL")).unwrap(), "9999 ZZ");
    }

    #[test]
    fn invalid_dutch_postcode_is_refused() {
        for bad in [
            "0123 AB",
            "123 AB",
            "12345 AB",
            "1234 A",
            "1234  AB",
            "1234-AB",
            "1234 SA",
            "1234 sd",
            "1234SS",
            "AB 1234",
            "1234 A1",
            "１２３４ AB",
        ] {
            assert_eq!(
                postal_code(bad, Some("NL")),
                Err(ValueError::InvalidPostalCode),
                "{bad:?}"
            );
        }
        assert_eq!(postal_code("  ", Some("NL")), Err(ValueError::Empty));
    }

    #[test]
    fn foreign_postal_code_is_kept_as_given() {
        assert_eq!(postal_code(" SW1A 1AA ", Some("GB")).unwrap(), "SW1A 1AA");
        assert_eq!(postal_code("10115", Some("DE")).unwrap(), "10115");
        assert_eq!(postal_code("1234-567", None).unwrap(), "1234-567");
        // A Dutch-looking code is not normalised for other countries.
        assert_eq!(postal_code("1234ab", Some("BE")).unwrap(), "1234ab");
    }

    #[test]
    fn foreign_postal_code_with_odd_characters_or_too_long_is_refused() {
        assert_eq!(
            postal_code("12/34", None),
            Err(ValueError::InvalidPostalCode)
        );
        assert_eq!(
            postal_code("1234é", Some("FR")),
            Err(ValueError::InvalidPostalCode)
        );
        assert_eq!(
            postal_code("12345678901234567", None),
            Err(ValueError::TooLong { max: 16 })
        );
        assert_eq!(
            postal_code("12\n34", None),
            Err(ValueError::ControlCharacter)
        );
        assert_eq!(postal_code("", None), Err(ValueError::Empty));
    }

    // --- username ---

    #[test]
    fn username_keeps_case_and_index_key_is_lowercase() {
        let u = Username::parse(" Jan.de-Vries_2+x@Kluis ").unwrap();
        assert_eq!(u.as_str(), "Jan.de-Vries_2+x@Kluis");
        assert_eq!(u.index_key(), "jan.de-vries_2+x@kluis");
        assert_eq!(u.into_inner(), "Jan.de-Vries_2+x@Kluis");
    }

    #[test]
    fn username_length_bounds_are_3_to_64() {
        assert!(Username::parse("abc").is_ok());
        assert!(Username::parse(&"a".repeat(64)).is_ok());
        assert_eq!(Username::parse("ab"), Err(ValueError::InvalidUsername));
        assert_eq!(
            Username::parse(&"a".repeat(65)),
            Err(ValueError::TooLong { max: 64 })
        );
    }

    #[test]
    fn username_with_bad_start_or_characters_is_refused() {
        for bad in [
            "-admin",
            ".hidden",
            "_x_",
            "@abc",
            "jan de vries",
            "jan/x",
            "jän",
            "a\0bc",
        ] {
            assert_eq!(
                Username::parse(bad),
                Err(ValueError::InvalidUsername),
                "{bad:?}"
            );
        }
        assert_eq!(Username::parse(" "), Err(ValueError::Empty));
    }

    // --- VAT ---

    #[test]
    fn vat_number_is_compacted_and_upper_cased() {
        assert_eq!(vat_number("nl 1234.56.789 b01").unwrap(), "NL123456789B01");
        assert_eq!(vat_number("DE123456789").unwrap(), "DE123456789");
        assert_eq!(vat_number("BE12").unwrap(), "BE12");
    }

    #[test]
    fn malformed_vat_number_is_refused() {
        for bad in [
            "123456789",
            "N1123456789",
            "NL1",
            "NL12345678901234",
            "NL-123456789B01",
            "NLß12345",
        ] {
            assert_eq!(
                vat_number(bad),
                Err(ValueError::InvalidVatNumber),
                "{bad:?}"
            );
        }
        assert_eq!(vat_number(" . "), Err(ValueError::Empty));
    }

    // --- IP ---

    #[test]
    fn ip_addresses_of_both_families_are_parsed() {
        assert_eq!(ip_address(" 192.0.2.1 ").unwrap().to_string(), "192.0.2.1");
        assert_eq!(
            ip_address("2001:DB8::1").unwrap().to_string(),
            "2001:db8::1"
        );
    }

    #[test]
    fn malformed_ip_is_refused() {
        for bad in [
            "256.0.0.1",
            "1.2.3",
            "example.nl",
            "2001:db8::1::2",
            "[::1]",
        ] {
            assert_eq!(ip_address(bad), Err(ValueError::InvalidIp), "{bad:?}");
        }
        assert_eq!(ip_address(""), Err(ValueError::Empty));
    }

    // --- redaction ---

    #[test]
    fn errors_never_contain_the_value() {
        const SECRET: &str = "geheim";
        let errors = [
            text(&format!("{SECRET}\0"), MAX_NAME).unwrap_err(),
            text(&format!("{SECRET}\nx"), MAX_NAME).unwrap_err(),
            text(SECRET, 2).unwrap_err(),
            Email::parse(&format!("{SECRET}@@{SECRET}.nl")).unwrap_err(),
            Email::parse(&format!("{SECRET}@{}.nl", SECRET.repeat(60))).unwrap_err(),
            Phone::parse(&format!("+31{SECRET}")).unwrap_err(),
            Iban::parse(&format!("NL91{SECRET}0417164300")).unwrap_err(),
            Iban::parse("NL91ABNA0417164301").unwrap_err(),
            Iban::parse(&format!("GE{SECRET}")).unwrap_err(),
            CountryCode::parse(SECRET).unwrap_err(),
            postal_code(SECRET, Some("NL")).unwrap_err(),
            postal_code(&format!("{SECRET}/1"), None).unwrap_err(),
            Username::parse(&format!("-{SECRET}")).unwrap_err(),
            vat_number(&format!("{SECRET}!")).unwrap_err(),
            ip_address(SECRET).unwrap_err(),
        ];
        for e in &errors {
            let shown = format!("{e} {e:?} {e:#?}");
            assert!(!shown.to_lowercase().contains(SECRET), "{shown}");
            assert!(!shown.contains("0417164301"), "{shown}");
            assert!(!shown.contains("GEHEIM"), "{shown}");
        }
    }

    #[test]
    fn debug_output_of_values_is_redacted() {
        let shown = format!(
            "{:?} {:?} {:?} {:?} {:?}",
            Email::parse("jan@example.nl").unwrap(),
            Phone::parse("+31853033451").unwrap(),
            Iban::parse("NL91ABNA0417164300").unwrap(),
            CountryCode::parse("NL").unwrap(),
            Username::parse("jan.devries").unwrap(),
        );
        assert_eq!(
            shown,
            "Email(***) Phone(***) Iban(***) CountryCode(***) Username(***)"
        );
    }

    #[test]
    fn error_messages_describe_the_problem() {
        assert_eq!(
            ValueError::TooLong { max: 254 }.to_string(),
            "longer than 254 characters"
        );
        assert_eq!(
            ValueError::InvalidEmail.to_string(),
            "not a valid e-mail address"
        );
        assert_eq!(
            ValueError::InvalidIban("checksum (mod-97) fails").to_string(),
            "not a valid IBAN: checksum (mod-97) fails"
        );
    }
}
