//! The append transaction: per-stream work first, in parallel with appends to other
//! streams, then the short global serialization point, then `COMMIT`.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgConnection;
use sqlx::{AssertSqlSafe, PgPool};
use uuid::Uuid;

use super::CommitDelays;
use super::rows::corrupt;
use super::rows::{self, StreamRow, get, to_i64, to_u64};
use super::sql::Statements;
use crate::api::{Append, Appended, Deletion, EventStoreError, ExpectedVersion};
use crate::event::StreamName;

/// Where an event id is stored.
#[derive(Debug)]
struct Stored {
    stream: StreamName,
    version: u64,
    position: u64,
}

/// What an append to one stream does, once checked.
#[derive(Debug)]
enum Plan {
    /// An idempotent repeat: nothing to store.
    Repeat(Appended),
    /// New events from `first_version` (none if the append has no events).
    Fresh {
        record: StreamRow,
        first_version: u64,
    },
}

/// What a committed append did: the outcomes and, if it stored events, the new
/// head.
pub(super) type Outcome = (Vec<Appended>, Option<u64>);

/// Runs the append transaction once. The outer `Result` is the database's (the
/// caller retries some); the inner one a refusal (after rollback).
pub(super) async fn try_append(
    pool: &PgPool,
    sql: &Arc<Statements>,
    delays: &CommitDelays,
    appends: &[Append],
) -> Result<Result<Outcome, EventStoreError>, sqlx::Error> {
    let mut tx = pool.begin().await?;

    // 1. Lock every stream of the call (creating missing rows), in name order.
    let names: Vec<&str> = appends.iter().map(|a| a.stream.as_str()).collect();
    let locked = sqlx::query(AssertSqlSafe(Arc::clone(&sql.lock_streams)))
        .bind(&names)
        .fetch_all(&mut *tx)
        .await?;
    let mut records = HashMap::with_capacity(locked.len());
    for row in &locked {
        let name: String = match get(row, 0) {
            Ok(name) => name,
            Err(e) => return Ok(Err(e)),
        };
        match rows::stream_row(row, 1) {
            Ok(record) => records.insert(name, record),
            Err(e) => return Ok(Err(e)),
        };
    }

    // 2. Where the call's event ids are stored already, if anywhere.
    let ids: Vec<String> = appends
        .iter()
        .flat_map(|a| a.events.iter().map(|e| e.id.to_string()))
        .collect();
    let mut stored = HashMap::new();
    if !ids.is_empty() {
        let found = sqlx::query(AssertSqlSafe(Arc::clone(&sql.find_ids)))
            .bind(&ids)
            .fetch_all(&mut *tx)
            .await?;
        for row in &found {
            match stored_id(row) {
                Ok((id, at)) => stored.insert(id, at),
                Err(e) => return Ok(Err(e)),
            };
        }
    }

    // 3. Check every expectation before writing anything.
    let mut plans = Vec::with_capacity(appends.len());
    for append in appends {
        let record = records
            .get(append.stream.as_str())
            .cloned()
            .unwrap_or_default();
        match check(append, record, &stored) {
            Ok(plan) => plans.push(plan),
            Err(e) => {
                tx.rollback().await?;
                return Ok(Err(e));
            }
        }
    }

    // 4. Per-stream writes: the streams' new last versions (their rows are locked
    //    by this transaction already, so this waits for no one).
    let (mut set_names, mut set_versions) = (Vec::new(), Vec::new());
    let mut total = 0u64;
    for (append, plan) in appends.iter().zip(&plans) {
        if let Plan::Fresh { first_version, .. } = plan
            && !append.events.is_empty()
        {
            let n = append.events.len() as u64;
            set_names.push(append.stream.as_str());
            set_versions.push(to_i64(first_version + n - 1));
            total += n;
        }
    }
    if !set_names.is_empty() {
        sqlx::query(AssertSqlSafe(Arc::clone(&sql.set_versions)))
            .bind(&set_names)
            .bind(&set_versions)
            .execute(&mut *tx)
            .await?;
    }

    // 5. The global serialization point, as late as possible: take positions from
    //    the head row (its lock is held until COMMIT) and insert the events there.
    let mut first_position = None;
    if total > 0 {
        sleep(&mut tx, sql, delays.before_position.as_ref()).await?;
        let first = position_and_insert(&mut tx, sql, appends, &plans, total).await?;
        match first {
            Ok(first) => first_position = Some(first),
            Err(e) => return Ok(Err(e)),
        }
        sleep(&mut tx, sql, delays.after_position.as_ref()).await?;
    }
    let mut position = match first_position {
        Some(first) => first,
        // Nothing stored: empty appends report an empty range at the head.
        None if plans.iter().any(|p| matches!(p, Plan::Fresh { .. })) => {
            let next: i64 = sqlx::query_scalar(AssertSqlSafe(Arc::clone(&sql.head)))
                .fetch_one(&mut *tx)
                .await?;
            match to_u64(next) {
                Ok(next) => next,
                Err(e) => return Ok(Err(e)),
            }
        }
        None => 0,
    };

    // 6. COMMIT releases the head lock: the next append takes the following
    //    positions only after this one is visible.
    tx.commit().await?;

    let mut out = Vec::with_capacity(plans.len());
    for (append, plan) in appends.iter().zip(plans) {
        match plan {
            Plan::Repeat(appended) => out.push(appended),
            Plan::Fresh {
                record,
                first_version,
            } => {
                let n = append.events.len() as u64;
                out.push(Appended {
                    stream: append.stream.clone(),
                    version: if n == 0 {
                        record.version
                    } else {
                        Some(first_version + n - 1)
                    },
                    positions: position..position + n,
                });
                position += n;
            }
        }
    }
    Ok(Ok((out, first_position.map(|first| first + total))))
}

