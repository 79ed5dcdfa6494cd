//! The end of a write transaction on PostgreSQL that checked its reads and staged its state in
//! memory (a batch of events, `crate::worker`; a group of commands, `crate::commands`): its
//! saga steps, state, deadlines, outbox rows, consumer positions and commands' stored replies,
//! written in one statement ([`super::joint`]) when they fit, else one statement per kind.

use std::collections::HashSet;

use super::joint::{Answer, Joint, Unexpected};
use super::{deadlines, idempotency, offsets, outbox, state, step, Conn, Error};

/// What a transaction writes at its end.
pub struct End<'e> {
    /// The service whose steps and state these are.
    pub service: &'e str,
    /// Saga steps to record (`step::record_all`): distinct events, and a compensation's saga in
    /// no other step.
    pub steps: &'e [step::Step],
    pub state: state::Staged,
    pub deadlines: &'e [deadlines::Op],
    pub emitted: &'e [(outbox::Message, i64)],
    /// Whose consumer positions `positions` are.
    pub consumer: &'e str,
    pub positions: &'e [(&'e str, i32, i64)],
    /// Commands' replies to store under their `Idempotency-Key`s (distinct keys), each only
    /// if no live reply is stored under its key (else the end is [`Unexpected`]); a reply
    /// stored before `replies_since_ms` has expired.
    pub replies: &'e [idempotency::Keyed<'e>],
    pub replies_since_ms: i64,
}

/// Write `end` on `conn`; when each saga whose deadline it cancelled was opened.
/// `Ok(Err(Unexpected))`: a step that no longer applies as the caller found it (its saga
/// expired or closed since, or the inbox has it), steps that break [`End::steps`]' rule, or a
/// key another transaction created; the transaction must be rolled back (and its work done the
/// statement-by-statement way, which tells what it was).
pub async fn write(conn: &mut Conn, end: End<'_>) -> Result<Result<Vec<i64>, Unexpected>, Error> {
    let (joint, deadlines) = match joint(&end) {
        Ok(Some(joined)) => joined,
        Ok(None) => return apart(conn, end).await,
        Err(broken) => return Ok(Err(broken)),
    };
    Ok(match run(conn, joint, deadlines).await? {
        Ok(Some(opened)) => Ok(opened),
        Ok(None) => Ok(deadlines::apply_all(conn, end.deadlines, end.state.now_ms()).await?),
        Err(unexpected) => Err(unexpected),
    })
}

/// [`write`] as one statement on a connection outside any transaction: all of it is written,
/// or (`Ok(Err(Unexpected))`, and any error) none of it. Also `Unexpected` when it does not
/// fit one statement: nothing was sent, and the caller writes it inside a transaction.
pub async fn write_alone(
    conn: &mut Conn,
    end: End<'_>,
) -> Result<Result<Vec<i64>, Unexpected>, Error> {
    let unfit = || Ok(Err(Unexpected("the end does not fit one statement".into())));
    let (joint, deadlines) = match joint(&end) {
        Ok(Some((_, None))) if !end.deadlines.is_empty() => return unfit(),
        Ok(Some(joined)) => joined,
        Ok(None) => return unfit(),
        Err(broken) => return Ok(Err(broken)),
    };
    Ok(run(conn, joint, deadlines)
        .await?
        .map(Option::unwrap_or_default))
}

/// Run `joint`; when each saga whose deadline it cancelled was opened, if `cancelled` (its
/// deadlines joined) says where that is answered.
async fn run(
    conn: &mut Conn,
    joint: Joint,
    cancelled: Option<Answer>,
) -> Result<Result<Option<Vec<i64>>, Unexpected>, Error> {
    let answered = joint.run(conn).await?;
    Ok(answered.map(|answers| {
        cancelled.map(|answer| answers.get(answer).iter().flatten().copied().collect())
    }))
}

/// `end` joined in one statement, with the answer that yields when each saga whose deadline it
/// cancelled was opened (`None`: its deadlines are not in it). `Ok(None)`: its steps, state,
/// events or positions do not fit one.
fn joint(end: &End<'_>) -> Result<Option<(Joint, Option<Answer>)>, Unexpected> {
    check(end.steps, end.replies)?;
    let now_ms = end.state.now_ms();
    let mut joint = Joint::new();
    let joined = step::join(&mut joint, end.service, now_ms, end.steps)
        && end.state.join(&mut joint)
        && outbox::join_all(&mut joint, end.emitted)
        && offsets::join(&mut joint, end.consumer, end.positions)
        && idempotency::join_all(&mut joint, end.service, end.replies, end.replies_since_ms);
    if !joined {
        return Ok(None);
    }
    // A deadline set for a saga whose expiry row a timed step moves is set apart: the parts of
    // a joint must not write one row twice.
    let timed: HashSet<&str> = end
        .steps
        .iter()
        .filter(|s| s.timed)
        .map(|s| s.saga.as_str())
        .collect();
    let cancelled = match end.deadlines {
        [] => None,
        ops => deadlines::join_all(&mut joint, ops, now_ms, |saga| timed.contains(saga)),
    };
    Ok(Some((joint, cancelled)))
}

/// [`write`] with each kind in its own statement: an end too large for one.
async fn apart(conn: &mut Conn, end: End<'_>) -> Result<Result<Vec<i64>, Unexpected>, Error> {
    let now_ms = end.state.now_ms();
    for r in end.replies {
        let since = end.replies_since_ms;
        if !idempotency::store(conn, end.service, r.key, r.reply, r.now_ms, since).await? {
            return Ok(Err(Unexpected(format!(
                "a reply is stored under Idempotency-Key {:?} already",
                r.key
            ))));
        }
    }
    if !end.steps.is_empty() {
        let stepped = step::record_all(conn, end.service, now_ms, end.steps).await?;
        if let Some(s) = stepped.iter().find(|s| !s.applies()) {
            return Ok(Err(Unexpected(format!(
                "a saga step no longer applies: {s:?}"
            ))));
        }
    }
    match end.state.flush(conn).await {
        Err(Error::Conflict { key, .. }) => {
            return Ok(Err(Unexpected(format!(
                "state key {key:?} was created meanwhile"
            ))))
        }
        flushed => flushed?,
    }
    let opened = deadlines::apply_all(conn, end.deadlines, now_ms).await?;
    outbox::insert_all(conn, end.emitted).await?;
    offsets::advance(conn, end.consumer, end.positions).await?;
    Ok(Ok(opened))
}

/// Whether `steps` keep [`End::steps`]' rule (two copies of one event in one statement would
/// both read as recorded, and one statement cannot write a ledger row twice), and the replies'
/// keys differ.
fn check(steps: &[step::Step], replies: &[idempotency::Keyed<'_>]) -> Result<(), Unexpected> {
    if !idempotency::keys_differ(replies) {
        return Err(Unexpected(
            "an Idempotency-Key twice among the replies".into(),
        ));
    }
    let mut ids: Vec<&str> = steps.iter().map(|s| s.event_id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    if ids.len() != steps.len() {
        return Err(Unexpected("an event twice among the steps".into()));
    }
    let compensated: HashSet<&str> = steps
        .iter()
        .filter(|s| s.kind == step::Kind::Compensation)
        .map(|s| s.saga.as_str())
        .collect();
    let sharing = steps
        .iter()
        .filter(|s| compensated.contains(s.saga.as_str()))
        .count();
    if sharing != compensated.len() {
        return Err(Unexpected(
            "a compensation's saga has another step among them".into(),
        ));
    }
    Ok(())
}
