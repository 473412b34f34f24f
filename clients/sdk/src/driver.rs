//! The task that owns a client's state: it drives the sans-IO [`ClientSession`] with
//! commands from the [`crate::Client`] handles, frames from the [`Link`], and timers, and it
//! reconnects with backoff when the connection ends.
//!
//! One task owns the session, so nothing is locked on the hot path; handles talk to it over a
//! bounded command queue, and acks go through a small shared buffer so that `ack` needs no
//! `await`.

use crate::backoff::Backoff;
use crate::client::{CampaignWaiter, Command, Shared, Waiter};
use crate::config::{ClientConfig, ConnectParams};
use crate::error::{ClientError, SendError};
use crate::event::{Event, SessionInfo};
use crate::session::{ClientSession, CloseRequest, Now};
use crate::transport::{self, Link, LinkError, LinkEvent};
use federation_spec::proto::Welcome;
use rand::SeedableRng;
use rand::rngs::StdRng;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

/// Frames taken from the link per batch (their signatures are verified together).
const READ_BATCH: usize = 256;

type Connecting = Pin<Box<dyn Future<Output = Result<(Link, Welcome), ClientError>> + Send>>;

enum Conn {
    Up(Link),
    Down { retry_at: Instant },
    Connecting(Connecting),
    Finished(String),
}

enum ConnEvent {
    Link(LinkEvent),
    Connected(Result<(Link, Welcome), ClientError>),
}

