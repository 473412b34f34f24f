//! Prometheus metrics, one registry per relay, rendered in the text format at `/metrics`.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every metric the relay exports.
pub struct Metrics {
    registry: Registry,
    /// Open sessions by peer and transport.
    pub sessions: IntGaugeVec,
    /// Messages accepted (durable) by lane.
    pub accepted: IntCounterVec,
    /// Messages acknowledged by their destination, by lane.
    pub delivered: IntCounterVec,
    /// Messages refused, by lane and reason (error code name).
    pub rejected: IntCounterVec,
    /// Messages that expired undelivered, by lane.
    pub expired: IntCounterVec,
    /// Items queued per destination.
    pub queue_depth: IntGaugeVec,
    /// Bytes queued per destination.
    pub queue_bytes: IntGaugeVec,
    /// From receiving a Deliver to sending its Accepted, by lane.
    pub accept_latency: HistogramVec,
    /// From accept to the destination's ack, by lane.
    pub delivery_latency: HistogramVec,
    /// Duration of the store's group commits (one fsync each).
    pub store_flush: HistogramVec,
    /// Handshakes refused, by reason.
    pub auth_failures: IntCounterVec,
    /// Connections closed for a protocol error, by code.
    pub protocol_errors: IntCounterVec,
    /// Admin requests refused (non-loopback without the token).
    pub admin_denied: IntCounterVec,
    /// Sessions the relay closed with a Goaway, by its code (protocol errors, flow control,
    /// idle timeout, revoked key, shutdown).
    pub sessions_closed: IntCounterVec,
    /// Campaign recipients by outcome: accepted, rejected, delivered, expired, cancelled.
    pub campaign_recipients: IntCounterVec,
    /// Campaigns known to the relay, by state.
    pub campaigns: IntGaugeVec,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 300.0, 3600.0,
];

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let registry = Registry::new();
        fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, m: T) -> T {
            // Names are fixed and distinct, so registration cannot collide.
            let _ = r.register(Box::new(m.clone()));
            m
        }
        let counter = |name: &str, help: &str, labels: &[&str]| {
            reg(
                &registry,
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            reg(
                &registry,
                IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let histogram = |name: &str, help: &str, labels: &[&str]| {
            reg(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
                    labels,
                )
                .expect("valid metric"),
            )
        };
        Self {
            sessions: gauge("relay_sessions", "Open sessions.", &["peer", "transport"]),
            accepted: counter(
                "relay_messages_accepted_total",
                "Messages accepted (durable).",
                &["lane"],
            ),
            delivered: counter(
                "relay_messages_delivered_total",
                "Messages acknowledged by their destination.",
                &["lane"],
            ),
            rejected: counter(
                "relay_messages_rejected_total",
                "Messages refused.",
                &["lane", "reason"],
            ),
            expired: counter(
                "relay_messages_expired_total",
                "Messages expired undelivered.",
                &["lane"],
            ),
            queue_depth: gauge(
                "relay_queue_messages",
                "Items queued per destination.",
                &["dest"],
            ),
            queue_bytes: gauge(
                "relay_queue_bytes",
                "Bytes queued per destination.",
                &["dest"],
            ),
            accept_latency: histogram(
                "relay_accept_latency_seconds",
                "Deliver received to Accepted sent.",
                &["lane"],
            ),
            delivery_latency: histogram(
                "relay_delivery_latency_seconds",
                "Accepted to acknowledged by the destination.",
                &["lane"],
            ),
            store_flush: histogram(
                "relay_store_flush_seconds",
                "Store group commit duration (one fsync).",
                &["backend"],
            ),
            auth_failures: counter(
                "relay_auth_failures_total",
                "Handshakes refused.",
                &["reason"],
            ),
            protocol_errors: counter(
                "relay_protocol_errors_total",
                "Connections closed for a protocol error.",
                &["code"],
            ),
            admin_denied: counter(
                "relay_admin_denied_total",
                "Admin requests refused.",
                &["reason"],
            ),
            sessions_closed: counter(
                "relay_sessions_closed_total",
                "Sessions closed by the relay with a Goaway, by code.",
                &["code"],
            ),
            campaign_recipients: counter(
                "relay_campaign_recipients_total",
                "Campaign recipients by outcome (accepted, rejected, delivered, expired, cancelled).",
                &["outcome"],
            ),
            campaigns: gauge(
                "relay_campaigns",
                "Campaigns kept by the relay, by state.",
                &["state"],
            ),
            registry,
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
