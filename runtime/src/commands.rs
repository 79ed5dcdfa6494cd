//! The commits of HTTP commands, grouped. A command whose handler returned effects hands them
//! to [`Handle::commit`] and waits for the answer. One loop takes the commands that queued
//! while the commits before them ran and commits each service's share in one transaction
//! ("group commit"): one `BEGIN` and `COMMIT` (one WAL flush on PostgreSQL, one turn of the
//! SQLite write gate) and one outbox statement for all of them, and on PostgreSQL their
//! reads checked in memory and their state written in two statements (`state::Staged`), as a
//! batch of events is. Under load each command costs a fraction of the five round trips it
//! made alone; a command that arrives when nothing is queued commits alone at once, as before.
//!
//! On PostgreSQL a group none of whose commands runs a statement before its end (none continues
//! a saga, which its fence reads) — `POST`s that start sagas, with or without an
//! `Idempotency-Key` — ends in one statement without a transaction, as a batch of events does
//! (`storage::end::write_alone`): its versions checked in that statement instead of locked
//! first, and its replies stored there only where no live reply is stored under their keys; one
//! round trip where the transaction takes four or more (`BEGIN`, the keys' lock, a statement
//! per reply, the end, `COMMIT`). If that statement finds a version not as read or a key
//! answered meanwhile, nothing of it is written, and the group is committed in a transaction,
//! which tells them apart. Two commands of a group with one key go to the transaction at once.
//!
//! A group is all or nothing. A command whose reads another command of the group (or any
//! commit since its handler read them) changed is answered [`Error::Conflict`] and re-run by
//! its request, the rest commit. Anything else that only one command's own transaction could
//! undo — a fence that refuses it, its `Idempotency-Key` answered meanwhile, a statement the
//! database refuses, a key another transaction created first — rolls the group back, and each
//! of its commands is committed alone, where that is told apart and answered as before.

use std::collections::HashSet;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::clock::Clock;
use crate::config::Config;
use crate::effects;
use crate::registry::Service;
use crate::stats::Stats;
use crate::storage::{self, door, idempotency, ledger, outbox, sagas, state, Db, Error};
use crate::wasm::bindings::Effects;
use crate::wasm::ReadSet;

/// Commands committed together at most (in one transaction per service).
const GROUP_MAX: usize = 64;
/// Group transactions in flight at once: a command that arrives while one commits need not
/// wait for it, and the next group gathers meanwhile.
const IN_FLIGHT: usize = 2;
/// Commands queued for a commit at most; a request waits for room (the door bounds them
/// anyway: one per admitted command).
const QUEUED_MAX: usize = 1024;

/// A command's effects, ready to commit.
pub struct Command {
    pub service: Arc<Service>,
    /// What its handler read, with the versions it saw.
    pub reads: ReadSet,
    pub effects: Effects,
    /// Its `context.new-id`: the saga it may start.
    pub new_id: String,
    /// The time its handler was given.
    pub now_ms: i64,
    /// Trace context of the request's span (`telemetry::carried`).
    pub trace: Vec<(String, String)>,
    /// The reply to store under its `Idempotency-Key`, with the key.
    pub retry: Option<(String, idempotency::Stored)>,
}

/// What became of a command.
#[derive(Debug)]
pub enum Committed {
    Done,
    /// Another request with its `Idempotency-Key` committed first: nothing was written.
    Answered,
    /// It continues a saga that expired or was compensated here (`409`): nothing was written.
    Refused(String),
}

/// What the commits need of the instance.
pub struct Context {
    pub db: Db,
    pub clock: Arc<dyn Clock>,
    pub config: Arc<Config>,
    /// Told the keys each commit wrote (held queries).
    pub changes: Arc<crate::watch::Changes>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Told when the earliest deadline a commit set is due.
    pub deadline_alarm: Arc<crate::deadline::Alarm>,
    /// Woken after a commit that wrote outbox rows.
    pub relay: crate::relay::Handle,
    /// Counts the groups (`command_groups`, `grouped_commands`).
    pub stats: Arc<crate::stats::Stats>,
}

/// The way to the commit loop.
#[derive(Clone)]
pub struct Handle {
    queue: mpsc::Sender<Ticket>,
}

struct Ticket {
    command: Command,
    answer: oneshot::Sender<Result<Committed, Error>>,
}

