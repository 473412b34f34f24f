//! Assembles a relay from its configuration: store, writer, router, listeners, admin API, and
//! the reload and drain procedures that SIGHUP and SIGTERM trigger.

use crate::admin::{self, AdminState, Health};
use crate::config::{self, ConfigError, Loaded};
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::router::{Router, RouterConfig, RouterHandle};
use crate::session::{self, Shared};
use crate::store::{self, Backend, StoreConfig, StoreError, Writer};
use crate::transport::{self, Connection};
use federation_spec::keyfile::KeyFile;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The store could not be opened.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The relay key file.
    #[error("relay key {path}: {detail}")]
    RelayKey {
        /// The file.
        path: String,
        /// What is wrong.
        detail: String,
    },
    /// TLS files.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// A listener could not bind.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// A running relay.
pub struct Relay {
    /// Where QUIC listens (the actual port when configured as 0).
    pub quic_addr: Option<SocketAddr>,
    /// Where WebSocket listens.
    pub ws_addr: Option<SocketAddr>,
    /// Where the admin API listens.
    pub admin_addr: Option<SocketAddr>,
    /// The relay's public key.
    pub relay_key: ed25519_dalek::VerifyingKey,
    loaded: Loaded,
    health: Arc<Health>,
    registry_tx: watch::Sender<Arc<Registry>>,
    shutdown_tx: watch::Sender<bool>,
    router: RouterHandle,
    /// Waits for the router task and reports its failure.
    router_task: JoinHandle<()>,
    router_abort: tokio::task::AbortHandle,
    router_failed: Arc<tokio::sync::Notify>,
    writer_thread: std::thread::JoinHandle<()>,
    quic: Option<quinn::Endpoint>,
    accept_tasks: Vec<JoinHandle<()>>,
    connections: Arc<Semaphore>,
    max_connections: usize,
}

