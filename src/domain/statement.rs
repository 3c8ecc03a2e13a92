//! What a subject receives: the explanation of their processing (Dutch or English) and the export
//! of their data (JSON of format `kluis.export.v1`, or the same as readable text),
//! rendered from the policy and a [`Dossier`]. Values appear only in the export, which is the
//! subject's own copy; the explanation names categories, purposes and dates.

use std::{collections::BTreeSet, fmt::Write as _};

use serde_json::{Value, json};

use super::{
    FieldPath, FieldValue,
    rights::{Dossier, by_category},
};
use crate::policy::{Lang, PathSet, Policy, lifecycle::PathState, period::civil_from_days};

/// `YYYY-MM-DD` (UTC) of a time in microseconds.
pub fn date(us: i64) -> String {
    let (y, m, d) = civil_from_days(us.div_euclid(86_400_000_000));
    format!("{y:04}-{m:02}-{d:02}")
}

/// `YYYY-MM-DDThh:mm:ss.ffffffZ` of a time in microseconds.
pub fn instant(us: i64) -> String {
    let secs = us.rem_euclid(86_400_000_000) / 1_000_000;
    format!(
        "{}T{:02}:{:02}:{:02}.{:06}Z",
        date(us),
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        us.rem_euclid(1_000_000)
    )
}

fn enum_name(path: FieldPath, n: i32) -> String {
    let names: &[&str] = match path {
        FieldPath::ProfileGender => &["", "female", "male", "other", "undisclosed"],
        FieldPath::PaymentMethod => &[
            "",
            "ideal",
            "sepa-direct-debit",
            "credit-card",
            "bank-transfer",
            "paypal",
        ],
        _ => &[],
    };
    usize::try_from(n)
        .ok()
        .and_then(|i| names.get(i))
        .filter(|s| !s.is_empty())
        .map_or_else(|| n.to_string(), |s| (*s).to_owned())
}

fn value_json(path: FieldPath, value: &FieldValue) -> Value {
    match value {
        FieldValue::Text(t) => json!(t),
        FieldValue::Enum(n) => json!(enum_name(path, *n)),
        FieldValue::IpAddresses(list) => Value::Array(
            list.iter()
                .map(|ip| {
                    json!({
                        "address": ip.address.to_string(),
                        "first_seen": ip.first_seen_us.map(instant),
                        "last_seen": ip.last_seen_us.map(instant),
                    })
                })
                .collect(),
        ),
        FieldValue::Activity(list) => Value::Array(
            list.iter()
                .map(|a| {
                    json!({
                        "action": a.action,
                        "time": a.time_us.map(instant),
                        "ip_address": a.ip.map(|ip| ip.to_string()),
                    })
                })
                .collect(),
        ),
    }
}

fn state_json(state: PathState) -> (&'static str, Option<String>) {
    match state {
        PathState::Kept => ("kept", None),
        PathState::Restricted { until_us, held } => (
            if held { "held" } else { "retention-restricted" },
            (!held).then(|| instant(until_us)),
        ),
        PathState::Due { since_us, held } => {
            (if held { "held" } else { "due" }, Some(instant(since_us)))
        }
        PathState::NoBasis => ("no-basis-recorded", None),
    }
}

/// The purposes of the policy that grant `path`.
fn purposes_granting(policy: &Policy, path: FieldPath) -> Vec<&str> {
    policy
        .purposes()
        .filter(|p| p.paths.contains(path))
        .map(|p| p.name.as_str())
        .collect()
}

