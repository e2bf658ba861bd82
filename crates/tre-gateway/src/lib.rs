//! The gRPC gateway: authenticates every call (EdDSA-signed bearer tokens,
//! revocable by token id; optionally mutual TLS), authorises it through one
//! matrix (`authz.rs`), hands Submit and DryRun to the transport-free
//! release pipeline (`tre-release`: compile → reserve → execute → commit,
//! with the charge settled and audited on every path), runs project
//! governance and the auditor's read-only view of the log, writes exactly
//! one audit event per call (cancelled, panicking and transport-refused
//! calls included), bounds connections and request sizes (`transport.rs`),
//! serves the same releases over Arrow Flight SQL for stock clients
//! (`flight.rs`), serves operator metrics on an address of their own
//! (`metrics.rs`), chooses the engine of the datasets a query names, one
//! dataset's or a joint one's, from the set it serves now, which a reload
//! replaces whole (`datasets.rs`), and converts between domain types and
//! proto types.
//! Errors become gRPC statuses in one exhaustive match (`error.rs`).
//!
//! This crate and tre-cli are the only ones that know tonic and the proto
//! types; nothing below it may depend on it.

use std::net::SocketAddr;
use std::sync::Arc;

use arrow_flight::flight_service_server::FlightServiceServer;
use tokio::net::TcpListener;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tre_proto::v1::admin_service_server::AdminServiceServer;
use tre_proto::v1::audit_service_server::AuditServiceServer;
use tre_proto::v1::catalog_service_server::CatalogServiceServer;
use tre_proto::v1::project_service_server::ProjectServiceServer;
use tre_proto::v1::query_service_server::QueryServiceServer;
use tre_proto::v1::release_service_server::ReleaseServiceServer;
use tre_store::Store;

mod audit;
mod auth;
pub mod authz;
mod convert;
mod datasets;
mod error;
mod flight;
pub mod metrics;
mod projects;
mod releases;
mod service;
mod transport;

pub use auth::{AuditNotary, Claims, Issuer};
pub use datasets::{Datasets, Served};
pub use error::{GatewayError, ServerFault};
pub use flight::{DATASET_HEADER, DELTA_HEADER, EPSILON_HEADER, PROJECT_HEADER, TOTALS_HEADER};
pub use metrics::{Metrics, serve_metrics};
pub use transport::ConnectionLimits;

/// What every handler shares.
pub struct AppState {
    /// The datasets served, each with its engine (issue #15), replaced
    /// whole on a reload.
    pub engines: Served,
    pub store: Box<dyn Store>,
    pub issuer: Issuer,
    /// Signs release manifests (the same key as the audit log).
    pub notary: Arc<dyn tre_store::Notary>,
    /// Bounds on connections and request sizes.
    pub connections: ConnectionLimits,
    /// Operator metrics; the store must be observed by the same (see
    /// `SqliteStore::observed_by`) for calls to be counted.
    pub metrics: Arc<metrics::Metrics>,
}

/// TLS for the gateway: a server certificate and key (PEM) and, for mutual
/// TLS, the CA whose certificates clients must present.
#[derive(Clone)]
pub struct Tls {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub client_ca_pem: Option<Vec<u8>>,
}

impl Tls {
    fn config(&self) -> ServerTlsConfig {
        let cfg =
            ServerTlsConfig::new().identity(Identity::from_pem(&self.cert_pem, &self.key_pem));
        match &self.client_ca_pem {
            Some(ca) => cfg.client_ca_root(Certificate::from_pem(ca)),
            None => cfg,
        }
    }
}

