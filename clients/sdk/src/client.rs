//! The application's side: [`Client`] to connect and read events, [`ClientHandle`] (cheap
//! to clone, `Send + Sync`) to send, ack and close from any task.

use crate::campaign::{
    AnswerRx, Campaign, CampaignAnswer, CampaignSpec, CampaignStatus, into_ack, into_status,
    prepare_campaign,
};
use crate::config::{ClientConfig, ConnectParams};
use crate::driver::{Channels, Driver};
use crate::error::{ClientError, PrepareError, SendError};
use crate::event::{DeliveryTag, Event, SessionInfo};
use crate::message::{
    MessageId, OutgoingMessage, OutgoingReceipt, PreparedMessage, PreparedReceipt, SendReceipt,
    prepare_message, prepare_receipt, unix_now_ms,
};
use crate::session::campaigns::{NewStep, Step, StepKey};
use crate::session::{ClientSession, Now, SessionOptions};
use crate::transport;
use bytes::Bytes;
use ed25519_dalek::SigningKey;
use federation_spec::frame::encode_kind;
use federation_spec::proto::{CampaignCancel, CampaignStatusRequest, frame::Kind};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tracing::Instrument;

/// Commands queued from handles to the driver.
const COMMAND_QUEUE: usize = 1024;

/// What a handle asks the driver to do.
pub(crate) enum Command {
    Message(PreparedMessage, Waiter),
    Receipt(PreparedReceipt, Waiter),
    Campaign(NewStep, CampaignWaiter),
    Credit(u32),
    Close(oneshot::Sender<()>),
}

/// Where the answer to one message goes; holds its place among the pending messages.
pub(crate) struct Waiter {
    tx: oneshot::Sender<Result<SendReceipt, SendError>>,
    _permit: OwnedSemaphorePermit,
}

impl Waiter {
    pub(crate) fn complete(self, result: Result<SendReceipt, SendError>) {
        // The sender may have stopped waiting; the message was handled all the same.
        let _ = self.tx.send(result);
    }
}

/// Where the answer to one campaign step goes; a chunk's also holds its place among the
/// pending chunks.
pub(crate) struct CampaignWaiter {
    tx: oneshot::Sender<Result<CampaignAnswer, SendError>>,
    _permit: Option<OwnedSemaphorePermit>,
}

impl CampaignWaiter {
    pub(crate) fn complete(self, result: Result<CampaignAnswer, SendError>) {
        // The sender may have stopped waiting; the step was handled all the same.
        let _ = self.tx.send(result);
    }
}

/// State shared by the handles and the driver.
pub(crate) struct Shared {
    peer: String,
    key: SigningKey,
    acks: Mutex<Vec<DeliveryTag>>,
    pub(crate) ack_ready: Notify,
    pending: Arc<Semaphore>,
    chunks: Arc<Semaphore>,
}

impl Shared {
    pub(crate) fn take_acks(&self) -> Vec<DeliveryTag> {
        match self.acks.lock() {
            Ok(mut acks) => std::mem::take(&mut *acks),
            Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
        }
    }

    fn push_acks(&self, tags: &[DeliveryTag]) {
        match self.acks.lock() {
            Ok(mut acks) => acks.extend_from_slice(tags),
            Err(poisoned) => poisoned.into_inner().extend_from_slice(tags),
        }
        self.ack_ready.notify_one();
    }
}

/// The answer to one message or receipt, to await.
///
/// Dropping it does not cancel anything: the SDK keeps the message until the relay answers.
#[derive(Debug)]
pub struct PendingSend {
    id: MessageId,
    rx: oneshot::Receiver<Result<SendReceipt, SendError>>,
}

impl PendingSend {
    /// The id of the message (or of the message a receipt is about).
    pub fn id(&self) -> MessageId {
        self.id
    }
}

impl Future for PendingSend {
    type Output = Result<SendReceipt, SendError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.rx)
            .poll(cx)
            .map(|r| r.unwrap_or_else(|_| Err(SendError::Closed("client stopped".into()))))
    }
}

/// Sends, acks and closes. Clone it freely; every clone talks to the same connection.
#[derive(Clone)]
pub struct ClientHandle {
    shared: Arc<Shared>,
    commands: mpsc::Sender<Command>,
    session: watch::Receiver<Option<SessionInfo>>,
}

impl std::fmt::Debug for ClientHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientHandle")
            .field("peer", &self.shared.peer)
            .finish_non_exhaustive()
    }
}

