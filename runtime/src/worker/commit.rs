//! The commit half of the event path: a batch's verdicts in one database transaction, each
//! event in its own savepoint (inbox record, the expiry and ledger fences, effects or a dead
//! letter), and the consumer positions advanced with them.

use std::collections::HashMap;
use std::sync::Arc;

use super::blocked::Blocked;
use super::{closed_reason, Item, Verdict, Worker};
use crate::effects;
use crate::kafka::dead_letter::{self, headers as dlt_headers};
use crate::limits;
use crate::registry::{Service, Step};
use crate::stats::Stats;
use crate::storage::{self, inbox, ledger, outbox};
use crate::wasm::bindings::Event;

/// How the events of a batch are kept apart inside its transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isolation {
    /// No transaction (PostgreSQL): everything the batch writes goes into its end's one
    /// statement, which checks the state versions the handlers read instead of locking them
    /// first (`storage::state::Staged::assuming`) — one round trip where `Batch` takes four
    /// (BEGIN, the keys' lock, the end, COMMIT). Only for batches whose every event is a saga
    /// step the end records ([`Worker::joins_alone`]); a version not as read, or anything else
    /// unexpected, fails the statement whole, and the batch is committed again `Batch`.
    Alone,
    /// No savepoints: two statements fewer per event. Anything that would undo one event's
    /// statements (a conflict, a duplicate found late, a refusal, any error) undoes the whole
    /// attempt instead, and the batch is committed again `PerEvent`.
    Batch,
    /// A savepoint per event, so one event's conflict or duplicate undoes only its own.
    PerEvent,
}

/// A `Batch` attempt met something only a savepoint could undo: nothing of it was committed.
struct Undo;

/// What an event's statements came to.
enum Steps {
    /// Recorded with this outcome (and its effects applied, if any).
    Done(inbox::Outcome, effects::Applied),
    /// The inbox already had it (another instance, since the door check).
    Duplicate,
}

