//! Compiles policy sections into kernel map entries.

pub mod net;

#[cfg(test)]
mod net_proptest;
#[cfg(test)]
mod net_tests;

use ipnet::IpNet;

/// A valid policy that the kernel's maps cannot hold.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    /// The longest-prefix entry for `cidr` would need more rules than a
    /// `NetRuleSet` holds.
    #[error(
        "{rule} ({cidr}): this CIDR and the rules whose CIDRs contain it need {entries} kernel \
         entries (one per port range), more than the {max} that fit; merge port ranges or rules"
    )]
    TooManyNetEntries {
        rule: String,
        cidr: IpNet,
        entries: usize,
        max: usize,
    },
    /// A rule index does not fit the kernel's 16-bit `rule_idx`.
    #[error("{rule}: too many rules in one section (at most {max})")]
    TooManyRules { rule: String, max: usize },
}
pub mod exec;
pub mod files;
