//! The admin HTTP server (axum): health, readiness, metrics, membership changes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::reconcile::run::ReconcileRequest;
use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{AddBrokerRequest, ErrorBody};
use crate::config::Secret;
use crate::membership::AddedBroker;
use crate::supervisor::{ADD_WAIT, ChangeError, Supervisor};

/// What the handlers share.
#[derive(Debug, Clone)]
pub(crate) struct AdminState {
    /// The mesh.
    pub(crate) supervisor: Arc<Mutex<Supervisor>>,
    /// Bearer token required on every route but the health checks.
    pub(crate) token: Option<Secret>,
    /// Drain time of a removed link.
    pub(crate) drain_timeout: Duration,
    /// Refused requests are logged at most once per peer address every 10 s.
    pub(crate) refusals: Arc<std::sync::Mutex<crate::ratelimit::LogLimit>>,
}

impl AdminState {
    /// The state for `supervisor`, with an empty refusal log limit.
    pub(crate) fn new(
        supervisor: Arc<Mutex<Supervisor>>,
        token: Option<Secret>,
        drain_timeout: Duration,
    ) -> Self {
        Self {
            supervisor,
            token,
            drain_timeout,
            refusals: Arc::new(std::sync::Mutex::new(crate::ratelimit::LogLimit::new(
                Duration::from_secs(10),
            ))),
        }
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (
        status,
        Json(ErrorBody {
            error: message.into(),
        }),
    )
        .into_response()
}

impl IntoResponse for ChangeError {
    fn into_response(self) -> Response {
        let status = match &self {
            ChangeError::Invalid(_) => StatusCode::BAD_REQUEST,
            ChangeError::Conflict(_) => StatusCode::CONFLICT,
            ChangeError::NotFound(_) => StatusCode::NOT_FOUND,
            ChangeError::Persist(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        error(status, self.to_string())
    }
}

/// The routes.
pub(crate) fn router(state: AdminState) -> Router {
    let protected = Router::new()
        .route("/metrics", get(metrics))
        .route("/api/v1/brokers", get(list).post(add))
        .route("/api/v1/brokers/{key}", delete(remove))
        .route("/api/v1/instances", get(instances))
        .route("/api/v1/dead-letters", get(dead_letters))
        .route("/api/v1/matrix", get(matrix))
        .route("/api/v1/reconcile", post(reconcile))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/readyz/broker/{name}", get(broker_ready))
        .route("/replicationz", get(replicationz))
        .merge(protected)
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such route; see /api/v1/brokers") })
        .with_state(state)
}

/// Most admin connections served with the whole API at once.
pub(crate) const MAX_CONNECTIONS: usize = 64;

/// Connections beyond [`MAX_CONNECTIONS`] still accepted, each for one health check only
/// ([`health_router`]): idle or slow clients holding every connection do not make keepalived's
/// or a load balancer's check time out. Beyond both, new connections wait in the listen
/// backlog without taking a file descriptor: the links are never starved of descriptors.
pub(crate) const MAX_HEALTH_CONNECTIONS: usize = 64;

/// How long a connection served beyond [`MAX_CONNECTIONS`] may take to send its request and
/// get its answer.
pub(crate) const HEALTH_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a client may take to send a request's headers, and how long an idle keep-alive
/// connection is kept.
pub(crate) const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a client may take to send a request's body (a Content-Length larger than what is
/// sent would otherwise hold the connection forever).
pub(crate) const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest request body accepted (an add request is a few hundred bytes); larger: 413.
pub(crate) const MAX_BODY: usize = 64 << 10;

/// Only the health checks, for connections beyond [`MAX_CONNECTIONS`]; anything else is 503.
pub(crate) fn health_router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/readyz/broker/{name}", get(broker_ready))
        .fallback(|| async {
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "the admin API is at its connection cap ({MAX_CONNECTIONS}): only /healthz and /readyz are answered now; retry"
                ),
            )
        })
        .with_state(state)
}

