//! Masked values for grants that may see a path only partly (`masked` in the policy file): enough
//! to recognise a value ("the IBAN ending in 4300"), never enough to use it.

use super::FieldPath;

/// The masked form of `text`, a value of `path`:
///
/// - IBAN: country code, then every character but the last four as `*`, grouped by four like a
///   printed IBAN (`NL91ABNA0417164300` → `NL** **** **** **43 00`);
/// - e-mail: first character of the local part, `***`, and the domain (`j***@example.nl`);
/// - phone: the country prefix and the last two digits, every other digit `*`
///   (`+31612345678` → `+31*******78`);
/// - anything else, and values of those paths that are not of that shape: the first character
///   and `***`. The empty text stays empty.
pub fn mask_text(path: FieldPath, text: &str) -> String {
    if text.is_empty() {
        return String::new();
    }
    let shaped = match path {
        FieldPath::PaymentIban => mask_iban(text),
        FieldPath::ContactEmail => mask_email(text),
        FieldPath::ContactPhone => mask_phone(text),
        _ => None,
    };
    shaped.unwrap_or_else(|| mask_other(text))
}

fn mask_other(text: &str) -> String {
    let mut out: String = text.chars().take(1).collect();
    out.push_str("***");
    out
}

fn mask_iban(text: &str) -> Option<String> {
    let chars: Vec<char> = text
        .chars()
        .filter(|c| *c != ' ')
        .map(|c| c.to_ascii_uppercase())
        .collect();
    let n = chars.len();
    let shaped = (15..=34).contains(&n)
        && chars.iter().take(2).all(char::is_ascii_alphabetic)
        && chars.iter().all(char::is_ascii_alphanumeric);
    if !shaped {
        return None;
    }
    let mut out = String::with_capacity(n + n / 4);
    for (i, c) in chars.into_iter().enumerate() {
        if i > 0 && i % 4 == 0 {
            out.push(' ');
        }
        out.push(if i < 2 || i >= n - 4 { c } else { '*' });
    }
    Some(out)
}

fn mask_email(text: &str) -> Option<String> {
    let (local, domain) = text.rsplit_once('@')?;
    let first = local.chars().next()?;
    if domain.is_empty() {
        return None;
    }
    Some(format!("{first}***@{domain}"))
}

fn mask_phone(text: &str) -> Option<String> {
    let compact: String = text
        .chars()
        .filter(|c| !matches!(c, ' ' | '-' | '.' | '(' | ')'))
        .collect();
    let (plus, digits) = match compact.strip_prefix('+') {
        Some(d) => (true, d),
        None => (false, compact.as_str()),
    };
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let keep_front = if plus { country_code_len(digits) } else { 0 };
    let n = digits.len();
    // At least one digit masked, and more masked than shown.
    if n < keep_front + 2 + 3 {
        return None;
    }
    let mut out = String::with_capacity(n + 1);
    if plus {
        out.push('+');
    }
    out.push_str(&digits[..keep_front]);
    out.extend(std::iter::repeat_n('*', n - keep_front - 2));
    out.push_str(&digits[n - 2..]);
    Some(out)
}

/// The length of the ITU-T E.164 country code at the start of `digits` (1 to 3 digits).
fn country_code_len(digits: &str) -> usize {
    let b = digits.as_bytes();
    match (b.first(), b.get(1)) {
        (Some(b'1' | b'7'), _) => 1,
        (Some(b'2'), Some(b'0' | b'7')) => 2,
        (Some(b'3'), Some(b'0'..=b'4' | b'6' | b'9')) => 2,
        (Some(b'4'), Some(b'0' | b'1' | b'3'..=b'9')) => 2,
        (Some(b'5'), Some(b'1'..=b'8')) => 2,
        (Some(b'6'), Some(b'0'..=b'6')) => 2,
        (Some(b'8'), Some(b'1' | b'2' | b'4' | b'6')) => 2,
        (Some(b'9'), Some(b'0'..=b'5' | b'8')) => 2,
        _ => 3,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iban_keeps_country_and_last_four_grouped_by_four() {
        assert_eq!(
            mask_text(FieldPath::PaymentIban, "NL91ABNA0417164300"),
            "NL** **** **** **43 00"
        );
        assert_eq!(
            mask_text(FieldPath::PaymentIban, "NL91 ABNA 0417 1643 00"),
            "NL** **** **** **43 00"
        );
        assert_eq!(
            mask_text(FieldPath::PaymentIban, "nl91abna0417164300"),
            "NL** **** **** **43 00"
        );
        assert_eq!(
            mask_text(FieldPath::PaymentIban, "DE89370400440532013000"),
            "DE** **** **** **** **30 00"
        );
        // Not an IBAN's shape: the general mask.
        assert_eq!(mask_text(FieldPath::PaymentIban, "NL91"), "N***");
    }

    #[test]
    fn email_keeps_first_letter_and_domain() {
        assert_eq!(
            mask_text(FieldPath::ContactEmail, "jan.jansen@example.nl"),
            "j***@example.nl"
        );
        assert_eq!(mask_text(FieldPath::ContactEmail, "a@b.nl"), "a***@b.nl");
        assert_eq!(mask_text(FieldPath::ContactEmail, "@example.nl"), "@***");
        assert_eq!(mask_text(FieldPath::ContactEmail, "no-at-sign"), "n***");
    }

    #[test]
    fn phone_keeps_country_prefix_and_last_two() {
        assert_eq!(
            mask_text(FieldPath::ContactPhone, "+31612345678"),
            "+31*******78"
        );
        assert_eq!(
            mask_text(FieldPath::ContactPhone, "+12025550123"),
            "+1********23"
        );
        assert_eq!(
            mask_text(FieldPath::ContactPhone, "+351912345678"),
            "+351*******78"
        );
        assert_eq!(
            mask_text(FieldPath::ContactPhone, "06 1234 5678"),
            "********78"
        );
        assert_eq!(mask_text(FieldPath::ContactPhone, "+3161"), "+***");
        assert_eq!(mask_text(FieldPath::ContactPhone, "call me"), "c***");
    }

    #[test]
    fn other_text_keeps_first_character_and_empty_stays_empty() {
        assert_eq!(mask_text(FieldPath::NameFamily, "Jansen"), "J***");
        assert_eq!(mask_text(FieldPath::PaymentAccountHolder, "Élise"), "É***");
        assert_eq!(mask_text(FieldPath::PaymentPspToken, "x"), "x***");
        for p in FieldPath::ALL {
            assert_eq!(mask_text(*p, ""), "", "{p}");
        }
    }
}
