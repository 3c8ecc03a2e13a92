//! Retention lifecycle (DESIGN.md §2, "What keeps a path alive"): from the policy and a subject's
//! processing records, which paths are kept, retention-restricted, due for purge, or without basis.
//!
//! Pure: no I/O, no async, no clock. Callers pass `now_us`; every time is in microseconds since the
//! Unix epoch. Crypto-shredding is irreversible, so the rules here are exact and exhaustively
//! tested: a path is only ever due when every closed record granting it is past its retention, no
//! open record grants it and no hold applies.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{FieldPath, PathSet, Policy, Role};

/// One processing record of a subject as the rules need it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordFact<'a> {
    pub purpose: &'a str,
    /// None while the record is open.
    pub closed_at_us: Option<i64>,
    /// A legal hold names this record (its reference).
    pub held: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LifecycleError {
    /// The purpose is unknown to the policy, or has no retention rule (opt-out and operator
    /// purposes never keep a path alive on their own), so it cannot have processing records.
    #[error("purpose {0} cannot hold processing records")]
    NoRetention(String),
    #[error("stored retention state unreadable: {0}")]
    Corrupt(String),
}

/// The derived retention state of one subject, stored beside it and consulted on every read.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Mark {
    /// Paths granted by at least one OPEN record.
    pub open: PathSet,
    /// Whether any record is open.
    pub any_open: bool,
    /// One entry per purpose that has at least one CLOSED record: the paths that purpose grants,
    /// `until_us` = the latest (closed_at + keep_for) over that purpose's closed records, and
    /// `held` = a hold names one of those closed records. [`derive()`] orders them by purpose name.
    pub groups: Vec<Group>,
    /// A legal hold on the whole subject.
    pub held: bool,
}

/// The closed records of one purpose, folded together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub purpose: String,
    pub paths: PathSet,
    pub until_us: i64,
    pub held: bool,
}

/// Where one path stands in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathState {
    /// An open record's purpose grants it.
    Kept,
    /// Kept only by closed records' retention, until `until_us` (the latest over the groups that
    /// grant it); `held`: a hold keeps it past that (a hold on one of those groups' records, or a
    /// hold on the whole subject).
    Restricted { until_us: i64, held: bool },
    /// Every closed record granting it is past retention since `since_us` (= latest until over the
    /// groups granting it); `held`: a subject hold suspends its purge.
    Due { since_us: i64, held: bool },
    /// No record of the subject ever granted it: never purged automatically.
    NoBasis,
}

