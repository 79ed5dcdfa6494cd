//! The commit half of the event path: a batch's verdicts in one database transaction, each
//! event in its own savepoint (inbox record, the expiry and ledger fences, effects or a dead
//! letter), and the consumer positions advanced with them.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::{closed_reason, Item, Verdict, Worker};
use crate::effects;
use crate::kafka::dead_letter::{self, headers as dlt_headers};
use crate::limits;
use crate::registry::{Service, Step};
use crate::stats::Stats;
use crate::storage::{self, inbox, ledger, outbox};
use crate::wasm::bindings::Event;

impl Worker {
    /// Commit a batch's verdicts in one transaction. Returns the indices deferred by a conflict.
    pub(super) async fn commit(
        &self,
        service: &Arc<Service>,
        items: &[Item<'_>],
        verdicts: &[Verdict],
    ) -> Result<Vec<usize>, storage::Error> {
        let mut tx = self.shared.db.begin().await?;
        let mut blocked: HashSet<(&str, i32)> = HashSet::new();
        let mut deferred = Vec::new();
        // Positions move with the effects: per partition, past every event handled here (a
        // deferred event blocks the rest of its partition, so those form a prefix).
        let mut next: HashMap<(&str, i32), i64> = HashMap::new();
        let (mut applied, mut duplicates, mut dead, mut expired, mut ignored) = (0, 0, 0, 0, 0);
        let mut refused = 0;
        // State keys the batch wrote, for the held queries that read them (`crate::watch`).
        let mut written: Vec<&str> = Vec::new();
        let handled = self
            .shared
            .metrics
            .handled(service.name(), service.version());
        // One `commit` span per event, ending when the batch's transaction does.
        let mut spans = Vec::with_capacity(items.len());
        // How long the sagas whose deadline the batch cancelled ran (ms).
        let mut settled = Vec::new();
        for (i, (item, verdict)) in items.iter().zip(verdicts).enumerate() {
            let lane = (item.record.topic.as_str(), item.record.partition);
            if blocked.contains(&lane) {
                deferred.push(i);
                continue;
            }
            if verdict.waits() {
                continue; // its partition is held: neither it nor what follows commits
            }
            let span = tracing::info_span!(parent: &item.span, "commit", saga.outcome = tracing::field::Empty);
            let outcome = self
                .commit_one(&mut tx, service, item, verdict, &mut settled)
                .await;
            if let Ok(o) = &outcome {
                let name = o.map_or("duplicate", inbox::Outcome::as_str);
                span.record("saga.outcome", name);
            }
            spans.push(span);
            if let Ok(o) = &outcome {
                handled.record(metric_outcome(*o), item.taken.elapsed());
            }
            if outcome.is_ok() {
                next.insert(lane, item.record.offset + 1);
                // A step released from a hold is handled: its compensations need not wait.
                if let Some(saga) = item.saga().filter(|_| item.first_attempt > 1) {
                    storage::held::release(&mut tx, &self.service, saga).await?;
                }
            }
            if let (
                Ok(Some(inbox::Outcome::Applied | inbox::Outcome::Compensated)),
                Verdict::Apply(c),
            ) = (&outcome, verdict)
            {
                written.extend(c.output.writes.iter().map(|w| w.key.as_str()));
            }
            match outcome {
                Ok(Some(inbox::Outcome::Applied | inbox::Outcome::Compensated)) => applied += 1,
                Ok(Some(inbox::Outcome::DeadLettered)) => dead += 1,
                Ok(Some(inbox::Outcome::Expired)) => expired += 1,
                Ok(Some(inbox::Outcome::Ignored)) => ignored += 1,
                Ok(None) => duplicates += 1,
                Err(storage::Error::Conflict { .. }) => {
                    Stats::add(&self.shared.stats.conflicts, 1);
                    blocked.insert(lane);
                    deferred.push(i);
                }
                // Retrying cannot help this event, and must not stop the ones behind it.
                Err(e) if e.refuses_data() => {
                    self.refuse(&mut tx, service, item, &e).await?;
                    next.insert(lane, item.record.offset + 1);
                    refused += 1;
                }
                Err(e) => return Err(e),
            }
        }
        for ((topic, partition), offset) in next {
            storage::offsets::advance(&mut tx, &self.service, topic, partition, offset).await?;
        }
        tx.commit().await?;
        drop(spans);
        let metrics = &self.shared.metrics;
        metrics.sagas_ended(service.name(), "settled", &settled);
        self.shared.changes.committed(&self.service, written);
        let stats = &self.shared.stats;
        Stats::add(&stats.applied, applied);
        Stats::add(&stats.duplicates, duplicates);
        Stats::add(&stats.dead_lettered, dead);
        Stats::add(&stats.expired, expired);
        Stats::add(&stats.ignored, ignored);
        Stats::add(&stats.refused, refused);
        if applied + dead + refused > 0 {
            self.shared.relay.wake();
        }
        let sets_deadlines = verdicts
            .iter()
            .any(|v| matches!(v, Verdict::Apply(c) if !c.output.set_deadlines.is_empty()));
        if sets_deadlines {
            self.shared.deadline_wake.notify_one();
        }
        Ok(deferred)
    }

    /// One event inside its own savepoint. `Ok(None)`: it was a duplicate.
    async fn commit_one(
        &self,
        tx: &mut storage::Tx,
        service: &Service,
        item: &Item<'_>,
        verdict: &Verdict,
        settled: &mut Vec<i64>,
    ) -> Result<Option<inbox::Outcome>, storage::Error> {
        use sqlx::Connection as _;
        let now_ms = self.shared.clock.now_ms();
        let id = item.inbox_id();
        let handled = self.entry(service, item, &id, now_ms);
        let saga = handled.saga;
        if matches!(verdict, Verdict::Duplicate) {
            if !saga.is_empty() {
                inbox::note(tx, &handled, inbox::Attempt::Duplicate).await?;
            }
            return Ok(None);
        }
        let mut sp = tx.begin().await?;
        let (outcome, detail) = match (verdict, &item.event) {
            (Verdict::Apply(_), Ok(event)) => {
                self.fence(&mut sp, service, item.saga(), event, &id, now_ms)
                    .await?
            }
            (Verdict::DeadLetter { reason, .. }, _) => {
                (inbox::Outcome::DeadLettered, Some(reason.clone()))
            }
            (Verdict::Expired { reason }, _) => (inbox::Outcome::Expired, Some(reason.clone())),
            (Verdict::Ignored { reason }, _) => (inbox::Outcome::Ignored, Some(reason.clone())),
            _ => (inbox::Outcome::Applied, None),
        };
        let entry = inbox::Entry {
            outcome,
            detail: detail.as_deref(),
            ..handled.clone()
        };
        if !inbox::record(&mut sp, &entry, item.redrive).await? {
            sp.rollback().await?;
            if !saga.is_empty() {
                inbox::note(tx, &handled, inbox::Attempt::Duplicate).await?;
            }
            return Ok(None);
        }
        let result = match (verdict, outcome) {
            (Verdict::Apply(called), inbox::Outcome::Applied | inbox::Outcome::Compensated) => {
                let trace = crate::telemetry::carried(&item.span);
                let ctx = effects::Context {
                    kafka: &self.shared.config.kafka,
                    now_ms,
                    cause_deadline_ms: item.event.as_ref().ok().and_then(|e| e.deadline_ms),
                    saga_deadline_ms: self.shared.saga_deadline_ms(service),
                    cause_id: &id,
                    trace: &trace,
                };
                effects::apply(&mut sp, &ctx, service, &called.reads, &called.output).await
            }
            (Verdict::DeadLetter { reason, attempts }, _) => {
                let message = self.dead_letter(service, item, &id, reason, *attempts);
                let inserted = outbox::insert(&mut sp, &message, now_ms).await;
                inserted.map(|()| effects::Applied::default())
            }
            _ => Ok(effects::Applied::default()),
        };
        match result {
            Ok(applied) => {
                sp.commit().await?;
                settled.extend(applied.settled_ms);
                Ok(Some(outcome))
            }
            Err(e) => {
                sp.rollback().await?;
                Err(e)
            }
        }
    }

    /// The in-commit half of the expiry and ledger checks for an event the guest handled, as
    /// row writes that the deadline firing (`storage::sagas`) and the saga's other steps at this
    /// service (`storage::ledger`) also write, so whichever commits second sees the first.
    async fn fence(
        &self,
        conn: &mut storage::Conn,
        service: &Service,
        saga: Option<&str>,
        event: &Event,
        id: &str,
        now_ms: i64,
    ) -> Result<(inbox::Outcome, Option<String>), storage::Error> {
        let step = service.step(&event.topic, &event.type_);
        let Some(saga) = saga.filter(|_| step != Step::Deadline) else {
            return Ok((inbox::Outcome::Applied, None));
        };
        if step == Step::Forward && event.deadline_ms.is_some() {
            if let Some(at) = storage::sagas::step(conn, saga, now_ms).await? {
                let reason = format!(
                    "its saga expired {} ms before this step committed",
                    now_ms - at
                );
                return Ok((inbox::Outcome::Expired, Some(reason)));
            }
        }
        if !service.keeps_ledger() {
            return Ok((inbox::Outcome::Applied, None)); // nothing can ever close its sagas
        }
        let name = service.name();
        let verdict = match step {
            Step::Compensation => ledger::compensate(conn, name, saga, id, now_ms).await?,
            _ => ledger::forward(conn, name, saga, now_ms).await?,
        };
        Ok(match verdict {
            ledger::Verdict::Closed { by } => {
                (inbox::Outcome::Ignored, Some(closed_reason(step, &by)))
            }
            ledger::Verdict::Apply { tombstone } if step == Step::Compensation => (
                inbox::Outcome::Compensated,
                tombstone.then(|| "tombstone: no forward step of this saga before it".to_string()),
            ),
            ledger::Verdict::Apply { .. } => (inbox::Outcome::Applied, None),
        })
    }

    /// Set aside an event whose statements the database refused (its own savepoint was rolled
    /// back): dead-lettered under its record's coordinates, so nothing of its own data has to
    /// be stored but the record itself, and with the database's reason.
    async fn refuse(
        &self,
        tx: &mut storage::Tx,
        service: &Service,
        item: &Item<'_>,
        error: &storage::Error,
    ) -> Result<(), storage::Error> {
        use sqlx::Connection as _;
        let r = item.record;
        tracing::warn!(
            service = service.name(), topic = %r.topic, partition = r.partition, offset = r.offset,
            "the database refused an event; dead-lettering it: {error}"
        );
        let now_ms = self.shared.clock.now_ms();
        let id = format!("kafka:{}:{}:{}", r.topic, r.partition, r.offset);
        let reason = limits::sanitize(
            &format!("the database refused to store this event: {error}"),
            limits::REASON_BYTES,
        );
        let entry = inbox::Entry {
            service: service.name(),
            event_id: &id,
            saga: "",
            event_type: "",
            topic: self.shared.config.kafka.logical(&r.topic),
            outcome: inbox::Outcome::DeadLettered,
            detail: Some(&reason),
            version: service.version(),
            handled_ms: now_ms,
        };
        let mut sp = tx.begin().await?;
        if inbox::record(&mut sp, &entry, false).await? {
            let message = self.dead_letter(service, item, &id, &reason, 0);
            outbox::insert(&mut sp, &message, now_ms).await?;
        }
        sp.commit().await?;
        Ok(())
    }

    /// The record as it arrived, to `<topic>.dlt`, with why and where from in headers. What
    /// came from outside is sanitised (`limits::sanitize`): a hostile record's headers must
    /// not make its own dead letter unstorable or unpublishable.
    fn dead_letter(
        &self,
        service: &Service,
        item: &Item<'_>,
        id: &str,
        reason: &str,
        attempts: u32,
    ) -> outbox::Message {
        let kafka = &self.shared.config.kafka;
        let r = &item.record;
        let mut budget = self.shared.config.limits.event_headers_bytes;
        let mut headers: Vec<(String, String)> = Vec::with_capacity(r.headers.len() + 6);
        for (k, v) in &r.headers {
            let k = limits::sanitize(k, budget);
            let v = limits::sanitize(&String::from_utf8_lossy(v), budget - k.len());
            if k.is_empty() || k.len() + v.len() >= budget {
                break; // the rest would not fit: the payload and our headers matter more
            }
            budget -= k.len() + v.len();
            headers.push((k, v));
        }
        headers.extend([
            (
                dlt_headers::REASON.to_string(),
                limits::sanitize(reason, limits::REASON_BYTES),
            ),
            (dlt_headers::ATTEMPTS.to_string(), attempts.to_string()),
            (dlt_headers::SERVICE.to_string(), service.name().to_string()),
            (
                dlt_headers::TOPIC.to_string(),
                kafka.logical(&r.topic).to_string(),
            ),
            (dlt_headers::PARTITION.to_string(), r.partition.to_string()),
            (dlt_headers::OFFSET.to_string(), r.offset.to_string()),
        ]);
        outbox::Message {
            event_id: id.to_string(),
            topic: kafka.topic(&dead_letter::topic(kafka.logical(&r.topic))),
            key: limits::sanitize(
                &String::from_utf8_lossy(r.key.as_deref().unwrap_or_default()),
                self.shared.config.limits.id_bytes,
            ),
            headers,
            payload: r.payload.clone(),
        }
    }
}

/// How the handler-duration metric labels an inbox outcome (`None`: a duplicate).
fn metric_outcome(o: Option<inbox::Outcome>) -> crate::metrics::Outcome {
    use crate::metrics::Outcome as M;
    match o {
        None => M::Duplicate,
        Some(inbox::Outcome::Applied) => M::Applied,
        Some(inbox::Outcome::Compensated) => M::Compensated,
        Some(inbox::Outcome::DeadLettered) => M::DeadLettered,
        Some(inbox::Outcome::Expired) => M::Expired,
        Some(inbox::Outcome::Ignored) => M::Ignored,
    }
}
