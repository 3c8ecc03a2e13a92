//! The privacy statement as data (DESIGN.md §2): purposes, roles, categories and retention, read
//! from a TOML file, validated once, then consulted on every call.
//!
//! Pure: no I/O except reading the file in [`Policy::load`]. The shipped file,
//! `policy/default.toml`, is compiled in ([`Policy::shipped`]); operators may copy and edit it.

mod explain;
mod file;
pub mod lifecycle;
mod mask;
pub mod paths;
mod pathset;
pub(crate) mod period;
mod role;

use std::{collections::BTreeMap, fmt, path::Path};

pub use explain::{Lang, UnknownLang};
pub use mask::mask_text;
pub use paths::FieldPath;
pub use pathset::PathSet;
pub use period::Period;
pub use role::{Role, UnknownRole};

/// The text of the shipped policy file (`policy/default.toml`).
pub const DEFAULT_TOML: &str = include_str!("../../policy/default.toml");

/// The name errors in the shipped file are reported under.
const DEFAULT_FILE_NAME: &str = "policy/default.toml";

/// Why a purpose may process personal data (GDPR art. 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LegalBasis {
    LegalObligation,
    Contract,
    LegitimateInterest,
    Consent,
}

impl LegalBasis {
    pub const ALL: [LegalBasis; 4] = [
        LegalBasis::LegalObligation,
        LegalBasis::Contract,
        LegalBasis::LegitimateInterest,
        LegalBasis::Consent,
    ];

    /// The name in the policy file.
    pub fn as_str(self) -> &'static str {
        match self {
            LegalBasis::LegalObligation => "legal-obligation",
            LegalBasis::Contract => "contract",
            LegalBasis::LegitimateInterest => "legitimate-interest",
            LegalBasis::Consent => "consent",
        }
    }

    pub fn from_name(name: &str) -> Option<LegalBasis> {
        LegalBasis::ALL.into_iter().find(|b| b.as_str() == name)
    }
}

impl fmt::Display for LegalBasis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether, and how, a subject can stop a purpose's use of their data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Objection {
    /// No objection possible (legal obligation, contract): a request is refused with the reason.
    NotObjectable,
    /// Reads are allowed unless the subject objected.
    OptOut,
    /// Reads are allowed only while the subject's consent is in force.
    ConsentBased,
}

impl Objection {
    pub const ALL: [Objection; 3] = [
        Objection::NotObjectable,
        Objection::OptOut,
        Objection::ConsentBased,
    ];

    /// The name in the policy file.
    pub fn as_str(self) -> &'static str {
        match self {
            Objection::NotObjectable => "none",
            Objection::OptOut => "opt-out",
            Objection::ConsentBased => "consent",
        }
    }

    pub fn from_name(name: &str) -> Option<Objection> {
        Objection::ALL.into_iter().find(|o| o.as_str() == name)
    }
}

impl fmt::Display for Objection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How long a purpose keeps its paths after its processing record is closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retention {
    /// The event that closes a processing record of the purpose (`order_completed`).
    pub close_event: String,
    /// How long after the close event the paths are kept (zero: gone at the close).
    pub keep_for: Period,
    /// The close event in words, for explanations ("de bestelling is afgerond"); optional.
    pub until_nl: Option<String>,
    pub until_en: Option<String>,
}

/// One purpose of the statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Purpose {
    /// The name callers declare (`x-kluis-purpose`), e.g. `order`.
    pub name: String,
    /// The statement's heading, e.g. "Afhandelen bestelling".
    pub heading_nl: String,
    pub description_nl: String,
    pub description_en: String,
    pub legal_basis: LegalBasis,
    pub objection: Objection,
    /// Every path the purpose may use; each role's grant under it is a subset.
    pub paths: PathSet,
    /// `None` for purposes that never keep a path alive (marketing, operator purposes).
    pub retention: Option<Retention>,
    /// Who may still read a path kept only by this purpose's retention (default billing, operator).
    pub retention_readers: Vec<Role>,
    /// The only parties data may be disclosed to under this purpose.
    pub recipients: Vec<String>,
}

