//! Lanes and their TTL policy (SPEC.md section 7).

use crate::proto::{Lane, LaneTtl};

/// Default and maximum TTL of a lane, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TtlPolicy {
    /// Used when a message asks for 0.
    pub default_ttl_s: u32,
    /// Longer requests are clamped to this.
    pub max_ttl_s: u32,
}

impl TtlPolicy {
    /// The TTL a message gets: the default for 0, at most the maximum.
    pub fn effective(&self, requested_s: u32) -> u32 {
        match requested_s {
            0 => self.default_ttl_s,
            s => s.min(self.max_ttl_s),
        }
    }
}

/// The protocol's defaults: a call that is not through in a minute is useless; a chat
/// message must survive a platform being down for a long holiday weekend; a campaign is
/// news for three days at most.
pub fn default_policy(lane: Lane) -> TtlPolicy {
    match lane {
        Lane::Call => TtlPolicy {
            default_ttl_s: 60,
            max_ttl_s: 300,
        },
        Lane::Chat | Lane::Unspecified => TtlPolicy {
            default_ttl_s: 86_400,
            max_ttl_s: 604_800,
        },
        Lane::Bulk => TtlPolicy {
            default_ttl_s: 86_400,
            max_ttl_s: 259_200,
        },
    }
}

/// Every real lane, highest priority first.
pub const LANES: [Lane; 3] = [Lane::Call, Lane::Chat, Lane::Bulk];

/// The lane of a wire value, if it names a real lane.
pub fn from_wire(value: i32) -> Option<Lane> {
    match Lane::try_from(value) {
        Ok(Lane::Unspecified) | Err(_) => None,
        Ok(lane) => Some(lane),
    }
}

/// The Welcome entry announcing a lane's policy.
pub fn announce(lane: Lane, policy: TtlPolicy) -> LaneTtl {
    LaneTtl {
        lane: lane as i32,
        default_ttl_s: policy.default_ttl_s,
        max_ttl_s: policy.max_ttl_s,
    }
}

/// Lower-case name of a lane, as used in config, metrics and the CLI.
pub fn name(lane: Lane) -> &'static str {
    match lane {
        Lane::Call => "call",
        Lane::Chat => "chat",
        Lane::Bulk => "bulk",
        Lane::Unspecified => "unspecified",
    }
}

/// The lane with that lower-case name.
pub fn from_name(name: &str) -> Option<Lane> {
    LANES.into_iter().find(|l| self::name(*l) == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_defaults_and_clamps() {
        let p = default_policy(Lane::Call);
        assert_eq!(p.effective(0), 60);
        assert_eq!(p.effective(10), 10);
        assert_eq!(p.effective(100_000), 300);
        assert_eq!(from_wire(9), None);
        assert_eq!(from_wire(0), None);
        assert_eq!(from_wire(3), Some(Lane::Bulk));
        assert_eq!(from_name("chat"), Some(Lane::Chat));
    }
}