impl ClientHandle {
    /// Our peer id.
    pub fn peer(&self) -> &str {
        &self.shared.peer
    }

    /// The current session, `None` while disconnected.
    pub fn session(&self) -> Option<SessionInfo> {
        self.session.borrow().clone()
    }

    /// Waits until a session is up (returns at once if one is) and returns it; `None` if the
    /// client stopped.
    pub async fn wait_connected(&self) -> Option<SessionInfo> {
        let mut rx = self.session.clone();
        let info = rx.wait_for(Option::is_some).await.ok()?;
        info.clone()
    }

    /// Builds and signs a message with a fresh id and the current time, ready to send.
    pub fn prepare(&self, msg: OutgoingMessage) -> Result<PreparedMessage, PrepareError> {
        prepare_message(
            &self.shared.key,
            &self.shared.peer,
            msg,
            MessageId::random(),
            unix_now_ms(),
        )
    }

    /// Sends a message and waits until the relay accepts (or refuses) it.
    pub async fn send(&self, msg: OutgoingMessage) -> Result<SendReceipt, SendError> {
        let prepared = self.prepare(msg)?;
        self.send_prepared(prepared).await
    }

    /// Sends a prepared message and waits for the relay's answer. Sending the same prepared
    /// message again (after a refusal) reuses its id.
    pub async fn send_prepared(&self, msg: PreparedMessage) -> Result<SendReceipt, SendError> {
        self.submit(msg).await?.await
    }

    /// Hands a prepared message to the SDK and returns without waiting for the answer, so that
    /// many can be in flight. Waits only while `max_pending` messages are held.
    pub async fn submit(&self, msg: PreparedMessage) -> Result<PendingSend, SendError> {
        let id = msg.id;
        let (waiter, rx) = self.waiter().await?;
        self.command(Command::Message(msg, waiter)).await?;
        Ok(PendingSend { id, rx })
    }

    /// Sends a delivery or read receipt and waits for the relay's answer.
    pub async fn send_receipt(&self, receipt: OutgoingReceipt) -> Result<SendReceipt, SendError> {
        self.submit_receipt(receipt).await?.await
    }

    /// Hands a receipt to the SDK without waiting for the answer.
    pub async fn submit_receipt(&self, receipt: OutgoingReceipt) -> Result<PendingSend, SendError> {
        let prepared = prepare_receipt(&self.shared.peer, receipt, unix_now_ms())?;
        let id = prepared.id;
        let (waiter, rx) = self.waiter().await?;
        self.command(Command::Receipt(prepared, waiter)).await?;
        Ok(PendingSend { id, rx })
    }

    /// Begins a campaign (SPEC.md 9): signs its envelope once, sends the `CampaignBegin` and
    /// waits until the relay has stored it. Needs a session with the broadcaster role (the
    /// relay refuses others with `NOT_PERMITTED`).
    pub async fn begin_campaign(&self, spec: CampaignSpec) -> Result<Campaign, SendError> {
        let prepared = prepare_campaign(
            &self.shared.key,
            &self.shared.peer,
            spec,
            MessageId::random(),
            unix_now_ms(),
        )?;
        let step = NewStep {
            key: StepKey {
                campaign: prepared.id,
                step: Step::Begin,
            },
            frame: prepared.frame.clone(),
            begin: Some(prepared.frame.clone()),
            recipients: 0,
        };
        let rx = self.submit_campaign_step(step, false).await?;
        let begin_ack = into_ack(rx.await)?;
        Ok(Campaign {
            id: prepared.id,
            envelope_id: prepared.envelope_id,
            begin_ack,
            begin: prepared.frame,
            handle: self.clone(),
        })
    }

    /// The status of one of our campaigns, begun by this client or by another session of
    /// our peer. Refused with `UNKNOWN_CAMPAIGN` for a campaign the relay does not know
    /// as ours. A status the relay pushes meanwhile counts as the answer.
    pub async fn campaign_status(&self, id: [u8; 16]) -> Result<CampaignStatus, SendError> {
        let frame = encode_kind(Kind::CampaignStatusRequest(CampaignStatusRequest {
            campaign_id: Bytes::copy_from_slice(&id),
        }));
        self.campaign_query(id, Step::Status, frame).await
    }

    /// Cancels one of our campaigns: what is not delivered yet never will be. Returns its
    /// status, cancelled (or done, if it had finished before).
    pub async fn cancel_campaign(&self, id: [u8; 16]) -> Result<CampaignStatus, SendError> {
        let frame = encode_kind(Kind::CampaignCancel(CampaignCancel {
            campaign_id: Bytes::copy_from_slice(&id),
        }));
        self.campaign_query(id, Step::Cancel, frame).await
    }

