//! The policy file: its TOML shape, and its validation into a [`Policy`] with every problem
//! reported at its file, line and column.
//!
//! Serde catches syntax errors, wrong types and unknown keys (one at a time: parsing stops
//! there); everything else — unknown names, overlaps, missing fields, inconsistent grants — is
//! collected, so one run lists every problem of the file.

use std::{collections::BTreeMap, ops::Range};

use serde::Deserialize;
use toml::Spanned;

use super::{
    Controller, FieldPath, Grant, LegalBasis, Objection, PathSet, Period, Policy, PolicyError,
    PolicyErrors, Purpose, Retention, Role, RoleDef, period,
};

type Name = Spanned<String>;
type List = Vec<Spanned<String>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    version: Option<Name>,
    date: Option<Name>,
    controller: Option<Spanned<RawController>>,
    categories: Option<Spanned<BTreeMap<Name, List>>>,
    purposes: Option<Spanned<BTreeMap<Name, Spanned<RawPurpose>>>>,
    roles: Option<Spanned<BTreeMap<Name, Spanned<RawRole>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawController {
    name: Option<Name>,
    address: Option<Name>,
    email: Option<Name>,
    phone: Option<Name>,
    supervisory_authority: Option<Name>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPurpose {
    heading_nl: Option<Name>,
    description_nl: Option<Name>,
    description_en: Option<Name>,
    legal_basis: Option<Name>,
    objection: Option<Name>,
    paths: Option<Spanned<List>>,
    retention: Option<Spanned<RawRetention>>,
    retention_readers: Option<Spanned<List>>,
    recipients: Option<List>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetention {
    close_event: Option<Name>,
    keep_for: Option<Name>,
    until_nl: Option<Name>,
    until_en: Option<Name>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRole {
    require_reason: Option<bool>,
    grants: Option<BTreeMap<Name, Spanned<RawGrant>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGrant {
    read: Option<List>,
    write: Option<List>,
    masked: Option<List>,
}

/// Where the problems go, and how a byte offset becomes a line and column.
struct Report<'a> {
    file: &'a str,
    text: &'a str,
    line_starts: Vec<usize>,
    errors: Vec<(usize, PolicyError)>,
}

impl<'a> Report<'a> {
    fn new(file: &'a str, text: &'a str) -> Self {
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Self {
            file,
            text,
            line_starts,
            errors: Vec::new(),
        }
    }

    /// 1-based line and column (in characters) of a byte offset.
    fn position(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let line = self.line_starts.partition_point(|&s| s <= offset).max(1);
        let start = self.line_starts.get(line - 1).copied().unwrap_or(0);
        let column = self
            .text
            .get(start..offset)
            .map_or(offset - start, |s| s.chars().count())
            + 1;
        (line, column)
    }

    fn line(&self, span: &Range<usize>) -> usize {
        self.position(span.start).0
    }

    fn error(&mut self, span: Range<usize>, problem: impl Into<String>) {
        let (line, column) = self.position(span.start);
        self.errors.push((
            span.start,
            PolicyError {
                file: self.file.to_owned(),
                line,
                column,
                problem: problem.into(),
            },
        ));
    }

    fn finish(mut self) -> PolicyErrors {
        self.errors.sort_by_key(|(offset, _)| *offset);
        PolicyErrors(self.errors.into_iter().map(|(_, e)| e).collect())
    }
}

/// A list entry resolved to paths.
struct Entry {
    name: String,
    span: Range<usize>,
    set: PathSet,
}

/// Where a problem about a whole missing table or key is reported: the start of the file.
const TOP: Range<usize> = 0..0;

pub(super) fn parse(file_name: &str, text: &str) -> Result<Policy, PolicyErrors> {
    let mut report = Report::new(file_name, text);
    let raw: RawFile = match toml::from_str(text) {
        Ok(raw) => raw,
        Err(e) => {
            report.error(e.span().unwrap_or(TOP), e.message().trim().to_owned());
            return Err(report.finish());
        }
    };

    let version = required_text(&mut report, raw.version, TOP, "`version`");
    let date = required_text(&mut report, raw.date, TOP, "`date`");
    if let Some(date) = &date
        && !valid_date(date.get_ref())
    {
        report.error(
            date.span(),
            format!("bad date `{}`: expected YYYY-MM-DD", date.get_ref()),
        );
    }
    let controller = controller(&mut report, raw.controller);
    let categories = categories(&mut report, raw.categories);
    let purposes = purposes(&mut report, raw.purposes, &categories);
    let roles = roles(&mut report, raw.roles, &categories, &purposes);
    let purposes: Vec<Purpose> = purposes.into_iter().map(|c| c.purpose).collect();

    if !report.errors.is_empty() {
        return Err(report.finish());
    }
    let (Some(version), Some(date), Some(controller)) = (version, date, controller) else {
        // Unreachable: a missing item is an error above.
        return Err(report.finish());
    };
    let purpose_index = purposes
        .iter()
        .enumerate()
        .map(|(i, p)| (p.name.clone(), i))
        .collect();
    Ok(Policy {
        version: version.into_inner(),
        date: date.into_inner(),
        controller,
        categories,
        purposes,
        purpose_index,
        roles,
    })
}

/// A required, non-empty text; reports `what` missing at `missing_at`.
fn required_text(
    report: &mut Report,
    value: Option<Name>,
    missing_at: Range<usize>,
    what: &str,
) -> Option<Name> {
    match value {
        None => {
            report.error(missing_at, format!("missing {what}"));
            None
        }
        Some(v) if v.get_ref().trim().is_empty() => {
            report.error(v.span(), format!("{what} is empty"));
            None
        }
        Some(v) => Some(v),
    }
}

fn valid_date(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return false;
    }
    let num = |r: Range<usize>| -> Option<i64> {
        let part = s.get(r)?;
        part.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    match (num(0..4), num(5..7), num(8..10)) {
        (Some(y), Some(m), Some(d)) => {
            (1..=12).contains(&m) && d >= 1 && d <= period::days_in_month(y, m)
        }
        _ => false,
    }
}

/// A name of the file's own vocabulary (category, purpose, close event): `a-z 0-9 _ -`.
fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

fn controller(report: &mut Report, raw: Option<Spanned<RawController>>) -> Option<Controller> {
    let Some(raw) = raw else {
        report.error(TOP, "missing [controller] table");
        return None;
    };
    let at = raw.span();
    let raw = raw.into_inner();
    let mut field = |v: Option<Name>, what: &str| {
        required_text(report, v, at.clone(), &format!("controller `{what}`"))
            .map(Spanned::into_inner)
    };
    // Every field is checked before any missing one ends the table.
    let name = field(raw.name, "name");
    let address = field(raw.address, "address");
    let email = field(raw.email, "email");
    let phone = field(raw.phone, "phone");
    let supervisory_authority = field(raw.supervisory_authority, "supervisory_authority");
    Some(Controller {
        name: name?,
        address: address?,
        email: email?,
        phone: phone?,
        supervisory_authority: supervisory_authority?,
    })
}

/// Entries of a map in file order (the map itself is sorted by name).
fn in_file_order<K: Ord, V>(map: BTreeMap<Spanned<K>, V>) -> Vec<(Spanned<K>, V)> {
    let mut items: Vec<_> = map.into_iter().collect();
    items.sort_by_key(|(k, _)| k.span().start);
    items
}

fn categories(
    report: &mut Report,
    raw: Option<Spanned<BTreeMap<Name, List>>>,
) -> Vec<(String, PathSet)> {
    let Some(raw) = raw else {
        report.error(TOP, "missing [categories] table");
        return Vec::new();
    };
    let table = raw.span();
    let mut owner: BTreeMap<FieldPath, (String, usize)> = BTreeMap::new();
    let mut out = Vec::new();
    for (name, entries) in in_file_order(raw.into_inner()) {
        let cat = name.get_ref().clone();
        if !valid_name(&cat) {
            report.error(
                name.span(),
                format!("bad category name `{cat}`: use a-z, 0-9, `_` and `-`"),
            );
        } else if FieldPath::from_leaf(&cat).is_some() {
            report.error(
                name.span(),
                format!("category `{cat}` has the name of a path; choose another name"),
            );
        }
        if entries.is_empty() {
            report.error(name.span(), format!("category `{cat}` is empty"));
        }
        let mut set = PathSet::EMPTY;
        let mut listed: Vec<(String, usize)> = Vec::new();
        for entry in entries {
            let text = entry.get_ref();
            let line = report.line(&entry.span());
            if let Some((_, first)) = listed.iter().find(|(n, _)| n == text) {
                report.error(
                    entry.span(),
                    format!("`{text}` is listed twice in category `{cat}` (first on line {first})"),
                );
                continue;
            }
            listed.push((text.clone(), line));
            let Some(leaves) = FieldPath::expand(text) else {
                report.error(
                    entry.span(),
                    format!(
                        "unknown path `{text}` in category `{cat}` (a category lists paths such as `name.given` or groups such as `billing.address`)"
                    ),
                );
                continue;
            };
            for leaf in leaves {
                if let Some((other, other_line)) = owner.get(&leaf) {
                    let where_ = if *other == cat {
                        format!("earlier in category `{cat}`, line {other_line}")
                    } else {
                        format!("in category `{other}`, line {other_line}")
                    };
                    let what = if leaf.as_str() == text.as_str() {
                        format!("path `{leaf}` in category `{cat}`")
                    } else {
                        format!("path `{leaf}` (of `{text}`) in category `{cat}`")
                    };
                    report.error(
                        entry.span(),
                        format!("{what} is already {where_}: a path belongs to one category"),
                    );
                } else {
                    owner.insert(leaf, (cat.clone(), line));
                    set.insert(leaf);
                }
            }
        }
        out.push((cat, set));
    }
    for leaf in FieldPath::ALL {
        if !owner.contains_key(leaf) {
            report.error(
                table.clone(),
                format!("path `{leaf}` is in no category: every path belongs to exactly one"),
            );
        }
    }
    out
}

/// Resolves a list of category names and paths (`naw`, `contact.email`, `billing.address`),
/// reporting unknown and repeated entries. `what` says where the list is, for messages.
fn resolve(
    report: &mut Report,
    list: &[Spanned<String>],
    categories: &[(String, PathSet)],
    what: &str,
) -> Vec<Entry> {
    let mut out: Vec<Entry> = Vec::new();
    for item in list {
        let text = item.get_ref();
        if let Some(first) = out.iter().find(|e| e.name == *text) {
            let first = report.line(&first.span);
            report.error(
                item.span(),
                format!("`{text}` is listed twice in {what} (first on line {first})"),
            );
            continue;
        }
        let set = match categories.iter().find(|(n, _)| n == text) {
            Some((_, set)) => *set,
            None => match FieldPath::expand(text) {
                Some(leaves) => PathSet::from_paths(leaves),
                None => {
                    let names: Vec<&str> = categories.iter().map(|(n, _)| n.as_str()).collect();
                    report.error(
                        item.span(),
                        format!(
                            "unknown category or path `{text}` in {what} (categories: {}; paths such as `contact.email`)",
                            names.join(", ")
                        ),
                    );
                    continue;
                }
            },
        };
        if let Some(first) = out.iter().find(|e| !e.set.intersection(set).is_empty()) {
            let line = report.line(&first.span);
            report.error(
                item.span(),
                format!(
                    "`{text}` overlaps `{}` (line {line}) in {what}: {} listed twice",
                    first.name,
                    first.set.intersection(set)
                ),
            );
            continue;
        }
        out.push(Entry {
            name: text.clone(),
            span: item.span(),
            set,
        });
    }
    out
}

fn union(entries: &[Entry]) -> PathSet {
    entries
        .iter()
        .fold(PathSet::EMPTY, |acc, e| acc.union(e.set))
}

/// A purpose as read, and whether its `paths` came through whole (if not, grants under it are not
/// checked against them: that would only repeat the problem).
struct Checked {
    purpose: Purpose,
    exact_paths: bool,
}

/// Every purpose of the file, also those with problems (reported; fields that could not be read
/// get placeholders), so that grants under them are still checked.
fn purposes(
    report: &mut Report,
    raw: Option<Spanned<BTreeMap<Name, Spanned<RawPurpose>>>>,
    categories: &[(String, PathSet)],
) -> Vec<Checked> {
    let Some(raw) = raw else {
        report.error(TOP, "missing [purposes] table");
        return Vec::new();
    };
    if raw.get_ref().is_empty() {
        report.error(raw.span(), "no purposes defined");
    }
    in_file_order(raw.into_inner())
        .into_iter()
        .map(|(name, body)| purpose(report, name, body, categories))
        .collect()
}

fn purpose(
    report: &mut Report,
    name: Name,
    body: Spanned<RawPurpose>,
    categories: &[(String, PathSet)],
) -> Checked {
    let at = name.span();
    let pname = name.into_inner();
    if !valid_name(&pname) {
        report.error(
            at.clone(),
            format!("bad purpose name `{pname}`: use a-z, 0-9, `_` and `-`"),
        );
    }
    let raw = body.into_inner();
    let mut text = |v: Option<Name>, field: &str| {
        required_text(
            report,
            v,
            at.clone(),
            &format!("`{field}` in purpose `{pname}`"),
        )
        .map(Spanned::into_inner)
    };
    let heading_nl = text(raw.heading_nl, "heading_nl");
    let description_nl = text(raw.description_nl, "description_nl");
    let description_en = text(raw.description_en, "description_en");

    let legal_basis = match raw.legal_basis {
        None => {
            report.error(
                at.clone(),
                format!("missing `legal_basis` in purpose `{pname}`"),
            );
            None
        }
        Some(b) => {
            let basis = LegalBasis::from_name(b.get_ref());
            if basis.is_none() {
                report.error(
                    b.span(),
                    format!(
                        "unknown legal_basis `{}` in purpose `{pname}`: expected legal-obligation, contract, legitimate-interest or consent",
                        b.get_ref()
                    ),
                );
            }
            basis.map(|basis| (basis, b.span()))
        }
    };
    let objection = match raw.objection {
        None => {
            report.error(
                at.clone(),
                format!("missing `objection` in purpose `{pname}` (none, opt-out or consent)"),
            );
            None
        }
        Some(o) => {
            let kind = Objection::from_name(o.get_ref());
            if kind.is_none() {
                report.error(
                    o.span(),
                    format!(
                        "unknown objection `{}` in purpose `{pname}`: expected none, opt-out or consent",
                        o.get_ref()
                    ),
                );
            }
            kind.map(|kind| (kind, o.span()))
        }
    };
    if let (Some((basis, _)), Some((kind, span))) = (&legal_basis, &objection) {
        let problem = match (basis, kind) {
            (LegalBasis::LegalObligation | LegalBasis::Contract, Objection::OptOut)
            | (LegalBasis::LegalObligation | LegalBasis::Contract, Objection::ConsentBased) => {
                Some(format!(
                    "objection `{kind}` in purpose `{pname}`: a purpose based on {basis} cannot be objected to; use `none`"
                ))
            }
            (LegalBasis::LegitimateInterest, Objection::ConsentBased) => Some(format!(
                "objection `consent` in purpose `{pname}` needs legal_basis = \"consent\""
            )),
            (LegalBasis::Consent, Objection::NotObjectable | Objection::OptOut) => Some(format!(
                "objection `{kind}` in purpose `{pname}`: a purpose based on consent needs objection = \"consent\""
            )),
            _ => None,
        };
        if let Some(problem) = problem {
            report.error(span.clone(), problem);
        }
    }

    let what = format!("the paths of purpose `{pname}`");
    let paths = match raw.paths {
        None => {
            report.error(at.clone(), format!("missing `paths` in purpose `{pname}`"));
            None
        }
        Some(list) => {
            if list.get_ref().is_empty() {
                report.error(list.span(), format!("{what} are empty"));
            }
            let before = report.errors.len();
            let entries = resolve(report, list.get_ref(), categories, &what);
            (report.errors.len() == before).then(|| union(&entries))
        }
    };

    let retention = raw.retention.and_then(|r| retention(report, r, &pname));
    let retention_readers = match raw.retention_readers {
        Some(list) => {
            if retention.is_none() {
                report.error(
                    list.span(),
                    format!("`retention_readers` in purpose `{pname}`, which has no `retention`"),
                );
            }
            role_list(report, list.get_ref(), &pname)
        }
        None if retention.is_some() => vec![Role::Billing, Role::Operator],
        None => Vec::new(),
    };

    let mut recipients: Vec<String> = Vec::new();
    for r in raw.recipients.unwrap_or_default() {
        if r.get_ref().trim().is_empty() {
            report.error(r.span(), format!("empty recipient in purpose `{pname}`"));
        } else if recipients.contains(r.get_ref()) {
            report.error(
                r.span(),
                format!(
                    "recipient `{}` is listed twice in purpose `{pname}`",
                    r.get_ref()
                ),
            );
        } else {
            recipients.push(r.into_inner());
        }
    }

    Checked {
        exact_paths: paths.is_some(),
        purpose: Purpose {
            name: pname,
            heading_nl: heading_nl.unwrap_or_default(),
            description_nl: description_nl.unwrap_or_default(),
            description_en: description_en.unwrap_or_default(),
            legal_basis: legal_basis.map_or(LegalBasis::LegalObligation, |(b, _)| b),
            objection: objection.map_or(Objection::NotObjectable, |(o, _)| o),
            paths: paths.unwrap_or_else(PathSet::all),
            retention,
            retention_readers,
            recipients,
        },
    }
}

fn retention(report: &mut Report, raw: Spanned<RawRetention>, pname: &str) -> Option<Retention> {
    let at = raw.span();
    let raw = raw.into_inner();
    let close_event = required_text(
        report,
        raw.close_event,
        at.clone(),
        &format!("`close_event` in the retention of purpose `{pname}`"),
    );
    if let Some(e) = &close_event
        && !valid_name(e.get_ref())
    {
        report.error(
            e.span(),
            format!(
                "bad close_event `{}` in purpose `{pname}`: use a-z, 0-9, `_` and `-`",
                e.get_ref()
            ),
        );
    }
    let keep_for = match raw.keep_for {
        None => {
            report.error(
                at,
                format!("missing `keep_for` in the retention of purpose `{pname}`"),
            );
            None
        }
        Some(k) => {
            let period = Period::parse(k.get_ref());
            if period.is_none() {
                report.error(
                    k.span(),
                    format!(
                        "bad period `{}` in the retention of purpose `{pname}`: expected ISO-8601 such as P7Y, P6M, P30D or P1Y6M (P0D: gone at the close)",
                        k.get_ref()
                    ),
                );
            }
            period
        }
    };
    let mut words = |v: Option<Name>, field: &str| -> Option<String> {
        let v = v?;
        required_text(
            report,
            Some(v),
            0..0,
            &format!("`{field}` in the retention of purpose `{pname}`"),
        )
        .map(Spanned::into_inner)
    };
    let until_nl = words(raw.until_nl, "until_nl");
    let until_en = words(raw.until_en, "until_en");
    Some(Retention {
        close_event: close_event?.into_inner(),
        keep_for: keep_for?,
        until_nl,
        until_en,
    })
}

fn role_list(report: &mut Report, list: &[Spanned<String>], pname: &str) -> Vec<Role> {
    let mut out = Vec::new();
    for item in list {
        match item.get_ref().parse::<Role>() {
            Err(e) => report.error(
                item.span(),
                format!(
                    "retention reader `{}` of purpose `{pname}`: {e}",
                    item.get_ref()
                ),
            ),
            Ok(r) if out.contains(&r) => report.error(
                item.span(),
                format!("retention reader `{r}` is listed twice in purpose `{pname}`"),
            ),
            Ok(r) => out.push(r),
        }
    }
    out
}

fn roles(
    report: &mut Report,
    raw: Option<Spanned<BTreeMap<Name, Spanned<RawRole>>>>,
    categories: &[(String, PathSet)],
    purposes: &[Checked],
) -> [RoleDef; 4] {
    let mut defs: BTreeMap<Role, RoleDef> = BTreeMap::new();
    let table = match raw {
        None => {
            report.error(TOP, "missing [roles] table");
            TOP
        }
        Some(raw) => {
            let table = raw.span();
            for (name, body) in in_file_order(raw.into_inner()) {
                match name.get_ref().parse::<Role>() {
                    Err(e) => report.error(name.span(), format!("role `{}`: {e}", name.get_ref())),
                    Ok(role) => {
                        let def = role_def(report, role, body.into_inner(), categories, purposes);
                        defs.insert(role, def);
                    }
                }
            }
            table
        }
    };
    Role::ALL.map(|role| {
        defs.remove(&role).unwrap_or_else(|| {
            report.error(
                table.clone(),
                format!("role `{role}` is not defined: add [roles.{role}] (it may grant nothing)"),
            );
            RoleDef {
                role,
                require_reason: false,
                grants: BTreeMap::new(),
            }
        })
    })
}

fn role_def(
    report: &mut Report,
    role: Role,
    raw: RawRole,
    categories: &[(String, PathSet)],
    purposes: &[Checked],
) -> RoleDef {
    let mut grants = BTreeMap::new();
    for (pname, body) in in_file_order(raw.grants.unwrap_or_default()) {
        let Some(purpose) = purposes.iter().find(|p| p.purpose.name == *pname.get_ref()) else {
            let known: Vec<&str> = purposes.iter().map(|p| p.purpose.name.as_str()).collect();
            report.error(
                pname.span(),
                format!(
                    "role `{role}` grants undefined purpose `{}` (purposes: {})",
                    pname.get_ref(),
                    known.join(", ")
                ),
            );
            continue;
        };
        let grant = grant(report, role, purpose, body.into_inner(), categories);
        grants.insert(purpose.purpose.name.clone(), grant);
    }
    RoleDef {
        role,
        require_reason: raw.require_reason.unwrap_or(false),
        grants,
    }
}

fn grant(
    report: &mut Report,
    role: Role,
    checked: &Checked,
    raw: RawGrant,
    categories: &[(String, PathSet)],
) -> Grant {
    let purpose = &checked.purpose;
    let p = &purpose.name;
    let mut list = |l: Option<List>, kind: &str| -> Vec<Entry> {
        let entries = resolve(
            report,
            &l.unwrap_or_default(),
            categories,
            &format!("`{kind}` of role `{role}` under `{p}`"),
        );
        for e in entries.iter().filter(|_| checked.exact_paths) {
            let outside = e.set.difference(purpose.paths);
            if !outside.is_empty() {
                report.error(
                    e.span.clone(),
                    format!(
                        "`{}` in `{kind}` of role `{role}` under `{p}`: purpose `{p}` does not grant {outside}",
                        e.name
                    ),
                );
            }
        }
        entries
    };
    let read = list(raw.read, "read");
    let write = list(raw.write, "write");
    let masked = list(raw.masked, "masked");
    let read_set = union(&read);
    for e in &masked {
        let both = e.set.intersection(read_set);
        if !both.is_empty() {
            report.error(
                e.span.clone(),
                format!(
                    "`{}` of role `{role}` under `{p}`: {both} both read and masked (masked means readable only masked)",
                    e.name
                ),
            );
        }
    }
    for e in &write {
        let unread = e.set.difference(read_set);
        if !unread.is_empty() {
            report.error(
                e.span.clone(),
                format!(
                    "`{}` in `write` of role `{role}` under `{p}`: {unread} not in `read` (a written path must be readable)",
                    e.name
                ),
            );
        }
    }
    let purpose_paths = purpose.paths;
    Grant {
        read: read_set.intersection(purpose_paths),
        write: union(&write)
            .intersection(read_set)
            .intersection(purpose_paths),
        masked: union(&masked)
            .difference(read_set)
            .intersection(purpose_paths),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// A small valid file; each test breaks one thing in it.
    const BASE: &str = r#"version = "1"
date = "2019-08-01"

[controller]
name = "C"
address = "A"
email = "e@example.nl"
phone = "1"
supervisory_authority = "AP"

[categories]
naw = ["name", "address"]
contact = ["contact.email", "contact.phone"]
network = ["ip_addresses"]
billing = ["billing"]
payment = ["payment"]
profile = ["profile.gender"]
account = ["account.username"]
activity = ["activity_log"]

[purposes.order]
heading_nl = "Afhandelen bestelling"
description_nl = "nl"
description_en = "en"
legal_basis = "legal-obligation"
objection = "none"
paths = ["naw", "contact.email", "billing"]
retention = { close_event = "order_completed", keep_for = "P7Y" }

[purposes.marketing]
heading_nl = "Reclame"
description_nl = "nl"
description_en = "en"
legal_basis = "legitimate-interest"
objection = "opt-out"
paths = ["contact.email"]

[roles.hosting-backend.grants.order]
read = ["naw", "contact.email"]
write = ["naw"]
masked = []

[roles.billing.grants.order]
read = ["billing"]

[roles.marketing-mailer.grants.marketing]
read = ["contact.email"]

[roles.operator]
require_reason = true
"#;

    /// `BASE` with `from` (which must occur exactly once) replaced by `to`.
    fn with(from: &str, to: &str) -> String {
        assert_eq!(BASE.matches(from).count(), 1, "{from}");
        BASE.replacen(from, to, 1)
    }

    /// The 1-based line of the first occurrence of `needle` in `text`.
    fn line_of(text: &str, needle: &str) -> usize {
        let at = text.find(needle).unwrap();
        text[..at].matches('\n').count() + 1
    }

    fn errors(text: &str) -> Vec<PolicyError> {
        match parse("test.toml", text) {
            Ok(_) => panic!("the file was accepted:\n{text}"),
            Err(e) => e.0,
        }
    }

    /// Asserts exactly one error, on `line`, whose problem contains `problem`.
    #[track_caller]
    fn assert_one(text: &str, line: usize, problem: &str) {
        let errs = errors(text);
        assert_eq!(errs.len(), 1, "{errs:#?}");
        assert_eq!(errs[0].line, line, "{}", errs[0]);
        assert!(errs[0].problem.contains(problem), "{}", errs[0]);
        assert_eq!(errs[0].file, "test.toml");
    }

    #[test]
    fn the_base_file_is_valid() {
        let p = parse("test.toml", BASE).unwrap();
        assert_eq!(p.version(), "1");
        let g = p.grant(Role::HostingBackend, "order").unwrap();
        assert_eq!(g.read.len(), 9);
        assert_eq!(g.write.len(), 8);
        assert!(p.grant(Role::Operator, "order").is_none());
        assert!(p.role(Role::Operator).require_reason);
        assert_eq!(
            p.purpose("order").unwrap().retention_readers,
            [Role::Billing, Role::Operator]
        );
        assert!(p.purpose("marketing").unwrap().retention_readers.is_empty());
    }

    #[test]
    fn toml_syntax_error_gives_its_line_and_column() {
        let errs = errors(&with("email = \"e@example.nl\"", "email = \"e@example.nl"));
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].line, 7);
        assert!(errs[0].problem.contains("string"), "{}", errs[0]);
        assert!(errs[0].to_string().starts_with("test.toml:7:"));
    }

    #[test]
    fn unknown_key_is_refused() {
        let text = with(
            "objection = \"none\"\n",
            "objection = \"none\"\ncolour = \"red\"\n",
        );
        let errs = errors(&text);
        assert_eq!(errs.len(), 1);
        assert_eq!((errs[0].line, errs[0].column), (27, 1));
        assert!(
            errs[0].problem.contains("unknown field `colour`"),
            "{}",
            errs[0]
        );
        let text = with(
            "read = [\"billing\"]",
            "read = [\"billing\"]\nwrite_all = true",
        );
        assert_one(
            &text,
            line_of(&text, "write_all"),
            "unknown field `write_all`",
        );
        let text = with("P7Y\" }", "P7Y\", keep = 1 }");
        assert_one(&text, 28, "unknown field `keep`");
    }

    #[test]
    fn wrong_type_is_refused() {
        let text = with("require_reason = true", "require_reason = \"yes\"");
        assert_one(&text, line_of(&text, "require_reason"), "invalid type");
    }

    #[test]
    fn unknown_category_or_path_in_a_list() {
        let text = with(
            "paths = [\"naw\", \"contact.email\", \"billing\"]",
            "paths = [\"naw\", \"contact.mail\", \"billing\"]",
        );
        let errs = errors(&text);
        assert_eq!(errs.len(), 1, "{errs:#?}");
        assert_eq!((errs[0].line, errs[0].column), (27, 17));
        assert!(
            errs[0].problem.contains(
                "unknown category or path `contact.mail` in the paths of purpose `order`"
            ),
            "{}",
            errs[0]
        );
        let text = with("read = [\"billing\"]", "read = [\"billling\"]");
        assert_one(
            &text,
            line_of(&text, "billling"),
            "unknown category or path `billling`",
        );
    }

    #[test]
    fn unknown_path_in_a_category() {
        let text = with(
            "[\"profile.gender\"]",
            "[\"profile.gender\", \"profile.age\"]",
        );
        assert_one(
            &text,
            17,
            "unknown path `profile.age` in category `profile`",
        );
    }

    #[test]
    fn path_in_two_categories() {
        let text = with(
            "account = [\"account.username\"]",
            "account = [\"account.username\", \"profile.gender\"]",
        );
        assert_one(
            &text,
            18,
            "path `profile.gender` in category `account` is already in category `profile`, line 17",
        );
    }

    #[test]
    fn path_in_no_category() {
        let text = with("activity = [\"activity_log\"]\n", "");
        let errs = errors(&text);
        assert_eq!(errs.len(), 1, "{errs:#?}");
        assert_eq!(errs[0].line, 11);
        assert!(
            errs[0]
                .problem
                .contains("path `activity_log` is in no category")
        );
    }

    #[test]
    fn entry_listed_twice_in_one_list() {
        let text = with(
            "read = [\"naw\", \"contact.email\"]",
            "read = [\"naw\", \"contact.email\",\n  \"naw\"]",
        );
        assert_one(
            &text,
            40,
            "`naw` is listed twice in `read` of role `hosting-backend` under `order` (first on line 39)",
        );
        let text = with(
            "read = [\"billing\"]",
            "read = [\"billing\", \"billing.address\"]",
        );
        assert_one(&text, 44, "`billing.address` overlaps `billing` (line 44)");
        let text = with(
            "naw = [\"name\", \"address\"]",
            "naw = [\"name\", \"address\", \"name\"]",
        );
        assert_one(
            &text,
            12,
            "`name` is listed twice in category `naw` (first on line 12)",
        );
    }

    #[test]
    fn missing_legal_basis() {
        let text = with("legal_basis = \"legal-obligation\"\n", "");
        let errs = errors(&text);
        assert_eq!(errs.len(), 1, "{errs:#?}");
        assert_eq!((errs[0].line, errs[0].column), (21, 11));
        assert_eq!(errs[0].problem, "missing `legal_basis` in purpose `order`");
    }

    #[test]
    fn unknown_legal_basis() {
        let text = with("\"legal-obligation\"", "\"legal-duty\"");
        assert_one(
            &text,
            25,
            "unknown legal_basis `legal-duty` in purpose `order`",
        );
    }

    #[test]
    fn unknown_objection_kind() {
        let text = with("objection = \"opt-out\"", "objection = \"sometimes\"");
        assert_one(
            &text,
            35,
            "unknown objection `sometimes` in purpose `marketing`",
        );
    }

    #[test]
    fn objection_against_a_legal_obligation_or_contract() {
        let text = with("objection = \"none\"", "objection = \"opt-out\"");
        assert_one(
            &text,
            26,
            "objection `opt-out` in purpose `order`: a purpose based on legal-obligation cannot be objected to",
        );
        let text = with(
            "legal_basis = \"legitimate-interest\"\nobjection = \"opt-out\"",
            "legal_basis = \"contract\"\nobjection = \"consent\"",
        );
        assert_one(
            &text,
            35,
            "a purpose based on contract cannot be objected to",
        );
        let text = with(
            "legal_basis = \"legitimate-interest\"",
            "legal_basis = \"consent\"",
        );
        assert_one(
            &text,
            35,
            "a purpose based on consent needs objection = \"consent\"",
        );
    }

    #[test]
    fn bad_period() {
        let text = with("\"P7Y\"", "\"7 years\"");
        let errs = errors(&text);
        assert_eq!(errs.len(), 1, "{errs:#?}");
        assert_eq!((errs[0].line, errs[0].column), (28, 59));
        assert!(errs[0].problem.starts_with("bad period `7 years`"));
        let text = with("\"P7Y\"", "\"PT1H\"");
        assert_one(&text, 28, "bad period `PT1H`");
    }

    #[test]
    fn retention_reader_not_a_role() {
        let text = with(
            "P7Y\" }\n",
            "P7Y\" }\nretention_readers = [\"billing\", \"auditor\"]\n",
        );
        assert_one(
            &text,
            29,
            "retention reader `auditor` of purpose `order`: unknown role",
        );
        let text = with(
            "paths = [\"contact.email\"]",
            "paths = [\"contact.email\"]\nretention_readers = [\"billing\"]",
        );
        assert_one(
            &text,
            37,
            "`retention_readers` in purpose `marketing`, which has no `retention`",
        );
    }

    #[test]
    fn unknown_role() {
        let text = format!("{BASE}\n[roles.auditor]\n");
        assert_one(
            &text,
            line_of(&text, "auditor"),
            "role `auditor`: unknown role",
        );
    }

    #[test]
    fn role_missing_from_the_file() {
        let text = with("[roles.operator]\nrequire_reason = true\n", "");
        let errs = errors(&text);
        assert_eq!(errs.len(), 1, "{errs:#?}");
        // Reported at the roles table: its first header.
        assert_eq!(errs[0].line, 38);
        assert!(
            errs[0]
                .problem
                .starts_with("role `operator` is not defined")
        );
    }

    #[test]
    fn grant_of_an_undefined_purpose() {
        let text = with(
            "[roles.billing.grants.order]",
            "[roles.billing.grants.invoicing]",
        );
        assert_one(
            &text,
            43,
            "role `billing` grants undefined purpose `invoicing`",
        );
    }

    #[test]
    fn grant_outside_the_purpose() {
        let text = with(
            "read = [\"naw\", \"contact.email\"]",
            "read = [\"naw\", \"contact.email\", \"network\"]",
        );
        assert_one(
            &text,
            39,
            "`network` in `read` of role `hosting-backend` under `order`: purpose `order` does not grant ip_addresses",
        );
        let text = with("read = [\"contact.email\"]\n", "read = [\"contact\"]\n");
        assert_one(
            &text,
            47,
            "purpose `marketing` does not grant contact.phone",
        );
    }

    #[test]
    fn path_both_read_and_masked() {
        let text = with("masked = []", "masked = [\"contact.email\", \"billing\"]");
        let errs = errors(&text);
        assert_eq!(errs.len(), 1, "{errs:#?}");
        assert_eq!((errs[0].line, errs[0].column), (41, 11));
        assert!(
            errs[0]
                .problem
                .contains("contact.email both read and masked")
        );
    }

    #[test]
    fn write_outside_read() {
        let text = with(
            "write = [\"naw\"]",
            "write = [\"naw\", \"billing.vat_number\"]",
        );
        assert_one(
            &text,
            40,
            "`billing.vat_number` in `write` of role `hosting-backend` under `order`: billing.vat_number not in `read`",
        );
    }

    #[test]
    fn missing_purpose_fields() {
        let text = with("heading_nl = \"Reclame\"\n", "");
        assert_one(&text, 30, "missing `heading_nl` in purpose `marketing`");
        let text = with(
            "description_en = \"en\"\nlegal_basis = \"legit",
            "legal_basis = \"legit",
        );
        assert_one(&text, 30, "missing `description_en` in purpose `marketing`");
        let text = with("paths = [\"contact.email\"]\n", "");
        assert_one(&text, 30, "missing `paths` in purpose `marketing`");
        let text = with("heading_nl = \"Reclame\"", "heading_nl = \"  \"");
        assert_one(&text, 31, "`heading_nl` in purpose `marketing` is empty");
    }

    #[test]
    fn missing_or_empty_version_and_date() {
        let text = with("version = \"1\"\n", "");
        assert_one(&text, 1, "missing `version`");
        let text = with("version = \"1\"", "version = \"\"");
        assert_one(&text, 1, "`version` is empty");
        let text = with("date = \"2019-08-01\"", "date = \"augustus 2019\"");
        assert_one(&text, 2, "bad date `augustus 2019`: expected YYYY-MM-DD");
        let text = with("date = \"2019-08-01\"", "date = \"2019-02-29\"");
        assert_one(&text, 2, "bad date");
        let text = with("date = \"2019-08-01\"\n", "");
        assert_one(&text, 1, "missing `date`");
    }

    #[test]
    fn missing_controller_fields_are_all_reported() {
        let text = with("phone = \"1\"\nsupervisory_authority = \"AP\"\n", "");
        let errs = errors(&text);
        assert_eq!(errs.len(), 2, "{errs:#?}");
        assert!(errs.iter().all(|e| e.line == 4));
        assert!(errs[0].problem.contains("controller `phone`"));
        assert!(
            errs[1]
                .problem
                .contains("controller `supervisory_authority`")
        );
    }

    #[test]
    fn every_problem_is_reported_in_file_order() {
        let text = with("\"legal-obligation\"", "\"legal-duty\"")
            .replace("\"P7Y\"", "\"P7\"")
            .replace("objection = \"opt-out\"", "objection = \"never\"");
        let errs = errors(&text);
        let lines: Vec<usize> = errs.iter().map(|e| e.line).collect();
        assert_eq!(lines, [25, 28, 35], "{errs:#?}");
        let shown = PolicyErrors(errs).to_string();
        assert_eq!(shown.lines().count(), 3);
        assert!(shown.lines().all(|l| l.starts_with("test.toml:")));
    }

    #[test]
    fn columns_count_characters() {
        let r = Report::new("f", "ab\néé = x\n");
        assert_eq!(r.position(0), (1, 1));
        assert_eq!(r.position(3), (2, 1));
        assert_eq!(r.position(7), (2, 3));
        assert_eq!(r.position(100), (3, 1));
    }
}
