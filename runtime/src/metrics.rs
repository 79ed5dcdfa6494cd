//! Prometheus metrics, served at `GET /metrics` (issue 13): the `metrics` crate's handles on a
//! recorder of `metrics-exporter-prometheus`, one per instance (not the process-wide global
//! recorder, so several instances in one process — the tests — each report their own).
//!
//! Three kinds of source, each where it is cheapest:
//! - histograms recorded where the thing happens, through handles registered at start-up or
//!   once per batch (never a registry lookup per event): handler durations by service,
//!   version and outcome, guest instance waits, relay rows per transaction, deadline lag;
//! - gauges the moving parts set on their own tick: consumer lag per partition (ownership);
//! - what is read when scraped: the instance's counters (`crate::stats`, kept once, shown
//!   here as Prometheus counters), queue depths, and a few database aggregates (outbox depth
//!   and age, dead letters per topic).
//!
//! Names and units follow the Prometheus conventions (`_total`, `_seconds`, base units); the
//! README lists them.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use metrics::{
    Counter, Gauge, Histogram, Key, KeyName, Label, Metadata, Recorder, SharedString, Unit,
};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

use crate::stats::Stats;

static META: Metadata<'static> =
    Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

/// Buckets of the `_seconds` histograms: 1 ms to 30 s.
const SECONDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Buckets of the rows-per-transaction histogram.
const ROWS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0];

/// How an event's handling ended, as the handler-duration histogram labels it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    Compensated,
    Duplicate,
    Expired,
    Ignored,
    /// One failed handler attempt (an error, trap or limit; retried or dead-lettered after).
    Failed,
    DeadLettered,
}

const OUTCOMES: [Outcome; 7] = [
    Outcome::Applied,
    Outcome::Compensated,
    Outcome::Duplicate,
    Outcome::Expired,
    Outcome::Ignored,
    Outcome::Failed,
    Outcome::DeadLettered,
];

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Compensated => "compensated",
            Outcome::Duplicate => "duplicate",
            Outcome::Expired => "expired",
            Outcome::Ignored => "ignored",
            Outcome::Failed => "failed",
            Outcome::DeadLettered => "dead_lettered",
        }
    }
}

/// The handler-duration histograms of one service version, one per outcome; taken once per
/// batch.
pub struct Handled([Histogram; OUTCOMES.len()]);

impl Handled {
    pub fn record(&self, outcome: Outcome, took: Duration) {
        let i = OUTCOMES
            .iter()
            .position(|o| *o == outcome)
            .expect("every outcome");
        self.0[i].record(took.as_secs_f64());
    }
}

/// What the scrape reads besides the recorder (see [`Metrics::render`]).
pub struct Scraped {
    pub queued_requests: usize,
    pub held_queries: usize,
    pub guest_instances_in_use: usize,
    pub guest_instances_max: usize,
    pub outbox_rows: i64,
    /// Age of the oldest outbox row, ms (0 if empty).
    pub outbox_oldest_ms: i64,
    /// (logical topic, dead letters not re-driven).
    pub dead_letters: Vec<(String, i64)>,
}

/// The metrics of one instance.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    pub guest_wait: Histogram,
    pub relay_rows: Histogram,
    pub deadline_lag: Histogram,
    pub ingress_wait: Histogram,
    pub relay_delay: Histogram,
}

/// The instance's counters (`crate::stats`) as Prometheus counters: name, labels, help, field.
type CounterRow = (
    &'static str,
    &'static [(&'static str, &'static str)],
    &'static str,
    fn(&Stats) -> &AtomicU64,
);