    async fn campaign_query(
        &self,
        campaign: [u8; 16],
        step: Step,
        frame: Bytes,
    ) -> Result<CampaignStatus, SendError> {
        let step = NewStep {
            key: StepKey { campaign, step },
            frame,
            begin: None,
            recipients: 0,
        };
        let rx = self.submit_campaign_step(step, false).await?;
        into_status(rx.await)
    }

    /// Hands a campaign step to the driver. Chunks take a place among the pending chunks
    /// first (waiting while `max_pending_chunks` are held).
    pub(crate) async fn submit_campaign_step(
        &self,
        step: NewStep,
        chunk: bool,
    ) -> Result<AnswerRx, SendError> {
        let permit = if chunk {
            let permit = self
                .shared
                .chunks
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| SendError::Closed("client stopped".into()))?;
            Some(permit)
        } else {
            None
        };
        let (tx, rx) = oneshot::channel();
        let waiter = CampaignWaiter {
            tx,
            _permit: permit,
        };
        self.command(Command::Campaign(step, waiter)).await?;
        Ok(rx)
    }

    /// Acknowledges an incoming frame: we have taken custody of it. Acks are batched and sent
    /// within one turn of the client's task.
    pub fn ack(&self, tag: DeliveryTag) {
        self.shared.push_acks(&[tag]);
    }

    /// Acknowledges several incoming frames.
    pub fn ack_many(&self, tags: &[DeliveryTag]) {
        if !tags.is_empty() {
            self.shared.push_acks(tags);
        }
    }

    /// Changes how many un-acked incoming frames the relay may send us (0 pauses delivery).
    pub async fn set_receive_window(&self, window: u32) -> Result<(), SendError> {
        self.command(Command::Credit(window)).await
    }

    /// Closes the client: sends what is held (waiting up to `close_grace` for the answers),
    /// flushes acks, says Goaway and closes the connection. Unanswered sends then fail with
    /// [`SendError::Closed`] and the event stream ends.
    pub async fn close(&self) {
        let (done, closed) = oneshot::channel();
        if self.commands.send(Command::Close(done)).await.is_ok() {
            let _ = closed.await;
        }
    }

    async fn waiter(
        &self,
    ) -> Result<(Waiter, oneshot::Receiver<Result<SendReceipt, SendError>>), SendError> {
        let permit = self
            .shared
            .pending
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| SendError::Closed("client stopped".into()))?;
        let (tx, rx) = oneshot::channel();
        Ok((
            Waiter {
                tx,
                _permit: permit,
            },
            rx,
        ))
    }

    async fn command(&self, command: Command) -> Result<(), SendError> {
        self.commands
            .send(command)
            .await
            .map_err(|_| SendError::Closed("client stopped".into()))
    }
}

/// A connection to the relay: send with the [`ClientHandle`] methods (also available here),
/// receive with [`Client::next_event`].
///
/// Dropping the client and every handle closes it as [`ClientHandle::close`] does, in the
/// background. Events must be read: incoming frames wait in the event queue until then (the
/// receive window bounds how many).
#[derive(Debug)]
pub struct Client {
    handle: ClientHandle,
    events: mpsc::UnboundedReceiver<Event>,
}

