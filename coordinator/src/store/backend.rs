//! The two database backends behind [`super::Store`]: SQLite (rusqlite) and PostgreSQL (the
//! synchronous `postgres` client). The store's queries are written once, in standard SQL with
//! `?N` positional parameters; for PostgreSQL they are rewritten to `$N`. Values cross the
//! boundary as [`Value`] and come back as [`Row`]s, so the store's logic is the same on both.

use std::error::Error as StdError;

use bytes::BytesMut;
use postgres::types::{IsNull, ToSql, Type, to_sql_checked};

use super::StoreError;

/// Which SQL dialect a connection speaks, for the few statements that differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dialect {
    /// SQLite.
    Sqlite,
    /// PostgreSQL.
    Postgres,
}

/// A parameter or a column value.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Value {
    Null,
    I64(i64),
    F64(f64),
    Text(String),
    Blob(Vec<u8>),
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Self::I64(v)
    }
}
impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Self::F64(v)
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Self::Text(v.to_string())
    }
}
impl From<&String> for Value {
    fn from(v: &String) -> Self {
        Self::Text(v.clone())
    }
}
impl From<String> for Value {
    fn from(v: String) -> Self {
        Self::Text(v)
    }
}
impl From<&[u8]> for Value {
    fn from(v: &[u8]) -> Self {
        Self::Blob(v.to_vec())
    }
}
impl From<&Vec<u8>> for Value {
    fn from(v: &Vec<u8>) -> Self {
        Self::Blob(v.clone())
    }
}
impl From<Option<i64>> for Value {
    fn from(v: Option<i64>) -> Self {
        v.map_or(Self::Null, Self::I64)
    }
}
impl From<Option<&str>> for Value {
    fn from(v: Option<&str>) -> Self {
        v.map_or(Self::Null, |s| Self::Text(s.to_string()))
    }
}

/// Builds a `&[Value]` from expressions that convert into [`Value`].
macro_rules! vals {
    ($($v:expr),* $(,)?) => { &[$(crate::store::backend::Value::from($v)),*][..] };
}
pub(crate) use vals;

impl ToSql for Value {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        match self {
            Value::Null => Ok(IsNull::Yes),
            Value::I64(v) if *ty == Type::INT4 => i32::try_from(*v)?.to_sql(ty, out),
            Value::I64(v) => v.to_sql(ty, out),
            Value::F64(v) => v.to_sql(ty, out),
            Value::Text(v) => v.to_sql(ty, out),
            Value::Blob(v) => v.to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

/// One result row.
#[derive(Clone, Debug)]
pub(crate) struct Row(Vec<Value>);

fn column(i: usize, want: &str, got: &Value) -> StoreError {
    StoreError::Corrupt(format!("column {i}: expected {want}, found {got:?}"))
}

impl Row {
    fn at(&self, i: usize) -> Result<&Value, StoreError> {
        self.0
            .get(i)
            .ok_or_else(|| StoreError::Corrupt(format!("no column {i}")))
    }

    /// An integer column.
    pub(crate) fn i64(&self, i: usize) -> Result<i64, StoreError> {
        match self.at(i)? {
            Value::I64(v) => Ok(*v),
            other => Err(column(i, "an integer", other)),
        }
    }

    /// A non-negative integer column.
    pub(crate) fn u64(&self, i: usize) -> Result<u64, StoreError> {
        let v = self.i64(i)?;
        u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("column {i}: negative {v}")))
    }

    /// A nullable integer column.
    pub(crate) fn opt_i64(&self, i: usize) -> Result<Option<i64>, StoreError> {
        match self.at(i)? {
            Value::Null => Ok(None),
            Value::I64(v) => Ok(Some(*v)),
            other => Err(column(i, "an integer or NULL", other)),
        }
    }

    /// A floating-point column (an integer is widened, as SQLite may store one).
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn f64(&self, i: usize) -> Result<f64, StoreError> {
        match self.at(i)? {
            Value::F64(v) => Ok(*v),
            Value::I64(v) => Ok(*v as f64),
            other => Err(column(i, "a number", other)),
        }
    }

    /// A text column.
    pub(crate) fn text(&self, i: usize) -> Result<String, StoreError> {
        match self.at(i)? {
            Value::Text(v) => Ok(v.clone()),
            other => Err(column(i, "text", other)),
        }
    }

    /// A nullable text column.
    pub(crate) fn opt_text(&self, i: usize) -> Result<Option<String>, StoreError> {
        match self.at(i)? {
            Value::Null => Ok(None),
            Value::Text(v) => Ok(Some(v.clone())),
            other => Err(column(i, "text or NULL", other)),
        }
    }