impl Worker {
    /// Commit the verdicts of a batch's events `subset` (indices into `items`, in order) in
    /// one transaction. Returns the indices deferred by a conflict.
    ///
    /// Most batches meet no conflict, late duplicate or refusal, so the batch is first
    /// committed without a savepoint per event (`Isolation::Batch`: two statements fewer per
    /// event, each a round trip on PostgreSQL); one that does is rolled back and committed
    /// again with them.
    pub(super) async fn commit(
        &self,
        service: &Arc<Service>,
        items: &[Item<'_>],
        verdicts: &[Verdict],
        subset: &[usize],
    ) -> Result<Vec<usize>, storage::Error> {
        // A `commit` span per event that reaches its commit (made once, whichever attempt
        // gets there first), ending when the batch's transaction does.
        let mut spans: Vec<Option<tracing::Span>> = vec![None; items.len()];
        let mut isolation = match self.joins_alone(service, items, verdicts, subset) {
            true => Isolation::Alone,
            false => Isolation::Batch,
        };
        loop {
            let attempt = self
                .commit_as(isolation, service, items, verdicts, subset, &mut spans)
                .await;
            match attempt {
                Ok(Ok(deferred)) => return Ok(deferred),
                Ok(Err(Undo)) => {}
                // A statement before the end: `joins_alone` let through an event it should
                // not have. Nothing was written; the transaction's way still works.
                Err(storage::Error::Detached) if isolation == Isolation::Alone => {
                    tracing::warn!(service = %self.service, "a one-statement commit met a statement before its end; committing in a transaction");
                }
                Err(e) => return Err(e),
            }
            isolation = match isolation {
                Isolation::Alone => {
                    Stats::add(&self.ctx.stats.ends_undone, 1);
                    Isolation::Batch
                }
                Isolation::Batch => {
                    Stats::add(&self.ctx.stats.recommits, 1);
                    Isolation::PerEvent
                }
                Isolation::PerEvent => unreachable!("a PerEvent attempt is not undone"),
            };
        }
    }

    /// Whether the commit of `subset` can be one statement without a transaction
    /// ([`Isolation::Alone`]): on PostgreSQL, when every event that commits is a first
    /// handling of a saga step, so that its record, fences and effects all go into the
    /// batch's end.
    fn joins_alone(
        &self,
        service: &Service,
        items: &[Item<'_>],
        verdicts: &[Verdict],
        subset: &[usize],
    ) -> bool {
        if self.ctx.db.dialect() != storage::Dialect::Postgres {
            return false;
        }
        subset.iter().all(|&i| {
            let item = &items[i];
            match (&verdicts[i], &item.event) {
                (v, _) if v.waits() => true,
                (Verdict::Apply(..), Ok(event)) => {
                    !item.redrive && item.first_attempt <= 1 && step_kind(service, event).is_some()
                }
                _ => false,
            }
        })
    }

    async fn commit_as(
        &self,
        isolation: Isolation,
        service: &Arc<Service>,
        items: &[Item<'_>],
        verdicts: &[Verdict],
        subset: &[usize],
        spans: &mut [Option<tracing::Span>],
    ) -> Result<Result<Vec<usize>, Undo>, storage::Error> {
        let mut tx = match isolation {
            Isolation::Alone => storage::Tx::detached(storage::Dialect::Postgres),
            _ => self.ctx.db.begin().await?,
        };
        // A batch on PostgreSQL checks reads and gathers writes in memory (`Batched`).
        let mut batched = None;
        if isolation == Isolation::Alone {
            let now_ms = self.ctx.clock.now_ms();
            batched = Some(Batched {
                state: storage::state::Staged::assuming(service.name(), now_ms),
                steps: Vec::new(),
            });
        } else if tx.dialect() == storage::Dialect::Postgres {
            // Locked first and in key order: a transaction committing at the same time
            // (another lane, another instance) that shares keys with this one waits for it
            // instead of deadlocking with it.
            let calls = subset.iter().filter_map(|&i| match &verdicts[i] {
                Verdict::Apply(c, _) => Some((&c.reads, &c.output.writes[..])),
                _ => None,
            });
            let keys = storage::state::touched(calls);
            let locked = storage::state::lock(&mut tx, service.name(), &keys).await?;
            if isolation == Isolation::Batch {
                let now_ms = self.ctx.clock.now_ms();
                batched = Some(Batched {
                    state: storage::state::Staged::new(service.name(), locked, now_ms),
                    steps: Vec::new(),
                });
            }
        }
        // Per partition, what its deferred events hold back of the events behind them.
        let mut blocked: HashMap<(&str, i32), Blocked<'_>> = HashMap::new();
        let mut deferred = Vec::new();
        // Positions move with the effects: per partition, past every event handled here, but
        // never past its first deferred event (the events after it that commit now are
        // found in the inbox if they are read again).
        let mut next: HashMap<(&str, i32), i64> = HashMap::new();
        let (mut applied, mut duplicates, mut dead, mut expired, mut ignored) = (0, 0, 0, 0, 0);
        let mut refused = 0;
        // State keys the batch wrote, for the held queries that read them (`crate::watch`).
        let mut written: Vec<&str> = Vec::new();
        // Each committed event's outcome, recorded (metrics, spans) once the batch commits.
        let mut outcomes = Vec::with_capacity(subset.len());
        // How long the sagas whose deadline the batch cancelled ran, when the earliest
        // deadline it set is due, and the events it emits (a `Batch` attempt inserts them in
        // one statement after its last event).
        let mut done = effects::Applied::default();
        for &i in subset {
            let (item, verdict) = (&items[i], &verdicts[i]);
            let lane = (item.record.topic.as_str(), item.record.partition);
            if let Some(b) = blocked.get_mut(&lane) {
                if b.holds_back(item, verdict) {
                    b.add(item, verdict);
                    deferred.push(i);
                    continue;
                }
            }
            if verdict.waits() {
                continue; // its partition is held: neither it nor what follows commits
            }
            spans[i].get_or_insert_with(|| {
                tracing::info_span!(parent: &item.span, "commit", saga.outcome = tracing::field::Empty)
            });
            let conflict = match (&batched, verdict) {
                (Some(b), Verdict::Apply(c, _)) => b.state.check(&c.reads).err(),
                _ => None,
            };
            let outcome = match conflict {
                // It read what an event before it in this transaction wrote: deferred with
                // nothing written for it, so nothing needs undoing.
                Some(conflict) => Err(conflict),
                None => {
                    let one = self.commit_one(
                        &mut tx,
                        isolation,
                        batched.as_mut(),
                        service,
                        item,
                        verdict,
                        &mut done,
                    );
                    match (isolation, one.await) {
                        (_, Ok(Ok(o))) => Ok(o),
                        (Isolation::Alone, Err(storage::Error::Detached)) => {
                            return Err(storage::Error::Detached)
                        }
                        (Isolation::Alone | Isolation::Batch, Ok(Err(Undo)) | Err(_)) => {
                            return Ok(Err(Undo))
                        }
                        (Isolation::PerEvent, Ok(Err(Undo))) => {
                            unreachable!("a savepoint undoes it")
                        }
                        (Isolation::PerEvent, Err(e)) => Err(e),
                    }
                }
            };
            if let Ok(o) = &outcome {
                outcomes.push((i, *o));
                next.insert(lane, item.record.offset + 1);
                // A step released from a hold is handled: its compensations need not wait.
                if let Some(saga) = item.saga().filter(|_| item.first_attempt > 1) {
                    storage::held::release(&mut tx, &self.service, saga).await?;
                }
            }
            if let (
                Ok(Some(inbox::Outcome::Applied | inbox::Outcome::Compensated)),
                Verdict::Apply(c, _),
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
                    Stats::add(&self.ctx.stats.conflicts, 1);
                    blocked
                        .entry(lane)
                        .or_insert_with(|| Blocked::at(item.record.offset))
                        .add(item, verdict);
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
        let positions: Vec<(&str, i32, i64)> = next
            .into_iter()
            .map(|((t, p), o)| (t, p, blocked.get(&(t, p)).map_or(o, |b| o.min(b.first))))
            .collect();
        match batched {
            Some(batched) => {
                let ops = std::mem::take(&mut done.deadlines);
                let now_ms = batched.state.now_ms();
                let end = storage::end::End {
                    service: service.name(),
                    steps: &batched.steps,
                    state: batched.state,
                    deadlines: &ops,
                    emitted: &done.emitted,
                    consumer: &self.service,
                    positions: &positions,
                    replies: &[],
                    replies_since_ms: 0,
                };
                let written = match isolation {
                    Isolation::Alone => {
                        let mut conn = self.ctx.db.pool().acquire().await?;
                        storage::end::write_alone(&mut conn, end).await
                    }
                    _ => storage::end::write(&mut tx, end).await,
                };
                match written {
                    Ok(Ok(opened)) => done.settled_ms.extend(opened.iter().map(|at| now_ms - at)),
                    // Committed again with a savepoint per event, which tells what it was.
                    Ok(Err(_)) | Err(_) => return Ok(Err(Undo)),
                }
            }
            None => {
                outbox::insert_all(&mut tx, &done.emitted).await?;
                storage::offsets::advance(&mut tx, &self.service, &positions).await?;
            }
        }
        tx.commit().await?;
        if isolation == Isolation::Alone {
            Stats::add(&self.ctx.stats.ends_alone, 1);
        }
        let handled = self.ctx.metrics.handled(service.name(), service.version());
        for (i, o) in outcomes {
            if let Some(span) = &spans[i] {
                span.record(
                    "saga.outcome",
                    o.map_or("duplicate", inbox::Outcome::as_str),
                );
            }
            handled.record(metric_outcome(o), items[i].taken.elapsed());
        }
        let metrics = &self.ctx.metrics;
        metrics.sagas_ended(service.name(), "settled", &done.settled_ms);
        self.ctx.changes.committed(&self.service, written);
        let stats = &self.ctx.stats;
        Stats::add(&stats.applied, applied);
        Stats::add(&stats.duplicates, duplicates);
        Stats::add(&stats.dead_lettered, dead);
        Stats::add(&stats.expired, expired);
        Stats::add(&stats.ignored, ignored);
        Stats::add(&stats.refused, refused);
        if applied + dead + refused > 0 {
            self.ctx.relay.wake();
        }
        if let Some(due) = done.earliest_due_ms {
            self.ctx.deadline_alarm.set(due);
        }
        Ok(Ok(deferred))
    }

    /// One event, inside its own savepoint (`PerEvent`) or not (`Batch`: whatever would undo
    /// it is an `Undo`). `Ok(Ok(None))`: it was a duplicate.
    #[allow(clippy::too_many_arguments)]
    async fn commit_one(
        &self,
        tx: &mut storage::Tx,
        isolation: Isolation,
        batched: Option<&mut Batched>,
        service: &Service,
        item: &Item<'_>,
        verdict: &Verdict,
        done: &mut effects::Applied,
    ) -> Result<Result<Option<inbox::Outcome>, Undo>, storage::Error> {
        let now_ms = self.ctx.clock.now_ms();
        let id = item.inbox_id();
        let handled = self.entry(service, item, &id, now_ms);
        let saga = handled.saga;
        if matches!(verdict, Verdict::Duplicate) {
            if !saga.is_empty() {
                inbox::note(tx, &handled, inbox::Attempt::Duplicate).await?;
            }
            return Ok(Ok(None));
        }
        let steps = match isolation {
            Isolation::Alone | Isolation::Batch => {
                self.steps(tx, batched, service, item, verdict, &handled)
                    .await
            }
            Isolation::PerEvent => {
                let mut sp = tx.savepoint().await?;
                let mut steps = self
                    .steps(&mut sp, None, service, item, verdict, &handled)
                    .await;
                // Its events in its savepoint, so that undoing the event undoes them too.
                if let Ok(Steps::Done(_, applied)) = &mut steps {
                    let emitted = std::mem::take(&mut applied.emitted);
                    if let Err(e) = outbox::insert_all(&mut sp, &emitted).await {
                        steps = Err(e);
                    }
                }
                match &steps {
                    Ok(Steps::Done(..)) => sp.commit().await?,
                    _ => sp.rollback().await?,
                }
                steps
            }
        };
        match (steps?, isolation) {
            (Steps::Done(outcome, applied), _) => {
                done.absorb(applied);
                Ok(Ok(Some(outcome)))
            }
            (Steps::Duplicate, Isolation::Alone | Isolation::Batch) => Ok(Err(Undo)),
            (Steps::Duplicate, Isolation::PerEvent) => {
                if !saga.is_empty() {
                    inbox::note(tx, &handled, inbox::Attempt::Duplicate).await?;
                }
                Ok(Ok(None))
            }
        }
    }

    /// An event's statements on `conn`: the fences, its inbox record, then its effects (or
    /// its dead letter). Nothing here is undone: the caller decides. With `batched` (a batch
    /// on PostgreSQL), a forward step's fences and record and every state write are left to
    /// the batch's end (`storage::end::write`).
    async fn steps(
        &self,
        conn: &mut storage::Conn,
        mut batched: Option<&mut Batched>,
        service: &Service,
        item: &Item<'_>,
        verdict: &Verdict,
        handled: &inbox::Entry<'_>,
    ) -> Result<Steps, storage::Error> {
        let id = handled.event_id;
        let now_ms = handled.handled_ms;
        let step = match (verdict, &item.event, batched.as_deref_mut()) {
            (Verdict::Apply(..), Ok(event), Some(b)) if !item.redrive => {
                saga_step(service, event, handled).map(|(step, outcome)| {
                    b.steps.push(step);
                    outcome
                })
            }
            _ => None,
        };
        let outcome = match step {
            // Left to the batch's end: applied (compensated) as the door found it, which
            // `storage::end::write` checks still holds.
            Some(outcome) => outcome,
            None => {
                let (outcome, detail) = match (verdict, &item.event) {
                    (Verdict::Apply(..), Ok(event)) => {
                        self.fence(conn, service, item.saga(), event, id, now_ms)
                            .await?
                    }
                    (Verdict::DeadLetter { reason, .. }, _) => {
                        (inbox::Outcome::DeadLettered, Some(reason.clone()))
                    }
                    (Verdict::Expired { reason }, _) => {
                        (inbox::Outcome::Expired, Some(reason.clone()))
                    }
                    (Verdict::Ignored { reason }, _) => {
                        (inbox::Outcome::Ignored, Some(reason.clone()))
                    }
                    _ => (inbox::Outcome::Applied, None),
                };
                let entry = inbox::Entry {
                    outcome,
                    detail: detail.as_deref(),
                    ..handled.clone()
                };
                if !inbox::record(conn, &entry, item.redrive).await? {
                    return Ok(Steps::Duplicate);
                }
                outcome
            }
        };
        let applied = match (verdict, outcome) {
            (Verdict::Apply(called, _), inbox::Outcome::Applied | inbox::Outcome::Compensated) => {
                let trace = crate::telemetry::carried(&item.span);
                let ctx = effects::Context {
                    kafka: &self.ctx.config.kafka,
                    now_ms,
                    cause_deadline_ms: item.event.as_ref().ok().and_then(|e| e.deadline_ms),
                    saga_deadline_ms: service.saga_deadline_ms(&self.ctx.config),
                    cause_id: id,
                    trace: &trace,
                    // A batch on PostgreSQL sets and cancels its deadlines at its end.
                    defer_deadlines: batched.is_some(),
                };
                let staged = batched.map(|b| &mut b.state);
                effects::apply(conn, &ctx, service, (&called.reads, staged), &called.output).await?
            }
            (Verdict::DeadLetter { reason, attempts }, _) => {
                let message = self.dead_letter(service, item, id, reason, *attempts);
                effects::Applied {
                    emitted: vec![(message, now_ms)],
                    ..Default::default()
                }
            }
            _ => effects::Applied::default(),
        };
        Ok(Steps::Done(outcome, applied))
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
                tombstone.then(|| ledger::TOMBSTONE.to_string()),
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
        let r = item.record;
        tracing::warn!(
            service = service.name(), topic = %r.topic, partition = r.partition, offset = r.offset,
            "the database refused an event; dead-lettering it: {error}"
        );
        let now_ms = self.ctx.clock.now_ms();
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
            topic: self.ctx.config.kafka.logical(&r.topic),
            outcome: inbox::Outcome::DeadLettered,
            detail: Some(&reason),
            version: service.version(),
            handled_ms: now_ms,
        };
        let mut sp = tx.savepoint().await?;
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
        let kafka = &self.ctx.config.kafka;
        let r = &item.record;
        let mut budget = self.ctx.config.limits.event_headers_bytes;
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
                self.ctx.config.limits.id_bytes,
            ),
            headers,
            payload: r.payload.clone(),
        }
    }
}

/// What a batch on PostgreSQL leaves to its end (`storage::end`): its state writes, checked
/// in memory, and its saga steps' fences and inbox records.
struct Batched {
    state: storage::state::Staged,
    steps: Vec<storage::step::Step>,
}

/// A forward step or a compensation of a saga, to record with the batch's others
/// (`storage::step`), with the outcome it is recorded with; `None` for any other event (and
/// for a compensation at a service without a ledger), recorded statement by statement
/// (`fence`, then the record).
fn saga_step(
    service: &Service,
    event: &Event,
    handled: &inbox::Entry<'_>,
) -> Option<(storage::step::Step, inbox::Outcome)> {
    use storage::step::Kind;
    let kind = step_kind(service, event)?;
    let outcome = match kind {
        Kind::Forward => inbox::Outcome::Applied,
        Kind::Compensation => inbox::Outcome::Compensated,
    };
    let step = storage::step::Step {
        kind,
        event_id: handled.event_id.to_string(),
        saga: handled.saga.to_string(),
        event_type: handled.event_type.to_string(),
        topic: handled.topic.to_string(),
        version: handled.version.to_string(),
        handled_ms: handled.handled_ms,
        timed: kind == Kind::Forward && event.deadline_ms.is_some(),
        ledger: service.keeps_ledger(),
    };
    Some((step, outcome))
}

/// Which kind of saga step `event` is at `service`, if one recorded with the batch's others:
/// a forward step, or a compensation at a service that keeps a ledger; `None` also for an
/// event without a saga.
fn step_kind(service: &Service, event: &Event) -> Option<storage::step::Kind> {
    use storage::step::Kind;
    if event.subject.is_empty() {
        return None;
    }
    match service.step(&event.topic, &event.type_) {
        Step::Forward => Some(Kind::Forward),
        Step::Compensation if service.keeps_ledger() => Some(Kind::Compensation),
        _ => None,
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
