//! The admin HTTP API: probes for the orchestrator, Prometheus metrics, and a read-only JSON
//! view of peers, queues and campaigns for operators.
//!
//! Loopback clients are served as they are. Any other client needs `Authorization: Bearer
//! <admin.token>`; without a configured token the API answers loopback only. Refusals are
//! logged and counted.

use crate::metrics::Metrics;
use crate::registry::RegistryWatch;
use crate::router::RouterHandle;
use crate::session::Shared;
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tracing::warn;

/// What readiness depends on.
#[derive(Debug, Default)]
pub struct Health {
    /// Start-up recovery finished.
    pub started: AtomicBool,
    /// SIGTERM received.
    pub draining: AtomicBool,
    /// The store's last commit succeeded.
    pub store_ok: Arc<AtomicBool>,
    /// The store is under its disk quota (`store.max_disk_mb`).
    pub disk_quota_ok: Arc<AtomicBool>,
    /// The router task is running (false: it failed; the relay cannot route).
    pub router_ok: AtomicBool,
}

impl Health {
    /// Why the relay is not ready, empty when it is.
    pub fn not_ready(&self) -> Vec<&'static str> {
        let mut why = Vec::new();
        if !self.started.load(Ordering::Relaxed) {
            why.push("recovering the store");
        }
        if self.draining.load(Ordering::Relaxed) {
            why.push("draining");
        }
        if !self.store_ok.load(Ordering::Relaxed) {
            why.push("store cannot write");
        }
        if !self.disk_quota_ok.load(Ordering::Relaxed) {
            why.push("store over its disk quota");
        }
        if !self.router_ok.load(Ordering::Relaxed) {
            why.push("router stopped");
        }
        why
    }
}

/// Everything the handlers read.
pub struct AdminState {
    /// Probes.
    pub health: Arc<Health>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Peers.
    pub registry: RegistryWatch,
    /// Queues.
    pub router: RouterHandle,
    /// Sessions.
    pub shared: Arc<Shared>,
    /// Bearer token for non-loopback clients.
    pub token: Option<String>,
}

/// The admin routes.
pub fn router(state: Arc<AdminState>) -> Router {
    let gate = Arc::new(Gate {
        token: state.token.clone(),
        metrics: state.metrics.clone(),
    });
    Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/peers", get(peers))
        .route("/v1/queues", get(queues))
        .route("/v1/campaigns", get(campaigns))
        .route("/v1/campaigns/{id}", get(campaign))
        .layer(middleware::from_fn_with_state(gate, guard))
        .with_state(state)
}

/// What the access check needs: the token, and where refusals are counted.
struct Gate {
    token: Option<String>,
    metrics: Arc<Metrics>,
}

async fn guard(
    State(gate): State<Arc<Gate>>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match access(remote.ip(), gate.token.as_deref(), presented) {
        Ok(()) => next.run(req).await,
        Err(reason) => {
            warn!(%remote, path = %req.uri().path(), reason, "admin request refused");
            gate.metrics.admin_denied.with_label_values(&[reason]).inc();
            (
                StatusCode::UNAUTHORIZED,
                "admin API: loopback only, or a bearer token\n",
            )
                .into_response()
        }
    }
}

/// Who may use the admin API: loopback always; others with the configured token.
fn access(
    remote: IpAddr,
    token: Option<&str>,
    presented: Option<&str>,
) -> Result<(), &'static str> {
    // A listener on an IPv6 socket (`[::]:7702`, or `[::ffff:127.0.0.1]`) sees IPv4 clients
    // as IPv4-mapped addresses, which `is_loopback` alone does not count as loopback:
    // 127.0.0.1 was refused there.
    if remote.to_canonical().is_loopback() {
        return Ok(());
    }
    match (token, presented) {
        (Some(token), Some(p)) if constant_time_eq(token.as_bytes(), p.as_bytes()) => Ok(()),
        (None, _) => Err("no token configured"),
        (Some(_), None) => Err("missing token"),
        (Some(_), Some(_)) => Err("wrong token"),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn readyz(State(state): State<Arc<AdminState>>) -> Response {
    let why = state.health.not_ready();
    if why.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "ready": false, "reasons": why })),
        )
            .into_response()
    }
}

async fn metrics(State(state): State<Arc<AdminState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

#[derive(Serialize)]
struct PeerView {
    id: String,
    role: &'static str,
    keys: Vec<String>,
    sessions: Vec<crate::session::SessionInfo>,
}

async fn peers(State(state): State<Arc<AdminState>>) -> Json<Vec<PeerView>> {
    let registry = state.registry.borrow().clone();
    let sessions: Vec<crate::session::SessionInfo> = state
        .shared
        .sessions
        .lock()
        .map(|s| s.values().cloned().collect())
        .unwrap_or_default();
    Json(
        registry
            .peers()
            .into_iter()
            .map(|p| PeerView {
                id: p.id.clone(),
                role: if p.role == federation_spec::proto::Role::Broadcaster {
                    "broadcaster"
                } else {
                    "platform"
                },
                keys: p.keys.iter().map(|k| hex::encode(k.as_bytes())).collect(),
                sessions: sessions
                    .iter()
                    .filter(|s| s.peer == p.id)
                    .cloned()
                    .collect(),
            })
            .collect(),
    )
}

async fn queues(State(state): State<Arc<AdminState>>) -> Response {
    match state.router.snapshot().await {
        Ok(q) => Json(q).into_response(),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "router stopped\n").into_response(),
    }
}