impl Handle {
    /// Start the commit loop (a task that ends when the last handle is dropped).
    pub fn start(ctx: Context) -> Handle {
        let (queue, queued) = mpsc::channel(QUEUED_MAX);
        let ctx = Arc::new(ctx);
        tokio::spawn(crate::grouped::serve(
            queued,
            IN_FLIGHT,
            GROUP_MAX,
            move |group| {
                let ctx = ctx.clone();
                async move { commit_group(&ctx, group).await }
            },
        ));
        Handle { queue }
    }

    /// Commit `command`'s effects, with other commands' or alone.
    pub async fn commit(&self, command: Command) -> Result<Committed, Error> {
        let (answer, answered) = oneshot::channel();
        let stopped = || Error::Stopped("the command commit loop");
        let ticket = Ticket { command, answer };
        self.queue.send(ticket).await.map_err(|_| stopped())?;
        answered.await.map_err(|_| stopped())?
    }
}

/// Commit a group: each service's share in a transaction of its own.
async fn commit_group(ctx: &Context, mut group: Vec<Ticket>) {
    while !group.is_empty() {
        let name = group[0].command.service.name().to_string();
        let (share, rest): (Vec<Ticket>, Vec<Ticket>) = group
            .into_iter()
            .partition(|t| t.command.service.name() == name);
        group = rest;
        commit_share(ctx, share).await;
    }
}

/// One service's commands: together if there are several (or one, on PostgreSQL, where a
/// transaction's end in one statement, `storage::end`, saves a round trip per kind of effect)
/// and nothing needs one undone, else each alone.
async fn commit_share(ctx: &Context, share: Vec<Ticket>) {
    if share.len() > 1 || ctx.db.dialect() == storage::Dialect::Postgres {
        let commands: Vec<&Command> = share.iter().map(|t| &t.command).collect();
        match together(ctx, &commands).await {
            Together::Committed(outcomes) => {
                let stats = &ctx.stats;
                if share.len() > 1 {
                    let grouped = outcomes.iter().filter(|o| o.is_ok()).count() as u64;
                    Stats::add(&stats.command_groups, 1);
                    Stats::add(&stats.grouped_commands, grouped);
                }
                for (ticket, outcome) in share.into_iter().zip(outcomes) {
                    let answer = outcome.map(|applied| {
                        settle(ctx, &ticket.command, applied);
                        Committed::Done
                    });
                    let _ = ticket.answer.send(answer); // a request that gave up
                }
                return;
            }
            // The commit's outcome is unknown: committing again could apply them twice.
            Together::Failed(e) => {
                for ticket in share {
                    let _ = ticket.answer.send(Err(Error::CommitUnknown(e.to_string())));
                }
                return;
            }
            Together::Undone => {}
        }
    }
    for ticket in share {
        let answer = alone(ctx, &ticket.command).await;
        let _ = ticket.answer.send(answer);
    }
}

/// What a group's transaction came to.
enum Together {
    /// Committed: each command's effects, or the [`Error::Conflict`] of one whose reads had
    /// changed (nothing of it was written).
    Committed(Vec<Result<effects::Applied, Error>>),
    /// Rolled back before its commit: commit each command alone.
    Undone,
    /// The commit itself failed.
    Failed(Error),
}

/// A service's commands in one statement (see the module doc) or in one transaction.
async fn together(ctx: &Context, commands: &[&Command]) -> Together {
    let one_statement = ctx.db.dialect() == storage::Dialect::Postgres
        && commands
            .iter()
            .all(|c| !continues_a_saga(&c.effects, &c.new_id))
        && idempotency::keys_differ(&replies(commands));
    if one_statement {
        match attempt(ctx, commands, true).await {
            Together::Undone => Stats::add(&ctx.stats.command_ends_undone, 1),
            done => {
                if matches!(done, Together::Committed(_)) {
                    Stats::add(&ctx.stats.command_ends_alone, 1);
                }
                return done;
            }
        }
    }
    attempt(ctx, commands, false).await
}