/// Serves until `shutdown` is cancelled: at most [`MAX_CONNECTIONS`] at once with the whole
/// API, each closed after [`HEADER_TIMEOUT`] without a request and [`BODY_TIMEOUT`] on a body
/// that stalls; up to [`MAX_HEALTH_CONNECTIONS`] more for one health check each, closed after
/// [`HEALTH_TIMEOUT`].
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    state: AdminState,
    shutdown: CancellationToken,
) {
    use hyper_util::service::TowerToHyperService;
    use tower::ServiceExt;

    let health = health_router(state.clone()).layer(axum::extract::DefaultBodyLimit::max(MAX_BODY));
    let app = router(state)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            BODY_TIMEOUT,
        ));
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let slots = Arc::new(tokio::sync::Semaphore::new(
        MAX_CONNECTIONS + MAX_HEALTH_CONNECTIONS,
    ));
    let connections = tokio_util::task::TaskTracker::new();
    let mut accept_errors = crate::ratelimit::LogLimit::new(Duration::from_secs(10));
    loop {
        let slot = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(accepted) => accepted,
                Err(e) => {
                    // EMFILE and the like: wait instead of spinning.
                    if let Some(more) = accept_errors.event("accept", std::time::Instant::now()) {
                        warn!(error = %e, failed_since_last_line = more, "admin API cannot accept a connection");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // The whole API while there is room; beyond, one health check.
        let permit = permits.clone().try_acquire_owned().ok();
        let full = permit.is_some();
        let routes = if full { app.clone() } else { health.clone() };
        // hyper's request into axum's, with the peer address the handlers log.
        let service = TowerToHyperService::new(routes.map_request(
            move |request: hyper::Request<hyper::body::Incoming>| {
                let mut request = request.map(axum::body::Body::new);
                request.extensions_mut().insert(ConnectInfo(peer));
                request
            },
        ));
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let _slot = slot;
            let _permit = permit;
            serve_connection(stream, service, full, shutdown).await;
        });
    }
    connections.close();
    if tokio::time::timeout(Duration::from_secs(5), connections.wait())
        .await
        .is_err()
    {
        warn!("admin API: connections still open at shutdown");
    }
}

/// Serves one connection: the whole API (`full`, keep-alive) or one health check within
/// [`HEALTH_TIMEOUT`], answer included; at shutdown, gracefully within 5 s.
async fn serve_connection<S>(
    stream: tokio::net::TcpStream,
    service: S,
    full: bool,
    shutdown: CancellationToken,
) where
    S: hyper::service::Service<
            hyper::Request<hyper::body::Incoming>,
            Response = axum::response::Response,
        >,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use hyper_util::rt::{TokioIo, TokioTimer};
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(if full { HEADER_TIMEOUT } else { HEALTH_TIMEOUT })
        .keep_alive(full);
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let limit = if full { None } else { Some(HEALTH_TIMEOUT) };
    let deadline = async {
        match limit {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = connection.as_mut() => {}
        _ = deadline => {}
        _ = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(5), connection).await;
        }
    }
}

/// Compares the SHA-256 digests of both, without an early exit: the time taken says nothing
/// about the token, its length included.
fn same(given: &[u8], token: &[u8]) -> bool {
    let a = ring::digest::digest(&ring::digest::SHA256, given);
    let b = ring::digest::digest(&ring::digest::SHA256, token);
    a.as_ref()
        .iter()
        .zip(b.as_ref())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// The credentials of an `Authorization: Bearer <token>` header; the scheme is
/// case-insensitive (RFC 7235).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_start().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim_matches(' '))
}

async fn require_token(
    State(state): State<AdminState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
    next: Next,
) -> Response {
    if let Some(token) = &state.token {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer);
        if !given.is_some_and(|g| same(g.as_bytes(), token.expose().as_bytes())) {
            let logged = state
                .refusals
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .event(&peer.ip().to_string(), std::time::Instant::now());
            if let Some(more) = logged {
                warn!(%peer, path = %request.uri().path(), refused_since_last_line = more, "admin request without a valid token refused (logged at most once per peer every 10 s)");
            }
            return error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
        }
    }
    next.run(request).await
}

async fn readyz(State(state): State<AdminState>) -> Response {
    let report = state.supervisor.lock().await.ready();
    let status = if report.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(report)).into_response()
}

async fn reconcile(
    State(state): State<AdminState>,
    body: Result<Json<ReconcileRequest>, JsonRejection>,
) -> Response {
    let Json(req) = match body {
        Ok(b) => b,
        Err(e) => return error(e.status(), format!("bad request body: {}", e.body_text())),
    };
    if req.delete_extra && !req.repair {
        return error(StatusCode::BAD_REQUEST, "delete_extra needs repair");
    }
    // Snapshots take a while: outside the lock, so status and metrics keep answering.
    let (members, (router, instance, limits, stats)) = {
        let sup = state.supervisor.lock().await;
        (sup.members(), sup.reconcile_context())
    };
    let report =
        crate::reconcile::run::reconcile(&members, req, &router, &instance, limits, &stats).await;
    Json(report).into_response()
}

async fn matrix(State(state): State<AdminState>) -> Response {
    Json(state.supervisor.lock().await.matrix()).into_response()
}

