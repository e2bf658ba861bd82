//! Operator metrics in the Prometheus (OpenMetrics) text format, on an
//! address of their own (issue #14).
//!
//! Calls are counted from the audit log itself: the store tells
//! [`Metrics`] of each event as its transaction commits, so the counts are
//! exactly what an auditor will find, cancelled and transport-refused calls
//! included. Labels are only an action, an outcome and a stable code, all
//! from closed sets: a metric never carries SQL, a user, a project or a
//! value. Active queries and pool memory are read from the engine when
//! scraped; they depend on what runs, which is why they are served to the
//! operator's address only, never on the researchers' one.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tre_store::{AuditEvent, AuditObserver};

use crate::{AppState, GatewayError, ServerFault};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    /// The audit log's action, e.g. `query.submit`.
    action: String,
    /// allowed | refused | failed | cancelled
    outcome: String,
    /// The stable code of a call that did not succeed; empty otherwise.
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReleaseLabels {
    /// released | held | not_released | error
    result: &'static str,
}

/// Every metric the gateway keeps.
pub struct Metrics {
    registry: Registry,
    calls: Family<CallLabels, Counter>,
    epsilon: Counter<f64, AtomicU64>,
    delta: Counter<f64, AtomicU64>,
    releases: Family<ReleaseLabels, Histogram>,
    active: Gauge,
    memory: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("tre");
        let calls = Family::<CallLabels, Counter>::default();
        registry.register(
            "calls",
            "Calls by audit action, outcome and stable code, as the audit log records them",
            calls.clone(),
        );
        let epsilon = Counter::<f64, AtomicU64>::default();
        registry.register(
            "epsilon_charged",
            "Privacy loss (epsilon) charged to projects, summed over all of them",
            epsilon.clone(),
        );
        let delta = Counter::<f64, AtomicU64>::default();
        registry.register(
            "delta_charged",
            "Probability of failure (delta) charged to projects, summed over all of them",
            delta.clone(),
        );
        // 5 ms to about 82 s: small queries take milliseconds, a heavy one
        // at 10M patients tens of seconds.
        let releases = Family::<ReleaseLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.005, 2.0, 15))
        });
        registry.register(
            "release_seconds",
            "Time from a query's arrival to its release (or its refusal), gRPC and Flight SQL alike",
            releases.clone(),
        );
        let active = Gauge::default();
        registry.register(
            "active_queries",
            "Queries executing now (holding an engine slot)",
            active.clone(),
        );
        let memory = Gauge::default();
        registry.register(
            "query_memory_bytes",
            "Bytes the executing queries' memory pools hold now, together",
            memory.clone(),
        );
        Self {
            registry,
            calls,
            epsilon,
            delta,
            releases,
            active,
            memory,
        }
    }
}

impl AuditObserver for Metrics {
    fn committed(&self, e: &AuditEvent) {
        self.calls
            .get_or_create(&CallLabels {
                action: e.action.clone(),
                outcome: e.outcome.clone(),
                code: e.code.clone(),
            })
            .inc();
        // A query's event carries its charge once the charge is made (and
        // none for a free repeat); other events' amounts are budgets.
        if e.action != crate::authz::Rpc::Submit.action() {
            return;
        }
        if e.epsilon_nanos > 0 {
            self.epsilon
                .inc_by(tre_core::Epsilon::from_nanos(e.epsilon_nanos));
        }
        if e.delta_femtos > 0 {
            self.delta
                .inc_by(tre_core::Delta::from_femtos(e.delta_femtos));
        }
    }
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// How long a Submit (either transport) took, by how it ended.
    pub(crate) fn release_took(&self, took: Duration, result: &'static str) {
        self.releases
            .get_or_create(&ReleaseLabels { result })
            .observe(took.as_secs_f64());
    }

    /// The text a scrape gets, with the engine's gauges read now.
    pub fn render(&self, engines: &crate::Datasets) -> Result<String, GatewayError> {
        // The engines share one admission, so any of them counts the
        // queries running; each holds its own queries' pools.
        let (running, _) = engines.first().load();
        let bytes = engines
            .all()
            .map(|e| e.load().1)
            .fold(0usize, usize::saturating_add);
        self.active.set(i64::try_from(running).unwrap_or(i64::MAX));
        self.memory.set(i64::try_from(bytes).unwrap_or(i64::MAX));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .map_err(|e| ServerFault::Startup(format!("cannot encode the metrics: {e}")))?;
        Ok(out)
    }
}

/// Serve `GET /metrics` on `listener` until `shutdown` resolves. Plain
/// HTTP, as Prometheus scrapes; the caller decides the address (loopback
/// unless the operator says otherwise).
pub async fn serve_metrics(
    state: Arc<AppState>,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), GatewayError> {
    use axum::http::{StatusCode, header};
    use axum::response::IntoResponse;

    let scrape = move || {
        let state = Arc::clone(&state);
        async move {
            match state.metrics.render(&state.engines.now()) {
                Ok(text) => (
                    StatusCode::OK,
                    [(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    text,
                )
                    .into_response(),
                Err(e) => {
                    tracing::error!("{e}");
                    StatusCode::INTERNAL_SERVER_ERROR.into_response()
                }
            }
        }
    };
    let app = axum::Router::new().route("/metrics", axum::routing::get(scrape));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| ServerFault::Startup(format!("the metrics server stopped: {e}")).into())
}
