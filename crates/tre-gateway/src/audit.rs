//! AuditService (read, verify, export; never write) and AdminService.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tre_core::Principal;
use tre_proto::v1 as pb;
use tre_proto::v1::admin_service_server::AdminService;
use tre_proto::v1::audit_service_server::AuditService;
use tre_store::{AuditFilter, chain};

use crate::authz::Rpc;
use crate::service::{Note, Services, handle};
use crate::{AppState, GatewayError, convert};

const DEFAULT_LIMIT: usize = 1_000;
const MAX_LIMIT: usize = 10_000;
/// Bytes of event text per ListEvents page and per export chunk, well
/// under gRPC's default 4 MB message limit even with JSON escaping: no
/// event can make the log unreadable (issue #11). One event is at most
/// about 70 KiB once capped (`chain::MAX_SQL_BYTES`).
const PAGE_BYTES: usize = 1 << 20;

pub(crate) type ExportStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<pb::ExportLogResponse, Status>> + Send>,
>;

fn text(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

impl Services {
    fn list_events(
        &self,
        req: pb::ListEventsRequest,
    ) -> Result<pb::ListEventsResponse, GatewayError> {
        let time = |t: &str| -> Result<Option<chrono::DateTime<chrono::Utc>>, GatewayError> {
            if t.is_empty() {
                return Ok(None);
            }
            chrono::DateTime::parse_from_rfc3339(t)
                .map(|t| Some(t.with_timezone(&chrono::Utc)))
                .map_err(|_| {
                    GatewayError::BadRequest(format!(
                        "'{t}' is not an RFC 3339 time; write e.g. 2026-11-24T09:00:00Z"
                    ))
                })
        };
        let (since, until) = (time(&req.since)?, time(&req.until)?);
        let filter = AuditFilter {
            user: text(req.user),
            project: text(req.project),
            action: text(req.action),
            outcome: match text(req.outcome) {
                None => None,
                Some(o) => Some(tre_core::Outcome::parse(&o).ok_or_else(|| {
                    GatewayError::BadRequest(format!(
                        "'{o}' is no outcome; filter by allowed, refused, failed or cancelled"
                    ))
                })?),
            },
            since,
            until,
            after_seq: (req.after_seq > 0).then_some(req.after_seq),
            through_seq: None,
            limit: Some(match req.limit {
                0 => DEFAULT_LIMIT,
                n => (n as usize).min(MAX_LIMIT),
            }),
        };
        let page = self.state.store.audit_page(&filter, PAGE_BYTES)?;
        Ok(pb::ListEventsResponse {
            next_after_seq: page.events.last().map_or(0, |e| e.seq),
            more: page.more,
            events: page.events.iter().map(convert::audit_event).collect(),
        })
    }

    fn verify_log(
        &self,
        req: &pb::VerifyLogRequest,
    ) -> Result<pb::VerifyLogResponse, GatewayError> {
        let own = self.state.store.audit_public_key();
        let (r, key) = if req.pinned_public_key.is_empty() {
            (self.state.store.verify_audit()?, own)
        } else {
            let pinned = chain::canonical_hex(&req.pinned_public_key)
                .filter(|k| k.len() == 32)
                .ok_or_else(|| {
                    GatewayError::BadRequest(
                        "pinned_public_key must be 64 lowercase hex digits (an Ed25519 key)".into(),
                    )
                })?;
            let entries = self.state.store.audit_entries()?;
            (chain::verify(&entries, &pinned), pinned)
        };
        Ok(pb::VerifyLogResponse {
            pinned: !req.pinned_public_key.is_empty(),
            key_fingerprint: chain::key_fingerprint(&key),
            intact: r.is_intact(),
            events: r.events as u64,
            checkpoints: r.checkpoints as u64,
            checkpointed_through: r.checkpointed_through,
            first_bad_position: r.first_bad.as_ref().map(|t| t.position as u64),
            reason: r.first_bad.map(|t| t.reason).unwrap_or_default(),
            public_key: hex::encode(&key),
        })
    }

    /// The log up to its head at the time of the call, read and sent in
    /// pages of about `PAGE_BYTES`, never held whole, then the signed end
    /// line over everything before it.
    fn export_log(&self) -> Result<ExportStream, GatewayError> {
        // Sign the head first so the export ends on a checkpoint and a cut
        // tail shows.
        let through = self.state.store.checkpoint()?.map_or(0, |c| c.seq);
        let public_key = hex::encode(self.state.store.audit_public_key());
        let state = Arc::clone(&self.state);
        let start = Progress {
            after: 0,
            lines: 0,
            head: (0, chain::GENESIS.to_owned()),
            done: false,
        };
        let chunks = futures::stream::unfold(start, move |mut p| {
            let (state, public_key) = (Arc::clone(&state), public_key.clone());
            async move {
                if p.done {
                    return None;
                }
                let chunk = export_chunk(&state, through, &mut p)
                    .map(|jsonl| pb::ExportLogResponse { jsonl, public_key });
                if chunk.is_err() {
                    p.done = true;
                }
                Some((chunk.map_err(GatewayError::into_status), p))
            }
        });
        Ok(Box::pin(chunks))
    }

    fn revoke_token(
        &self,
        who: &Principal,
        req: &pb::RevokeTokenRequest,
        note: &mut Note,
    ) -> Result<pb::RevokeTokenResponse, GatewayError> {
        if req.jti.is_empty() || req.jti.len() > 128 || req.reason.trim().is_empty() {
            return Err(GatewayError::BadRequest(
                "give the token id (its jti claim) and a reason".into(),
            ));
        }
        note.detail = format!("revoked token {}: {}", req.jti, req.reason);
        tre_release::off_worker(|| {
            self.state
                .store
                .revoke_token(&req.jti, &who.user, &req.reason)
        })?;
        Ok(pb::RevokeTokenResponse {})
    }
}

/// How far an export has got.
struct Progress {
    /// The last event sent.
    after: i64,
    /// Lines sent.
    lines: usize,
    /// Sequence number and hash of the last event sent.
    head: (i64, String),
    done: bool,
}

/// The next chunk of an export: a page of whole lines and, after the last
/// page, the signed end line.
fn export_chunk(state: &AppState, through: i64, p: &mut Progress) -> Result<String, GatewayError> {
    let page = state.store.export_page(p.after, through, PAGE_BYTES)?;
    let mut jsonl = chain::to_jsonl(&page.entries)?;
    p.lines += page.entries.len();
    if let Some(last) = page.entries.iter().rev().find_map(|e| match e {
        chain::Entry::Event(e) => Some(e),
        _ => None,
    }) {
        p.after = last.seq;
        p.head = (last.seq, last.hash.clone());
    }
    if !page.more {
        let end = chain::Entry::ExportEnd(chain::export_end(
            p.head.0,
            &p.head.1,
            p.lines,
            &tre_store::now(),
            state.notary.as_ref(),
        ));
        let line = chain::to_jsonl(std::slice::from_ref(&end))?;
        jsonl.push_str(&line);
        p.done = true;
    }
    Ok(jsonl)
}

#[tonic::async_trait]
impl AuditService for Services {
    async fn list_events(
        &self,
        request: Request<pb::ListEventsRequest>,
    ) -> Result<Response<pb::ListEventsResponse>, Status> {
        handle!(
            self,
            request,
            Rpc::ListEvents,
            |_call, _who, req, _note| async { self.list_events(req) }
        )
    }

    async fn verify_log(
        &self,
        request: Request<pb::VerifyLogRequest>,
    ) -> Result<Response<pb::VerifyLogResponse>, Status> {
        handle!(
            self,
            request,
            Rpc::VerifyLog,
            |_call, _who, req, _note| async { self.verify_log(&req) }
        )
    }

    type ExportLogStream = ExportStream;

    async fn export_log(
        &self,
        request: Request<pb::ExportLogRequest>,
    ) -> Result<Response<ExportStream>, Status> {
        handle!(
            self,
            request,
            Rpc::ExportLog,
            |_call, _who, _req, _note| async { self.export_log() }
        )
    }
}

#[tonic::async_trait]
impl AdminService for Services {
    async fn revoke_token(
        &self,
        request: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        handle!(
            self,
            request,
            Rpc::RevokeToken,
            |_call, who, req, note| async { self.revoke_token(&who, &req, note) }
        )
    }
}