/// For a load balancer's check of one broker: 503 while the broker is cut off from the mesh
/// (every origin that still delivers elsewhere is stalled into it). One slow origin does not
/// fail it.
async fn broker_ready(State(state): State<AdminState>, Path(name): Path<String>) -> Response {
    let matrix = state.supervisor.lock().await.matrix();
    if !matrix.brokers.contains(&name) {
        return error(
            StatusCode::NOT_FOUND,
            format!("no broker named {name:?} is probed (probe_interval = 0s, or not a member)"),
        );
    }
    let stalled_from: Vec<&str> = matrix
        .pairs
        .iter()
        .filter(|p| p.target == name && p.stalled)
        .map(|p| p.origin.as_str())
        .collect();
    let cut_off = matrix.cut_off(&name);
    let status = if cut_off {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    let body =
        serde_json::json!({ "broker": name, "cut_off": cut_off, "stalled_from": stalled_from });
    (status, Json(body)).into_response()
}

/// For monitoring, not for a load balancer: 503 while any pair is stalled.
async fn replicationz(State(state): State<AdminState>) -> Response {
    let matrix = state.supervisor.lock().await.matrix();
    let stalled: Vec<String> = matrix
        .stalled()
        .map(|p| format!("{}->{}", p.origin, p.target))
        .collect();
    let status = if stalled.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({ "probes": matrix.enabled, "stalled": stalled });
    (status, Json(body)).into_response()
}

async fn metrics(State(state): State<AdminState>) -> Response {
    let sup = state.supervisor.lock().await;
    let matrix = sup.matrix();
    let body = super::exposition::encode(
        &sup.status_with(&matrix),
        sup.reconcile_stats(),
        sup.config().spool.overflow,
        &sup.spool_health(),
        (&matrix, sup.lag_histograms()),
    );
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

async fn list(State(state): State<AdminState>) -> Response {
    Json(state.supervisor.lock().await.status()).into_response()
}

/// `?limit=N` (default 100, at most the table's size).
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DeadLettersQuery {
    #[serde(default = "default_dead_letters")]
    limit: usize,
}

fn default_dead_letters() -> usize {
    100
}

async fn dead_letters(
    State(state): State<AdminState>,
    query: Result<axum::extract::Query<DeadLettersQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let limit = match query {
        Ok(q) => q.limit,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("bad query: {}", e.body_text()),
            );
        }
    };
    let spool = state.supervisor.lock().await.spool();
    // A read of the spool file: off the async threads.
    let rows = tokio::task::spawn_blocking(move || spool.dead_letters(limit)).await;
    match rows {
        Ok(Ok(rows)) => Json(rows).into_response(),
        Ok(Err(e)) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot read the dead letters: {e}"),
        ),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn instances(State(state): State<AdminState>) -> Response {
    Json(state.supervisor.lock().await.instances()).into_response()
}

async fn add(
    State(state): State<AdminState>,
    body: Result<Json<AddBrokerRequest>, JsonRejection>,
) -> Response {
    let Json(req) = match body {
        Ok(b) => b,
        // 400 for what is not an add request, 413 for a body over MAX_BODY.
        Err(e) => return error(e.status(), format!("bad request body: {}", e.body_text())),
    };
    // An empty name is derived from the address when the broker is built.
    let spec = AddedBroker {
        name: req.name.unwrap_or_default(),
        address: req.address,
        protocol: req.protocol.unwrap_or_default(),
        tls: req.tls.unwrap_or(crate::config::DEFAULT_TLS),
        server_name: req.server_name,
        rules: req.rules,
    };
    let added = state.supervisor.lock().await.add(spec);
    let status = match added {
        Ok(status) => status,
        Err(e) => return e.into_response(),
    };
    let name = status.name.clone();
    info!(broker = %name, "added through the admin API");
    // Answered once what is published on the new broker reaches the mesh, or after ADD_WAIT
    // with the broker's state (its consumer not subscribed yet: 202). Outside the lock.
    let consumption = state.supervisor.lock().await.consumption(&name);
    let consumed = crate::supervisor::consumed_within(consumption, ADD_WAIT).await;
    let row = state
        .supervisor
        .lock()
        .await
        .status()
        .into_iter()
        .find(|r| r.name == name)
        .unwrap_or(status);
    if consumed {
        (StatusCode::CREATED, Json(row)).into_response()
    } else {
        info!(broker = %name, "added, not consumed yet (see `bridge status`)");
        (StatusCode::ACCEPTED, Json(row)).into_response()
    }
}

async fn remove(State(state): State<AdminState>, Path(key): Path<String>) -> Response {
    let handle = match state.supervisor.lock().await.remove(&key) {
        Ok(h) => h,
        Err(e) => return e.into_response(),
    };
    let name = handle.broker.name.clone();
    // Drain outside the lock: status and metrics keep answering meanwhile.
    handle.shutdown(state.drain_timeout).await;
    state
        .supervisor
        .lock()
        .await
        .drained(std::slice::from_ref(&name));
    info!(broker = %name, "removed through the admin API");
    Json(serde_json::json!({ "removed": name })).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison_and_bearer_scheme() {
        assert!(same(b"s3cret", b"s3cret"));
        assert!(!same(b"s3cre", b"s3cret"));
        assert!(!same(b"s3cret-and-more", b"s3cret"));
        assert!(!same(b"", b"s3cret"));
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer abc"), Some("abc"));
        assert_eq!(bearer("BEARER  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearerabc"), None);
    }
}
