//! The gRPC gateway: authenticates every call (EdDSA-signed bearer tokens),
//! authorises it, wires the query engine to the ledger (compile → reserve →
//! execute → commit), writes one audit event per call, and converts between
//! domain types and proto types. Errors become gRPC statuses in one
//! exhaustive match (`error.rs`).
//!
//! This crate and tre-cli are the only ones that know tonic and the proto
//! types; nothing below it may depend on it.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tre_proto::v1::catalog_service_server::CatalogServiceServer;
use tre_proto::v1::query_service_server::QueryServiceServer;
use tre_query::Engine;
use tre_store::Store;

mod auth;
mod convert;
mod error;
mod service;

pub use auth::{Claims, Issuer};
pub use error::GatewayError;

/// What every handler shares.
pub struct AppState {
    pub engine: Engine,
    pub store: Store,
    pub issuer: Issuer,
}

/// Serve on an already-bound listener until `shutdown` resolves. Binding
/// first lets callers (tests, the demo) use port 0 and learn the address.
pub async fn serve(
    state: Arc<AppState>,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let svc = service::Services { state };
    tonic::transport::Server::builder()
        .add_service(QueryServiceServer::new(svc.clone()))
        .add_service(CatalogServiceServer::new(svc))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await
}

/// Bind `addr` and serve in a background task; returns the bound address
/// and a handle that stops the server when dropped or sent to.
pub async fn spawn(
    state: Arc<AppState>,
    addr: SocketAddr,
) -> std::io::Result<(
    SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(async move {
        let shutdown = async move {
            let _ = rx.await;
        };
        if let Err(e) = serve(state, listener, shutdown).await {
            tracing::error!("gateway stopped: {e}");
        }
    });
    Ok((bound, tx, handle))
}