/// Serve on an already-bound listener until `shutdown` resolves, then sign
/// an audit checkpoint. Binding first lets callers (tests, the demo) use
/// port 0 and learn the address. Without TLS only loopback is served, so a
/// token never crosses a network in the clear.
pub async fn serve(
    state: Arc<AppState>,
    listener: TcpListener,
    tls: Option<Tls>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), GatewayError> {
    let local = listener
        .local_addr()
        .map_err(|e| ServerFault::Startup(format!("cannot read the listening address: {e}")))?;
    if tls.is_none() && !local.ip().is_loopback() {
        return Err(ServerFault::Startup(format!(
            "refusing to serve plaintext on {local}; give --tls-cert and --tls-key, or listen on 127.0.0.1"
        ))
        .into());
    }
    let limits = &state.connections;
    let mut builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(limits.keepalive_interval))
        .http2_keepalive_timeout(Some(limits.keepalive_timeout))
        .max_connection_age(limits.max_age)
        .max_connection_age_grace(limits.max_age_grace)
        .max_concurrent_streams(limits.max_streams)
        .http2_max_header_list_size(limits.max_header_bytes);
    if let Some(tls) = &tls {
        builder = builder
            .tls_config(tls.config())
            .map_err(|e| ServerFault::Startup(format!("bad TLS configuration: {e}")))?;
    }
    let svc = service::Services::new(Arc::clone(&state));
    // Flight SQL shares the gRPC services' state, so a repeat is free
    // whichever transport made the first release.
    let flight = flight::Flight::new(svc.clone())?;
    let max = limits.max_request_bytes;
    // Operators and tools need no token to see what is served and whether
    // it is up (issue #14): gRPC server reflection (`grpcurl list`) and the
    // standard health service. Neither reads data or state.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(tre_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_error =
        |e| ServerFault::Startup(format!("cannot build the reflection service: {e}"));
    // v1alpha too: older clients (Python's grpcio-reflection, some IDEs)
    // speak only that; grpcurl tries v1 first.
    let reflection_v1alpha = reflection().build_v1alpha().map_err(reflection_error)?;
    let reflection = reflection().build_v1().map_err(reflection_error)?;
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<QueryServiceServer<service::Services>>()
        .await;
    health
        .set_serving::<CatalogServiceServer<service::Services>>()
        .await;
    health
        .set_serving::<ProjectServiceServer<service::Services>>()
        .await;
    health
        .set_serving::<AuditServiceServer<service::Services>>()
        .await;
    health
        .set_serving::<ReleaseServiceServer<service::Services>>()
        .await;
    health
        .set_serving::<AdminServiceServer<service::Services>>()
        .await;
    health
        .set_serving::<FlightServiceServer<flight::Flight>>()
        .await;
    let served = builder
        .layer(transport::RejectionAudit {
            state: Arc::clone(&state),
        })
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(QueryServiceServer::new(svc.clone()).max_decoding_message_size(max))
        .add_service(CatalogServiceServer::new(svc.clone()).max_decoding_message_size(max))
        .add_service(ProjectServiceServer::new(svc.clone()).max_decoding_message_size(max))
        .add_service(AuditServiceServer::new(svc.clone()).max_decoding_message_size(max))
        .add_service(ReleaseServiceServer::new(svc.clone()).max_decoding_message_size(max))
        .add_service(AdminServiceServer::new(svc).max_decoding_message_size(max))
        .add_service(FlightServiceServer::new(flight).max_decoding_message_size(max))
        .serve_with_incoming_shutdown(transport::incoming(listener, limits), async move {
            shutdown.await;
            // An orchestrator watching health stops routing here first.
            health
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
        })
        .await;
    // At shutdown the head of the log is signed, so an auditor can tell a
    // log cut short after this point.
    state.store.checkpoint()?;
    served.map_err(|e| ServerFault::Startup(format!("the gateway stopped: {e}")).into())
}

/// Resolves on Ctrl-C or, on Unix, SIGTERM (what service managers and
/// `kill` send). Either one then stops the server through `serve`'s
/// shutdown path, which signs the final audit checkpoint (issue #11:
/// SIGTERM used to kill the process without it).
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!("cannot listen for SIGTERM ({e}); stopping on Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Bind `addr` and serve in a background task; returns the bound address
/// and a handle that stops the server when sent to.
pub async fn spawn(
    state: Arc<AppState>,
    addr: SocketAddr,
    tls: Option<Tls>,
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
        if let Err(e) = serve(state, listener, tls, shutdown).await {
            tracing::error!("{e}");
        }
    });
    Ok((bound, tx, handle))
}
