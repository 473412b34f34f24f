//! The client's protocol state after the handshake, with no I/O (the quinn-proto way): frames
//! go in with [`ClientSession::handle_frames`], and what to write, what to tell the
//! application and when to wake up come out of the `poll_*` methods.
//!
//! One `ClientSession` lives as long as the client, across reconnects: the [`Outbox`] of
//! unanswered messages (and the book of unanswered campaign steps) outlives every connection, while the per-connection state (limits,
//! directory, tags, timers) is replaced at each `Welcome`.
//!
//! What it guarantees:
//! - at most `max_inflight` messages and receipts unanswered on the wire, at most
//!   `max_msgs_per_s` sent per second (when pacing), call lane before chat;
//! - at most `max_inflight` campaign frames unanswered, counted apart from messages
//!   (SPEC.md 8.4), each answer matched to its step (`campaigns`, `broadcast`);
//! - nothing new is sent after the relay's `Goaway`; once what is in flight is answered (or
//!   a grace period passes) it asks the shell to close and reconnect;
//! - acks of tags from an earlier session are dropped;
//! - a `Ping` when nothing was sent for a third of the idle timeout, and the connection is
//!   declared dead when nothing was received for the whole idle timeout.

use crate::campaign::CampaignAnswer;
use crate::directory::Directory;
use crate::error::{SendError, error_code};
use crate::event::{BulkMessage, DeliveryTag, Event, SessionInfo};
use crate::message::SendReceipt;
use crate::outbox::Outbox;
use bytes::Bytes;
use campaigns::CampaignBook;
use federation_spec::ProtocolError;
use federation_spec::frame::{ABSOLUTE_MAX_FRAME, DEFAULT_MAX_FRAME, encode_kind, kind_name};
use federation_spec::lane::{TtlPolicy, default_policy};
use federation_spec::message::DEFAULT_MAX_PAYLOAD;
use federation_spec::proto::{
    Ack, Credit, ErrorCode, Frame, Goaway, Lane, Limits, Ping, Pong, Welcome, frame::Kind,
};
use incoming::Staged;
use outgoing::TokenBucket;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, info};

/// Appendix D defaults, used when `Welcome.limits` has a zero.
const DEFAULT_MAX_INFLIGHT: u32 = 4096;
const DEFAULT_IDLE_TIMEOUT_MS: u32 = 60_000;
const DEFAULT_MAX_CHUNK_RECIPIENTS: u32 = 10_000;
const DEFAULT_RECEIVE_WINDOW: u32 = 1024;
/// How long to wait for answers after the relay's `Goaway` before closing anyway.
const DRAIN_GRACE: Duration = Duration::from_secs(10);

/// The time, both monotonic (timers) and wall-clock (TTLs, receipts).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Now {
    pub(crate) at: Instant,
    pub(crate) unix_ms: u64,
}

impl Now {
    pub(crate) fn system() -> Self {
        Self {
            at: Instant::now(),
            unix_ms: crate::message::unix_now_ms(),
        }
    }
}

/// Which stream a frame goes on (QUIC); WebSocket has only one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Route {
    Control,
    Lane(Lane),
}

/// A frame to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Transmit {
    pub(crate) route: Route,
    /// Length-prefixed frame.
    pub(crate) bytes: Bytes,
}

/// The session asks the shell to end the connection.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct CloseRequest {
    /// Send this before closing.
    pub(crate) goaway: Option<Goaway>,
    /// For logs and the Disconnected event.
    pub(crate) reason: String,
    /// The relay's Goaway code, when it asked for the close.
    pub(crate) code: Option<ErrorCode>,
    /// Reconnect after this (the relay's `reconnect_after_ms`).
    pub(crate) reconnect_after: Option<Duration>,
    /// The application closed the client: do not reconnect.
    pub(crate) final_close: bool,
}

/// Settings the session needs from the client configuration.
#[derive(Debug, Clone)]
pub(crate) struct SessionOptions {
    pub(crate) receive_window: u32,
    pub(crate) backpressure_retries: u32,
    pub(crate) pace_sends: bool,
    pub(crate) verify_signatures: bool,
}

/// A result for the waiter of a message or receipt.
pub(crate) type Completion<W> = (W, Result<SendReceipt, SendError>);

