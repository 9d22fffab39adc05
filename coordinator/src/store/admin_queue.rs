//! The admin-command queue that replicas share, and the run events log.

use super::*;

impl Store {
    /// Appends one event to a run's ledger on its own (a guardrail alert), fenced.
    pub fn append_event(
        &mut self,
        run_id: &str,
        event: LedgerEvent,
        at_ms: i64,
    ) -> Result<(), StoreError> {
        self.write(|tx| {
            run_status(tx, run_id)?;
            self.fence(tx, run_id)?;
            append(tx, self.signer.as_ref(), run_id, at_ms, event)
        })
    }

    /// Queues an admin command for the replica that owns `run_id` (see
    /// [`crate::replica::forward`]); `id` is unique.
    pub fn enqueue_admin_command(
        &self,
        id: &str,
        run_id: &str,
        command: &str,
        at_ms: i64,
    ) -> Result<(), StoreError> {
        self.write(|tx| {
            run_status(tx, run_id)?;
            tx.execute(
                "INSERT INTO admin_commands (id, run_id, command, status, result, created_at_ms) \
                 VALUES (?1, ?2, ?3, 'pending', '', ?4)",
                vals![id, run_id, command, at_ms],
            )?;
            Ok(())
        })
    }

    /// Claims a run's queued admin commands, oldest first (they become `running`), fenced:
    /// only the lease holder claims.
    pub fn claim_admin_commands(
        &mut self,
        run_id: &str,
    ) -> Result<Vec<(String, String)>, StoreError> {
        self.write(|tx| {
            self.fence(tx, run_id)?;
            let rows = tx.query(
                "SELECT id, command FROM admin_commands WHERE run_id = ?1 AND status = 'pending' \
                 ORDER BY created_at_ms, id",
                vals![run_id],
            )?;
            let mut out = vec![];
            for r in rows {
                let id = r.text(0)?;
                tx.execute(
                    "UPDATE admin_commands SET status = 'running' WHERE id = ?1",
                    vals![&id],
                )?;
                out.push((id, r.text(1)?));
            }
            Ok(out)
        })
    }

    /// Records a claimed admin command's outcome: `done` or `failed`, with a result text.
    pub fn finish_admin_command(&self, id: &str, ok: bool, result: &str) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.execute(
                "UPDATE admin_commands SET status = ?2, result = ?3 WHERE id = ?1",
                vals![id, if ok { "done" } else { "failed" }, result],
            )?;
            Ok(())
        })
    }

    /// Withdraws a queued admin command nobody claimed yet; whether it was withdrawn.
    pub fn cancel_admin_command(&self, id: &str) -> Result<bool, StoreError> {
        self.write(|tx| {
            Ok(tx.execute(
                "UPDATE admin_commands SET status = 'cancelled' WHERE id = ?1 AND status = 'pending'",
                vals![id],
            )? == 1)
        })
    }

    /// An admin command's status (`pending`, `running`, `done`, `failed`, `cancelled`) and
    /// result text.
    pub fn admin_command(&self, id: &str) -> Result<Option<(String, String)>, StoreError> {
        self.read(|tx| {
            tx.query_opt(
                "SELECT status, result FROM admin_commands WHERE id = ?1",
                vals![id],
            )?
            .map(|r| Ok((r.text(0)?, r.text(1)?)))
            .transpose()
        })
    }
}