const COUNTERS: &[CounterRow] = &[
    (
        "saga_events_total",
        &[("outcome", "applied")],
        "Events handled, by outcome",
        |s| &s.applied,
    ),
    (
        "saga_events_total",
        &[("outcome", "duplicate")],
        "Events handled, by outcome",
        |s| &s.duplicates,
    ),
    (
        "saga_events_total",
        &[("outcome", "expired")],
        "Events handled, by outcome",
        |s| &s.expired,
    ),
    (
        "saga_events_total",
        &[("outcome", "ignored")],
        "Events handled, by outcome",
        |s| &s.ignored,
    ),
    (
        "saga_events_total",
        &[("outcome", "dead_lettered")],
        "Events handled, by outcome",
        |s| &s.dead_lettered,
    ),
    (
        "saga_events_total",
        &[("outcome", "refused")],
        "Events handled, by outcome",
        |s| &s.refused,
    ),
    (
        "saga_handler_failures_total",
        &[],
        "Failed handler attempts (errors, traps, limits)",
        |s| &s.failures,
    ),
    (
        "saga_host_faults_total",
        &[],
        "Handler calls run again after a host fault, not counted as attempts",
        |s| &s.host_faults,
    ),
    (
        "saga_conflict_reruns_total",
        &[],
        "Handler runs discarded because state they read changed before commit",
        |s| &s.conflicts,
    ),
    (
        "saga_events_deferred_total",
        &[],
        "Events handled again in a later round of their batch: a conflict, or behind one in their partition and depending on it",
        |s| &s.deferred,
    ),
    (
        "saga_events_chained_total",
        &[],
        "Events run again before their batch's commit on the writes of the events before them that they had read stale",
        |s| &s.chained,
    ),
    (
        "saga_batch_recommits_total",
        &[],
        "Event batches committed again with a savepoint per event after a conflict, late duplicate or refusal",
        |s| &s.recommits,
    ),
    (
        "saga_batch_ends_alone_total",
        &[],
        "Event batches committed as one statement without a transaction (PostgreSQL)",
        |s| &s.ends_alone,
    ),
    (
        "saga_batch_ends_undone_total",
        &[],
        "Event batches whose end as one statement without a transaction failed (a state version not as read, a step no longer applying) and that were committed again in a transaction",
        |s| &s.ends_undone,
    ),
    (
        "saga_state_reads_ahead_total",
        &[],
        "Handlers' state reads answered from the keys the door check read ahead with its statement",
        |s| &s.reads_ahead,
    ),
    (
        "saga_outbox_parked_total",
        &[],
        "Outbox rows the broker refused for good, parked",
        |s| &s.parked,
    ),
    (
        "saga_ingress_shed_total",
        &[],
        "HTTP requests answered 503 at the door",
        |s| &s.shed,
    ),
    (
        "saga_ingress_replays_total",
        &[],
        "Commands answered from a stored Idempotency-Key reply",
        |s| &s.replayed,
    ),
    (
        "saga_ingress_command_groups_total",
        &[],
        "Transactions that committed several HTTP commands together",
        |s| &s.command_groups,
    ),
    (
        "saga_ingress_grouped_commands_total",
        &[],
        "HTTP commands committed together with others",
        |s| &s.grouped_commands,
    ),
    (
        "saga_ingress_command_ends_alone_total",
        &[],
        "Groups of HTTP commands committed as one statement without a transaction (PostgreSQL)",
        |s| &s.command_ends_alone,
    ),
    (
        "saga_ingress_command_ends_undone_total",
        &[],
        "Groups of HTTP commands whose one statement found a version not as read, \
         committed in a transaction instead",
        |s| &s.command_ends_undone,
    ),
    (
        "saga_retention_deleted_total",
        &[],
        "Rows the retention clean-up deleted",
        |s| &s.retention_deleted,
    ),
    (
        "saga_deadlines_fired_total",
        &[],
        "Deadlines this instance fired",
        |s| &s.deadlines_fired,
    ),
    (
        "saga_relay_rows_total",
        &[],
        "Outbox rows the relay published",
        |s| &s.published,
    ),
    (
        "saga_relay_transactions_total",
        &[],
        "Kafka transactions the relay committed",
        |s| &s.relay_batches,
    ),
    (
        "saga_relay_retries_total",
        &[],
        "Relay batches that failed transiently and were tried again",
        |s| &s.relay_retries,
    ),
    (
        "saga_db_statements_total",
        &[],
        "SQL statements this process sent (queries, transaction begins and ends)",
        |s| &s.db_statements,
    ),
];