/// A result for the waiter of a campaign step.
pub(crate) type CampaignCompletion<C> = (C, Result<CampaignAnswer, SendError>);

/// State of one connection, from its `Welcome` to its end.
#[derive(Debug)]
struct Live {
    info: SessionInfo,
    max_inflight: usize,
    max_payload: usize,
    max_frame: usize,
    max_chunk_recipients: usize,
    idle: Duration,
    window: u32,
    ttl: HashMap<i32, TtlPolicy>,
    directory: Directory,
    last_sent: Instant,
    last_received: Instant,
    next_ping_nonce: u64,
    tokens: Option<TokenBucket>,
    /// Sending paused (RATE_LIMITED, or waiting for a token) until then.
    paused_until: Option<Instant>,
    /// The relay's Goaway, and when we stop waiting for answers.
    goaway: Option<(Goaway, Instant)>,
    unacked: HashSet<u64>,
    window_warned: bool,
    /// Campaign envelopes received on this session (`None`: it did not decode).
    bulk: HashMap<Bytes, Option<Arc<BulkMessage>>>,
}

impl Live {
    fn policy(&self, lane: Lane) -> TtlPolicy {
        self.ttl
            .get(&(lane as i32))
            .copied()
            .unwrap_or_else(|| default_policy(lane))
    }
}

/// The client's protocol state (see the module docs). `W` is what a sender of a message
/// waits on, `C` what a sender of a campaign step waits on.
pub(crate) struct ClientSession<W, C = W> {
    peer: String,
    opts: SessionOptions,
    outbox: Outbox<W>,
    campaigns: CampaignBook<C>,
    live: Option<Live>,
    sessions: u32,
    control: VecDeque<Bytes>,
    acks: Vec<u64>,
    events: VecDeque<Event>,
    completions: VecDeque<Completion<W>>,
    campaign_completions: VecDeque<CampaignCompletion<C>>,
    close: Option<CloseRequest>,
    /// The application asked to close: finish what is held, then Goaway.
    closing: Option<Instant>,
}

/// The limits of a Welcome with the protocol's defaults filled in for zeros.
pub(crate) fn effective_limits(limits: Option<&Limits>, requested_window: u32) -> Limits {
    let l = limits.copied().unwrap_or_default();
    let or = |v: u32, d: u32| if v == 0 { d } else { v };
    Limits {
        max_frame_bytes: or(l.max_frame_bytes, DEFAULT_MAX_FRAME as u32)
            .min(ABSOLUTE_MAX_FRAME as u32),
        max_payload_bytes: or(l.max_payload_bytes, DEFAULT_MAX_PAYLOAD as u32),
        max_inflight: or(l.max_inflight, DEFAULT_MAX_INFLIGHT),
        max_msgs_per_s: l.max_msgs_per_s,
        idle_timeout_ms: or(l.idle_timeout_ms, DEFAULT_IDLE_TIMEOUT_MS),
        max_chunk_recipients: or(l.max_chunk_recipients, DEFAULT_MAX_CHUNK_RECIPIENTS),
        receive_window: or(
            l.receive_window,
            or(requested_window, DEFAULT_RECEIVE_WINDOW),
        ),
    }
}

impl<W, C> ClientSession<W, C> {
    pub(crate) fn new(peer: impl Into<String>, opts: SessionOptions) -> Self {
        Self {
            peer: peer.into(),
            opts,
            outbox: Outbox::new(),
            campaigns: CampaignBook::new(),
            live: None,
            sessions: 0,
            control: VecDeque::new(),
            acks: Vec::new(),
            events: VecDeque::new(),
            completions: VecDeque::new(),
            campaign_completions: VecDeque::new(),
            close: None,
            closing: None,
        }
    }

    /// The receive window to announce in the next handshake.
    pub(crate) fn receive_window(&self) -> u32 {
        self.opts.receive_window
    }

    /// True while a session is up.
    #[cfg(test)]
    pub(crate) fn is_live(&self) -> bool {
        self.live.is_some()
    }

    /// Messages and receipts held, unanswered.
    #[cfg(test)]
    pub(crate) fn pending(&self) -> usize {
        self.outbox.len()
    }