fn stored_id(row: &sqlx::postgres::PgRow) -> Result<(Uuid, Stored), EventStoreError> {
    let id = rows::uuid(&get::<String>(row, 0)?)?;
    Ok((
        id,
        Stored {
            stream: rows::stream_name(get(row, 1)?)?,
            version: to_u64(get(row, 2)?)?,
            position: to_u64(get(row, 3)?)?,
        },
    ))
}

/// Checks one append against its locked stream row; the same rules as the
/// embedded backend.
fn check(
    append: &Append,
    record: StreamRow,
    stored: &HashMap<Uuid, Stored>,
) -> Result<Plan, EventStoreError> {
    if record.deleted == Some(Deletion::Hard) {
        return Err(EventStoreError::StreamDeleted(append.stream.clone()));
    }
    if let Some(first) = append.events.first()
        && let Some(at) = stored.get(&first.id)
    {
        return repeat(append, &record, at, stored);
    }
    let admitted = match (record.deleted, append.expected) {
        // A soft-deleted stream is recreated by appending, continuing its versions.
        (Some(Deletion::Soft), ExpectedVersion::Any | ExpectedVersion::NoStream) => true,
        (Some(Deletion::Soft), ExpectedVersion::Exact(v)) => record.version == Some(v),
        (Some(Deletion::Soft), ExpectedVersion::Exists) => false,
        (_, expected) => expected.admits(record.version),
    };
    if !admitted {
        return Err(EventStoreError::WrongExpectedVersion {
            stream: append.stream.clone(),
            expected: append.expected,
            actual: if record.deleted.is_some() {
                None
            } else {
                record.version
            },
        });
    }
    if let Some((id, at)) = append
        .events
        .iter()
        .find_map(|e| stored.get(&e.id).map(|at| (e.id, at)))
    {
        return Err(EventStoreError::DuplicateEventId {
            id,
            stream: at.stream.clone(),
            version: at.version,
        });
    }
    let first_version = record.version.map_or(0, |v| v + 1);
    Ok(Plan::Fresh {
        record,
        first_version,
    })
}