    /// A blob column.
    pub(crate) fn blob(&self, i: usize) -> Result<Vec<u8>, StoreError> {
        match self.at(i)? {
            Value::Blob(v) => Ok(v.clone()),
            other => Err(column(i, "bytes", other)),
        }
    }
}

/// An open connection.
pub(crate) enum Conn {
    Sqlite(rusqlite::Connection),
    Postgres(Box<postgres::Client>),
    /// Closed (see [`Conn::close_off_runtime`]).
    Closed,
}

/// An open transaction; dropped without [`Tx::commit`], it rolls back.
pub(crate) enum Tx<'a> {
    Sqlite(rusqlite::Transaction<'a>),
    Postgres(postgres::Transaction<'a>),
}

/// Rewrites `?N` parameters to PostgreSQL's `$N`. The store's SQL has no `?` inside string
/// literals.
pub(crate) fn to_postgres(sql: &str) -> String {
    sql.replace('?', "$")
}

fn pg_params(params: &[Value]) -> Vec<&(dyn ToSql + Sync)> {
    params.iter().map(|p| p as &(dyn ToSql + Sync)).collect()
}

fn pg_row(row: &postgres::Row) -> Result<Row, StoreError> {
    let mut out = Vec::with_capacity(row.len());
    for (i, col) in row.columns().iter().enumerate() {
        let ty = col.type_();
        let v = if *ty == Type::INT8 {
            row.try_get::<_, Option<i64>>(i)?.map(Value::I64)
        } else if *ty == Type::INT4 {
            row.try_get::<_, Option<i32>>(i)?
                .map(|v| Value::I64(v.into()))
        } else if *ty == Type::INT2 {
            row.try_get::<_, Option<i16>>(i)?
                .map(|v| Value::I64(v.into()))
        } else if *ty == Type::FLOAT8 {
            row.try_get::<_, Option<f64>>(i)?.map(Value::F64)
        } else if *ty == Type::BOOL {
            row.try_get::<_, Option<bool>>(i)?
                .map(|v| Value::I64(v.into()))
        } else if *ty == Type::BYTEA {
            row.try_get::<_, Option<Vec<u8>>>(i)?.map(Value::Blob)
        } else {
            row.try_get::<_, Option<String>>(i)?.map(Value::Text)
        };
        out.push(v.unwrap_or(Value::Null));
    }
    Ok(Row(out))
}

fn sqlite_rows(
    conn: &rusqlite::Connection,
    sql: &str,
    params: &[Value],
) -> Result<Vec<Row>, StoreError> {
    let mut stmt = conn.prepare(sql)?;
    let n = stmt.column_count();
    let mut rows = stmt.query(rusqlite::params_from_iter(params.iter()))?;
    let mut out = vec![];
    while let Some(r) = rows.next()? {
        let mut values = Vec::with_capacity(n);
        for i in 0..n {
            values.push(match r.get_ref(i)? {
                rusqlite::types::ValueRef::Null => Value::Null,
                rusqlite::types::ValueRef::Integer(v) => Value::I64(v),
                rusqlite::types::ValueRef::Real(v) => Value::F64(v),
                rusqlite::types::ValueRef::Text(t) => Value::Text(
                    std::str::from_utf8(t)
                        .map_err(|e| StoreError::Corrupt(format!("column {i}: {e}")))?
                        .to_string(),
                ),
                rusqlite::types::ValueRef::Blob(b) => Value::Blob(b.to_vec()),
            });
        }
        out.push(Row(values));
    }
    Ok(out)
}

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(ToSqlOutput::Borrowed(match self {
            Value::Null => ValueRef::Null,
            Value::I64(v) => ValueRef::Integer(*v),
            Value::F64(v) => ValueRef::Real(*v),
            Value::Text(v) => ValueRef::Text(v.as_bytes()),
            Value::Blob(v) => ValueRef::Blob(v),
        }))
    }
}

impl Conn {
    /// The connection's dialect.
    pub(crate) fn dialect(&self) -> Dialect {
        match self {
            Conn::Sqlite(_) | Conn::Closed => Dialect::Sqlite,
            Conn::Postgres(_) => Dialect::Postgres,
        }
    }

    /// Closes a PostgreSQL connection on a thread of its own when called on an async runtime:
    /// the synchronous client's close blocks on a runtime of its own, which tokio forbids
    /// inside another (a server's last reference to the store may go there).
    pub(crate) fn close_off_runtime(&mut self) {
        if matches!(self, Conn::Postgres(_)) && tokio::runtime::Handle::try_current().is_ok() {
            let conn = std::mem::replace(self, Conn::Closed);
            let _ = std::thread::Builder::new()
                .name("fedpref-pg-close".into())
                .spawn(move || drop(conn));
        }
    }

