//! `stress bulk`: a campaign to K recipients while chat runs. The relay answers campaign
//! frames with `NOT_PERMITTED` until it implements campaigns, and the SDK has no campaign
//! sender yet, so this scenario says so and exits non-zero instead of printing figures.

use crate::cli::BulkArgs;

/// Why the scenario cannot run.
pub fn unsupported(a: &BulkArgs) -> String {
    format!(
        "stress bulk (a campaign to {} recipients while chat runs at {} msgs/s for {:?}) needs the \
         campaign feature: this relay version answers CampaignBegin/Chunk/End with \
         Rejected NOT_PERMITTED (\"campaigns are not supported by this relay version yet\") and \
         the relay-client SDK has no campaign sender. No figures were measured. Re-run once \
         campaigns land in the relay and the SDK.",
        a.recipients, a.chat_rate, a.duration
    )
}