/// The first event's id is stored already: a repeat of an earlier append if every
/// id lines up with the stream's events from there (and the expectation is the
/// one that append had), else a conflict or a duplicate id.
fn repeat(
    append: &Append,
    record: &StreamRow,
    first: &Stored,
    stored: &HashMap<Uuid, Stored>,
) -> Result<Plan, EventStoreError> {
    let lines_up = first.stream == append.stream
        && append.events.iter().enumerate().all(|(i, event)| {
            stored.get(&event.id).is_some_and(|at| {
                at.stream == append.stream && at.version == first.version + i as u64
            })
        });
    // The same expectation as the first time: what the stream was before it.
    let before = first.version.checked_sub(1);
    let same_expectation = match append.expected {
        ExpectedVersion::Any => true,
        ExpectedVersion::NoStream => before.is_none(),
        ExpectedVersion::Exists => before.is_some(),
        ExpectedVersion::Exact(v) => before == Some(v),
    };
    if lines_up && same_expectation {
        let n = append.events.len() as u64;
        return Ok(Plan::Repeat(Appended {
            stream: append.stream.clone(),
            version: record.version,
            positions: first.position..first.position + n,
        }));
    }
    if lines_up {
        return Err(EventStoreError::WrongExpectedVersion {
            stream: append.stream.clone(),
            expected: append.expected,
            actual: record.version,
        });
    }
    Err(EventStoreError::DuplicateEventId {
        id: append.events.first().map_or_else(Uuid::nil, |e| e.id),
        stream: first.stream.clone(),
        version: first.version,
    })
}

/// Takes `total` positions and inserts the fresh events at them, in one statement
/// (one round trip while holding the head lock). Returns the first position.
async fn position_and_insert(
    tx: &mut PgConnection,
    sql: &Statements,
    appends: &[Append],
    plans: &[Plan],
    total: u64,
) -> Result<Result<u64, EventStoreError>, sqlx::Error> {
    let capacity = usize::try_from(total).unwrap_or(0);
    let mut streams = Vec::with_capacity(capacity);
    let mut versions = Vec::with_capacity(capacity);
    let mut categories = Vec::with_capacity(capacity);
    let mut ids = Vec::with_capacity(capacity);
    let mut types = Vec::with_capacity(capacity);
    let mut json = Vec::with_capacity(capacity);
    let mut bytes = Vec::with_capacity(capacity);
    let mut metadata = Vec::with_capacity(capacity);
    for (append, plan) in appends.iter().zip(plans) {
        let Plan::Fresh { first_version, .. } = plan else {
            continue;
        };
        for (version, event) in (*first_version..).zip(&append.events) {
            streams.push(append.stream.as_str());
            versions.push(to_i64(version));
            categories.push(append.stream.category());
            ids.push(event.id.to_string());
            types.push(event.ty.as_str());
            let (j, b) = rows::body_columns(&event.data);
            json.push(j);
            bytes.push(b);
            metadata.push(rows::metadata_column(&event.metadata));
        }
    }
    let row = sqlx::query(AssertSqlSafe(Arc::clone(&sql.position_and_insert)))
        .bind(to_i64(total))
        .bind(&streams)
        .bind(&versions)
        .bind(&categories)
        .bind(&ids)
        .bind(&types)
        .bind(&json)
        .bind(&bytes)
        .bind(&metadata)
        .bind(sql.channel.as_str())
        .fetch_one(&mut *tx)
        .await?;
    let first: i64 = sqlx::Row::try_get(&row, 0)?;
    let inserted: i64 = sqlx::Row::try_get(&row, 1)?;
    if inserted != to_i64(total) {
        return Ok(Err(corrupt(format!(
            "inserted {inserted} events of {total}"
        ))));
    }
    Ok(to_u64(first))
}

/// The test hook: sleeps inside the transaction for a random time in `range`.
async fn sleep(
    tx: &mut PgConnection,
    sql: &Statements,
    range: Option<&Range<Duration>>,
) -> Result<(), sqlx::Error> {
    let Some(range) = range else {
        return Ok(());
    };
    let spread = range.end.saturating_sub(range.start);
    sqlx::query(AssertSqlSafe(Arc::clone(&sql.sleep)))
        .bind(range.start.as_secs_f64())
        .bind(spread.as_secs_f64())
        .execute(&mut *tx)
        .await?;
    Ok(())
}