    /// Begins a transaction. On SQLite, a writing one takes the write lock at once
    /// (`BEGIN IMMEDIATE`), so two handles on one file never deadlock upgrading a read lock.
    pub(crate) fn begin(&mut self, write: bool) -> Result<Tx<'_>, StoreError> {
        Ok(match self {
            Conn::Sqlite(c) => Tx::Sqlite(c.transaction_with_behavior(if write {
                rusqlite::TransactionBehavior::Immediate
            } else {
                rusqlite::TransactionBehavior::Deferred
            })?),
            Conn::Postgres(c) => Tx::Postgres(c.transaction()?),
            Conn::Closed => {
                return Err(StoreError::Corrupt(
                    "the store's connection is closed".into(),
                ));
            }
        })
    }
}

impl Tx<'_> {
    /// The transaction's dialect.
    pub(crate) fn dialect(&self) -> Dialect {
        match self {
            Tx::Sqlite(_) => Dialect::Sqlite,
            Tx::Postgres(_) => Dialect::Postgres,
        }
    }

    /// Runs a statement; returns the rows it changed.
    pub(crate) fn execute(&mut self, sql: &str, params: &[Value]) -> Result<u64, StoreError> {
        match self {
            Tx::Sqlite(t) => {
                let mut stmt = t.prepare(sql)?;
                Ok(stmt.execute(rusqlite::params_from_iter(params.iter()))? as u64)
            }
            Tx::Postgres(t) => Ok(t.execute(to_postgres(sql).as_str(), &pg_params(params))?),
        }
    }

    /// Runs several statements without parameters.
    pub(crate) fn batch(&mut self, sql: &str) -> Result<(), StoreError> {
        match self {
            Tx::Sqlite(t) => Ok(t.execute_batch(sql)?),
            Tx::Postgres(t) => Ok(t.batch_execute(sql)?),
        }
    }

    /// All rows of a query.
    pub(crate) fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>, StoreError> {
        match self {
            Tx::Sqlite(t) => sqlite_rows(t, sql, params),
            Tx::Postgres(t) => t
                .query(to_postgres(sql).as_str(), &pg_params(params))?
                .iter()
                .map(pg_row)
                .collect(),
        }
    }

    /// The first row of a query, if any.
    pub(crate) fn query_opt(
        &mut self,
        sql: &str,
        params: &[Value],
    ) -> Result<Option<Row>, StoreError> {
        Ok(self.query(sql, params)?.into_iter().next())
    }

    /// The first row of a query that always returns one.
    pub(crate) fn query_one(&mut self, sql: &str, params: &[Value]) -> Result<Row, StoreError> {
        self.query_opt(sql, params)?
            .ok_or_else(|| StoreError::Corrupt(format!("no row from {sql}")))
    }

    /// Commits.
    pub(crate) fn commit(self) -> Result<(), StoreError> {
        match self {
            Tx::Sqlite(t) => Ok(t.commit()?),
            Tx::Postgres(t) => Ok(t.commit()?),
        }
    }
}

/// The database's clock in ms since the epoch, as an SQL expression: leases are timed by
/// one clock, the database's, whatever the replicas' clocks say.
pub(crate) fn now_ms_sql(d: Dialect) -> &'static str {
    match d {
        Dialect::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000.0 AS BIGINT)",
        Dialect::Postgres => "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_are_rewritten_for_postgres() {
        assert_eq!(
            to_postgres("SELECT a FROM t WHERE b = ?1 AND c = ?12"),
            "SELECT a FROM t WHERE b = $1 AND c = $12"
        );
    }

    #[test]
    fn sqlite_round_trips_every_value_kind() {
        let mut conn = Conn::Sqlite(rusqlite::Connection::open_in_memory().unwrap());
        let mut tx = conn.begin(true).unwrap();
        tx.batch("CREATE TABLE t (a BIGINT, b DOUBLE PRECISION, c TEXT, d BLOB, e BIGINT)")
            .unwrap();
        tx.execute(
            "INSERT INTO t VALUES (?1, ?2, ?3, ?4, ?5)",
            vals![7i64, 0.5f64, "x", &vec![1u8, 2], None::<i64>],
        )
        .unwrap();
        let row = tx.query_one("SELECT a, b, c, d, e FROM t", &[]).unwrap();
        assert_eq!(row.i64(0).unwrap(), 7);
        assert_eq!(row.f64(1).unwrap(), 0.5);
        assert_eq!(row.text(2).unwrap(), "x");
        assert_eq!(row.blob(3).unwrap(), vec![1, 2]);
        assert_eq!(row.opt_i64(4).unwrap(), None);
        assert!(row.text(0).is_err(), "an integer is not text");
        assert!(row.u64(5).is_err(), "no sixth column");
    }
}
