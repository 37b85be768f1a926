//! The admin HTTP server (axum): health, readiness, metrics, membership changes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{AddBrokerRequest, ErrorBody};
use crate::config::Secret;
use crate::membership::AddedBroker;
use crate::supervisor::{ChangeError, Supervisor};

/// What the handlers share.
#[derive(Debug, Clone)]
pub struct AdminState {
    /// The mesh.
    pub supervisor: Arc<Mutex<Supervisor>>,
    /// Bearer token required on every route but the health checks.
    pub token: Option<Secret>,
    /// Drain time of a removed link.
    pub drain_timeout: Duration,
    /// Refused requests are logged at most once per peer address every 10 s.
    pub refusals: Arc<std::sync::Mutex<crate::ratelimit::LogLimit>>,
}

impl AdminState {
    /// The state for `supervisor`, with an empty refusal log limit.
    pub fn new(
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
pub fn router(state: AdminState) -> Router {
    let protected = Router::new()
        .route("/metrics", get(metrics))
        .route("/api/v1/brokers", get(list).post(add))
        .route("/api/v1/brokers/{key}", delete(remove))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .merge(protected)
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such route; see /api/v1/brokers") })
        .with_state(state)
}

/// Serves until `shutdown` is cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AdminState,
    shutdown: CancellationToken,
) {
    let app = router(state).into_make_service_with_connect_info::<SocketAddr>();
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
    {
        warn!(error = %e, "admin API stopped");
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

async fn metrics(State(state): State<AdminState>) -> Response {
    let sup = state.supervisor.lock().await;
    let body = crate::metrics::encode(
        &sup.status(),
        sup.router().retained_stats(),
        sup.config().spool.overflow,
        &sup.spool_health(),
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

async fn add(
    State(state): State<AdminState>,
    body: Result<Json<AddBrokerRequest>, JsonRejection>,
) -> Response {
    let Json(req) = match body {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("bad request body: {}", e.body_text()),
            );
        }
    };
    // An empty name is derived from the address when the broker is built.
    let spec = AddedBroker {
        name: req.name.unwrap_or_default(),
        address: req.address,
        protocol: req.protocol.unwrap_or(crate::config::Protocol::V5),
        tls: req.tls.unwrap_or(true),
        server_name: req.server_name,
    };
    match state.supervisor.lock().await.add(spec) {
        Ok(status) => {
            info!(broker = %status.name, "added through the admin API");
            (StatusCode::CREATED, Json(status)).into_response()
        }
        Err(e) => e.into_response(),
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
