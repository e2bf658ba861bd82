//! The transport's bounds (issue #11): how many connections, for how long
//! silent, how many streams and how large a request; an accept loop that
//! backs off instead of spinning when the process runs out of file
//! descriptors; and a tower layer that gives every request the transport
//! refused before a handler read it (undecodable, too large, an unknown
//! method, cancelled while being read) its audit event and a coded error.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_io_timeout::TimeoutStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::authz::Rpc;
use crate::{AppState, GatewayError};

/// Bounds on connections and requests. The defaults suit a TRE's few
/// dozen researchers; every one is finite.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// Open connections at once; further clients wait in the kernel's
    /// backlog until one closes.
    pub max_connections: usize,
    /// A connection that sends nothing (not even an answer to the
    /// keep-alive ping) or accepts nothing for this long is closed. It
    /// also bounds how long a new connection may take to start HTTP/2.
    pub silence: Duration,
    /// The server pings every connection this often, and closes one that
    /// does not answer within `keepalive_timeout`.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// A connection is asked to go away after this long, and closed
    /// `max_age_grace` later, so a live but idle one cannot be held for
    /// ever. The grace covers the longest query.
    pub max_age: Duration,
    pub max_age_grace: Duration,
    /// Concurrent calls on one connection.
    pub max_streams: u32,
    /// Bytes of request headers.
    pub max_header_bytes: u32,
    /// Bytes of one request message (`TRE-S003` beyond it).
    pub max_request_bytes: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: 256,
            silence: Duration::from_secs(60),
            keepalive_interval: Duration::from_secs(20),
            keepalive_timeout: Duration::from_secs(10),
            max_age: Duration::from_secs(30 * 60),
            max_age_grace: Duration::from_secs(6 * 60),
            max_streams: 32,
            max_header_bytes: 16 << 10,
            max_request_bytes: 4 << 20,
        }
    }
}

/// A back-off after a failed accept, so running out of file descriptors
/// does not spin a core (tonic's own loop retries at once).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The accepted connections of `listener`, at most `max_connections` open
/// at once, each closed after `silence` without traffic either way.
pub(crate) fn incoming(
    listener: TcpListener,
    limits: &ConnectionLimits,
) -> impl tokio_stream::Stream<Item = Result<BoundedConn, io::Error>> + use<> {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let silence = limits.silence;
    futures::stream::unfold((listener, slots), move |(listener, slots)| async move {
        // Closed only if the semaphore is, which never happens.
        let permit = Arc::clone(&slots).acquire_owned().await.ok()?;
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let conn = BoundedConn::new(stream, permit, silence);
                    return Some((Ok(conn), (listener, slots)));
                }
                Err(e) => {
                    tracing::warn!("cannot accept a connection ({e}); retrying shortly");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            }
        }
    })
}

/// One accepted connection, holding its place among `max_connections`.
pub(crate) struct BoundedConn {
    stream: Pin<Box<TimeoutStream<TcpStream>>>,
    info: TcpConnectInfo,
    _slot: OwnedSemaphorePermit,
}

impl BoundedConn {
    fn new(stream: TcpStream, slot: OwnedSemaphorePermit, silence: Duration) -> Self {
        let info = stream.connect_info();
        let _ = stream.set_nodelay(true);
        let mut stream = TimeoutStream::new(stream);
        stream.set_read_timeout(Some(silence));
        stream.set_write_timeout(Some(silence));
        Self {
            stream: Box::pin(stream),
            info,
            _slot: slot,
        }
    }
}

impl Connected for BoundedConn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for BoundedConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.stream.as_mut().poll_read(cx, buf)
    }
}

impl AsyncWrite for BoundedConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.stream.as_mut().poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream.as_mut().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream.as_mut().poll_shutdown(cx)
    }
}

/// Set by the handler's `begin`: from then on the handler owns the call's
/// audit event. A request that never gets there was refused by the
/// transport, and `RejectionAudit` records it.
#[derive(Clone, Default)]
pub(crate) struct Reached(Arc<AtomicBool>);

impl Reached {
    pub(crate) fn set(&self) {
        self.0.store(true, Ordering::Release);
    }