/// Folds a subject's processing records into its [`Mark`].
///
/// Every record's purpose must exist and have a retention rule, else
/// [`LifecycleError::NoRetention`]. A closed record keeps its purpose's paths until
/// `keep_for.after(closed_at_us)`; with a zero period (`account`, `portal`) that is the close
/// instant itself.
pub fn derive(
    policy: &Policy,
    records: &[RecordFact<'_>],
    subject_held: bool,
) -> Result<Mark, LifecycleError> {
    let mut open = PathSet::EMPTY;
    let mut any_open = false;
    let mut groups: BTreeMap<&str, Group> = BTreeMap::new();
    for record in records {
        let Some((purpose, retention)) = policy
            .purpose(record.purpose)
            .and_then(|p| p.retention.as_ref().map(|r| (p, r)))
        else {
            return Err(LifecycleError::NoRetention(record.purpose.to_owned()));
        };
        match record.closed_at_us {
            None => {
                open = open.union(purpose.paths);
                any_open = true;
            }
            Some(closed_at) => {
                let until = retention.keep_for.after(closed_at);
                let group = groups
                    .entry(purpose.name.as_str())
                    .or_insert_with(|| Group {
                        purpose: purpose.name.clone(),
                        paths: purpose.paths,
                        until_us: until,
                        held: false,
                    });
                group.until_us = group.until_us.max(until);
                group.held |= record.held;
            }
        }
    }
    Ok(Mark {
        open,
        any_open,
        groups: groups.into_values().collect(),
        held: subject_held,
    })
}

impl Mark {
    /// The groups whose purpose grants `path`.
    fn granting(&self, path: FieldPath) -> impl Iterator<Item = &Group> {
        self.groups.iter().filter(move |g| g.paths.contains(path))
    }

    /// Every path some record (open or closed) grants.
    fn granted(&self) -> PathSet {
        self.groups
            .iter()
            .fold(self.open, |acc, g| acc.union(g.paths))
    }

    /// When `path` becomes due on its own: the latest until over the groups granting it; `None`
    /// if it never does (kept open, granted by no closed group, granted by a held group, or the
    /// subject is held).
    fn due_at(&self, path: FieldPath) -> Option<i64> {
        if self.held || self.open.contains(path) {
            return None;
        }
        let mut latest: Option<i64> = None;
        for g in self.granting(path) {
            if g.held {
                return None;
            }
            latest = Some(latest.map_or(g.until_us, |l| l.max(g.until_us)));
        }
        latest
    }

    /// The state of `path` at `now_us`. A path is past its retention at `until_us` itself.
    pub fn state(&self, path: FieldPath, now_us: i64) -> PathState {
        if self.open.contains(path) {
            return PathState::Kept;
        }
        let mut latest: Option<i64> = None;
        let mut alive = false;
        let mut group_held = false;
        for g in self.granting(path) {
            latest = Some(latest.map_or(g.until_us, |l| l.max(g.until_us)));
            alive |= g.until_us > now_us;
            group_held |= g.held;
        }
        match latest {
            None => PathState::NoBasis,
            Some(until_us) if alive || group_held => PathState::Restricted {
                until_us,
                held: group_held || self.held,
            },
            Some(since_us) => PathState::Due {
                since_us,
                held: self.held,
            },
        }
    }

    /// Paths of `stored` to purge now: Due and not held (a subject hold → EMPTY).
    pub fn purgeable(&self, stored: PathSet, now_us: i64) -> PathSet {
        if self.held {
            return PathSet::EMPTY;
        }
        stored
            .iter()
            .filter(|p| matches!(self.state(*p, now_us), PathState::Due { held: false, .. }))
            .collect()
    }

    /// Paths of `stored` with no recorded basis.
    pub fn no_basis(&self, stored: PathSet) -> PathSet {
        stored.difference(self.granted())
    }

    /// The earliest time at which any path becomes due (may be in the past), or None when nothing
    /// ever becomes due on its own (no closed group, every grant also open, everything held, or a
    /// subject hold). A path's due time = the latest until over the non-held groups granting it;
    /// a path granted by any held group, or kept by `open`, never becomes due.
    pub fn first_due_us(&self) -> Option<i64> {
        FieldPath::ALL.iter().filter_map(|p| self.due_at(*p)).min()
    }

    /// Like first_due_us but only times strictly after `after_us` (the next visit once everything
    /// due at `after_us` was purged).
    pub fn next_due_after(&self, after_us: i64) -> Option<i64> {
        FieldPath::ALL
            .iter()
            .filter_map(|p| self.due_at(*p))
            .filter(|t| *t > after_us)
            .min()
    }

    /// Whether, once `remaining` paths are stored, the subject is to be crypto-shredded: nothing
    /// remains, no record is open, and no hold (subject or any group) applies.
    pub fn shreddable(&self, remaining: PathSet) -> bool {
        remaining.is_empty() && !self.any_open && !self.held && !self.groups.iter().any(|g| g.held)
    }

    /// Paths that do not exist for `role` reading under `purpose` at `now_us` (DESIGN.md §2: a path
    /// kept only by a closed record's retention is readable only by that purpose's retention
    /// readers under that purpose).
    ///
    /// `Role::Operator` → EMPTY: operators handle access requests and legal demands and must see
    /// everything stored, whatever keeps it. Otherwise a Kept or NoBasis path is visible; a
    /// Restricted or Due path is visible only if `role` is among the retention readers of
    /// `purpose` and a group of that same purpose grants the path with its retention still
    /// running, or held (by a record hold or a subject hold). Every other Restricted or Due path
    /// is hidden. An unknown `purpose` has no retention readers.
    pub fn hidden(&self, policy: &Policy, role: Role, purpose: &str, now_us: i64) -> PathSet {
        if role == Role::Operator {
            return PathSet::EMPTY;
        }
        let reader = policy
            .purpose(purpose)
            .is_some_and(|p| p.retention_readers.contains(&role));
        let mut hidden = PathSet::EMPTY;
        for path in FieldPath::ALL.iter().copied() {
            match self.state(path, now_us) {
                PathState::Kept | PathState::NoBasis => {}
                PathState::Restricted { .. } | PathState::Due { .. } => {
                    let visible = reader
                        && self.granting(path).any(|g| {
                            g.purpose == purpose && (g.until_us > now_us || g.held || self.held)
                        });
                    if !visible {
                        hidden.insert(path);
                    }
                }
            }
        }
        hidden
    }

    /// Compact stored form: JSON with path names (never bit positions, so adding a leaf to the
    /// vocabulary keeps stored marks readable) and a format version `"v":1`.
    pub fn encode(&self) -> Vec<u8> {
        let stored = StoredMark {
            v: FORMAT_VERSION,
            open: names(self.open),
            any_open: self.any_open,
            groups: self
                .groups
                .iter()
                .map(|g| StoredGroup {
                    purpose: g.purpose.clone(),
                    paths: names(g.paths),
                    until_us: g.until_us,
                    held: g.held,
                })
                .collect(),
            held: self.held,
        };
        // Cannot fail: only strings, integers, booleans and lists. Were it ever to, the empty
        // output decodes as Corrupt, so reads fail closed rather than on stale state.
        serde_json::to_vec(&stored).unwrap_or_default()
    }

    /// The inverse of [`Mark::encode`]. Malformed JSON, a version other than 1, unknown fields,
    /// unknown path names, a purpose grouped twice, or open paths without an open record →
    /// [`LifecycleError::Corrupt`].
    pub fn decode(bytes: &[u8]) -> Result<Mark, LifecycleError> {
        let corrupt = |e: serde_json::Error| LifecycleError::Corrupt(e.to_string());
        // The version first, so that a future format is reported as such, not as a field error.
        let version: VersionOnly = serde_json::from_slice(bytes).map_err(corrupt)?;
        if version.v != FORMAT_VERSION {
            return Err(LifecycleError::Corrupt(format!(
                "format version {} (expected {FORMAT_VERSION})",
                version.v
            )));
        }
        let stored: StoredMark = serde_json::from_slice(bytes).map_err(corrupt)?;
        let open = parse_names(&stored.open)?;
        if !open.is_empty() && !stored.any_open {
            return Err(LifecycleError::Corrupt(
                "open paths without an open record".to_owned(),
            ));
        }
        let mut groups: Vec<Group> = Vec::with_capacity(stored.groups.len());
        for g in stored.groups {
            if g.purpose.is_empty() {
                return Err(LifecycleError::Corrupt(
                    "group without a purpose".to_owned(),
                ));
            }
            if groups.iter().any(|x| x.purpose == g.purpose) {
                return Err(LifecycleError::Corrupt(format!(
                    "purpose {} grouped twice",
                    g.purpose
                )));
            }
            groups.push(Group {
                paths: parse_names(&g.paths)?,
                purpose: g.purpose,
                until_us: g.until_us,
                held: g.held,
            });
        }
        Ok(Mark {
            open,
            any_open: stored.any_open,
            groups,
            held: stored.held,
        })
    }
}

/// The version of [`Mark::encode`]'s output.
const FORMAT_VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredMark {
    v: u32,
    open: Vec<String>,
    any_open: bool,
    groups: Vec<StoredGroup>,
    held: bool,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredGroup {
    purpose: String,
    paths: Vec<String>,
    until_us: i64,
    held: bool,
}

/// Only the version of a stored mark; every other field is ignored.
#[derive(Deserialize)]
struct VersionOnly {
    v: u32,
}

fn names(set: PathSet) -> Vec<String> {
    set.iter().map(|p| p.as_str().to_owned()).collect()
}

fn parse_names(names: &[String]) -> Result<PathSet, LifecycleError> {
    names
        .iter()
        .map(|n| {
            FieldPath::from_leaf(n)
                .ok_or_else(|| LifecycleError::Corrupt(format!("unknown path {n:?}")))
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::policy::Period;

    /// 2019-08-01T00:00:00Z.
    const T0: i64 = 1_564_617_600_000_000;
    const DAY: i64 = 86_400_000_000;

    fn policy() -> Policy {
        Policy::shipped().unwrap()
    }

    fn paths_of(purpose: &str) -> PathSet {
        policy().purpose(purpose).unwrap().paths
    }

    fn seven_years(closed_at: i64) -> i64 {
        Period {
            years: 7,
            ..Period::ZERO
        }
        .after(closed_at)
    }

    fn open(purpose: &str) -> RecordFact<'_> {
        RecordFact {
            purpose,
            closed_at_us: None,
            held: false,
        }
    }

    fn closed(purpose: &str, at: i64) -> RecordFact<'_> {
        RecordFact {
            purpose,
            closed_at_us: Some(at),
            held: false,
        }
    }

    fn held(purpose: &str, at: i64) -> RecordFact<'_> {
        RecordFact {
            purpose,
            closed_at_us: Some(at),
            held: true,
        }
    }

    fn mark(records: &[RecordFact<'_>]) -> Mark {
        derive(&policy(), records, false).unwrap()
    }

    fn set(paths: &[FieldPath]) -> PathSet {
        PathSet::from_paths(paths.iter().copied())
    }

    /// What `account` grants beyond `subscription`.
    fn account_only() -> PathSet {
        set(&[
            FieldPath::ProfileGender,
            FieldPath::PaymentIban,
            FieldPath::PaymentAccountHolder,
            FieldPath::PaymentPspToken,
            FieldPath::PaymentMethod,
            FieldPath::AccountUsername,
        ])
    }

    #[test]
    fn the_shipped_retention_rules_are_as_tested_here() {
        let p = policy();
        for (name, years) in [
            ("order", 7),
            ("subscription", 7),
            ("account", 0),
            ("portal", 0),
        ] {
            let r = p.purpose(name).unwrap().retention.as_ref().unwrap();
            assert_eq!(
                r.keep_for,
                Period {
                    years,
                    ..Period::ZERO
                },
                "{name}"
            );
        }
        assert_eq!(
            paths_of("account").difference(paths_of("subscription")),
            account_only()
        );
    }

    #[test]
    fn an_open_order_keeps_its_paths() {
        let m = mark(&[open("order")]);
        assert!(m.any_open);
        assert_eq!(m.open, paths_of("order"));
        assert!(m.groups.is_empty());
        for p in paths_of("order").iter() {
            assert_eq!(m.state(p, T0), PathState::Kept, "{p}");
            assert_eq!(m.state(p, i64::MAX), PathState::Kept, "{p}");
        }
        assert_eq!(m.purgeable(PathSet::all(), i64::MAX), PathSet::EMPTY);
        assert_eq!(m.first_due_us(), None);
        assert_eq!(
            m.hidden(&policy(), Role::HostingBackend, "order", T0),
            PathSet::EMPTY
        );
        assert!(!m.shreddable(PathSet::EMPTY));
    }

    #[test]
    fn a_completed_order_keeps_its_paths_restricted_for_seven_years_and_due_exactly_then() {
        let m = mark(&[closed("order", T0)]);
        let until = seven_years(T0);
        assert_eq!(until, 1_785_542_400_000_000); // 2026-08-01T00:00:00Z
        assert!(!m.any_open);
        assert_eq!(
            m.groups,
            [Group {
                purpose: "order".to_owned(),
                paths: paths_of("order"),
                until_us: until,
                held: false
            }]
        );
        let email = FieldPath::ContactEmail;
        let restricted = PathState::Restricted {
            until_us: until,
            held: false,
        };
        assert_eq!(m.state(email, T0), restricted);
        assert_eq!(m.state(email, until - 1), restricted);
        assert_eq!(
            m.state(email, until),
            PathState::Due {
                since_us: until,
                held: false
            }
        );
        assert_eq!(m.purgeable(paths_of("order"), until - 1), PathSet::EMPTY);
        assert_eq!(m.purgeable(paths_of("order"), until), paths_of("order"));
        assert_eq!(m.purgeable(PathSet::all(), until + DAY), paths_of("order"));
        assert_eq!(m.first_due_us(), Some(until));
        assert_eq!(m.no_basis(paths_of("order")), PathSet::EMPTY);
    }

    #[test]
    fn never_granted_paths_have_no_basis_and_are_never_purgeable() {
        let m = mark(&[closed("order", T0)]);
        let ungranted = PathSet::all().difference(paths_of("order"));
        assert!(ungranted.contains(FieldPath::PaymentIban));
        assert!(ungranted.contains(FieldPath::ActivityLog));
        for p in ungranted.iter() {
            assert_eq!(m.state(p, T0), PathState::NoBasis, "{p}");
            assert_eq!(m.state(p, i64::MAX), PathState::NoBasis, "{p}");
        }
        assert_eq!(m.no_basis(PathSet::all()), ungranted);
        assert_eq!(m.purgeable(ungranted, i64::MAX), PathSet::EMPTY);
        assert_eq!(
            m.hidden(&policy(), Role::MarketingMailer, "marketing", i64::MAX)
                .intersection(ungranted),
            PathSet::EMPTY
        );
    }

    #[test]
    fn a_subject_without_records_has_no_basis_for_anything_and_nothing_becomes_due() {
        let m = mark(&[]);
        assert_eq!(m, Mark::default());
        for p in FieldPath::ALL.iter().copied() {
            assert_eq!(m.state(p, T0), PathState::NoBasis);
        }
        assert_eq!(m.no_basis(PathSet::all()), PathSet::all());
        assert_eq!(m.purgeable(PathSet::all(), i64::MAX), PathSet::EMPTY);
        assert_eq!(m.first_due_us(), None);
        assert_eq!(m.next_due_after(i64::MIN), None);
        assert!(m.shreddable(PathSet::EMPTY));
        assert!(!m.shreddable(set(&[FieldPath::NameGiven])));
    }

    #[test]
    fn closing_the_account_while_a_subscription_is_open_purges_only_what_the_subscription_lacks() {
        let m = mark(&[open("subscription"), closed("account", T0)]);
        let stored = paths_of("account");
        // P0D: due at the close instant itself.
        assert_eq!(m.purgeable(stored, T0), account_only());
        assert_eq!(m.purgeable(stored, T0 - 1), PathSet::EMPTY);
        for p in [
            FieldPath::ProfileGender,
            FieldPath::PaymentIban,
            FieldPath::AccountUsername,
        ] {
            assert_eq!(
                m.state(p, T0),
                PathState::Due {
                    since_us: T0,
                    held: false
                }
            );
        }
        for p in paths_of("subscription").iter() {
            assert_eq!(m.state(p, T0), PathState::Kept, "{p}");
        }
        assert_eq!(m.first_due_us(), Some(T0));
        // Once purged, nothing else becomes due on its own while the subscription is open.
        assert_eq!(m.next_due_after(T0), None);
        assert!(!m.shreddable(PathSet::EMPTY));
        // Hosting sees subscription paths (kept) but the due account-only paths do not exist.
        assert_eq!(
            m.hidden(&policy(), Role::HostingBackend, "account", T0),
            account_only()
        );
    }

    #[test]
    fn after_the_subscription_is_cancelled_its_paths_are_for_its_retention_readers_only() {
        let cancelled = T0 + 30 * DAY;
        let m = mark(&[closed("account", T0), closed("subscription", cancelled)]);
        let p = policy();
        let now = cancelled + DAY;
        let until = seven_years(cancelled);
        let sub = paths_of("subscription");
        for path in sub.iter() {
            assert_eq!(
                m.state(path, now),
                PathState::Restricted {
                    until_us: until,
                    held: false
                },
                "{path}"
            );
        }
        assert_eq!(m.purgeable(paths_of("account"), now), account_only());
        // Hosting under account: neither the restricted nor the due paths exist.
        assert_eq!(
            m.hidden(&p, Role::HostingBackend, "account", now),
            paths_of("account")
        );
        // Billing under subscription: the restricted subscription paths are there.
        assert_eq!(
            m.hidden(&p, Role::Billing, "subscription", now),
            account_only()
        );
        // Billing under account: the account's retention ran out at its close.
        assert_eq!(
            m.hidden(&p, Role::Billing, "account", now),
            paths_of("account")
        );
        // Billing under order (a retention reader, but no closed order grants them).
        assert!(sub.is_subset(m.hidden(&p, Role::Billing, "order", now)));
        // The mailer cannot see the e-mail address kept only for retention.
        assert!(
            m.hidden(&p, Role::MarketingMailer, "marketing", now)
                .contains(FieldPath::ContactEmail)
        );
        // Unknown purposes have no retention readers.
        assert!(sub.is_subset(m.hidden(&p, Role::Billing, "nope", now)));
    }

    #[test]
    fn the_operator_sees_everything_stored() {
        let m = mark(&[closed("account", T0), closed("order", T0)]);
        let p = policy();
        for now in [T0, seven_years(T0), i64::MAX] {
            for purpose in ["subject-request", "legal-demand", "order", "account"] {
                assert_eq!(m.hidden(&p, Role::Operator, purpose, now), PathSet::EMPTY);
            }
        }
        // The same mark does hide things from others.
        assert!(!m.hidden(&p, Role::Billing, "account", T0).is_empty());
    }

    #[test]
    fn two_closed_orders_keep_their_paths_until_the_later_retention() {
        let first = T0;
        let second = T0 + 100 * DAY;
        let m = mark(&[closed("order", second), closed("order", first)]);
        assert_eq!(m.groups.len(), 1);
        let until = seven_years(second);
        assert_eq!(m.groups[0].until_us, until);
        let email = FieldPath::ContactEmail;
        assert!(matches!(
            m.state(email, seven_years(first)),
            PathState::Restricted { until_us, .. } if until_us == until
        ));
        assert_eq!(
            m.purgeable(paths_of("order"), seven_years(first)),
            PathSet::EMPTY
        );
        assert_eq!(m.purgeable(paths_of("order"), until), paths_of("order"));
        assert_eq!(m.first_due_us(), Some(until));
    }

    #[test]
    fn overlapping_purposes_are_due_at_the_latest_until_over_the_groups_granting_them() {
        let order_closed = T0;
        let sub_closed = T0 + 365 * DAY;
        let m = mark(&[
            closed("order", order_closed),
            closed("subscription", sub_closed),
        ]);
        let (order_until, sub_until) = (seven_years(order_closed), seven_years(sub_closed));
        // contact.email is granted by both: restricted while the subscription's retention runs.
        assert_eq!(
            m.state(FieldPath::ContactEmail, order_until),
            PathState::Restricted {
                until_us: sub_until,
                held: false
            }
        );
        // Billing reads it under subscription, no longer under order.
        let p = policy();
        assert!(
            !m.hidden(&p, Role::Billing, "subscription", order_until)
                .contains(FieldPath::ContactEmail)
        );
        assert!(
            m.hidden(&p, Role::Billing, "order", order_until)
                .contains(FieldPath::ContactEmail)
        );
        assert!(
            !m.hidden(&p, Role::Billing, "order", order_until - 1)
                .contains(FieldPath::ContactEmail)
        );
        assert_eq!(m.first_due_us(), Some(sub_until));
        assert_eq!(m.purgeable(PathSet::all(), order_until), PathSet::EMPTY);
        assert_eq!(
            m.purgeable(PathSet::all(), sub_until),
            paths_of("subscription")
        );
    }

    #[test]
    fn a_hold_on_a_record_keeps_its_paths_restricted_past_retention_and_unpurgeable() {
        let m = mark(&[held("order", T0), closed("account", T0)]);
        let until = seven_years(T0);
        let later = until + 1000 * DAY;
        assert!(m.groups.iter().any(|g| g.purpose == "order" && g.held));
        assert_eq!(
            m.state(FieldPath::NameGiven, later),
            PathState::Restricted {
                until_us: until,
                held: true
            }
        );
        // Only what the order does not grant goes (the account closed with P0D).
        assert_eq!(
            m.purgeable(PathSet::all(), later),
            paths_of("account").difference(paths_of("order"))
        );
        assert_eq!(m.first_due_us(), Some(T0));
        assert_eq!(m.next_due_after(T0), None);
        // Retention readers still see the held paths under the order.
        let p = policy();
        assert_eq!(
            m.hidden(&p, Role::Billing, "order", later),
            paths_of("account").difference(paths_of("order"))
        );
        assert!(!m.shreddable(PathSet::EMPTY));
    }

    #[test]
    fn a_hold_on_one_record_of_a_purpose_holds_the_whole_group() {
        let m = mark(&[closed("order", T0), held("order", T0 - DAY)]);
        assert_eq!(m.groups.len(), 1);
        assert!(m.groups[0].held);
        assert_eq!(m.groups[0].until_us, seven_years(T0));
        assert_eq!(m.first_due_us(), None);
    }

    #[test]
    fn a_subject_hold_suspends_every_purge() {
        let records = [closed("order", T0), closed("account", T0)];
        let m = derive(&policy(), &records, true).unwrap();
        assert!(m.held);
        let later = seven_years(T0) + DAY;
        assert_eq!(
            m.state(FieldPath::PaymentIban, later),
            PathState::Due {
                since_us: T0,
                held: true
            }
        );
        assert_eq!(
            m.state(FieldPath::NameGiven, T0),
            PathState::Restricted {
                until_us: seven_years(T0),
                held: true
            }
        );
        assert_eq!(m.purgeable(PathSet::all(), later), PathSet::EMPTY);
        assert_eq!(m.first_due_us(), None);
        assert_eq!(m.next_due_after(i64::MIN), None);
        assert!(!m.shreddable(PathSet::EMPTY));
        // Retention readers keep reading what the hold keeps, under its purpose.
        let p = policy();
        assert!(
            !m.hidden(&p, Role::Billing, "order", later)
                .contains(FieldPath::NameGiven)
        );
        assert!(
            !m.hidden(&p, Role::Billing, "account", later)
                .contains(FieldPath::PaymentIban)
        );
        assert!(
            m.hidden(&p, Role::HostingBackend, "account", later)
                .contains(FieldPath::PaymentIban)
        );
        // Without the hold the same records would purge.
        let free = derive(&policy(), &records, false).unwrap();
        assert_eq!(free.purgeable(PathSet::all(), later), paths_of("account"));
    }

    #[test]
    fn shreddable_only_when_nothing_remains_no_record_is_open_and_nothing_is_held() {
        let p = policy();
        let m = mark(&[closed("account", T0)]);
        assert!(m.shreddable(PathSet::EMPTY));
        assert!(!m.shreddable(set(&[FieldPath::NameGiven])));
        let with_open = mark(&[closed("account", T0), open("portal")]);
        assert!(!with_open.shreddable(PathSet::EMPTY));
        let group_held = mark(&[held("account", T0)]);
        assert!(!group_held.shreddable(PathSet::EMPTY));
        let subject_held = derive(&p, &[closed("account", T0)], true).unwrap();
        assert!(!subject_held.shreddable(PathSet::EMPTY));
    }

    #[test]
    fn closing_the_portal_makes_its_paths_due_at_the_close_instant() {
        let m = mark(&[closed("portal", T0)]);
        assert_eq!(
            m.state(FieldPath::ActivityLog, T0 - 1),
            PathState::Restricted {
                until_us: T0,
                held: false
            }
        );
        assert_eq!(m.purgeable(PathSet::all(), T0), paths_of("portal"));
        assert_eq!(m.first_due_us(), Some(T0));
    }

    #[test]
    fn paths_still_granted_by_an_open_record_never_become_due() {
        // Every path of the closed order is also granted by the open account.
        let m = mark(&[closed("order", T0), open("account")]);
        assert_eq!(m.first_due_us(), None);
        assert_eq!(m.purgeable(PathSet::all(), i64::MAX), PathSet::EMPTY);
        assert_eq!(m.state(FieldPath::NameGiven, i64::MAX), PathState::Kept);
        // activity_log: granted by no record.
        assert_eq!(m.no_basis(PathSet::all()), set(&[FieldPath::ActivityLog]));
    }

    #[test]
    fn purposes_without_retention_cannot_hold_records() {
        let p = policy();
        for purpose in [
            "marketing",
            "subject-request",
            "legal-demand",
            "unknown",
            "",
        ] {
            for record in [open(purpose), closed(purpose, T0)] {
                assert_eq!(
                    derive(&p, &[open("order"), record], false),
                    Err(LifecycleError::NoRetention(purpose.to_owned()))
                );
            }
        }
        assert_eq!(
            LifecycleError::NoRetention("marketing".to_owned()).to_string(),
            "purpose marketing cannot hold processing records"
        );
    }

    #[test]
    fn next_due_after_skips_times_already_passed() {
        let account_closed = T0;
        let order_closed = T0 + 10 * DAY;
        let m = mark(&[
            closed("account", account_closed),
            closed("order", order_closed),
            closed("portal", T0 + 5 * DAY),
        ]);
        // account-only paths due at T0; activity_log at T0+5d; network, contact.email and naw
        // (also granted by the order) and billing at order + 7 years.
        assert_eq!(m.first_due_us(), Some(T0));
        assert_eq!(m.next_due_after(T0 - 1), Some(T0));
        assert_eq!(m.next_due_after(T0), Some(T0 + 5 * DAY));
        assert_eq!(
            m.next_due_after(T0 + 5 * DAY),
            Some(seven_years(order_closed))
        );
        assert_eq!(m.next_due_after(seven_years(order_closed)), None);
        assert_eq!(m.purgeable(PathSet::all(), T0 + 5 * DAY), {
            let mut s = account_only();
            s.insert(FieldPath::ContactPhone);
            s.insert(FieldPath::ActivityLog);
            s
        });
    }

    #[test]
    fn groups_are_one_per_purpose_in_name_order_and_open_records_make_none() {
        let m = mark(&[
            closed("subscription", T0),
            open("order"),
            closed("account", T0),
            closed("subscription", T0 + DAY),
        ]);
        let names: Vec<&str> = m.groups.iter().map(|g| g.purpose.as_str()).collect();
        assert_eq!(names, ["account", "subscription"]);
        assert_eq!(m.groups[1].until_us, seven_years(T0 + DAY));
        assert_eq!(m.open, paths_of("order"));
    }

    #[test]
    fn encode_and_decode_round_trip() {
        let marks = [
            Mark::default(),
            mark(&[open("order")]),
            mark(&[
                open("subscription"),
                closed("account", T0),
                held("order", T0),
            ]),
            derive(&policy(), &[closed("portal", -5)], true).unwrap(),
            Mark {
                open: PathSet::EMPTY,
                any_open: false,
                groups: vec![Group {
                    purpose: "order".to_owned(),
                    paths: PathSet::all(),
                    until_us: i64::MAX,
                    held: false,
                }],
                held: false,
            },
        ];
        for m in marks {
            let bytes = m.encode();
            assert_eq!(Mark::decode(&bytes), Ok(m.clone()));
        }
        let text = String::from_utf8(mark(&[held("order", 0)]).encode()).unwrap();
        assert!(text.contains(r#""v":1"#), "{text}");
        assert!(text.contains(r#""name.given""#), "{text}");
        assert!(text.contains(r#""purpose":"order""#), "{text}");
    }

    #[test]
    fn corrupt_stored_state_is_rejected() {
        let good = r#"{"v":1,"open":[],"any_open":false,"groups":[{"purpose":"order","paths":["name.given"],"until_us":5,"held":false}],"held":false}"#;
        assert!(Mark::decode(good.as_bytes()).is_ok());
        let bad = [
            "".to_owned(),
            "not json".to_owned(),
            "[]".to_owned(),
            "{}".to_owned(),
            good.replace(r#""v":1"#, r#""v":2"#),
            good.replace(r#""v":1"#, r#""v":0"#),
            good.replace(r#""v":1"#, r#""v":"1""#),
            good.replace(r#""v":1,"#, ""),
            good.replace("name.given", "name.middle"),
            good.replace("name.given", "name"),
            good.replace(r#""open":[]"#, r#""open":["password"]"#),
            good.replace(r#""open":[]"#, r#""open":["name.given"]"#),
            good.replace(r#","held":false}"#, r#","held":false,"extra":1}"#),
            good.replace(r#""until_us":5"#, r#""until_us":"5""#),
            good.replace(r#""purpose":"order""#, r#""purpose":"""#),
            good.replace(r#""any_open":false,"#, ""),
            good.replace(
                r#""groups":[{"purpose":"order","paths":["name.given"],"until_us":5,"held":false}]"#,
                r#""groups":[{"purpose":"order","paths":[],"until_us":5,"held":false},{"purpose":"order","paths":[],"until_us":6,"held":false}]"#,
            ),
        ];
        for text in bad {
            assert!(
                matches!(
                    Mark::decode(text.as_bytes()),
                    Err(LifecycleError::Corrupt(_))
                ),
                "{text}"
            );
        }
        let err = Mark::decode(good.replace(r#""v":1"#, r#""v":2"#).as_bytes()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "stored retention state unreadable: format version 2 (expected 1)"
        );
    }
}