/// [`together`] in one statement without a transaction (`one_statement`), or in a
/// transaction.
async fn attempt(ctx: &Context, commands: &[&Command], one_statement: bool) -> Together {
    let now_ms = ctx.clock.now_ms();
    let tried = async {
        let service = &commands[0].service;
        let mut tx = match one_statement {
            true => storage::Tx::detached(storage::Dialect::Postgres),
            false => ctx.db.begin().await?,
        };
        // On PostgreSQL, reads checked and writes gathered in memory: in one statement, at the
        // versions the handlers read (checked by the end's statement); else against rows
        // locked in key order (as a batch of events does, so the two never wait in a circle).
        let mut staged = None;
        if one_statement {
            staged = Some(state::Staged::assuming(service.name(), now_ms));
        } else if tx.dialect() == storage::Dialect::Postgres {
            let keys = state::touched(commands.iter().map(|c| (&c.reads, &c.effects.writes[..])));
            let locked = state::lock(&mut tx, service.name(), &keys).await?;
            staged = Some(state::Staged::new(service.name(), locked, now_ms));
        }
        let mut outcomes = Vec::with_capacity(commands.len());
        let mut emitted = Vec::new();
        let mut deadlines = Vec::new();
        // Keys the commands before wrote: one that read such a key read it before they did.
        let mut written: HashSet<&str> = HashSet::new();
        for command in commands {
            let read_written = command
                .reads
                .0
                .keys()
                .find(|k| written.contains(k.as_str()));
            let conflict = match (&staged, read_written) {
                (Some(staged), _) => staged.check(&command.reads).err(),
                (None, Some(key)) => Some(Error::Conflict {
                    service: service.name().to_string(),
                    key: key.clone(),
                }),
                (None, None) => None,
            };
            if let Some(conflict) = conflict {
                outcomes.push(Err(conflict));
                continue;
            }
            written.extend(command.effects.writes.iter().map(|w| w.key.as_str()));
            // In one statement: no fence (it continues no saga), its reply stored at the end.
            if !one_statement {
                match steps(ctx, &mut tx, command).await? {
                    Committed::Done => {}
                    Committed::Answered | Committed::Refused(_) => return Ok(None),
                }
            }
            let mut applied = apply(ctx, &mut tx, command, (staged.as_mut(), true)).await?;
            emitted.append(&mut applied.emitted);
            deadlines.append(&mut applied.deadlines);
            outcomes.push(Ok(applied));
        }
        let opened = match staged {
            // Its state, deadlines and events in one statement.
            Some(staged) => {
                let replies: Vec<idempotency::Keyed<'_>> = match one_statement {
                    true => replies(commands),
                    false => Vec::new(), // stored by `steps`
                };
                let earliest = commands.iter().map(|c| c.now_ms).min().unwrap_or(now_ms);
                let end = storage::end::End {
                    service: service.name(),
                    steps: &[],
                    state: staged,
                    deadlines: &deadlines,
                    emitted: &emitted,
                    consumer: service.name(),
                    positions: &[],
                    replies: &replies,
                    replies_since_ms: ctx.config.retention.idempotency_since(earliest),
                };
                let written = match one_statement {
                    true => {
                        let mut conn = ctx.db.pool().acquire().await?;
                        let written = storage::end::write_alone(&mut conn, end).await;
                        // Refused by the database: nothing was written. Anything else: the
                        // statement may have committed.
                        written.map_err(|e| match e.refused_by_database() {
                            true => e,
                            false => Error::CommitUnknown(e.to_string()),
                        })?
                    }
                    false => storage::end::write(&mut tx, end).await?,
                };
                match written {
                    Ok(opened) => opened,
                    // A version not as read, a key created meanwhile: in a transaction, or
                    // each alone.
                    Err(_) => return Ok(None),
                }
            }
            None => {
                let opened = storage::deadlines::apply_all(&mut tx, &deadlines, now_ms).await?;
                outbox::insert_all(&mut tx, &emitted).await?;
                opened
            }
        };
        Ok::<_, Error>(Some((tx, outcomes, opened)))
    };
    match tried.await {
        Ok(Some((tx, outcomes, opened))) => match tx.commit().await {
            Ok(()) => {
                // The sagas whose deadlines the group cancelled: how long each ran.
                let ran: Vec<i64> = opened.iter().map(|at| now_ms - at).collect();
                let name = commands[0].service.name();
                ctx.metrics.sagas_ended(name, "settled", &ran);
                Together::Committed(outcomes)
            }
            Err(e) => Together::Failed(e),
        },
        Err(e @ Error::CommitUnknown(_)) => Together::Failed(e),
        Ok(None) | Err(_) => Together::Undone, // dropped: rolled back
    }
}

/// A command alone in its transaction, as it always was.
async fn alone(ctx: &Context, command: &Command) -> Result<Committed, Error> {
    let mut tx = ctx.db.begin().await?;
    match steps(ctx, &mut tx, command).await? {
        Committed::Done => {}
        other => {
            tx.rollback().await?;
            return Ok(other);
        }
    }
    let applied = apply(ctx, &mut tx, command, (None, false)).await?;
    outbox::insert_all(&mut tx, &applied.emitted).await?;
    tx.commit().await?;
    settle(ctx, command, applied);
    Ok(Committed::Done)
}