async fn next_conn_event(conn: &mut Conn) -> ConnEvent {
    match conn {
        Conn::Up(link) => ConnEvent::Link(link.recv().await),
        Conn::Connecting(attempt) => ConnEvent::Connected(attempt.as_mut().await),
        Conn::Down { .. } | Conn::Finished(_) => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// The task's state.
pub(crate) struct Driver {
    session: ClientSession<Waiter, CampaignWaiter>,
    conn: Conn,
    params: Arc<ConnectParams>,
    backoff: Backoff,
    rng: StdRng,
    reconnect: bool,
    reset_after: Duration,
    close_grace: Duration,
    up_since: Instant,
    commands: mpsc::Receiver<Command>,
    commands_open: bool,
    closing: bool,
    close_waiters: Vec<oneshot::Sender<()>>,
    shared: Arc<Shared>,
    events: mpsc::UnboundedSender<Event>,
    session_info: watch::Sender<Option<SessionInfo>>,
}

/// The channels between the driver and the client handles.
pub(crate) struct Channels {
    pub(crate) commands: mpsc::Receiver<Command>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) events: mpsc::UnboundedSender<Event>,
    pub(crate) session_info: watch::Sender<Option<SessionInfo>>,
}

impl Driver {
    /// A driver for a session that is up on `link`.
    pub(crate) fn new(
        session: ClientSession<Waiter, CampaignWaiter>,
        link: Link,
        params: Arc<ConnectParams>,
        config: &ClientConfig,
        channels: Channels,
    ) -> Self {
        Self {
            session,
            conn: Conn::Up(link),
            params,
            backoff: Backoff::new(config.reconnect.clone()),
            rng: StdRng::from_entropy(),
            reconnect: config.reconnect.enabled,
            reset_after: config.reconnect.reset_after,
            close_grace: config.close_grace,
            up_since: Instant::now(),
            commands: channels.commands,
            commands_open: true,
            closing: false,
            close_waiters: Vec::new(),
            shared: channels.shared,
            events: channels.events,
            session_info: channels.session_info,
        }
    }

    /// Runs until the client is closed, or the connection is lost for good.
    pub(crate) async fn run(mut self) {
        loop {
            self.flush().await;
            if matches!(self.conn, Conn::Finished(_)) {
                break;
            }
            let mut deadline = self.session.poll_timeout();
            if let Conn::Down { retry_at } = self.conn {
                deadline = Some(deadline.map_or(retry_at, |d| d.min(retry_at)));
            }
            tokio::select! {
                command = self.commands.recv(), if self.commands_open => self.on_command(command),
                () = self.shared.ack_ready.notified() => {
                    let tags = self.shared.take_acks();
                    self.session.ack(tags);
                }
                event = next_conn_event(&mut self.conn) => match event {
                    ConnEvent::Link(event) => self.on_link_event(event).await,
                    ConnEvent::Connected(result) => self.on_connected(result),
                },
                () = sleep_until(deadline) => self.on_timer(),
            }
        }
        let reason = match &self.conn {
            Conn::Finished(reason) => reason.clone(),
            _ => "client stopped".into(),
        };
        self.session.fail_all(SendError::Closed(reason.clone()));
        self.flush_outputs();
        let _ = self.session_info.send(None);
        for waiter in self.close_waiters.drain(..) {
            let _ = waiter.send(());
        }
        info!(reason, "client stopped");
    }

    /// Writes what the session wants written and hands out events and answers; ends the
    /// connection when the session asks to.
    async fn flush(&mut self) {
        loop {
            let now = Now::system();
            if let Conn::Up(link) = &mut self.conn {
                while let Some(transmit) = self.session.poll_transmit(now) {
                    if link.send(transmit).await.is_err() {
                        // The link is going away; its reader reports why.
                        break;
                    }
                }
            }
            self.flush_outputs();
            match self.session.poll_close() {
                Some(request) => self.end_connection(request).await,
                None => return,
            }
        }
    }

    fn flush_outputs(&mut self) {
        while let Some(event) = self.session.poll_event() {
            // The application may have dropped its event stream; that is its choice.
            let _ = self.events.send(event);
        }
        while let Some((waiter, result)) = self.session.poll_completion() {
            waiter.complete(result);
        }
        while let Some((waiter, result)) = self.session.poll_campaign_completion() {
            waiter.complete(result);
        }
    }

    fn on_command(&mut self, command: Option<Command>) {
        match command {
            Some(Command::Message(message, waiter)) => self.session.submit_message(message, waiter),
            Some(Command::Receipt(receipt, waiter)) => self.session.submit_receipt(receipt, waiter),
            Some(Command::Campaign(step, waiter)) => {
                self.session.submit_campaign_step(step, waiter)
            }
            Some(Command::Credit(window)) => self.session.set_receive_window(window),
            Some(Command::Close(done)) => {
                self.close_waiters.push(done);
                self.begin_close();
            }
            None => {
                // Every handle is gone: finish what is held, then close.
                self.commands_open = false;
                self.begin_close();
            }
        }
    }

    fn begin_close(&mut self) {
        // Acks given before the close must go out before the Goaway, whichever of the two
        // wake-ups the select above saw first.
        let tags = self.shared.take_acks();
        self.session.ack(tags);
        self.closing = true;
        if matches!(self.conn, Conn::Up(_)) {
            self.session.begin_close(Instant::now() + self.close_grace);
        } else {
            self.conn = Conn::Finished("client closed while disconnected".into());
        }
    }

    async fn on_link_event(&mut self, first: LinkEvent) {
        let mut frames = Vec::new();
        let mut failure = None;
        match first {
            LinkEvent::Frame(frame) => frames.push(frame),
            LinkEvent::Failed(e) => failure = Some(e),
        }
        if let Conn::Up(link) = &mut self.conn {
            while failure.is_none() && frames.len() < READ_BATCH {
                match link.try_recv() {
                    Some(LinkEvent::Frame(frame)) => frames.push(frame),
                    Some(LinkEvent::Failed(e)) => failure = Some(e),
                    None => break,
                }
            }
        }
        if !frames.is_empty()
            && let Err(e) = self.session.handle_frames(frames, Now::system())
        {
            warn!(error = %e, "relay broke the protocol");
            failure = Some(LinkError::Protocol(e));
        }
        let Some(failure) = failure else {
            return;
        };
        let request = match failure {
            LinkError::Protocol(e) => CloseRequest {
                goaway: Some(e.to_goaway()),
                reason: format!("protocol error: {e}"),
                code: None,
                reconnect_after: None,
                final_close: false,
            },
            LinkError::Closed(reason) => CloseRequest {
                goaway: None,
                reason,
                code: None,
                reconnect_after: None,
                final_close: false,
            },
        };
        self.end_connection(request).await;
    }

    /// Closes the connection (sending the request's Goaway) and decides what comes next.
    async fn end_connection(&mut self, request: CloseRequest) {
        if let Conn::Up(link) = std::mem::replace(&mut self.conn, Conn::Finished(String::new())) {
            link.close(request.goaway.clone()).await;
        }
        let relay_hint = self.session.disconnected(&request.reason, request.code);
        let _ = self.session_info.send(None);
        if request.final_close || self.closing {
            self.conn = Conn::Finished(request.reason);
            return;
        }
        if !self.reconnect {
            self.conn = Conn::Finished(format!("connection lost ({})", request.reason));
            return;
        }
        if self.up_since.elapsed() >= self.reset_after {
            self.backoff.reset();
        }
        // The relay's Goaway says when to come back, even if the connection ended before
        // the session asked to close.
        let hint = request.reconnect_after.or(relay_hint);
        let delay = self.backoff.next_delay(hint, &mut self.rng);
        info!(reason = %request.reason, delay_ms = delay.as_millis() as u64, "reconnecting");
        self.conn = Conn::Down {
            retry_at: Instant::now() + delay,
        };
    }

    fn on_connected(&mut self, result: Result<(Link, Welcome), ClientError>) {
        match result {
            Ok((link, welcome)) => {
                let info = self.session.established(welcome, Now::system());
                let _ = self.session_info.send(Some(info));
                self.up_since = Instant::now();
                self.conn = Conn::Up(link);
            }
            Err(e) => {
                if e.is_permanent() {
                    warn!(error = %e, "reconnect refused; this will not fix itself");
                } else {
                    warn!(error = %e, "reconnect failed");
                }
                if self.backoff.exhausted() {
                    self.conn = Conn::Finished(format!("gave up reconnecting: {e}"));
                    return;
                }
                let hint = match &e {
                    ClientError::Refused {
                        reconnect_after_ms, ..
                    } => Some(Duration::from_millis(u64::from(*reconnect_after_ms))),
                    _ => None,
                };
                let delay = self.backoff.next_delay(hint, &mut self.rng);
                self.conn = Conn::Down {
                    retry_at: Instant::now() + delay,
                };
            }
        }
    }

    fn on_timer(&mut self) {
        let now = Now::system();
        if let Conn::Down { retry_at } = self.conn
            && now.at >= retry_at
        {
            let attempt = transport::connect(self.params.clone(), self.session.receive_window());
            self.conn = Conn::Connecting(Box::pin(attempt));
        }
        self.session.handle_timeout(now);
    }
}