impl Relay {
    /// Starts a relay from a loaded configuration.
    pub async fn start(loaded: Loaded) -> Result<Self, StartError> {
        let cfg = &loaded.config;
        let metrics = Arc::new(Metrics::new());
        let health = Arc::new(Health::default());
        health.store_ok.store(true, Ordering::Relaxed);
        health.disk_quota_ok.store(true, Ordering::Relaxed);
        health.router_ok.store(true, Ordering::Relaxed);

        let relay_key_path = loaded.resolve(&cfg.relay_key);
        let relay_key = std::fs::read_to_string(&relay_key_path)
            .map_err(|e| e.to_string())
            .and_then(|text| KeyFile::parse(&text).map_err(|e| e.to_string()))
            .map_err(|detail| StartError::RelayKey {
                path: relay_key_path.display().to_string(),
                detail,
            })?
            .secret;

        let backend: Backend =
            cfg.store
                .backend
                .parse()
                .map_err(|e: store::ParseBackendError| ConfigError::Invalid {
                    path: loaded.path.clone(),
                    field: "store.backend".into(),
                    message: e.to_string(),
                })?;
        let mut store_cfg = StoreConfig::new(loaded.data_dir.join("store"));
        store_cfg.cache_bytes = cfg.store.cache_mb << 20;
        let store = store::open(backend, store_cfg)?;
        let (writer, writer_thread) = Writer::spawn(store.clone(), 1024);
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        spawn_flush_metrics(
            writer.clone(),
            metrics.clone(),
            backend.name(),
            shutdown_rx.clone(),
        );

        let (registry_tx, registry_rx) =
            watch::channel(Arc::new(Registry::new(loaded.peers.clone())));
        let (router, router_task) = Router::start(
            store,
            writer,
            registry_rx.clone(),
            RouterConfig {
                default_quota: cfg.queue,
                max_disk_bytes: cfg.store.max_disk_mb << 20,
                // A notice is the only word the origin gets: keep it at least a week.
                notice_ttl_ms: (cfg.lanes.chat.max_ttl_s as u64).max(7 * 86_400) * 1000,
                campaigns: cfg.campaigns,
            },
            metrics.clone(),
            &health,
        )?;
        // A router that fails (a panic) leaves a process that cannot route: say so at
        // /readyz and tell `main`, which stops the relay so that its supervisor restarts it.
        let router_abort = router_task.abort_handle();
        let router_failed = Arc::new(tokio::sync::Notify::new());
        let router_task = {
            let health = health.clone();
            let failed = router_failed.clone();
            tokio::spawn(async move {
                if let Err(e) = router_task.await
                    && !e.is_cancelled()
                {
                    tracing::error!(error = %e, "the router task failed; the relay cannot route and stops");
                    health.router_ok.store(false, Ordering::Relaxed);
                    failed.notify_one();
                }
            })
        };

        let shared = Arc::new(Shared::new(
            relay_key.clone(),
            cfg.relay_id.clone(),
            registry_rx.clone(),
            router.clone(),
            metrics.clone(),
            cfg,
            shutdown_rx,
        ));
        let connections = Arc::new(Semaphore::new(cfg.limits.max_connections));
        let handler = {
            let shared = shared.clone();
            let connections = connections.clone();
            move |conn: Connection| {
                let shared = shared.clone();
                match connections.clone().try_acquire_owned() {
                    Ok(permit) => {
                        tokio::spawn(async move {
                            session::run(conn, shared).await;
                            drop(permit);
                        });
                    }
                    Err(_) => {
                        warn!(remote = %conn.remote, "connection limit reached; refusing");
                        tokio::spawn(async move {
                            let goaway = federation_spec::proto::Goaway {
                                code: federation_spec::proto::ErrorCode::Busy as i32,
                                reason: "connection limit reached".into(),
                                reconnect_after_ms: 1000,
                            };
                            conn.outbound.close(Some(goaway)).await;
                        });
                    }
                }
            }
        };

        let handshake_timeout = Duration::from_millis(cfg.limits.handshake_timeout_ms);
        let tls = if cfg.listen.quic.is_some() || cfg.listen.ws_tls {
            let cert = loaded.resolve(&cfg.tls.cert);
            let key = loaded.resolve(&cfg.tls.key);
            Some((
                crate::tls::server_config(&cert, &key, &[federation_spec::ALPN])?,
                crate::tls::server_config(&cert, &key, &[b"http/1.1"])?,
            ))
        } else {
            None
        };
        let mut accept_tasks = Vec::new();
        let (mut quic, mut quic_addr) = (None, None);
        if let (Some(addr), Some((quic_tls, _))) = (cfg.listen.quic, &tls) {
            let idle = Duration::from_millis(cfg.limits.idle_timeout_ms * 2);
            let endpoint = transport::quic::endpoint(
                addr,
                quic_tls.clone(),
                idle,
                transport::quic::reset_secret(&relay_key),
            )
            .map_err(|source| StartError::Bind { addr, source })?;
            quic_addr = Some(
                endpoint
                    .local_addr()
                    .map_err(|source| StartError::Bind { addr, source })?,
            );
            accept_tasks.push(tokio::spawn(transport::quic::serve(
                endpoint.clone(),
                handshake_timeout,
                handler.clone(),
            )));
            quic = Some(endpoint);
        }
        let mut ws_addr = None;
        if let Some(addr) = cfg.listen.ws {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind { addr, source })?;
            ws_addr = Some(
                listener
                    .local_addr()
                    .map_err(|source| StartError::Bind { addr, source })?,
            );
            let ws_tls = if cfg.listen.ws_tls {
                tls.as_ref().map(|(_, t)| Arc::new(t.clone()))
            } else {
                None
            };
            let max_message = cfg.limits.max_frame_bytes as usize + 64 * 1024;
            accept_tasks.push(tokio::spawn(transport::ws::serve(
                listener,
                ws_tls,
                handshake_timeout,
                max_message,
                handler,
            )));
        }
        let mut admin_addr = None;
        if let Some(addr) = cfg.listen.admin {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind { addr, source })?;
            admin_addr = Some(
                listener
                    .local_addr()
                    .map_err(|source| StartError::Bind { addr, source })?,
            );
            let state = Arc::new(AdminState {
                health: health.clone(),
                metrics: metrics.clone(),
                registry: registry_rx.clone(),
                router: router.clone(),
                shared: shared.clone(),
                token: cfg.admin.token.clone(),
            });
            let app = admin::router(state).into_make_service_with_connect_info::<SocketAddr>();
            accept_tasks.push(tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app).await {
                    warn!(error = %e, "admin server stopped");
                }
            }));
        }
        health.started.store(true, Ordering::Relaxed);
        info!(quic = ?quic_addr, ws = ?ws_addr, admin = ?admin_addr, "relay ready");
        Ok(Self {
            quic_addr,
            ws_addr,
            admin_addr,
            relay_key: relay_key.verifying_key(),
            max_connections: cfg.limits.max_connections,
            loaded,
            health,
            registry_tx,
            shutdown_tx,
            router,
            router_task,
            router_abort,
            router_failed,
            writer_thread,
            quic,
            accept_tasks,
            connections,
        })
    }

    /// Re-reads the configuration file and publishes its peer registry: new peers can connect,
    /// and sessions whose key was removed are closed. Other settings need a restart.
    pub fn reload(&self) -> Result<usize, ConfigError> {
        let loaded = config::load(&self.loaded.path)?;
        let count = loaded.peers.len();
        self.registry_tx
            .send_replace(Arc::new(Registry::new(loaded.peers)));
        info!(peers = count, "peer registry reloaded");
        Ok(count)
    }

    /// Resolves if the router task fails: the relay cannot route any more and must stop.
    pub async fn router_failed(&self) {
        self.router_failed.notified().await;
    }

    /// Drains and stops: no new connections, Goaway to every session, answers for what is in
    /// flight, the store flushed. Returns when done or after `deadline`.
    pub async fn shutdown(self, deadline: Duration) {
        info!("draining");
        self.health.draining.store(true, Ordering::Relaxed);
        if let Some(q) = &self.quic {
            q.set_server_config(None);
        }
        for t in &self.accept_tasks {
            t.abort();
        }
        let _ = self.shutdown_tx.send(true);
        let sessions_done = async {
            // Every session holds a permit; all permits back means all sessions ended.
            let _ = self
                .connections
                .acquire_many(self.max_connections as u32)
                .await;
        };
        if tokio::time::timeout(deadline, sessions_done).await.is_err() {
            warn!("drain deadline passed with sessions still open");
        }
        let _ = self.router.flush().await;
        drop(self.router);
        self.router_abort.abort();
        let _ = self.router_task.await;
        if let Some(q) = self.quic {
            q.close(0u32.into(), b"relay stopped");
            // Peers that vanished would hold this for their idle timeout: bound it.
            let _ = tokio::time::timeout(Duration::from_secs(2), q.wait_idle()).await;
        }
        // The writer finishes what is queued once its last handle is gone.
        let _ = tokio::task::spawn_blocking(move || self.writer_thread.join()).await;
        info!("stopped");
    }
}

/// Samples the writer's commit durations into the flush histogram until shutdown (it holds a
/// writer handle, and the writer thread ends only when every handle is gone).
fn spawn_flush_metrics(
    writer: Writer,
    metrics: Arc<Metrics>,
    backend: &'static str,
    mut shutdown: watch::Receiver<bool>,
) {
    tokio::spawn(async move {
        let mut last = writer.stats().commits;
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            let stats = writer.stats();
            if stats.commits != last {
                last = stats.commits;
                metrics
                    .store_flush
                    .with_label_values(&[backend])
                    .observe(stats.last_commit.as_secs_f64());
            }
        }
    });
}
