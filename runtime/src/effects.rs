//! Applying a handler's effects: state writes (checked against what it read), outbox rows of
//! the events it emits (CloudEvents, with the saga deadline carried along) and deadlines, all
//! on the caller's transaction. Used for events (worker) and commands (ingress) alike.

use crate::kafka::{cloudevents, Settings};
use crate::limits;
use crate::registry::{self, Service};
use crate::storage::{self, deadlines, outbox, Conn};
use crate::wasm::bindings::Effects;
use crate::wasm::ReadSet;

/// What a handler call may touch besides its own state: the saga of the event it handles (none
/// for a request) and the saga it may start (its `context.new-id`).
#[derive(Debug, Clone, Copy)]
pub struct Scope<'a> {
    pub saga: Option<&'a str>,
    pub new_id: &'a str,
}

impl Scope<'_> {
    fn owns(&self, saga: &str) -> bool {
        saga == self.new_id || self.saga == Some(saga)
    }
}

/// Refuse effects the host cannot or must not carry out, before anything is written: over a
/// limit (`crate::limits`), to a topic the service does not declare or that belongs to the host
/// (`*.deadline`, `*.dlt`), or deadlines on a saga outside the call's [`Scope`]. The reason is
/// permanent: re-running the same handler on the same input gives the same effects.
pub fn validate(
    limits: &limits::Settings,
    service: &Service,
    scope: Scope<'_>,
    fx: &Effects,
) -> Result<(), String> {
    limits.effects(fx).map_err(|e| e.to_string())?;
    if let Some(emit) = fx.emits.iter().find(|e| registry::is_host_topic(&e.topic)) {
        return Err(format!(
            "handler emitted {} to {:?}, a topic only the host writes (deadlines and dead letters)",
            emit.type_, emit.topic
        ));
    }
    if let Some(emit) = fx.emits.iter().find(|e| !service.publishes(&e.topic)) {
        return Err(format!(
            "handler emitted {} to topic {:?}, which service {} does not declare in `publishes`",
            emit.type_,
            emit.topic,
            service.name()
        ));
    }
    let subjects = fx
        .set_deadlines
        .iter()
        .map(|d| &d.subject)
        .chain(fx.cancel_deadlines.iter().map(|d| &d.subject));
    if let Some(other) = subjects.into_iter().find(|s| !scope.owns(s)) {
        return Err(format!(
            "handler set or cancelled a deadline of saga {other:?}: a handler may only touch \
             the deadlines of the saga it handles or of the one it starts (context.new-id)"
        ));
    }
    Ok(())
}

/// What the host needs to know besides the effects.
pub struct Context<'a> {
    pub kafka: &'a Settings,
    pub now_ms: i64,
    /// The saga deadline of the causing event, carried to the events emitted for that saga.
    pub cause_deadline_ms: Option<i64>,
    /// Deadline for `after-ms: none` (`Service::saga_deadline_ms`).
    pub saga_deadline_ms: u64,
    /// The id of the causing event or request, recorded with deadlines it sets.
    pub cause_id: &'a str,
    /// Trace context of the span handling the cause (`telemetry::carried`): the events
    /// emitted and the deadlines set are its children.
    pub trace: &'a [(String, String)],
    /// The caller sets and cancels the effects' deadlines (`Applied::deadlines`,
    /// `deadlines::apply_all`) at the end of its transaction, with those of the other handlers
    /// there: a batch of events or a group of commands (deadline rows are written only by such
    /// effects and by the firing, so their order against the other statements does not matter).
    pub defer_deadlines: bool,
}