/// What one role may do under one purpose.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Grant {
    /// Paths the role reads in clear.
    pub read: PathSet,
    /// Paths the role may change; always a subset of `read`.
    pub write: PathSet,
    /// Paths the role sees only masked ([`mask_text`]); disjoint from `read`.
    pub masked: PathSet,
}

impl Grant {
    /// Paths the role sees at all, in clear or masked.
    pub fn visible(&self) -> PathSet {
        self.read.union(self.masked)
    }
}

/// A role as the policy file defines it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleDef {
    pub role: Role,
    /// Every read needs a recorded reason (`x-kluis-reason`).
    pub require_reason: bool,
    /// Purpose name → grant; a purpose absent here may not be acted under.
    pub grants: BTreeMap<String, Grant>,
}

/// The controller (verwerkingsverantwoordelijke) the statement names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Controller {
    pub name: String,
    pub address: String,
    pub email: String,
    pub phone: String,
    pub supervisory_authority: String,
}

/// A validated policy. Lookups are cheap: purposes are indexed and grants precomputed as bitsets.
#[derive(Debug, Clone)]
pub struct Policy {
    version: String,
    date: String,
    controller: Controller,
    /// In file order.
    categories: Vec<(String, PathSet)>,
    /// In file order.
    purposes: Vec<Purpose>,
    purpose_index: BTreeMap<String, usize>,
    /// Indexed by [`Role::index`].
    roles: [RoleDef; 4],
}

impl Policy {
    /// The policy compiled into kluis (`policy/default.toml`).
    pub fn shipped() -> Result<Policy, PolicyErrors> {
        Policy::parse(DEFAULT_FILE_NAME, DEFAULT_TOML)
    }

    /// Parses and validates a policy file's text; `file_name` is only used in error positions.
    pub fn parse(file_name: &str, text: &str) -> Result<Policy, PolicyErrors> {
        file::parse(file_name, text)
    }

    /// Reads and validates a policy file. A read error is reported at line 0.
    pub fn load(path: &Path) -> Result<Policy, PolicyErrors> {
        let file_name = path.display().to_string();
        match std::fs::read_to_string(path) {
            Ok(text) => Policy::parse(&file_name, &text),
            Err(e) => Err(PolicyErrors(vec![PolicyError {
                file: file_name,
                line: 0,
                column: 0,
                problem: format!("cannot read the policy file: {e}"),
            }])),
        }
    }

    /// The policy's version, cited by audit events, explanations and exports.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The date of the statement the policy encodes (`YYYY-MM-DD`).
    pub fn date(&self) -> &str {
        &self.date
    }

    pub fn controller(&self) -> &Controller {
        &self.controller
    }

    /// Every purpose, in file order.
    pub fn purposes(&self) -> impl Iterator<Item = &Purpose> {
        self.purposes.iter()
    }

    pub fn purpose(&self, name: &str) -> Option<&Purpose> {
        self.purpose_index
            .get(name)
            .and_then(|&i| self.purposes.get(i))
    }

    /// The role's definition; validation guarantees every role has one.
    pub fn role(&self, role: Role) -> &RoleDef {
        &self.roles[role.index()]
    }

    /// What `role` may do under `purpose`; `None` if it may not act under it at all.
    pub fn grant(&self, role: Role, purpose: &str) -> Option<&Grant> {
        self.role(role).grants.get(purpose)
    }

    /// The paths of a category of the file.
    pub fn category_paths(&self, category: &str) -> Option<PathSet> {
        self.categories
            .iter()
            .find(|(name, _)| name == category)
            .map(|(_, set)| *set)
    }

    /// Every category with its paths, in file order.
    pub fn categories(&self) -> impl Iterator<Item = (&str, PathSet)> {
        self.categories.iter().map(|(n, s)| (n.as_str(), *s))
    }

    /// Names `set` briefly: each category wholly inside it, then the remaining single paths.
    pub fn describe_paths(&self, set: PathSet) -> Vec<String> {
        let mut rest = set;
        let mut names = Vec::new();
        for (name, cat) in &self.categories {
            if !cat.is_empty() && cat.difference(set).is_empty() {
                names.push(name.clone());
                rest = rest.difference(*cat);
            }
        }
        names.extend(rest.iter().map(|p| p.as_str().to_owned()));
        names
    }
}