    fn get(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// The tower layer that audits transport rejections.
#[derive(Clone)]
pub(crate) struct RejectionAudit {
    pub(crate) state: Arc<AppState>,
}

impl<S> tower::Layer<S> for RejectionAudit {
    type Service = RejectionAuditService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RejectionAuditService {
            inner,
            state: Arc::clone(&self.state),
        }
    }
}

#[derive(Clone)]
pub(crate) struct RejectionAuditService<S> {
    inner: S,
    state: Arc<AppState>,
}

/// Services outside the audit: the standard gRPC health check and server
/// reflection, served without a token.
const UNAUDITED_SERVICES: [&str; 3] = [
    "/grpc.health.v1.Health",
    "/grpc.reflection.v1.ServerReflection",
    "/grpc.reflection.v1alpha.ServerReflection",
];

/// What the transport saw of a request, for its event.
struct Seen {
    state: Arc<AppState>,
    reached: Reached,
    method: String,
    client: String,
    authorization: Option<String>,
    /// Still owed an event if dropped (the client left mid-request).
    armed: bool,
}

impl Seen {
    /// The event of a request no handler took: who (if the token is
    /// valid), from where, which method, and the transport's reason.
    fn record(&self, error: &GatewayError) {
        let who = self
            .authorization
            .as_deref()
            .and_then(|h| crate::service::bearer_principal(&self.state, h).ok());
        let (user, role) = match &who {
            Some(p) => (p.user.as_str(), p.role.as_str()),
            None => ("(unauthenticated)", ""),
        };
        let action = Rpc::from_method(&self.method).map_or("transport", Rpc::action);
        let mut e = tre_store::AuditEvent::new(user, role, "", action);
        e.client = self.client.clone();
        e.set_outcome(tre_core::Outcome::of_failure(
            matches!(error, GatewayError::Cancelled),
            false,
        ));
        e.code = error.code().as_str().into();
        e.detail = format!("{error} (method {})", self.method);
        if let Err(err) = self.state.store.append_audit(&e) {
            tracing::error!("cannot record a transport rejection: {err}");
        }
    }
}

impl Drop for Seen {
    fn drop(&mut self) {
        if self.armed && !self.reached.get() {
            self.record(&GatewayError::Cancelled);
        }
    }
}

impl<S, B, RB> tower::Service<http::Request<B>> for RejectionAuditService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        // Health probes and reflection read no data and need no token;
        // an orchestrator probes every few seconds, which would drown
        // the audit log (issue #14).
        let path = req.uri().path();
        if UNAUDITED_SERVICES
            .iter()
            .any(|s| path.strip_prefix(s).is_some_and(|m| m.starts_with('/')))
        {
            return Box::pin(self.inner.call(req));
        }
        let reached = Reached::default();
        req.extensions_mut().insert(reached.clone());
        let ext = req.extensions();
        let client = ext
            .get::<TcpConnectInfo>()
            .or_else(|| {
                ext.get::<tonic::transport::server::TlsConnectInfo<TcpConnectInfo>>()
                    .map(|t| t.get_ref())
            })
            .and_then(|i| i.remote_addr)
            .map(|a| a.to_string())
            .unwrap_or_default();
        let mut seen = Seen {
            state: Arc::clone(&self.state),
            reached,
            method: req
                .uri()
                .path()
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .chars()
                .take(64)
                .collect(),
            client,
            authorization: req
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            armed: true,
        };
        let response = self.inner.call(req);
        Box::pin(async move {
            let mut response = response.await?;
            seen.armed = false;
            if !seen.reached.get() {
                let refused = tonic::Status::from_header_map(response.headers());
                let (grpc, message) = match &refused {
                    Some(s) => (s.code(), s.message().to_owned()),
                    None => (tonic::Code::Unknown, "not a gRPC request".to_owned()),
                };
                let error = GatewayError::Rejected { grpc, message };
                seen.record(&error);
                let headers = response.headers_mut();
                for h in ["grpc-status", "grpc-message", "grpc-status-details-bin"] {
                    headers.remove(h);
                }
                if error.into_status().add_header(headers).is_err() {
                    tracing::error!("cannot write a coded transport rejection");
                }
            }
            Ok(response)
        })
    }
}