/// A command's fences and its idempotency record: `Done` if its effects may follow.
async fn steps(ctx: &Context, tx: &mut storage::Tx, command: &Command) -> Result<Committed, Error> {
    let service = &command.service;
    if let Some(refused) = fence(
        tx,
        service,
        &command.effects,
        &command.new_id,
        command.now_ms,
    )
    .await?
    {
        return Ok(Committed::Refused(refused));
    }
    if let Some((key, reply)) = &command.retry {
        let since = ctx.config.retention.idempotency_since(command.now_ms);
        let stored =
            idempotency::store(tx, service.name(), key, reply, command.now_ms, since).await?;
        if !stored {
            return Ok(Committed::Answered);
        }
    }
    Ok(Committed::Done)
}

/// A command's effects on `tx`, its events returned; its state written to `staged` if given
/// and, in a group, its deadlines returned too (`effects::Applied::deadlines`).
async fn apply(
    ctx: &Context,
    tx: &mut storage::Tx,
    command: &Command,
    (staged, grouped): (Option<&mut state::Staged>, bool),
) -> Result<effects::Applied, Error> {
    let service = &command.service;
    let fx_ctx = effects::Context {
        kafka: &ctx.config.kafka,
        now_ms: command.now_ms,
        cause_deadline_ms: None,
        saga_deadline_ms: service.saga_deadline_ms(&ctx.config),
        cause_id: &command.new_id,
        trace: &command.trace,
        defer_deadlines: grouped,
    };
    let reads = (&command.reads, staged);
    effects::apply(tx, &fx_ctx, service, reads, &command.effects).await
}

/// After a command committed: held queries, the saga metric, the deadline scheduler, the relay.
fn settle(ctx: &Context, command: &Command, applied: effects::Applied) {
    let name = command.service.name();
    let written = command.effects.writes.iter().map(|w| w.key.as_str());
    ctx.changes.committed(name, written);
    ctx.metrics
        .sagas_ended(name, "settled", &applied.settled_ms);
    if let Some(due) = applied.earliest_due_ms {
        ctx.deadline_alarm.set(due);
    }
    if !command.effects.emits.is_empty() {
        ctx.relay.wake();
    }
}

/// The replies `commands` store under their `Idempotency-Key`s.
fn replies<'c>(commands: &[&'c Command]) -> Vec<idempotency::Keyed<'c>> {
    commands
        .iter()
        .filter_map(|c| {
            c.retry.as_ref().map(|(key, reply)| idempotency::Keyed {
                key,
                reply,
                now_ms: c.now_ms,
            })
        })
        .collect()
}

/// Whether a command continues a saga: emits an event `fx` of a saga other than the one it
/// may start (`new_id`).
fn continues_a_saga(fx: &Effects, new_id: &str) -> bool {
    fx.emits.iter().any(|e| e.subject != new_id)
}

/// The sagas a command continues ([`continues_a_saga`]), each once.
fn continuing<'f>(fx: &'f Effects, new_id: &str) -> Vec<&'f str> {
    let mut continued: Vec<&str> = fx
        .emits
        .iter()
        .map(|e| e.subject.as_str())
        .filter(|s| *s != new_id)
        .collect();
    continued.sort_unstable();
    continued.dedup();
    continued
}

/// The fences of events, for commands: a command that continues a saga (emits an event of a
/// saga other than the one it starts) is refused if that saga expired — a firing marked it,
/// or a deadline of it is due — or was compensated at this service. Checked inside the
/// commit, as row writes the firing and the compensation also write, like an event's step.
async fn fence(
    conn: &mut storage::Conn,
    service: &Service,
    fx: &Effects,
    new_id: &str,
    now_ms: i64,
) -> Result<Option<String>, Error> {
    for saga in continuing(fx, new_id) {
        let fired = sagas::step(conn, saga, now_ms).await?;
        let ask = door::Ask {
            now_ms,
            timed: &[saga],
            ..door::Ask::default()
        };
        let due = door::read(conn, &ask).await?.expiry.remove(saga).flatten();
        if let Some(at) = fired.or(due) {
            return Ok(Some(format!(
                "saga {saga} expired {} ms ago; the command was not applied",
                now_ms - at
            )));
        }
        if service.keeps_ledger() {
            if let ledger::Verdict::Closed { by } =
                ledger::forward(conn, service.name(), saga, now_ms).await?
            {
                return Ok(Some(format!(
                    "saga {saga} was compensated here by event {by}; the command was not applied"
                )));
            }
        }
    }
    Ok(None)
}