/// The machine-readable export (schema `export-v1`).
pub fn export_json(policy: &Policy, d: &Dossier) -> Value {
    let c = policy.controller();
    let fields: Vec<Value> = d
        .subject
        .fields
        .iter()
        .map(|(path, stored)| {
            let state = d
                .retention
                .paths
                .iter()
                .find(|p| p.path == *path)
                .map(|p| p.state)
                .unwrap_or(PathState::NoBasis);
            let (state, due) = state_json(state);
            let purposes = purposes_granting(policy, *path);
            json!({
                "path": path.as_str(),
                "category": path.category(),
                "value": value_json(*path, &stored.value),
                "purposes": purposes,
                "legal_bases": purposes.iter().filter_map(|p| policy.purpose(p)).map(|p| p.legal_basis.as_str()).collect::<BTreeSet<_>>(),
                "state": state,
                "due": due,
                "source": stored.source,
                "updated": instant(stored.updated_at_us),
            })
        })
        .collect();
    json!({
        "format": "kluis.export.v1",
        "generated": instant(d.now_us),
        "policy_version": d.policy_version,
        "controller": {
            "name": c.name, "address": c.address, "email": c.email, "phone": c.phone,
            "supervisory_authority": c.supervisory_authority,
        },
        "subject": {
            "id": d.subject.id.to_string(),
            "version": d.subject.version,
            "created": instant(d.subject.created_at_us),
            "updated": instant(d.subject.updated_at_us),
        },
        "fields": fields,
        "processing_records": d.retention.records.iter().map(|r| json!({
            "purpose": r.row.purpose,
            "reference": r.row.reference,
            "opened": instant(r.row.opened_at),
            "closed": r.row.closed_at.map(instant),
            "close_event": r.row.close_event,
            "retained_until": r.until_us.map(instant),
            "held": r.held,
        })).collect::<Vec<_>>(),
        "legal_holds": d.retention.holds.iter().map(|h| json!({
            "id": h.id,
            "scope": match (&h.purpose, &h.reference) {
                (Some(p), Some(r)) => format!("{p}/{r}"),
                _ => "subject".to_owned(),
            },
            "reason": h.reason,
            "placed": instant(h.placed_at),
            "released": h.released_at.map(instant),
        })).collect::<Vec<_>>(),
        "consent": {
            "objected_purposes": d.consent.objected,
            "consented_purposes": d.consent.consented,
            "history": d.consent.events.iter().map(|e| json!({
                "purpose": e.purpose, "action": e.action, "route": e.route,
                "time": instant(e.at), "caller": e.caller,
            })).collect::<Vec<_>>(),
        },
        "restrictions": d.restrictions.iter().map(|r| json!({
            "id": r.id, "reason": r.reason, "placed": instant(r.placed_at),
            "lifted": r.lifted_at.map(instant),
        })).collect::<Vec<_>>(),
        "disclosures": d.disclosures.iter().map(|x| json!({
            "id": x.id, "recipient": x.recipient, "purpose": x.purpose,
            "legal_basis": x.legal_basis, "paths": x.paths, "reference": x.reference,
            "disclosed": instant(x.disclosed_at),
        })).collect::<Vec<_>>(),
        "access_history": d.access_history.iter().map(|(seq, e)| json!({
            "seq": seq, "time": instant(e.at_us), "caller": e.caller, "role": e.role,
            "purpose": e.purpose, "method": e.method, "outcome": e.outcome,
            "read": e.read, "written": e.written, "masked": e.masked,
        })).collect::<Vec<_>>(),
    })
}

/// The export as readable text: the same content as the JSON, line by line.
pub fn export_text(policy: &Policy, d: &Dossier, lang: Lang) -> String {
    let nl = lang == Lang::Nl;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} — {}\n{}: {}\n",
        policy.controller().name,
        if nl {
            "uw gegevens bij ons"
        } else {
            "your data with us"
        },
        if nl {
            "Privacyverklaring, versie"
        } else {
            "Privacy statement, version"
        },
        d.policy_version
    );
    let doc = export_json(policy, d);
    let _ = writeln!(out, "{}:", if nl { "Gegevens" } else { "Data" });
    if let Some(fields) = doc["fields"].as_array() {
        for f in fields {
            let value = match &f["value"] {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let _ = writeln!(
                out,
                "  {} = {}  ({}: {}; {}: {}{})",
                f["path"].as_str().unwrap_or_default(),
                value,
                if nl { "doelen" } else { "purposes" },
                f["purposes"]
                    .as_array()
                    .map(|a| a
                        .iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(", "))
                    .unwrap_or_default(),
                if nl { "status" } else { "state" },
                f["state"].as_str().unwrap_or_default(),
                f["due"]
                    .as_str()
                    .map(|d| format!(", {} {d}", if nl { "tot" } else { "until" }))
                    .unwrap_or_default(),
            );
        }
    }
    for (key, nl_title, en_title) in [
        ("processing_records", "Verwerkingen", "Processing records"),
        (
            "consent",
            "Bezwaar en toestemming",
            "Objections and consent",
        ),
        ("restrictions", "Beperkingen", "Restrictions"),
        ("disclosures", "Verstrekkingen", "Disclosures"),
        (
            "access_history",
            "Wie uw gegevens inzag",
            "Who accessed your data",
        ),
    ] {
        let _ = writeln!(out, "\n{}:", if nl { nl_title } else { en_title });
        match &doc[key] {
            Value::Array(items) if items.is_empty() => {
                let _ = writeln!(out, "  -");
            }
            Value::Array(items) => {
                for item in items {
                    let _ = writeln!(out, "  {item}");
                }
            }
            other => {
                let _ = writeln!(out, "  {other}");
            }
        }
    }
    out
}