    /// Campaign steps held, unanswered.
    #[cfg(test)]
    pub(crate) fn pending_campaign_steps(&self) -> usize {
        self.campaigns.len()
    }

    /// A new session is up. Returns what to tell the application about it.
    pub(crate) fn established(&mut self, welcome: Welcome, now: Now) -> SessionInfo {
        self.sessions += 1;
        let limits = effective_limits(welcome.limits.as_ref(), self.opts.receive_window);
        let info = SessionInfo {
            number: self.sessions,
            session_id: hex::encode(&welcome.session_id),
            role: federation_spec::proto::Role::try_from(welcome.role).unwrap_or_default(),
            limits,
            lanes: welcome.lanes.clone(),
            directory: welcome.directory.clone(),
        };
        let ttl = welcome
            .lanes
            .iter()
            .map(|l| {
                (
                    l.lane,
                    TtlPolicy {
                        default_ttl_s: l.default_ttl_s,
                        max_ttl_s: l.max_ttl_s,
                    },
                )
            })
            .collect();
        self.live = Some(Live {
            info: info.clone(),
            max_inflight: limits.max_inflight as usize,
            max_payload: limits.max_payload_bytes as usize,
            max_frame: limits.max_frame_bytes as usize,
            max_chunk_recipients: limits.max_chunk_recipients as usize,
            idle: Duration::from_millis(u64::from(limits.idle_timeout_ms)),
            window: limits.receive_window,
            ttl,
            directory: Directory::new(&welcome.directory),
            last_sent: now.at,
            last_received: now.at,
            next_ping_nonce: 1,
            tokens: (self.opts.pace_sends && limits.max_msgs_per_s > 0)
                .then(|| TokenBucket::new(limits.max_msgs_per_s, now.at)),
            paused_until: None,
            goaway: None,
            unacked: HashSet::new(),
            window_warned: false,
            bulk: HashMap::new(),
        });
        if self.sessions > 1 {
            self.events.push_back(Event::Reconnected(info.clone()));
        }
        info!(
            peer = %self.peer,
            session = %info.session_id,
            pending = self.outbox.len(),
            campaign_steps = self.campaigns.len(),
            "session established"
        );
        info
    }

    /// The connection ended. What was in flight will be resent on the next session.
    /// Returns the relay's `reconnect_after_ms` if it had sent a Goaway.
    pub(crate) fn disconnected(
        &mut self,
        reason: &str,
        code: Option<ErrorCode>,
    ) -> Option<Duration> {
        let live = self.live.take()?;
        let goaway = live.goaway.map(|(g, _)| g);
        let code = code.or_else(|| goaway.as_ref().map(|g| error_code(g.code)));
        self.outbox.requeue_in_flight();
        self.campaigns.requeue();
        self.acks.clear();
        self.control.clear();
        self.close = None;
        info!(peer = %self.peer, reason, pending = self.outbox.len(), "disconnected");
        self.events.push_back(Event::Disconnected {
            reason: reason.to_string(),
            code,
        });
        goaway.map(|g| Duration::from_millis(u64::from(g.reconnect_after_ms)))
    }

    /// Completes every held message and campaign step with `error` (the client closed or
    /// gave up).
    pub(crate) fn fail_all(&mut self, error: SendError) {
        for entry in self.outbox.drain() {
            self.completions
                .push_back((entry.waiter, Err(error.clone())));
        }
        for entry in self.campaigns.drain() {
            self.fail_step(entry, &error);
        }
    }

    /// The application took custody of these incoming frames.
    pub(crate) fn ack(&mut self, tags: impl IntoIterator<Item = DeliveryTag>) {
        let Some(live) = self.live.as_mut() else {
            return;
        };
        for tag in tags {
            if tag.session == live.info.number && live.unacked.remove(&tag.value) {
                self.acks.push(tag.value);
            } else {
                debug!(peer = %self.peer, tag = tag.value, session = tag.session, "ack of a stale or unknown tag dropped");
            }
        }
    }

    /// Changes the receive window, now and for later sessions.
    pub(crate) fn set_receive_window(&mut self, window: u32) {
        self.opts.receive_window = window;
        if let Some(live) = self.live.as_mut() {
            live.window = window.max(1);
            self.control.push_back(encode_kind(Kind::Credit(Credit {
                receive_window: window,
            })));
        }
    }