/// What applying effects ended: how long each saga whose pending deadline they cancelled had
/// run, ms (the saga duration metric, recorded once the transaction commits).
#[derive(Debug, Default)]
pub struct Applied {
    pub settled_ms: Vec<i64>,
    /// When the earliest deadline the effects set is due (for `deadline::Alarm::set`).
    pub earliest_due_ms: Option<i64>,
    /// The events the effects emit (each with its creation time), in order: the caller puts
    /// them into the outbox (`outbox::insert_all`) in the same transaction — a batch's all in
    /// one statement after its last event.
    pub emitted: Vec<(outbox::Message, i64)>,
    /// The deadlines the effects set and cancel, in order, left to the caller
    /// (`Context::defer_deadlines`); the sagas they settle are then the caller's to count.
    pub deadlines: Vec<deadlines::Op>,
}

impl Applied {
    /// Add what another commit's effects did (a batch's events, one after another).
    pub fn absorb(&mut self, other: Applied) {
        self.settled_ms.extend(other.settled_ms);
        self.emitted.extend(other.emitted);
        self.deadlines.extend(other.deadlines);
        if let Some(due) = other.earliest_due_ms {
            self.due(due);
        }
    }

    /// A deadline due at `due_ms` was set.
    fn due(&mut self, due_ms: i64) {
        self.earliest_due_ms = Some(self.earliest_due_ms.map_or(due_ms, |e| e.min(due_ms)));
    }
}

/// Apply a handler's effects on `conn`, but for its emitted events, which the caller inserts
/// (`Applied::emitted`). State writes go to `staged` if given (a batch commit that writes
/// them at its end, its reads already checked there), else straight to `conn`.
pub async fn apply(
    conn: &mut Conn,
    ctx: &Context<'_>,
    service: &Service,
    (reads, staged): (&ReadSet, Option<&mut storage::state::Staged>),
    fx: &Effects,
) -> Result<Applied, storage::Error> {
    let mut applied = Applied::default();
    match staged {
        Some(staged) => staged.stage(reads, &fx.writes),
        None => storage::state::apply(conn, service.name(), reads, &fx.writes, ctx.now_ms).await?,
    }
    // Delays are bounded by `validate` (and the config); saturate anyway, never overflow.
    let due = |after: Option<u64>| {
        let after = after.unwrap_or(ctx.saga_deadline_ms).min(i64::MAX as u64) as i64;
        ctx.now_ms.saturating_add(after)
    };
    for d in &fx.cancel_deadlines {
        if ctx.defer_deadlines {
            applied.deadlines.push(deadlines::Op::Cancel {
                service: service.name().to_string(),
                saga: d.subject.clone(),
                name: d.name.clone(),
            });
            continue;
        }
        if let Some(opened) = deadlines::cancel(conn, service.name(), &d.subject, &d.name).await? {
            applied
                .settled_ms
                .extend(opened.map(|opened| ctx.now_ms - opened));
        }
    }
    for d in &fx.set_deadlines {
        let due_ms = due(d.after_ms);
        applied.due(due_ms);
        let set = deadlines::Set {
            service: service.name().to_string(),
            saga: d.subject.clone(),
            name: d.name.clone(),
            due_ms,
            set_by: ctx.cause_id.to_string(),
            traceparent: crate::telemetry::traceparent(ctx.trace).map(str::to_string),
        };
        match ctx.defer_deadlines {
            true => applied.deadlines.push(deadlines::Op::Set(set)),
            false => deadlines::set(conn, &set, ctx.now_ms).await?,
        }
    }
    for emit in &fx.emits {
        // A deadline set for this saga by the same handler wins over the inherited one.
        let deadline = fx
            .set_deadlines
            .iter()
            .filter(|d| d.subject == emit.subject)
            .map(|d| due(d.after_ms))
            .min()
            .or(ctx.cause_deadline_ms);
        let message = cloudevents::encode(
            service.name(),
            ctx.kafka.topic(&emit.topic),
            uuid::Uuid::now_v7().to_string(),
            emit,
            ctx.now_ms,
            deadline,
            ctx.trace,
        );
        applied.emitted.push((message, ctx.now_ms));
    }
    Ok(applied)
}
