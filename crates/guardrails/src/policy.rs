//! Named policies: what to do with each kind of finding.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::PiiKind;

/// What a policy does with a finding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Leave the value in the text.
    Allow,
    /// Replace the value by a placeholder, restored in the answer to the client.
    Redact,
    /// Refuse the whole text (`pii_blocked`).
    Block,
}

/// A named policy, set per tenant, project or preset. See the crate documentation for its
/// serialised shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub name: String,
    /// The action for every kind not listed in `kinds`.
    pub action: Action,
    /// Per-kind overrides of `action`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub kinds: BTreeMap<PiiKind, Action>,
    /// Whether [`crate::Redactor::redact_response`] applies the policy to what the model wrote.
    #[serde(default)]
    pub apply_to_responses: bool,
}

impl Policy {
    pub fn action_for(&self, kind: PiiKind) -> Action {
        self.kinds.get(&kind).copied().unwrap_or(self.action)
    }
}