/// The explanation of a subject's processing: controller, what is held per category, for which
/// purposes on which basis and until when, who received what, the policy version, where to
/// complain. No values.
pub fn explain(policy: &Policy, d: &Dossier, lang: Lang) -> String {
    let nl = lang == Lang::Nl;
    let c = policy.controller();
    let stored = PathSet::from_paths(d.subject.fields.keys().copied());
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}\n{}\n{} · {}\n",
        c.name, c.address, c.email, c.phone
    );
    let _ = writeln!(
        out,
        "{} {} ({} {}).\n",
        if nl {
            "Uitleg over de verwerking van uw persoonsgegevens, opgesteld op"
        } else {
            "Explanation of how your personal data is processed, drawn up on"
        },
        date(d.now_us),
        if nl {
            "privacyverklaring versie"
        } else {
            "privacy statement version"
        },
        d.policy_version
    );
    let _ = writeln!(
        out,
        "{}",
        if nl {
            "Welke gegevens wij van u hebben:"
        } else {
            "What data we hold about you:"
        }
    );
    for (category, paths) in by_category(stored) {
        let _ = writeln!(out, "  - {category}: {}", paths.join(", "));
    }
    let _ = writeln!(
        out,
        "\n{}",
        if nl {
            "Waarvoor, op welke grond en hoe lang:"
        } else {
            "For which purposes, on which legal basis, and for how long:"
        }
    );
    for purpose in policy.purposes() {
        let used = stored.intersection(purpose.paths);
        let records: Vec<_> = d
            .retention
            .records
            .iter()
            .filter(|r| r.row.purpose == purpose.name)
            .collect();
        if used.is_empty() || (purpose.retention.is_some() && records.is_empty()) {
            continue;
        }
        let _ = writeln!(
            out,
            "  - {} ({}): {} {}.",
            purpose.heading_nl,
            purpose.name,
            if nl { "grondslag" } else { "legal basis" },
            purpose.legal_basis.words(lang)
        );
        for r in records {
            let line = match (r.row.closed_at, r.until_us) {
                (None, _) => {
                    let until = purpose
                        .retention
                        .as_ref()
                        .and_then(|ret| {
                            if nl {
                                ret.until_nl.clone()
                            } else {
                                ret.until_en.clone()
                            }
                        })
                        .unwrap_or_default();
                    if nl {
                        format!(
                            "lopend ({}); bewaard tot {until}, daarna de wettelijke termijn",
                            r.row.reference
                        )
                    } else {
                        format!(
                            "ongoing ({}); kept until {until}, then for the legal period",
                            r.row.reference
                        )
                    }
                }
                (Some(_), Some(until)) if r.held => {
                    format!(
                        "{} ({}): {}",
                        if nl { "afgesloten" } else { "closed" },
                        r.row.reference,
                        if nl {
                            "bewaard zolang een juridische blokkade geldt"
                        } else {
                            "kept while a legal hold applies"
                        },
                    ) + &format!(
                        " ({} {})",
                        if nl { "anders tot" } else { "otherwise until" },
                        date(until)
                    )
                }
                (Some(_), Some(until)) => format!(
                    "{} ({}): {} {}",
                    if nl { "afgesloten" } else { "closed" },
                    r.row.reference,
                    if nl { "bewaard tot" } else { "kept until" },
                    date(until)
                ),
                (Some(_), None) => String::new(),
            };
            let _ = writeln!(out, "      {line}");
        }
        if d.consent.objected.contains(&purpose.name) {
            let _ = writeln!(
                out,
                "      {}",
                if nl {
                    "u heeft hiertegen bezwaar gemaakt: wij gebruiken uw gegevens hiervoor niet"
                } else {
                    "you objected to this: we do not use your data for it"
                }
            );
        }
    }
    let unbased: Vec<&str> = d
        .retention
        .paths
        .iter()
        .filter(|p| p.state == PathState::NoBasis)
        .map(|p| p.path.as_str())
        .collect();
    if !unbased.is_empty() {
        let _ = writeln!(
            out,
            "  - {}: {}",
            if nl {
                "zonder vastgelegde grondslag (u kunt verwijdering vragen)"
            } else {
                "without a recorded legal basis (you may ask for erasure)"
            },
            unbased.join(", ")
        );
    }
    let _ = writeln!(
        out,
        "\n{}",
        if nl {
            "Aan wie wij gegevens verstrekten:"
        } else {
            "Who received your data:"
        }
    );
    if d.disclosures.is_empty() {
        let _ = writeln!(out, "  -");
    }
    for x in &d.disclosures {
        let _ = writeln!(
            out,
            "  - {} {}: {} ({}: {})",
            date(x.disclosed_at),
            x.recipient,
            x.paths.join(", "),
            if nl { "grondslag" } else { "basis" },
            x.legal_basis
        );
    }
    if d.restrictions.iter().any(|r| r.lifted_at.is_none()) {
        let _ = writeln!(
            out,
            "\n{}",
            if nl {
                "De verwerking van uw gegevens is op uw verzoek beperkt (AVG art. 18)."
            } else {
                "Processing of your data is restricted at your request (GDPR art. 18)."
            }
        );
    }
    let _ = writeln!(
        out,
        "\n{} {}.",
        if nl {
            "U heeft recht op inzage, correctie, verwijdering, beperking, overdracht en bezwaar. Bent u niet tevreden, dan kunt u een klacht indienen bij de"
        } else {
            "You have the right of access, rectification, erasure, restriction, portability and objection. If you are not satisfied, you may complain to the"
        },
        c.supervisory_authority
    );
    out
}
