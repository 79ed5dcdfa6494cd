//! Deciding an event: the guest's call under the subscription's failure policy, after the
//! door checks (expiry, the ledger, held steps of the saga). Host faults are retried here
//! without counting an attempt; the handler's own failures count and end in a dead letter or a
//! hold.

use super::*;
use futures::StreamExt as _;
use tracing::Instrument as _;

/// Calls of one partition's events running at once, at most, where their order does not
/// matter (see `Worker::decide_all`).
const CHAIN_CALLS: usize = 8;

impl Worker {
    /// Run the guests of a batch: partitions concurrently. A partition whose subscription
    /// blocks runs its events in order, since a failing one holds the rest. Any other runs
    /// up to [`CHAIN_CALLS`] of its events' calls at once: only the door holds such a
    /// partition (a compensation waiting for a held step), and what the door says needs no
    /// call, so the events behind a hold are known before any call starts. Guests read
    /// committed state either way: an event never sees the uncommitted effects of one before
    /// it in its batch (until `super::chain` runs it again on them), and the commit checks
    /// what each read.
    pub(super) async fn decide_all(
        &self,
        service: &Arc<Service>,
        items: &[Item<'_>],
        door: &Door,
        holds: &Holds,
    ) -> Option<Vec<Verdict>> {
        let mut by_partition: HashMap<(&str, i32), Vec<usize>> = HashMap::new();
        for (i, item) in items.iter().enumerate() {
            by_partition
                .entry((&item.record.topic, item.record.partition))
                .or_default()
                .push(i);
        }
        let lanes = by_partition
            .into_iter()
            .map(|((topic, _), indices)| async move {
                let logical = self.ctx.config.kafka.logical(topic);
                let in_order = service.policy(logical) == FailurePolicy::Blocking;
                let mut out = Vec::with_capacity(indices.len());
                let mut calls = Vec::new();
                let mut held = false;
                for i in indices {
                    let item = &items[i];
                    let verdict = if held {
                        Verdict::Behind
                    } else if item.duplicate(door.seen.get(&item.inbox_id())) {
                        Verdict::Duplicate
                    } else if let Some(verdict) = self.at_door(service, item, door, holds) {
                        verdict
                    } else if !in_order {
                        calls.push(i);
                        continue;
                    } else {
                        let called = self.decide_call(service, item, door);
                        called.instrument(item.span.clone()).await?
                    };
                    held = verdict.waits();
                    out.push((i, verdict));
                }
                let called = futures::stream::iter(calls.into_iter().map(|i| {
                    let called = self.decide_call(service, &items[i], door);
                    async move { (i, called.instrument(items[i].span.clone()).await) }
                }))
                .buffer_unordered(CHAIN_CALLS)
                .collect::<Vec<_>>()
                .await;
                for (i, verdict) in called {
                    out.push((i, verdict?));
                }
                Some(out)
            });
        let mut verdicts: Vec<Option<Verdict>> = (0..items.len()).map(|_| None).collect();
        for lane in futures::future::join_all(lanes).await {
            for (i, verdict) in lane? {
                verdicts[i] = Some(verdict);
            }
        }
        verdicts.into_iter().collect()
    }

    /// What the door decides for an event without calling its handler (`None`: call it).
    fn at_door(
        &self,
        service: &Service,
        item: &Item<'_>,
        door: &Door,
        holds: &Holds,
    ) -> Option<Verdict> {
        let event = match &item.event {
            Ok(event) => event,
            Err(malformed) => {
                return Some(Verdict::DeadLetter {
                    reason: format!("malformed event: {malformed}"),
                    attempts: 0,
                })
            }
        };
        // Expiry and the ledger, first half: at the door. (The second half is in `commit_one`.)
        let step = service.step(&event.topic, &event.type_);
        if step != Step::Deadline {
            if let Some(by) = item.saga().and_then(|saga| door.closed.get(saga)) {
                return Some(Verdict::Ignored {
                    reason: closed_reason(step, by),
                });
            }
        }
        if let Some(carried) = event.deadline_ms.filter(|_| step == Step::Forward) {
            // The stored deadlines decide (one cancelled or moved since this event was emitted
            // is honoured); only a saga the database knows none of goes by the carried one.
            let now = self.ctx.clock.now_ms();
            let stored = item.saga().and_then(|saga| door.expiry.get(saga));
            let expired_at = match stored {
                Some(stored) => *stored,
                None => Some(carried).filter(|&d| d <= now),
            };
            if let Some(at) = expired_at {
                return Some(Verdict::Expired {
                    reason: format!("arrived {} ms after its saga deadline", now - at),
                });
            }
        }
        if step == Step::Compensation {
            let now = tokio::time::Instant::now();
            let at_least = Duration::from_millis(self.ctx.config.worker.retry_backoff_ms);
            if let Some(until) = item.saga().and_then(|saga| holds.step_pending(saga, now)) {
                return Some(Verdict::Held {
                    attempt: 0,
                    retry_in: until.duration_since(now).max(at_least),
                });
            }
            // Held on another instance (or here, before a restart).
            if let Some(&until) = item.saga().and_then(|saga| door.held.get(saga)) {
                // Look again soon: the row goes as soon as the step is handled over there.
                let left = (until - self.ctx.clock.now_ms()).max(0) as u64;
                let cap = self.ctx.config.worker.max_backoff_ms;
                return Some(Verdict::Held {
                    attempt: 0,
                    retry_in: Duration::from_millis(left.min(cap)).max(at_least),
                });
            }
        }
        None
    }

    /// The handler's call for an event the door let through, under the subscription's
    /// failure policy. `None` if stopping interrupted the retries.
    async fn decide_call(
        &self,
        service: &Arc<Service>,
        item: &Item<'_>,
        door: &Door,
    ) -> Option<Verdict> {
        let Ok(event) = &item.event else {
            unreachable!("the door decides a malformed event");
        };
        let policy = service.policy(&event.topic);
        let mut attempt = item.first_attempt;
        let mut host_faults = 0;
        let scope = effects::Scope {
            saga: item.saga(),
            new_id: &item.new_id,
        };
        // The door's read-ahead serves the first run only: a run again after a failure or a
        // host fault reads what is committed by then.
        let mut ahead = Some(door);
        loop {
            let started = std::time::Instant::now();
            let called = self.call(service, item, event, attempt, ahead.take(), None);
            let failure = match called.await {
                Ok(called) => {
                    if let Some(learned) = &self.ahead {
                        let read = called.reads.0.keys().map(String::as_str);
                        learned.learn(&event.topic, &event.type_, &event.subject, read);
                    }
                    let limits = &self.ctx.config.limits;
                    match effects::validate(limits, service, scope, &called.output) {
                        Ok(()) => return Some(Verdict::Apply(called, attempt)),
                        Err(reason) => Failure::Reject(reason),
                    }
                }
                Err(failure) => failure,
            };
            if failure.is_host() {
                // Not the handler's attempt: wait and run it again, whatever the policy.
                host_faults += 1;
                Stats::add(&self.ctx.stats.host_faults, 1);
                tracing::warn!(
                    service = %self.service, event = %event.id, attempt, "{failure}; retrying"
                );
                if !self.pause(self.backoff(host_faults)).await {
                    return None;
                }
                continue;
            }
            Stats::add(&self.ctx.stats.failures, 1);
            let handled = self.ctx.metrics.handled(service.name(), service.version());
            handled.record(crate::metrics::Outcome::Failed, started.elapsed());
            tracing::warn!(
                service = %self.service, event = %event.id, attempt, "handler failed: {failure}"
            );
            self.note_failure(service, item, attempt, &failure).await;
            let exhausted = match policy {
                FailurePolicy::DeadLetter(max) => attempt >= max.max(1),
                FailurePolicy::Blocking => false,
            };
            if failure.is_permanent() || exhausted {
                return Some(Verdict::DeadLetter {
                    reason: failure.to_string(),
                    attempts: attempt,
                });
            }
            if policy == FailurePolicy::Blocking {
                return Some(Verdict::Held {
                    attempt,
                    retry_in: self.backoff(attempt),
                });
            }
            if !self.pause(self.backoff(attempt)).await {
                return None;
            }
            attempt += 1;
        }
    }

    /// One call of an event's handler. Its state reads: the keys `door` read ahead from its
    /// answer, then what `chained` holds on top (a re-run of `super::chain`).
    pub(super) async fn call(
        &self,
        service: &Arc<Service>,
        item: &Item<'_>,
        event: &Event,
        attempt: u32,
        door: Option<&Door>,
        chained: Option<&super::chain::Overlay>,
    ) -> Result<Called<Effects>, Failure> {
        let ctx = bindings::Context {
            now_ms: self.ctx.clock.now_ms(),
            attempt,
            new_id: item.new_id.clone(),
        };
        let waited = std::time::Instant::now();
        let slot = service.guest.slots().admit().await?;
        self.ctx
            .metrics
            .guest_wait
            .record(waited.elapsed().as_secs_f64());
        let span =
            crate::telemetry::guest_span(&item.span, service.name(), service.version(), attempt);
        let host = &self.ctx;
        // Keys read ahead at the door come from its answer (`ahead`).
        let reader: Arc<dyn StateReader> = match door.filter(|d| !d.state.is_empty()) {
            None => host.reader.clone(),
            Some(door) => Arc::new(super::ahead::Ahead {
                service: service.name().to_string(),
                read: door.state.clone(),
                inner: host.reader.clone(),
                stats: host.stats.clone(),
            }),
        };
        let reader: Arc<dyn StateReader> = match chained {
            None => reader,
            Some(overlay) => Arc::new(super::chain::Chained {
                service: service.name().to_string(),
                overlay: overlay.clone(),
                inner: reader,
            }),
        };
        let called = async {
            if !host.recordings.enabled() {
                return service.guest.on_event(&slot, reader, &ctx, event).await;
            }
            let recorder = Arc::new(Recorder::new(reader));
            let called = service
                .guest
                .on_event(&slot, recorder.clone(), &ctx, event)
                .await;
            if let Ok(called) = &called {
                let recording = Recording {
                    event: event.clone(),
                    ctx,
                    tape: recorder.take(),
                    effects: called.output.clone(),
                    version: service.version().to_string(),
                };
                host.recordings.add(service.name(), recording);
            }
            called
        };
        called.instrument(span).await
    }

    /// Put a failed attempt on the saga's timeline. Best effort: the timeline is for people,
    /// and a database that is down now fails the commit, which is retried anyway.
    async fn note_failure(
        &self,
        service: &Service,
        item: &Item<'_>,
        attempt: u32,
        failure: &Failure,
    ) {
        if item.saga().is_none() {
            return;
        }
        let detail = format!("attempt {attempt}: {failure}");
        let id = item.inbox_id();
        let entry = inbox::Entry {
            detail: Some(&detail),
            ..self.entry(service, item, &id, self.ctx.clock.now_ms())
        };
        let noted = async {
            let _gate = self.ctx.db.write_gate().await;
            let mut conn = self.ctx.db.pool().acquire().await?;
            inbox::note(&mut conn, &entry, inbox::Attempt::Failed).await
        };
        if let Err(e) = noted.await {
            tracing::debug!(service = %self.service, "failed attempt not on the timeline: {e}");
        }
    }
}
