//! One call's audit event while the call runs: the api opens it, the vault adds what it touched
//! (subjects, paths read, written, masked, withheld) and commits it with a write; the api records
//! it with the call's outcome when no write did.

use crate::{
    audit::{AuditEvent, AuditTrail},
    policy::PathSet,
    store::AuditRecord,
};

use super::access::path_list;

/// The status name of a call that succeeded.
pub const OK: &str = "OK";

#[derive(Debug, Clone)]
pub struct Draft {
    pub event: AuditEvent,
    /// The event was appended in the transaction of the write it records.
    pub committed: bool,
}

impl Draft {
    pub fn new(event: AuditEvent) -> Self {
        Self {
            event,
            committed: false,
        }
    }

    /// Names a subject the call concerns (once, however often it is named).
    pub fn subject(&mut self, id: uuid::Uuid) {
        let id = id.to_string();
        if !self.event.subjects.contains(&id) {
            self.event.subjects.push(id);
        }
    }

    /// Names the subject of a request before anything is decided, so a refused call is found in
    /// the subject's history too; text that is not a subject id is not recorded.
    pub fn subject_text(&mut self, text: &str) {
        if let Ok(id) = uuid::Uuid::parse_str(text.trim()) {
            self.subject(id);
        }
    }

    pub fn read(&mut self, paths: PathSet) {
        self.event.read = merge(&self.event.read, paths);
    }

    pub fn masked(&mut self, paths: PathSet) {
        self.event.masked = merge(&self.event.masked, paths);
    }

    pub fn withheld(&mut self, paths: PathSet) {
        self.event.withheld = merge(&self.event.withheld, paths);
    }

    pub fn written(&mut self, paths: PathSet) {
        self.event.written = merge(&self.event.written, paths);
    }

    /// The event of a write that applies, to commit with it.
    pub fn committed_record(&self) -> AuditRecord {
        let mut event = self.event.clone();
        event.outcome = OK.to_owned();
        AuditTrail::record_of(&event)
    }
}

/// The union of the listed paths and `more`, in vocabulary order.
fn merge(listed: &[String], more: PathSet) -> Vec<String> {
    let known = PathSet::from_paths(listed.iter().filter_map(|p| super::FieldPath::from_leaf(p)));
    path_list(known.union(more))
}