    /// The application closes the client: send what is held (until `deadline`), then say
    /// Goaway and close.
    pub(crate) fn begin_close(&mut self, deadline: Instant) {
        self.closing.get_or_insert(deadline);
    }

    /// Frames read from the connection, in order. An error is fatal for the connection:
    /// send its Goaway and close.
    pub(crate) fn handle_frames(
        &mut self,
        frames: impl IntoIterator<Item = Frame>,
        now: Now,
    ) -> Result<(), ProtocolError> {
        let Some(live) = self.live.as_mut() else {
            return Ok(());
        };
        live.last_received = now.at;
        let mut staged = Vec::new();
        let mut result = Ok(());
        for frame in frames {
            if let Err(e) = self.on_frame(frame, now, &mut staged) {
                result = Err(e);
                break;
            }
        }
        self.release(staged);
        result
    }

    fn on_frame(
        &mut self,
        frame: Frame,
        now: Now,
        staged: &mut Vec<Staged>,
    ) -> Result<(), ProtocolError> {
        let name = kind_name(&frame);
        let Some(kind) = frame.kind else {
            // A kind from a newer revision: ignored after the handshake (SPEC.md 4.4).
            return Ok(());
        };
        match kind {
            Kind::Deliver(d) => self.on_deliver(d, staged),
            Kind::Receipt(r) => self.on_receipt(r, staged),
            Kind::Expired(e) => self.on_expired(e, staged),
            Kind::BulkDeliver(b) => self.on_bulk(b, staged),
            Kind::Accepted(a) => self.on_accepted(a),
            Kind::Rejected(r) => self.on_rejected(r, now),
            Kind::Ping(p) => self
                .control
                .push_back(encode_kind(Kind::Pong(Pong { nonce: p.nonce }))),
            Kind::Pong(_) => {}
            Kind::Goaway(g) => self.on_goaway(g, now),
            Kind::CampaignAck(a) => self.on_campaign_ack(a),
            Kind::CampaignStatus(s) => self.on_campaign_status(s),
            Kind::Hello(_)
            | Kind::Challenge(_)
            | Kind::Auth(_)
            | Kind::Welcome(_)
            | Kind::Ack(_)
            | Kind::Credit(_)
            | Kind::CampaignBegin(_)
            | Kind::CampaignChunk(_)
            | Kind::CampaignEnd(_)
            | Kind::CampaignStatusRequest(_)
            | Kind::CampaignCancel(_)
            // Only ever the first frame of a QUIC lane stream, which the transport consumes.
            | Kind::StreamInit(_) => return Err(ProtocolError::UnexpectedFrame(name)),
        }
        Ok(())
    }

    fn on_goaway(&mut self, g: Goaway, now: Now) {
        info!(peer = %self.peer, code = ?error_code(g.code), reason = %g.reason, "relay sent goaway");
        self.stop_sending(Some(g), now);
    }

    fn stop_sending(&mut self, goaway: Option<Goaway>, now: Now) {
        let Some(live) = self.live.as_mut() else {
            return;
        };
        match (&mut live.goaway, goaway) {
            (Some((old, _)), Some(new)) => *old = new,
            (Some(_), None) => {}
            (slot @ None, g) => *slot = Some((g.unwrap_or_default(), now.at + DRAIN_GRACE)),
        }
    }

    /// The next frame to write, if any.
    pub(crate) fn poll_transmit(&mut self, now: Now) -> Option<Transmit> {
        let live = self.live.as_mut()?;
        if let Some(bytes) = self.control.pop_front() {
            live.last_sent = now.at;
            return Some(Transmit {
                route: Route::Control,
                bytes,
            });
        }
        if !self.acks.is_empty() {
            live.last_sent = now.at;
            let tags = std::mem::take(&mut self.acks);
            return Some(Transmit {
                route: Route::Control,
                bytes: encode_kind(Kind::Ack(Ack { tags })),
            });
        }
        if live.goaway.is_some() {
            return None;
        }
        // Messages and campaign steps are paced and bounded separately (SPEC.md 8.4).
        if live.paused_until.is_none_or(|p| p <= now.at) {
            live.paused_until = None;
            if let Some(transmit) = self.next_message(now) {
                return Some(transmit);
            }
        }
        self.next_campaign_step(now)
    }

