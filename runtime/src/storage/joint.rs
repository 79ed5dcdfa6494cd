//! Several data-modifying statements sent to PostgreSQL as one: each part becomes one or more
//! `WITH` entries of a single statement, its parameters renumbered after the parts before it.
//! A batch's commit on PostgreSQL (`crate::worker`) writes its saga steps, state, deadlines,
//! outbox rows and consumer positions so: one round trip where each kind of row took one.
//!
//! The parts run on one snapshot and cannot see each other's rows, so they must touch disjoint
//! rows (PostgreSQL does not define which of two changes of one row in one statement wins):
//! each caller joins only parts that do, and runs the others statement by statement.
//!
//! What the caller checks is checked in the same statement: counts that must come out as
//! expected ([`Joint::expect`]; otherwise the statement fails, nothing of it is written, and
//! [`run`](Joint::run) answers [`Unexpected`]), and values it reads ([`Joint::answer`]). The
//! checks failing the statement itself (`saga_expect`, `migrations/postgres/0025`) let a joint
//! run without a transaction around it, as a batch's whole end (`crate::worker`).

use super::sql::{Query, Value};
use super::{Conn, Error};

/// The statement being built.
#[derive(Default)]
pub struct Joint {
    /// The `WITH` entries so far, comma separated.
    with: String,
    args: Vec<Value>,
    /// Per answer: the `SELECT` of one `BIGINT` column that yields it, and the count it must
    /// come to, if it is a check.
    answers: Vec<(String, Option<i64>)>,
}

/// Which of a joint's answers ([`Joint::answer`]).
#[derive(Debug, Clone, Copy)]
pub struct Answer(usize);

/// What a joint statement read back, per [`Answer`].
#[derive(Debug)]
pub struct Answers(Vec<Vec<Option<i64>>>);

impl Answers {
    pub fn get(&self, answer: Answer) -> &[Option<i64>] {
        &self.0[answer.0]
    }
}

/// A count that [`Joint::expect`]ed one did not come out so: a step, a row or a key is not as
/// the batch found it, and its transaction must be rolled back.
#[derive(Debug)]
pub struct Unexpected(pub String);

impl Joint {
    pub fn new() -> Self {
        Joint::default()
    }

    /// Add `part`: one or more `name AS (…)` entries, its parameters `$1`, `$2`, … bound in
    /// order. Names must differ from every other part's.
    pub(super) fn with(&mut self, part: Query<'_>) {
        let (sql, args) = part.into_parts();
        if !self.with.is_empty() {
            self.with.push_str(", ");
        }
        renumber(sql, self.args.len(), &mut self.with);
        self.args.extend(args);
    }

    /// Read what `select` (one `BIGINT` column, over the entries added) yields.
    pub(super) fn answer(&mut self, select: &str) -> Answer {
        self.answers.push((select.to_string(), None));
        Answer(self.answers.len() - 1)
    }

    /// Check that `select` (one row, one `BIGINT` column, over the entries added) yields
    /// `count`.
    pub(super) fn expect(&mut self, select: &str, count: usize) {
        self.answers.push((select.to_string(), Some(count as i64)));
    }

