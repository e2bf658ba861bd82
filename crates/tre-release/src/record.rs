//! A Submit's one audit event and the reservation it may hold, as a guard.
//!
//! The event is written exactly once, and an open reservation is settled
//! with it in the same transaction, on every path out of the pipeline:
//! - a release: `commit` stores it, settles the charge and writes the event;
//! - an error, or a panic the pipeline caught: `finish` writes it as
//!   refused (nothing charged) or failed (charged, an incident that
//!   suspends the project);
//! - the pipeline's future dropped unfinished (the caller went away):
//!   `Drop` writes it as cancelled (the charge stands, no suspension); or,
//!   if the thread is unwinding from a panic nothing caught, as failed.
//!
//! Before this guard the gateway settled a reservation in two places, and
//! an event written after a panic lost the project and the SQL (issue #12).

use tre_core::Outcome;
use tre_store::{AuditEvent, Settle, Store, StoredRelease};

use crate::{Caller, Fault, ReleaseError};

pub(crate) struct Record<'a> {
    store: &'a dyn Store,
    /// Everything but the outcome, filled in as the call goes.
    event: AuditEvent,
    /// The open reservation, once charged.
    ledger_id: Option<i64>,
    written: bool,
}

impl<'a> Record<'a> {
    pub(crate) fn new(store: &'a dyn Store, caller: &Caller, project: &str, sql: &str) -> Self {
        let mut event = AuditEvent::new(
            caller.who.user.as_str(),
            caller.who.role.as_str(),
            project,
            caller.action,
        );
        event.client = caller.client.clone();
        event.sql = sql.to_owned();
        Self {
            store,
            event,
            ledger_id: None,
            written: false,
        }
    }

    pub(crate) fn planned(&mut self, plan: &tre_query::PrivatePlan) {
        self.event.plan_hash = plan.plan_hash().to_owned();
    }

    /// The charge is made: from here on a failure settles it.
    pub(crate) fn reserved(&mut self, ledger_id: i64, plan: &tre_query::PrivatePlan) {
        self.ledger_id = Some(ledger_id);
        self.event.epsilon_nanos = plan.epsilon().as_nanos();
        self.event.delta_femtos = plan.delta().as_femtos();
    }

    /// An identical query's release, served again at no charge.
    pub(crate) fn repeated(&mut self, stored: &StoredRelease) {
        self.event.release_id = stored.id.clone();
        self.event.release_hash = stored.body_hash.clone();
        self.event.detail = format!(
            "repeat of release {} ({}); no charge",
            stored.id,
            stored.status.as_str()
        );
    }

    /// Store the release, settle the reservation and write the event, in
    /// one transaction. On failure nothing is written, and `finish`
    /// settles the reservation as failed.
    pub(crate) fn commit(&mut self, stored: &StoredRelease) -> Result<(), ReleaseError> {
        let Some(ledger_id) = self.ledger_id else {
            return Err(Fault::Unsettled.into());
        };
        let mut event = self.event.clone();
        event.release_id = stored.id.clone();
        event.release_hash = stored.body_hash.clone();
        if stored.status == tre_store::ReleaseStatus::Held {
            event.detail = format!("held for review: {}", stored.hold_reason);
        }
        event.set_outcome(Outcome::Allowed);
        crate::off_worker(|| self.store.commit_release(ledger_id, stored, &event))?;
        self.written = true;
        Ok(())
    }

    /// Write the event for `result` (unless `commit` already did) and hand
    /// the result back; if the event cannot be written the call fails:
    /// nothing may happen without a record.
    pub(crate) fn finish<T>(mut self, result: Result<T, ReleaseError>) -> Result<T, ReleaseError> {
        match self.write(result.as_ref().err(), true) {
            Ok(()) => result,
            Err(e) => Err(e),
        }
    }

    /// Write the event (and settle it with any reservation). From async
    /// code the store call runs `off_worker`; from `Drop`, which may run
    /// where blocking in place is not allowed (a runtime shutting down),
    /// it is a plain call.
    fn write(&mut self, error: Option<&ReleaseError>, offload: bool) -> Result<(), ReleaseError> {
        if self.written {
            return Ok(());
        }
        // Once, even if the store refuses: `Drop` must not try again.
        self.written = true;
        let unsettled = ReleaseError::Fault(Fault::Unsettled);
        // A reservation that ends without a release and without an error
        // is a bug; it is settled as one.
        let error = match (error, self.ledger_id) {
            (None, Some(_)) => Some(&unsettled),
            (error, _) => error,
        };
        let mut event = self.event.clone();
        match error {
            None => event.set_outcome(Outcome::Allowed),
            Some(e) => {
                event.set_outcome(Outcome::of_failure(
                    matches!(e, ReleaseError::Cancelled),
                    self.ledger_id.is_some(),
                ));
                event.code = e.code().as_str().into();
                if event.detail.is_empty() {
                    event.detail = e.audit_detail();
                }
            }
        }
        let run = |call: &mut dyn FnMut() -> Result<i64, tre_store::StoreError>| {
            if offload {
                crate::off_worker(call)
            } else {
                call()
            }
        };
        match (self.ledger_id, error) {
            (Some(id), Some(e)) => {
                let settle = match e {
                    ReleaseError::Cancelled => Settle::Cancelled,
                    ReleaseError::Query(_) | ReleaseError::Store(_) | ReleaseError::Fault(_) => {
                        Settle::Incident
                    }
                };
                run(&mut || self.store.fail_reservation(id, &event, settle))?;
            }
            _ => {
                run(&mut || self.store.append_audit(&event))?;
            }
        }
        Ok(())
    }
}

impl Drop for Record<'_> {
    fn drop(&mut self) {
        if self.written {
            return;
        }
        let error = if std::thread::panicking() {
            ReleaseError::Fault(Fault::Panicked("a panic the pipeline did not catch".into()))
        } else {
            ReleaseError::Cancelled
        };
        if let Err(e) = self.write(Some(&error), false) {
            tracing::error!("cannot record an unfinished query: {e}");
        }
    }
}