impl Client {
    /// Connects, authenticates, and starts the client's task. The first connection is not
    /// retried: its error is returned (see [`ClientError::is_permanent`]). Later disconnects
    /// are handled by reconnecting, as configured.
    pub async fn connect(config: ClientConfig) -> Result<Client, ClientError> {
        let params = Arc::new(ConnectParams::new(&config)?);
        let span = tracing::info_span!("relay_client", peer = %config.key.peer);
        let (link, welcome) = transport::connect(params.clone(), config.receive_window)
            .instrument(span.clone())
            .await?;
        let mut session = ClientSession::new(
            config.key.peer.clone(),
            SessionOptions {
                receive_window: config.receive_window,
                backpressure_retries: config.backpressure_retries,
                pace_sends: config.pace_sends,
                verify_signatures: config.verify_signatures,
            },
        );
        let info = span.in_scope(|| session.established(welcome, Now::system()));
        let (info_tx, info_rx) = watch::channel(Some(info));
        let (commands_tx, commands_rx) = mpsc::channel(COMMAND_QUEUE);
        // Unbounded on purpose: what needs an ack is bounded by the receive window, which is
        // the protocol's flow control; blocking the driver on a slow reader instead would
        // stall answers and keepalives, and the relay would drop the session.
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            peer: config.key.peer.clone(),
            key: config.key.secret.clone(),
            acks: Mutex::new(Vec::new()),
            ack_ready: Notify::new(),
            pending: Arc::new(Semaphore::new(config.max_pending.max(1))),
            chunks: Arc::new(Semaphore::new(config.max_pending_chunks.max(1))),
        });
        let driver = Driver::new(
            session,
            link,
            params,
            &config,
            Channels {
                commands: commands_rx,
                shared: shared.clone(),
                events: events_tx,
                session_info: info_tx,
            },
        );
        tokio::spawn(driver.run().instrument(span));
        Ok(Client {
            handle: ClientHandle {
                shared,
                commands: commands_tx,
                session: info_rx,
            },
            events: events_rx,
        })
    }

    /// The next event; `None` once the client has stopped and every event was read.
    pub async fn next_event(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    /// A handle for other tasks.
    pub fn handle(&self) -> ClientHandle {
        self.handle.clone()
    }

    /// Splits into the handle and the event stream.
    pub fn split(self) -> (ClientHandle, Events) {
        (self.handle, Events(self.events))
    }

    /// See [`ClientHandle::peer`].
    pub fn peer(&self) -> &str {
        self.handle.peer()
    }

    /// See [`ClientHandle::session`].
    pub fn session(&self) -> Option<SessionInfo> {
        self.handle.session()
    }

    /// See [`ClientHandle::prepare`].
    pub fn prepare(&self, msg: OutgoingMessage) -> Result<PreparedMessage, PrepareError> {
        self.handle.prepare(msg)
    }

    /// See [`ClientHandle::send`].
    pub async fn send(&self, msg: OutgoingMessage) -> Result<SendReceipt, SendError> {
        self.handle.send(msg).await
    }

    /// See [`ClientHandle::send_prepared`].
    pub async fn send_prepared(&self, msg: PreparedMessage) -> Result<SendReceipt, SendError> {
        self.handle.send_prepared(msg).await
    }

    /// See [`ClientHandle::submit`].
    pub async fn submit(&self, msg: PreparedMessage) -> Result<PendingSend, SendError> {
        self.handle.submit(msg).await
    }

    /// See [`ClientHandle::send_receipt`].
    pub async fn send_receipt(&self, receipt: OutgoingReceipt) -> Result<SendReceipt, SendError> {
        self.handle.send_receipt(receipt).await
    }

    /// See [`ClientHandle::submit_receipt`].
    pub async fn submit_receipt(&self, receipt: OutgoingReceipt) -> Result<PendingSend, SendError> {
        self.handle.submit_receipt(receipt).await
    }

    /// See [`ClientHandle::begin_campaign`].
    pub async fn begin_campaign(&self, spec: CampaignSpec) -> Result<Campaign, SendError> {
        self.handle.begin_campaign(spec).await
    }

    /// See [`ClientHandle::campaign_status`].
    pub async fn campaign_status(&self, id: [u8; 16]) -> Result<CampaignStatus, SendError> {
        self.handle.campaign_status(id).await
    }

    /// See [`ClientHandle::cancel_campaign`].
    pub async fn cancel_campaign(&self, id: [u8; 16]) -> Result<CampaignStatus, SendError> {
        self.handle.cancel_campaign(id).await
    }

    /// See [`ClientHandle::wait_connected`].
    pub async fn wait_connected(&self) -> Option<SessionInfo> {
        self.handle.wait_connected().await
    }

    /// See [`ClientHandle::ack`].
    pub fn ack(&self, tag: DeliveryTag) {
        self.handle.ack(tag)
    }

    /// See [`ClientHandle::ack_many`].
    pub fn ack_many(&self, tags: &[DeliveryTag]) {
        self.handle.ack_many(tags)
    }

    /// See [`ClientHandle::set_receive_window`].
    pub async fn set_receive_window(&self, window: u32) -> Result<(), SendError> {
        self.handle.set_receive_window(window).await
    }

    /// See [`ClientHandle::close`].
    pub async fn close(&self) {
        self.handle.close().await
    }
}

/// The event stream of a [`Client`] after [`Client::split`].
#[derive(Debug)]
pub struct Events(mpsc::UnboundedReceiver<Event>);

impl Events {
    /// The next event; `None` once the client has stopped and every event was read.
    pub async fn next(&mut self) -> Option<Event> {
        self.0.recv().await
    }
}