    /// Send the statement on `conn`. `Ok(Err(Unexpected))`: a check failed, and the statement
    /// with it (a transaction around it must be rolled back).
    pub async fn run(mut self, conn: &mut Conn) -> Result<Result<Answers, Unexpected>, Error> {
        let mut sql = String::with_capacity(self.with.len() + 64 * self.answers.len() + 64);
        if !self.with.is_empty() {
            sql.push_str("WITH ");
            sql.push_str(&self.with);
            sql.push(' ');
        }
        if self.answers.is_empty() {
            sql.push_str("SELECT CAST(NULL AS BIGINT) AS answer, CAST(NULL AS BIGINT) AS v");
        }
        for (i, (select, count)) in self.answers.iter().enumerate() {
            if i > 0 {
                sql.push_str(" UNION ALL ");
            }
            sql.push_str(&match count {
                // The count bound, not written into the text: one statement shape (one
                // `Parse` and plan per connection) for any count.
                Some(count) => {
                    self.args.push(Value::Int(*count));
                    let n = self.args.len();
                    format!(
                        "SELECT CAST({i} AS BIGINT) AS answer, \
                         saga_expect(CAST(({select}) AS BIGINT), CAST(${n} AS BIGINT), {i}) AS v"
                    )
                }
                None => format!(
                    "SELECT CAST({i} AS BIGINT) AS answer, CAST(a.v AS BIGINT) AS v \
                     FROM ({select}) AS a(v)"
                ),
            });
        }
        let mut query = super::query(&sql);
        for arg in std::mem::take(&mut self.args) {
            query = query.bind_value(arg);
        }
        let rows = match query.fetch_all(&mut *conn).await {
            Ok(rows) => rows,
            Err(e) => {
                return match failed_check(&e) {
                    Some(message) => Ok(Err(Unexpected(self.explain(message)))),
                    None => Err(e),
                }
            }
        };
        let mut answers = vec![Vec::new(); self.answers.len()];
        for row in rows {
            let Some(i) = row.try_get::<Option<i64>, _>("answer")? else {
                continue;
            };
            let slot = answers
                .get_mut(i as usize)
                .ok_or_else(|| Error::Corrupt(format!("joint answer {i} was not asked")))?;
            slot.push(row.try_get::<Option<i64>, _>("v")?);
        }
        Ok(Ok(Answers(answers)))
    }

    /// `message` (`saga_expect`'s) with the check it names.
    fn explain(&self, message: &str) -> String {
        let which = message
            .split_whitespace()
            .nth(2)
            .and_then(|n| n.parse::<usize>().ok())
            .and_then(|n| self.answers.get(n));
        match which {
            Some((select, _)) => format!("{select}: {message}"),
            None => message.to_string(),
        }
    }
}

/// `saga_expect`'s message, if `e` is a check of a joint that failed.
fn failed_check(e: &Error) -> Option<&str> {
    let Error::Sql(sqlx::Error::Database(db)) = e else {
        return None;
    };
    (db.code().as_deref() == Some(CHECK_FAILED)).then(|| db.message())
}

/// The SQLSTATE `saga_expect` fails a statement with.
const CHECK_FAILED: &str = "SG001";

/// `rows` as a JSON array: a part's rows in one parameter, which its entries read with
/// `json_to_recordset(CAST($n AS json)) AS v(column type, …)`, so that one statement shape
/// serves every row count (each shape is parsed and planned once per connection, and a batch's
/// end with its counts padded to powers of two had ~200 shapes at 128 bench clients).
pub(super) fn json<T: serde::Serialize>(rows: &[T]) -> String {
    serde_json::to_string(rows).expect("rows of strings and numbers serialise")
}

/// Bytes as the hex digits a part's JSON carries them in, read back with
/// `decode(…, 'hex')`.
pub(super) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(2 * bytes.len());
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 15)] as char);
    }
    out
}

/// Append `sql` to `out` with each parameter `$n` as `$(n + by)`.
fn renumber(sql: &str, by: usize, out: &mut String) {
    let mut rest = sql;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        match after[..digits].parse::<usize>() {
            Ok(n) => out.push_str(&format!("${}", n + by)),
            Err(_) => out.push('$'),
        }
        rest = &after[digits..];
    }
    out.push_str(rest);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_are_renumbered_after_the_parts_before() {
        let mut out = String::new();
        renumber("a AS (SELECT $1, $10 WHERE x = $2)", 3, &mut out);
        assert_eq!(out, "a AS (SELECT $4, $13 WHERE x = $5)");
        let mut out = String::new();
        renumber("no parameters, a lone $ sign", 7, &mut out);
        assert_eq!(out, "no parameters, a lone $ sign");
    }
}