/// One problem in a policy file, with its position (1-based; line 0 when the file is unreadable).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub problem: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Line 0: the file as a whole (it could not be read).
        if self.line == 0 {
            write!(f, "{}: {}", self.file, self.problem)
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file, self.line, self.column, self.problem
            )
        }
    }
}

impl std::error::Error for PolicyError {}

/// Every problem found in a policy file, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyErrors {}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn shipped() -> Policy {
        match Policy::shipped() {
            Ok(p) => p,
            Err(e) => panic!("the shipped policy is invalid:\n{e}"),
        }
    }

    fn set(entries: &[&str]) -> PathSet {
        let p = shipped();
        let mut s = PathSet::EMPTY;
        for e in entries {
            s = s.union(
                p.category_paths(e)
                    .unwrap_or_else(|| PathSet::from_paths(FieldPath::expand(e).unwrap())),
            );
        }
        s
    }

    #[test]
    fn the_shipped_policy_is_valid_and_dated() {
        let p = shipped();
        assert_eq!(p.version(), "2019-08.1");
        assert_eq!(p.date(), "2019-08-01");
        assert_eq!(p.controller().name, "Source XS B.V. h.o.d.n. TwenteNET");
        assert_eq!(
            p.controller().supervisory_authority,
            "Autoriteit Persoonsgegevens"
        );
        assert_eq!(p.controller().email, "info@twentenet.nl");
    }

    #[test]
    fn shipped_categories_are_the_design_categories() {
        let p = shipped();
        let names: Vec<&str> = p.categories().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                "naw", "contact", "network", "billing", "payment", "profile", "account", "activity"
            ]
        );
        for path in FieldPath::ALL {
            let owners: Vec<&str> = p
                .categories()
                .filter(|(_, s)| s.contains(*path))
                .map(|(n, _)| n)
                .collect();
            assert_eq!(owners, [path.category()], "{path}");
        }
    }

    #[test]
    fn shipped_purposes_are_the_design_purposes() {
        let p = shipped();
        let names: Vec<&str> = p.purposes().map(|x| x.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "order",
                "portal",
                "subscription",
                "account",
                "marketing",
                "subject-request",
                "legal-demand"
            ]
        );
        let order = p.purpose("order").unwrap();
        assert_eq!(order.heading_nl, "Afhandelen bestelling");
        assert_eq!(order.legal_basis, LegalBasis::LegalObligation);
        assert_eq!(order.objection, Objection::NotObjectable);
        assert_eq!(
            order.paths,
            set(&["naw", "network", "contact.email", "billing"])
        );
        let r = order.retention.as_ref().unwrap();
        assert_eq!(r.close_event, "order_completed");
        assert_eq!(
            r.keep_for,
            Period {
                years: 7,
                months: 0,
                days: 0
            }
        );
        assert_eq!(order.retention_readers, [Role::Billing, Role::Operator]);
        assert_eq!(order.recipients.len(), 2);

        let portal = p.purpose("portal").unwrap();
        assert_eq!(portal.legal_basis, LegalBasis::Contract);
        assert_eq!(portal.paths, set(&["network", "contact.email", "activity"]));
        let r = portal.retention.as_ref().unwrap();
        assert_eq!(
            (r.close_event.as_str(), r.keep_for),
            ("service_ended", Period::ZERO)
        );

        let sub = p.purpose("subscription").unwrap();
        assert_eq!(sub.paths, set(&["billing", "contact", "naw", "network"]));
        assert_eq!(
            sub.retention.as_ref().unwrap().close_event,
            "subscription_cancelled"
        );

        let account = p.purpose("account").unwrap();
        assert_eq!(account.legal_basis, LegalBasis::Contract);
        assert!(!account.paths.contains(FieldPath::ActivityLog));
        assert_eq!(account.paths.len(), 25);
        assert!(account.retention.as_ref().unwrap().keep_for.is_zero());

        let marketing = p.purpose("marketing").unwrap();
        assert_eq!(marketing.legal_basis, LegalBasis::LegitimateInterest);
        assert_eq!(marketing.objection, Objection::OptOut);
        assert_eq!(marketing.paths, set(&["contact.email"]));
        assert!(marketing.retention.is_none());
        assert!(marketing.retention_readers.is_empty());

        for name in ["subject-request", "legal-demand"] {
            let x = p.purpose(name).unwrap();
            assert_eq!(x.paths, PathSet::all(), "{name}");
            assert_eq!(x.legal_basis, LegalBasis::LegalObligation);
            assert!(x.retention.is_none());
        }
        assert!(p.purpose("Order").is_none());
        assert!(p.purpose("").is_none());
    }

    #[test]
    fn shipped_roles_are_the_design_roles() {
        let p = shipped();
        let hb = Role::HostingBackend;
        let acc = p.grant(hb, "account").unwrap();
        assert!(acc.masked.contains(FieldPath::PaymentIban));
        assert_eq!(acc.masked, set(&["payment"]));
        assert!(!acc.read.contains(FieldPath::PaymentIban));
        assert_eq!(
            acc.write,
            set(&["naw", "contact", "network", "profile", "account"])
        );
        assert_eq!(acc.read, acc.write);
        assert!(!acc.read.contains(FieldPath::BillingVatNumber));
        let portal = p.grant(hb, "portal").unwrap();
        assert_eq!(portal.read, set(&["network", "contact.email", "activity"]));
        let order = p.grant(hb, "order").unwrap();
        assert_eq!(order.write, set(&["naw", "network", "contact.email"]));
        assert!(p.grant(hb, "subscription").is_none());
        assert!(p.grant(hb, "marketing").is_none());
        assert!(!p.role(hb).require_reason);

        let b = Role::Billing;
        let g = p.grant(b, "order").unwrap();
        assert_eq!(g.write, set(&["billing"]));
        assert_eq!(g.read, set(&["billing", "naw", "contact.email"]));
        let g = p.grant(b, "subscription").unwrap();
        assert_eq!(g.read, set(&["billing", "naw", "contact"]));
        let g = p.grant(b, "account").unwrap();
        assert_eq!(g.write, set(&["billing", "payment"]));
        assert!(g.read.contains(FieldPath::PaymentIban));
        assert!(g.masked.is_empty());
        assert!(p.grant(b, "marketing").is_none());
        assert!(p.grant(b, "portal").is_none());

        let m = Role::MarketingMailer;
        let g = p.grant(m, "marketing").unwrap();
        assert_eq!(g.read.iter().collect::<Vec<_>>(), [FieldPath::ContactEmail]);
        assert!(g.write.is_empty() && g.masked.is_empty());
        assert_eq!(p.role(m).grants.len(), 1);

        let o = Role::Operator;
        assert!(p.role(o).require_reason);
        let g = p.grant(o, "subject-request").unwrap();
        assert_eq!((g.read, g.write), (PathSet::all(), PathSet::all()));
        let g = p.grant(o, "legal-demand").unwrap();
        assert_eq!((g.read, g.write), (PathSet::all(), PathSet::EMPTY));
        assert!(p.grant(o, "order").is_none());
        for r in Role::ALL {
            assert_eq!(p.role(r).role, r);
        }
    }

    #[test]
    fn describe_paths_names_whole_categories_first() {
        let p = shipped();
        let order = p.purpose("order").unwrap();
        assert_eq!(
            p.describe_paths(order.paths),
            ["naw", "network", "billing", "contact.email"]
        );
    }

    #[test]
    fn load_reports_an_unreadable_file_as_a_whole() {
        let e = Policy::load(Path::new("/nonexistent/kluis/policy.toml")).unwrap_err();
        assert_eq!(e.0.len(), 1);
        assert_eq!((e.0[0].line, e.0[0].column), (0, 0));
        assert!(e.0[0].problem.starts_with("cannot read the policy file"));
        assert!(
            e.to_string()
                .starts_with("/nonexistent/kluis/policy.toml: cannot read")
        );
    }

    #[test]
    fn load_reads_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");
        std::fs::write(&path, DEFAULT_TOML).unwrap();
        assert_eq!(Policy::load(&path).unwrap().version(), "2019-08.1");
    }
}
