//! Dead-letter records: the record as it arrived, on `<topic>.dlt`, with why and where from in
//! `saga_dlt_*` headers. The original CloudEvents headers stay, so the event keeps its id: a
//! consumer of the dead-letter topic deduplicates it like any event, and a re-drive
//! (`crate::dlt`) is recognised by the original service's inbox.

use crate::wasm::bindings::DeadLetter;

/// Headers we add to a dead-lettered record.
pub mod headers {
    pub const REASON: &str = "saga_dlt_reason";
    pub const ATTEMPTS: &str = "saga_dlt_attempts";
    pub const SERVICE: &str = "saga_dlt_service";
    pub const TOPIC: &str = "saga_dlt_topic";
    pub const PARTITION: &str = "saga_dlt_partition";
    pub const OFFSET: &str = "saga_dlt_offset";
    /// On a re-driven record: the dead-letter record it came from (`topic/partition/offset`).
    pub const REDRIVEN_FROM: &str = "saga_redriven_from";
    /// Every header of ours on a dead-letter record (a re-drive strips them).
    pub const ALL: [&str; 6] = [REASON, ATTEMPTS, SERVICE, TOPIC, PARTITION, OFFSET];
}

/// The dead-letter topic of a logical topic.
pub fn topic(logical: &str) -> String {
    format!("{logical}.dlt")
}

/// Whether a logical topic is a dead-letter topic.
pub fn is_dead_letter_topic(logical: &str) -> bool {
    logical.ends_with(".dlt")
}

/// What the headers of a dead-letter record say, if they are one.
pub fn info(header: impl Fn(&'static str) -> Option<String>) -> Option<DeadLetter> {
    let reason = header(headers::REASON)?;
    Some(DeadLetter {
        reason,
        attempts: header(headers::ATTEMPTS)
            .and_then(|a| a.parse().ok())
            .unwrap_or(0),
        service: header(headers::SERVICE).unwrap_or_default(),
        topic: header(headers::TOPIC).unwrap_or_default(),
    })
}