    /// The next thing to tell the application.
    pub(crate) fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The next answer for a waiting sender.
    pub(crate) fn poll_completion(&mut self) -> Option<Completion<W>> {
        self.completions.pop_front()
    }

    /// The next answer for a waiting sender of a campaign step.
    pub(crate) fn poll_campaign_completion(&mut self) -> Option<CampaignCompletion<C>> {
        self.campaign_completions.pop_front()
    }

    /// Whether the connection should end now, and how.
    pub(crate) fn poll_close(&mut self) -> Option<CloseRequest> {
        if let Some(close) = self.close.take() {
            return Some(close);
        }
        let live = self.live.as_ref()?;
        if let Some((goaway, _)) = &live.goaway
            && self.outbox.in_flight_len() == 0
            && self.campaigns.in_flight_len() == 0
            && self.control.is_empty()
            && self.acks.is_empty()
        {
            return Some(CloseRequest {
                goaway: None,
                reason: format!("relay goaway: {}", goaway.reason),
                code: Some(error_code(goaway.code)),
                reconnect_after: Some(Duration::from_millis(u64::from(goaway.reconnect_after_ms))),
                final_close: false,
            });
        }
        if self.closing.is_some()
            && self.outbox.is_empty()
            && self.campaigns.is_empty()
            && self.control.is_empty()
            && self.acks.is_empty()
        {
            return Some(final_close("client closed"));
        }
        None
    }

    /// When [`Self::handle_timeout`] should run next.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        let mut next = self.closing;
        let mut consider = |t: Option<Instant>| {
            if let Some(t) = t {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        };
        if let Some(live) = &self.live {
            consider(Some(live.last_sent + live.idle / 3));
            consider(Some(live.last_received + live.idle));
            match &live.goaway {
                Some((_, deadline)) => consider(Some(*deadline)),
                None => {
                    consider(live.paused_until);
                    consider(self.outbox.next_wakeup());
                    consider(self.campaigns.next_wakeup());
                }
            }
        }
        next
    }

    /// Runs the timers that are due.
    pub(crate) fn handle_timeout(&mut self, now: Now) {
        if self.closing.is_some_and(|deadline| now.at >= deadline) {
            self.close = Some(final_close("client closed (grace period over)"));
            return;
        }
        let Some(live) = self.live.as_mut() else {
            return;
        };
        self.outbox.promote(now.at);
        self.campaigns.promote(now.at);
        if live.paused_until.is_some_and(|p| p <= now.at) {
            live.paused_until = None;
        }
        if now.at >= live.last_received + live.idle {
            self.close = Some(CloseRequest {
                goaway: Some(Goaway {
                    code: ErrorCode::IdleTimeout as i32,
                    reason: "nothing received from the relay within the idle timeout".into(),
                    reconnect_after_ms: 0,
                }),
                reason: "relay silent for the idle timeout".into(),
                code: None,
                reconnect_after: None,
                final_close: false,
            });
            return;
        }
        if let Some((goaway, deadline)) = &live.goaway
            && now.at >= *deadline
        {
            self.close = Some(CloseRequest {
                goaway: None,
                reason: format!("relay goaway: {} (answers not all received)", goaway.reason),
                code: Some(error_code(goaway.code)),
                reconnect_after: Some(Duration::from_millis(u64::from(goaway.reconnect_after_ms))),
                final_close: false,
            });
            return;
        }
        if now.at >= live.last_sent + live.idle / 3 {
            let nonce = live.next_ping_nonce;
            live.next_ping_nonce += 1;
            self.control
                .push_back(encode_kind(Kind::Ping(Ping { nonce })));
        }
    }
}

fn final_close(reason: &str) -> CloseRequest {
    CloseRequest {
        goaway: Some(Goaway {
            code: ErrorCode::ShuttingDown as i32,
            reason: reason.into(),
            reconnect_after_ms: 0,
        }),
        reason: reason.into(),
        code: None,
        reconnect_after: None,
        final_close: true,
    }
}

mod broadcast;
#[cfg(test)]
mod campaign_tests;
pub(crate) mod campaigns;
mod incoming;
mod outgoing;
#[cfg(test)]
mod tests;
