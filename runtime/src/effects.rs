//! Applying a handler's effects: state writes (checked against what it read), outbox rows of
//! the events it emits (CloudEvents, with the saga deadline carried along) and deadlines, all
//! on the caller's transaction. Used for events (worker) and commands (ingress) alike.

use crate::kafka::{cloudevents, Settings};
use crate::registry::Service;
use crate::storage::{self, deadlines, outbox, Conn};
use crate::wasm::bindings::Effects;
use crate::wasm::ReadSet;

/// Refuse effects the host cannot carry out, before anything is written. The reason is
/// permanent: re-running the same handler on the same input gives the same effects.
pub fn validate(service: &Service, fx: &Effects) -> Result<(), String> {
    if let Some(emit) = fx.emits.iter().find(|e| !service.publishes(&e.topic)) {
        return Err(format!(
            "handler emitted {} to topic {:?}, which service {} does not declare in `publishes`",
            emit.type_,
            emit.topic,
            service.name()
        ));
    }
    if let Some(emit) = fx.emits.iter().find(|e| e.subject.is_empty()) {
        return Err(format!(
            "handler emitted {} without a subject (saga id)",
            emit.type_
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
    /// Deadline for `after-ms: none` (`Shared::saga_deadline_ms`).
    pub saga_deadline_ms: u64,
    /// The id of the causing event or request, recorded with deadlines it sets.
    pub cause_id: &'a str,
}

pub async fn apply(
    conn: &mut Conn,
    ctx: &Context<'_>,
    service: &Service,
    reads: &ReadSet,
    fx: &Effects,
) -> Result<(), storage::Error> {
    storage::state::apply(conn, service.name(), reads, &fx.writes).await?;
    let due = |after: Option<u64>| ctx.now_ms + after.unwrap_or(ctx.saga_deadline_ms) as i64;
    for d in &fx.cancel_deadlines {
        deadlines::cancel(conn, service.name(), &d.subject, &d.name).await?;
    }
    for d in &fx.set_deadlines {
        storage::sagas::open(conn, &d.subject).await?;
        deadlines::set(
            conn,
            service.name(),
            &d.subject,
            &d.name,
            due(d.after_ms),
            ctx.cause_id,
        )
        .await?;
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
        );
        outbox::insert(conn, &message, ctx.now_ms).await?;
    }
    Ok(())
}