impl Metrics {
    pub fn new() -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS)
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Full("saga_relay_transaction_rows".into()), ROWS)
            })
            .expect("static buckets are valid")
            .build_recorder();
        let handle = recorder.handle();
        let m = Metrics {
            guest_wait: histogram(&recorder, "saga_guest_instance_wait_seconds", &[]),
            relay_rows: histogram(&recorder, "saga_relay_transaction_rows", &[]),
            deadline_lag: histogram(&recorder, "saga_deadline_lag_seconds", &[]),
            ingress_wait: histogram(&recorder, "saga_ingress_wait_seconds", &[]),
            relay_delay: histogram(&recorder, "saga_relay_delay_seconds", &[]),
            recorder,
            handle,
        };
        m.describe();
        m
    }

    fn describe(&self) {
        let r = &self.recorder;
        let mut described = std::collections::HashSet::new();
        for (name, _, help, _) in COUNTERS {
            if described.insert(*name) {
                r.describe_counter(KeyName::from(*name), None, SharedString::from(*help));
            }
        }
        let histograms: [(&'static str, Option<Unit>, &'static str); 8] = [
            ("saga_ingress_wait_seconds", Some(Unit::Seconds), "How long an HTTP request waited at the door for its turn (admitted ones; refusals count in saga_ingress_shed_total)"),
            ("saga_duration_seconds", Some(Unit::Seconds), "From a saga's first deadline set to a deadline of it cancelled by a handler (end=settled) or fired (end=expired), by the service owning the deadline"),
            ("saga_handler_duration_seconds", Some(Unit::Seconds), "Handling of one event (taken from the consumer to committed), by service, version and outcome; failed: one failed attempt"),
            ("saga_guest_instance_wait_seconds", Some(Unit::Seconds), "Wait for a free guest instance before a handler call"),
            ("saga_relay_transaction_rows", Some(Unit::Count), "Outbox rows per relay Kafka transaction"),
            ("saga_deadline_lag_seconds", Some(Unit::Seconds), "How late a deadline fired after it was due"),
            ("saga_relay_delay_seconds", Some(Unit::Seconds), "From the commit that wrote an outbox row to the Kafka transaction that published it"),
            ("saga_event_delivery_seconds", Some(Unit::Seconds), "From an event's commit (its CloudEvents time) to a worker of the service taking it from Kafka, by service"),
        ];
        for (name, unit, help) in histograms {
            r.describe_histogram(KeyName::from(name), unit, SharedString::from(help));
        }
        let gauges: [(&'static str, &'static str); 9] = [
            ("saga_consumer_lag_records", "Committed records beyond this instance's position, per service, topic and partition it reads"),
            ("saga_outbox_rows", "Rows in the outbox waiting for the relay"),
            ("saga_outbox_oldest_age_seconds", "Age of the oldest outbox row"),
            ("saga_dead_letters", "Dead-lettered events not re-driven, per topic"),
            ("saga_ingress_queued_requests", "HTTP requests waiting for their turn at the door"),
            ("saga_held_queries", "GET requests held until their answer changes (Prefer: wait)"),
            ("saga_guest_instances_in_use", "Guest instances in use"),
            ("saga_guest_instances_max", "Guest instances at most (sandbox.max_instances)"),
            ("saga_relay_slots_held", "Relay slots this instance holds"),
        ];
        for (name, help) in gauges {
            r.describe_gauge(KeyName::from(name), None, SharedString::from(help));
        }
    }

    /// The handler-duration histograms of `service` at `version`.
    pub fn handled(&self, service: &str, version: &str) -> Handled {
        Handled(OUTCOMES.map(|o| {
            histogram(
                &self.recorder,
                "saga_handler_duration_seconds",
                &[
                    ("service", service),
                    ("version", version),
                    ("outcome", o.label()),
                ],
            )
        }))
    }

    /// The delivery histogram of `service`: how long its events took from the emitting
    /// commit to its worker (relay, broker, fetch).
    pub fn delivered(&self, service: &str) -> Histogram {
        histogram(
            &self.recorder,
            "saga_event_delivery_seconds",
            &[("service", service)],
        )
    }

    /// Record how long `service`'s sagas that ended `end` ran (ms): `settled` (a handler
    /// cancelled the deadline) or `expired` (it fired).
    pub fn sagas_ended(&self, service: &str, end: &'static str, ran_ms: &[i64]) {
        if ran_ms.is_empty() {
            return;
        }
        let ended = histogram(
            &self.recorder,
            "saga_duration_seconds",
            &[("service", service), ("end", end)],
        );
        for ms in ran_ms {
            ended.record((*ms).max(0) as f64 / 1000.0);
        }
    }

    /// The lag gauge of one partition a service reads here.
    pub fn consumer_lag(&self, service: &str, topic: &str, partition: i32) -> Gauge {
        let partition = partition.to_string();
        gauge(
            &self.recorder,
            "saga_consumer_lag_records",
            &[
                ("service", service),
                ("topic", topic),
                ("partition", &partition),
            ],
        )
    }

    pub fn relay_slots(&self) -> Gauge {
        gauge(&self.recorder, "saga_relay_slots_held", &[])
    }

    /// The exposition text: the counters of `stats` and what was scraped set first.
    pub fn render(&self, stats: &Stats, scraped: &Scraped) -> String {
        let r = &self.recorder;
        let stats = stats.refreshed();
        for (name, labels, _, field) in COUNTERS {
            counter(r, name, labels).absolute(Stats::get(field(stats)));
        }
        let set = |name: &'static str, value: f64| gauge(r, name, &[]).set(value);
        set(
            "saga_ingress_queued_requests",
            scraped.queued_requests as f64,
        );
        set("saga_held_queries", scraped.held_queries as f64);
        set(
            "saga_guest_instances_in_use",
            scraped.guest_instances_in_use as f64,
        );
        set(
            "saga_guest_instances_max",
            scraped.guest_instances_max as f64,
        );
        set("saga_outbox_rows", scraped.outbox_rows as f64);
        set(
            "saga_outbox_oldest_age_seconds",
            scraped.outbox_oldest_ms as f64 / 1000.0,
        );
        for (topic, n) in &scraped.dead_letters {
            gauge(r, "saga_dead_letters", &[("topic", topic)]).set(*n as f64);
        }
        self.handle.run_upkeep();
        self.handle.render()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn key(name: &'static str, labels: &[(&str, &str)]) -> Key {
    let labels: Vec<Label> = labels
        .iter()
        .map(|(k, v)| Label::new(k.to_string(), v.to_string()))
        .collect();
    Key::from_parts(name, labels)
}

fn histogram(r: &PrometheusRecorder, name: &'static str, labels: &[(&str, &str)]) -> Histogram {
    r.register_histogram(&key(name, labels), &META)
}

fn gauge(r: &PrometheusRecorder, name: &'static str, labels: &[(&str, &str)]) -> Gauge {
    r.register_gauge(&key(name, labels), &META)
}

fn counter(r: &PrometheusRecorder, name: &'static str, labels: &[(&str, &str)]) -> Counter {
    r.register_counter(&key(name, labels), &META)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_histograms_show_in_the_exposition() {
        let m = Metrics::new();
        let stats = Stats::default();
        Stats::add(&stats.applied, 3);
        m.handled("order", "1.0.0")
            .record(Outcome::Applied, Duration::from_millis(4));
        m.relay_rows.record(20.0);
        let scraped = Scraped {
            queued_requests: 2,
            held_queries: 0,
            guest_instances_in_use: 0,
            guest_instances_max: 64,
            outbox_rows: 5,
            outbox_oldest_ms: 1500,
            dead_letters: vec![("payment".into(), 1)],
        };
        let text = m.render(&stats, &scraped);
        assert!(
            text.contains("saga_events_total{outcome=\"applied\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("saga_handler_duration_seconds_bucket{service=\"order\",version=\"1.0.0\",outcome=\"applied\",le=\"0.005\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("saga_relay_transaction_rows_bucket{le=\"20\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("saga_outbox_oldest_age_seconds 1.5"),
            "{text}"
        );
        assert!(
            text.contains("saga_dead_letters{topic=\"payment\"} 1"),
            "{text}"
        );
        assert!(text.contains("# TYPE saga_events_total counter"), "{text}");
    }
}