/// Every campaign the relay keeps, newest first.
async fn campaigns(State(state): State<Arc<AdminState>>) -> Response {
    match state.router.campaigns(None).await {
        Ok(c) => Json(c).into_response(),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "router stopped\n").into_response(),
    }
}

/// One campaign by its id (32 hex digits).
async fn campaign(State(state): State<Arc<AdminState>>, Path(id): Path<String>) -> Response {
    let Some(id) = hex::decode(&id)
        .ok()
        .and_then(|b| <[u8; 16]>::try_from(b.as_slice()).ok())
    else {
        return (StatusCode::BAD_REQUEST, "a campaign id is 32 hex digits\n").into_response();
    };
    match state.router.campaigns(Some(id)).await {
        Ok(mut c) => match c.pop() {
            Some(view) => Json(view).into_response(),
            None => (StatusCode::NOT_FOUND, "no such campaign\n").into_response(),
        },
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "router stopped\n").into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_loopback_needs_the_token() {
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let far: IpAddr = "203.0.113.9".parse().unwrap();
        assert_eq!(access(lo, None, None), Ok(()));
        assert_eq!(access(far, None, Some("x")), Err("no token configured"));
        assert_eq!(access(far, Some("s3cret"), None), Err("missing token"));
        assert_eq!(
            access(far, Some("s3cret"), Some("s3cre")),
            Err("wrong token")
        );
        assert_eq!(access(far, Some("s3cret"), Some("s3cret")), Ok(()));
        let mapped_lo: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        let mapped_far: IpAddr = "::ffff:203.0.113.9".parse().unwrap();
        assert_eq!(access(mapped_lo, None, None), Ok(()));
        assert_eq!(access(mapped_far, None, None), Err("no token configured"));
        assert_eq!(access("::1".parse().unwrap(), None, None), Ok(()));
    }

    /// Captures what the relay logs, for the test that owns the guard.
    #[derive(Clone, Default)]
    struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    async fn get_with(addr: SocketAddr, auth: Option<&str>) -> u16 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let auth = auth
            .map(|a| format!("Authorization: {a}\r\n"))
            .unwrap_or_default();
        s.write_all(
            format!("GET /x HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// The guard over real HTTP on 127.0.0.1, with the client's address replaced by a
    /// non-loopback one in front of it (every connection a test can make comes from
    /// loopback): refused with 401 unless the token is right, and every refusal logged and
    /// counted in `relay_admin_denied_total{reason}`.
    #[tokio::test]
    async fn non_loopback_requests_are_refused_logged_and_counted() {
        let log = Captured::default();
        let writer = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .finish();
        // The runtime of this test is single-threaded, so the server's tasks log here too.
        let _logging = tracing::subscriber::set_default(subscriber);
        let metrics = Arc::new(Metrics::new());
        let far: SocketAddr = "203.0.113.9:40000".parse().unwrap();
        let serve = |token: Option<&str>| {
            let gate = Arc::new(Gate {
                token: token.map(String::from),
                metrics: metrics.clone(),
            });
            let app = Router::new()
                .route("/x", get(|| async { "ok" }))
                .layer(middleware::from_fn_with_state(gate, guard))
                .layer(middleware::map_request(
                    move |mut req: Request| async move {
                        req.extensions_mut().insert(ConnectInfo(far));
                        req
                    },
                ))
                .into_make_service_with_connect_info::<SocketAddr>();
            async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let addr = listener.local_addr().unwrap();
                tokio::spawn(async move { axum::serve(listener, app).await });
                addr
            }
        };
        let open = serve(None).await;
        assert_eq!(get_with(open, None).await, 401);
        assert_eq!(get_with(open, Some("Bearer anything")).await, 401);
        let guarded = serve(Some("s3cret")).await;
        assert_eq!(get_with(guarded, None).await, 401);
        assert_eq!(get_with(guarded, Some("Bearer s3cre")).await, 401);
        assert_eq!(get_with(guarded, Some("Basic s3cret")).await, 401);
        assert_eq!(get_with(guarded, Some("Bearer s3cret")).await, 200);

        let text = metrics.render();
        for (reason, count) in [
            ("no token configured", 2),
            ("missing token", 2),
            ("wrong token", 1),
        ] {
            let line = format!("relay_admin_denied_total{{reason=\"{reason}\"}} {count}");
            assert!(text.contains(&line), "{line} in {text}");
        }
        let logged = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
        assert_eq!(
            logged.matches("admin request refused").count(),
            5,
            "{logged}"
        );
        assert!(logged.contains("203.0.113.9"), "{logged}");
    }
}
