//! The four caller roles (DESIGN.md §2); what each may do is the policy file's business.

use std::{fmt, str::FromStr};

/// A caller's role. The set is fixed; every role must be defined in the policy file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    HostingBackend,
    Billing,
    MarketingMailer,
    Operator,
}

impl Role {
    pub const ALL: [Role; 4] = [
        Role::HostingBackend,
        Role::Billing,
        Role::MarketingMailer,
        Role::Operator,
    ];

    /// The role's name in the policy file, in caller rows and in audit events.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::HostingBackend => "hosting-backend",
            Role::Billing => "billing",
            Role::MarketingMailer => "marketing-mailer",
            Role::Operator => "operator",
        }
    }

    /// The role's position in [`Role::ALL`].
    pub(crate) fn index(self) -> usize {
        match self {
            Role::HostingBackend => 0,
            Role::Billing => 1,
            Role::MarketingMailer => 2,
            Role::Operator => 3,
        }
    }
}

/// A name that is not one of the four roles. Its text does not repeat the name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnknownRole;

impl fmt::Display for UnknownRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("unknown role: expected hosting-backend, billing, marketing-mailer or operator")
    }
}

impl std::error::Error for UnknownRole {}

impl FromStr for Role {
    type Err = UnknownRole;
    fn from_str(s: &str) -> Result<Self, UnknownRole> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or(UnknownRole)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back_and_index_matches_all() {
        for (i, r) in Role::ALL.into_iter().enumerate() {
            assert_eq!(r.as_str().parse::<Role>(), Ok(r));
            assert_eq!(r.index(), i);
        }
        assert_eq!("admin".parse::<Role>(), Err(UnknownRole));
        assert_eq!("Operator".parse::<Role>(), Err(UnknownRole));
    }
}
