//! The router's campaign half (SPEC.md section 9): taking a broadcaster's Begin, chunks,
//! End, Cancel and status requests, turning chunks into per-platform bulk items, keeping each
//! campaign's counters durable alongside the removals that move them, and reporting progress.
//!
//! Every step that changes anything is answered only once its commit is durable; a repeat of
//! a step still being committed waits for that commit ([`Router::defer`]) and is then answered
//! as a duplicate or handled anew, so a resend after a failure is never acknowledged falsely.

use super::*;

/// A broadcaster's campaign frame, checked by its session (SPEC.md 9).
#[derive(Debug, Clone)]
pub enum CampaignRequest {
    /// CampaignBegin; the record carries the verified envelope and the expiry.
    Begin {
        id: CampaignId,
        record: CampaignRecord,
    },
    /// CampaignChunk.
    Chunk {
        id: CampaignId,
        seq: u32,
        chunk: campaign::PreparedChunk,
    },
    /// CampaignEnd.
    End { id: CampaignId, chunks: u32 },
    /// CampaignStatusRequest.
    Status { id: CampaignId },
    /// CampaignCancel.
    Cancel { id: CampaignId },
}

impl CampaignRequest {
    pub(super) fn id(&self) -> CampaignId {
        match self {
            Self::Begin { id, .. }
            | Self::Chunk { id, .. }
            | Self::End { id, .. }
            | Self::Status { id }
            | Self::Cancel { id } => *id,
        }
    }

    /// The `seq` a refusal of this request carries (SPEC.md 9.5).
    pub(super) fn seq(&self) -> u32 {
        match self {
            Self::Chunk { seq, .. } => *seq,
            Self::End { chunks, .. } => chunks.saturating_add(1),
            _ => 0,
        }
    }
}

/// A campaign as the admin API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct CampaignView {
    /// The broadcaster.
    pub broadcaster: String,
    /// When the relay accepted its Begin, ms since the epoch.
    pub accepted_at_ms: u64,
    /// When it expires.
    pub expires_at_ms: u64,
    /// Chunks acknowledged.
    pub chunks: usize,
    /// Its status, as the broadcaster gets it.
    pub status: CampaignStatus,
}

/// A refusal of a campaign frame.
pub(super) fn refuse(
    request: &CampaignRequest,
    code: ErrorCode,
    retry_after_ms: u32,
    detail: String,
) -> Kind {
    Kind::Rejected(Rejected {
        code: code as i32,
        retry_after_ms,
        detail,
        campaign_id: Bytes::copy_from_slice(&request.id()),
        seq: request.seq(),
        ..Default::default()
    })
}

/// The refusal of a new step (a chunk, the end) of a campaign that takes none any more:
/// cancelled (`INVALID_MESSAGE`, SPEC.md 9.3) or past its expiry (`EXPIRED`, 9.9).
fn refuse_closed(c: &Campaign, request: &CampaignRequest, now: u64) -> Option<Kind> {
    if c.cancelled() {
        Some(refuse(
            request,
            ErrorCode::InvalidMessage,
            0,
            "the campaign was cancelled".into(),
        ))
    } else if c.expired_at(now) {
        Some(refuse(
            request,
            ErrorCode::Expired,
            0,
            "the campaign has expired".into(),
        ))
    } else {
        None
    }
}

impl Router {
    /// Handles a broadcaster's campaign frame (SPEC.md 9.2-9.7); the answer goes to `reply`,
    /// after the step is durable when it changes anything.
    pub(super) async fn campaign(
        &mut self,
        peer: String,
        request: CampaignRequest,
        reply: oneshot::Sender<Kind>,
    ) {
        let now = unix_ms();
        let id = request.id();
        if let CampaignRequest::Begin { record, .. } = request {
            return self.begin(peer, id, record, reply, now).await;
        }
        let Some(c) = self.campaigns.get(&id).filter(|c| c.record.owner == peer) else {
            let detail = "no campaign of this broadcaster has that id".to_string();
            let _ = reply.send(refuse(&request, ErrorCode::UnknownCampaign, 0, detail));
            return;
        };
        if !c.durable {
            return self.defer(peer, request, reply);
        }
        match request {
            CampaignRequest::Status { .. } => {
                let _ = reply.send(Kind::CampaignStatus(c.status(now)));
            }
            CampaignRequest::Cancel { .. } => {
                if c.cancelled() || c.finished(now) {
                    let _ = reply.send(Kind::CampaignStatus(c.status(now)));
                    return;
                }
                let Some(c) = self.campaigns.get_mut(&id) else {
                    return;
                };
                c.record.cancelled_at_ms = now;
                let status = c.status(now);
                if let Some(t) = &status.total {
                    self.metrics
                        .campaign_recipients
                        .with_label_values(&["cancelled"])
                        .inc_by(t.cancelled);
                }
                tracing::info!(
                    campaign = hex::encode(id),
                    broadcaster = peer,
                    "campaign cancelled"
                );
                self.save_record(id, Some(reply), Kind::CampaignStatus(status), Undo::Cancel)
                    .await;
            }
            CampaignRequest::End { chunks, .. } => {
                let (accepted, rejected) = c.totals();
                let ack = |duplicate| {
                    Kind::CampaignAck(CampaignAck {
                        campaign_id: Bytes::copy_from_slice(&id),
                        seq: chunks.saturating_add(1),
                        accepted: accepted.min(u32::MAX as u64) as u32,
                        rejected: rejected.min(u32::MAX as u64) as u32,
                        duplicate,
                    })
                };
                let invalid =
                    |detail: String| refuse(&request, ErrorCode::InvalidMessage, 0, detail);
                if c.record.ended {
                    let answer = if c.record.end_chunks == chunks {
                        ack(true)
                    } else {
                        invalid(format!(
                            "the campaign was ended with {} chunks",
                            c.record.end_chunks
                        ))
                    };
                    let _ = reply.send(answer);
                    return;
                }
                if let Some(refusal) = refuse_closed(c, &request, now) {
                    let _ = reply.send(refusal);
                    return;
                }
                if let Some(beyond) = c.chunks.keys().copied().filter(|&s| s > chunks).min() {
                    let _ = reply.send(invalid(format!(
                        "chunk {beyond} is beyond the {chunks} chunks the end names"
                    )));
                    return;
                }
                if let Some(missing) = (1..=chunks).find(|s| !c.chunks.contains_key(s)) {
                    let _ = reply.send(invalid(format!(
                        "chunk {missing} is missing; send it and end again"
                    )));
                    return;
                }
                if c.chunks.values().any(|(_, durable)| !durable) {
                    return self.defer(peer, request, reply);
                }
                let answer = ack(false);
                let Some(c) = self.campaigns.get_mut(&id) else {
                    return;
                };
                c.record.ended = true;
                c.record.end_chunks = chunks;
                self.save_record(id, Some(reply), answer, Undo::End).await;
            }
            CampaignRequest::Chunk { seq, chunk, .. } => {
                self.chunk(peer, id, seq, chunk, reply, now).await
            }
            CampaignRequest::Begin { .. } => {}
        }
    }

    pub(super) async fn begin(
        &mut self,
        peer: String,
        id: CampaignId,
        record: CampaignRecord,
        reply: oneshot::Sender<Kind>,
        now: u64,
    ) {
        let request = CampaignRequest::Begin { id, record };
        let CampaignRequest::Begin { record, .. } = &request else {
            return;
        };
        if let Some(c) = self.campaigns.get(&id) {
            let answer = if c.record.owner != peer {
                refuse(
                    &request,
                    ErrorCode::InvalidMessage,
                    0,
                    "campaign id already in use".into(),
                )
            } else if c.record.envelope != record.envelope {
                refuse(
                    &request,
                    ErrorCode::InvalidMessage,
                    0,
                    "this campaign was begun with a different envelope".into(),
                )
            } else if !c.durable {
                return self.defer(peer, request, reply);
            } else {
                Kind::CampaignAck(CampaignAck {
                    campaign_id: Bytes::copy_from_slice(&id),
                    duplicate: true,
                    ..Default::default()
                })
            };
            let _ = reply.send(answer);
            return;
        }
        let quota = self.bulk_quota(&peer);
        let running = self
            .campaigns
            .values()
            .filter(|c| c.record.owner == peer && !c.finished(now))
            .count();
        if running >= quota.max_campaigns_in_flight as usize {
            let detail = format!(
                "{running} campaigns in flight; the quota is {}",
                quota.max_campaigns_in_flight
            );
            let _ = reply.send(refuse(&request, ErrorCode::CampaignQuota, 0, detail));
            return;
        }
        let CampaignRequest::Begin { record, .. } = request else {
            return;
        };
        tracing::info!(
            campaign = hex::encode(id),
            broadcaster = peer,
            label = record.label,
            expires_at_ms = record.expires_at_ms,
            "campaign begun"
        );
        let c = Campaign::new(id, record);
        let batch = WriteBatch {
            meta: vec![
                (
                    campaign::key(campaign::CAMPAIGN_PREFIX, &id),
                    Some(c.record_bytes()),
                ),
                (
                    campaign::key(campaign::COUNTS_PREFIX, &id),
                    Some(c.counts_record()),
                ),
            ],
            ..Default::default()
        };
        self.campaigns.insert(id, c);
        self.submit(
            batch,
            Pending::Campaign {
                id,
                reply: Some(reply),
                answer: Kind::CampaignAck(CampaignAck {
                    campaign_id: Bytes::copy_from_slice(&id),
                    ..Default::default()
                }),
                pushed: Vec::new(),
                undo: Undo::Begin,
            },
        )
        .await;
    }

    pub(super) async fn chunk(
        &mut self,
        peer: String,
        id: CampaignId,
        seq: u32,
        chunk: campaign::PreparedChunk,
        reply: oneshot::Sender<Kind>,
        now: u64,
    ) {
        let request = CampaignRequest::Chunk {
            id,
            seq,
            chunk: Default::default(),
        };
        let invalid = |detail: String| refuse(&request, ErrorCode::InvalidMessage, 0, detail);
        let Some(c) = self.campaigns.get(&id) else {
            return;
        };
        if seq == 0 {
            let _ = reply.send(invalid("chunk seqs start at 1".into()));
            return;
        }
        if let Some((recorded, durable)) = c.chunks.get(&seq) {
            if !durable {
                let request = CampaignRequest::Chunk { id, seq, chunk };
                return self.defer(peer, request, reply);
            }
            let _ = reply.send(Kind::CampaignAck(CampaignAck {
                campaign_id: Bytes::copy_from_slice(&id),
                seq,
                accepted: recorded.accepted,
                rejected: recorded.rejected,
                duplicate: true,
            }));
            return;
        }
        if c.record.ended {
            let _ = reply.send(invalid(
                "the campaign was ended; no new chunk is taken".into(),
            ));
            return;
        }
        if let Some(refusal) = refuse_closed(c, &request, now) {
            let _ = reply.send(refusal);
            return;
        }
        let quota = self.bulk_quota(&peer);
        let total = c.recipients() + chunk.offered;
        if total > quota.max_campaign_recipients {
            let detail = format!(
                "the campaign would have {total} recipients; the quota is {}",
                quota.max_campaign_recipients
            );
            let _ = reply.send(refuse(&request, ErrorCode::CampaignQuota, 0, detail));
            return;
        }
        // All of the chunk or none: every destination must have room.
        for (platform, _, bodies) in &chunk.platforms {
            let bytes = bodies.iter().map(|b| b.len() as u64).sum();
            if !self.room(platform, bodies.len() as u64, bytes) {
                let detail = format!("the queue of `{platform}` or the store is full");
                let _ = reply.send(refuse(&request, ErrorCode::Busy, BUSY_RETRY_MS, detail));
                return;
            }
        }
        let expires_at_ms = c.record.expires_at_ms;
        let record = ChunkRecord {
            accepted: chunk.accepted() as u32,
            rejected: chunk.rejected as u32,
        };
        let mut batch = WriteBatch::default();
        let mut pushed = Vec::new();
        let mut accepted = Vec::with_capacity(chunk.platforms.len());
        for (platform, n, bodies) in chunk.platforms {
            for body in bodies {
                let item =
                    self.reserve_unchecked(platform.clone(), Lane::Bulk, expires_at_ms, body);
                pushed.push(item.clone());
                batch.push.push(NewItem { item, dedup: None });
            }
            accepted.push((platform, n));
        }
        let Some(c) = self.campaigns.get_mut(&id) else {
            return;
        };
        for (platform, n) in &accepted {
            c.platforms.entry(platform.clone()).or_default().accepted += n;
        }
        c.rejected += chunk.rejected;
        c.chunks.insert(seq, (record, false));
        batch.meta.push((
            campaign::chunk_key(&id, seq),
            Some(record.encode_to_vec().into()),
        ));
        self.dirty.insert(id);
        self.write_dirty(&mut batch);
        debug!(
            campaign = hex::encode(id),
            seq,
            accepted = record.accepted,
            rejected = record.rejected,
            items = pushed.len(),
            "campaign chunk"
        );
        self.submit(
            batch,
            Pending::Campaign {
                id,
                reply: Some(reply),
                answer: Kind::CampaignAck(CampaignAck {
                    campaign_id: Bytes::copy_from_slice(&id),
                    seq,
                    accepted: record.accepted,
                    rejected: record.rejected,
                    duplicate: false,
                }),
                pushed,
                undo: Undo::Chunk {
                    seq,
                    accepted,
                    rejected: chunk.rejected,
                },
            },
        )
        .await;
    }

    /// Writes the campaign's record (and any changed counters), then answers `reply` with
    /// `answer` once durable, or undoes the change and refuses.
    pub(super) async fn save_record(
        &mut self,
        id: CampaignId,
        reply: Option<oneshot::Sender<Kind>>,
        answer: Kind,
        undo: Undo,
    ) {
        let Some(c) = self.campaigns.get(&id) else {
            return;
        };
        let mut batch = WriteBatch {
            meta: vec![(
                campaign::key(campaign::CAMPAIGN_PREFIX, &id),
                Some(c.record_bytes()),
            )],
            ..Default::default()
        };
        self.write_dirty(&mut batch);
        self.submit(
            batch,
            Pending::Campaign {
                id,
                reply,
                answer,
                pushed: Vec::new(),
                undo,
            },
        )
        .await;
    }

    /// Handles `request` again once every commit submitted so far has completed: it found the
    /// step it repeats still being committed, and must answer as that commit turns out.
    pub(super) fn defer(
        &mut self,
        peer: String,
        request: CampaignRequest,
        reply: oneshot::Sender<Kind>,
    ) {
        let (tx, rx) = oneshot::channel();
        let _ = tx.send(Ok(Vec::new()));
        self.completions.push_back(rx);
        self.pending.push_back(Pending::Retry {
            peer,
            request,
            reply,
        });
    }

    pub(super) fn bulk_quota(&self, peer: &str) -> crate::config::BulkQuota {
        let c = &self.campaign_config;
        self.registry.borrow().get(peer).map_or(
            crate::config::BulkQuota {
                max_bulk_rate: c.max_bulk_rate,
                max_campaign_recipients: c.max_campaign_recipients,
                max_campaigns_in_flight: c.max_campaigns_in_flight,
                max_recipients_per_s: c.max_recipients_per_s,
            },
            |p| p.bulk,
        )
    }

    /// Changes the counters of `id` for `platform`; false if the campaign is gone.
    pub(super) fn campaign_counts(
        &mut self,
        id: &CampaignId,
        platform: &str,
        f: impl FnOnce(&mut campaign::Counts),
    ) -> bool {
        let Some(c) = self.campaigns.get_mut(id) else {
            return false;
        };
        f(c.platforms.entry(platform.to_string()).or_default());
        self.dirty.insert(*id);
        true
    }

    /// The campaign and recipient count of an item, if it is a campaign item.
    pub(super) fn bulk_item(&self, item: &Item) -> Option<(CampaignId, u64)> {
        (item.queue.lane == Lane::Bulk as u8)
            .then(|| bulk_info_of(item))
            .flatten()
    }

    /// Adds the counters of every campaign changed since the last write to `batch`, so they
    /// become durable with the removals that changed them.
    pub(super) fn write_dirty(&mut self, batch: &mut WriteBatch) {
        for id in self.dirty.drain() {
            if let Some(c) = self.campaigns.get(&id) {
                batch.meta.push((
                    campaign::key(campaign::COUNTS_PREFIX, &id),
                    Some(c.counts_record()),
                ));
            }
        }
    }

    /// Sends the campaign's status to its broadcaster's open sessions, if any.
    pub(super) fn push_status(&mut self, id: &CampaignId) {
        let Some(c) = self.campaigns.get(id) else {
            return;
        };
        let Some(d) = self.dests.get(&c.record.owner) else {
            return;
        };
        if d.sessions.is_empty() {
            return;
        }
        let frame = federation_spec::frame::encode_to_bytes(&Frame {
            kind: Some(Kind::CampaignStatus(c.status(unix_ms()))),
        });
        for sid in &d.sessions {
            if let Some(s) = self.sessions.get(sid) {
                // A full queue skips one progress report; the next one carries the news.
                let _ = s.tx.try_send(Delivery {
                    lane: None,
                    frame: frame.clone(),
                });
            }
        }
    }

    /// Pushes the status of every unfinished campaign (SPEC.md 9.6).
    pub(super) fn push_statuses(&mut self) {
        let ids: Vec<CampaignId> = self
            .campaigns
            .values()
            .filter(|c| c.record.finished_at_ms == 0)
            .map(|c| c.id)
            .collect();
        for id in ids {
            self.push_status(&id);
        }
    }

    /// Marks finished campaigns (and pushes their final status), forgets those past their
    /// retention, and updates the campaign gauges. Once per tick.
    pub(super) async fn campaign_tick(&mut self, now: u64) {
        let mut finished = Vec::new();
        let mut forget = Vec::new();
        let retention_ms = self.campaign_config.retention_s.saturating_mul(1000);
        let mut by_state: HashMap<&'static str, i64> = HashMap::new();
        for c in self.campaigns.values() {
            let state = c.state(now);
            *by_state.entry(state.as_str_name()).or_default() += 1;
            if c.record.finished_at_ms == 0 {
                if c.durable && c.finished(now) {
                    finished.push(c.id);
                }
            } else if now.saturating_sub(c.record.finished_at_ms) > retention_ms {
                forget.push(c.id);
            }
        }
        for state in [
            "CAMPAIGN_STATE_OPEN",
            "CAMPAIGN_STATE_SENDING",
            "CAMPAIGN_STATE_DONE",
            "CAMPAIGN_STATE_CANCELLED",
        ] {
            self.metrics
                .campaigns
                .with_label_values(&[state])
                .set(by_state.get(state).copied().unwrap_or(0));
        }
        for id in finished {
            let Some(c) = self.campaigns.get_mut(&id) else {
                continue;
            };
            c.record.finished_at_ms = now;
            let status = c.status(now);
            tracing::info!(
                campaign = hex::encode(id),
                broadcaster = c.record.owner,
                state = status.state().as_str_name(),
                "campaign finished"
            );
            self.save_record(id, None, Kind::CampaignStatus(status), Undo::Finish)
                .await;
        }
        if forget.is_empty() {
            return;
        }
        let mut batch = WriteBatch::default();
        for id in forget {
            if let Some(c) = self.campaigns.remove(&id) {
                batch
                    .meta
                    .push((campaign::key(campaign::CAMPAIGN_PREFIX, &id), None));
                batch
                    .meta
                    .push((campaign::key(campaign::COUNTS_PREFIX, &id), None));
                for seq in c.chunks.keys() {
                    batch.meta.push((campaign::chunk_key(&id, *seq), None));
                }
            }
        }
        self.submit(batch, Pending::Nothing).await;
    }

    /// Reverts the in-memory effect of a campaign step whose commit failed.
    pub(super) fn undo(&mut self, id: &CampaignId, undo: Undo) {
        match undo {
            Undo::Begin => {
                self.campaigns.remove(id);
            }
            Undo::Chunk {
                seq,
                accepted,
                rejected,
            } => {
                if let Some(c) = self.campaigns.get_mut(id) {
                    c.chunks.remove(&seq);
                    c.rejected = c.rejected.saturating_sub(rejected);
                    for (platform, n) in accepted {
                        if let Some(counts) = c.platforms.get_mut(&platform) {
                            counts.accepted = counts.accepted.saturating_sub(n);
                        }
                    }
                }
                self.dirty.insert(*id);
            }
            Undo::End => {
                if let Some(c) = self.campaigns.get_mut(id) {
                    c.record.ended = false;
                    c.record.end_chunks = 0;
                }
            }
            Undo::Cancel => {
                if let Some(c) = self.campaigns.get_mut(id) {
                    c.record.cancelled_at_ms = 0;
                }
            }
            Undo::Finish => {
                if let Some(c) = self.campaigns.get_mut(id) {
                    c.record.finished_at_ms = 0;
                }
            }
        }
    }
}

/// Campaign id and recipient count of a stored campaign item.
pub(super) fn bulk_info_of(item: &Item) -> Option<(CampaignId, u64)> {
    let (h, inner) = record::decode(&item.body).ok()?;
    (h.kind == RecordKind::Bulk)
        .then(|| campaign::bulk_info(inner))
        .flatten()
}

/// Reads every campaign's records back from the store at start.
pub(super) fn load_campaigns(
    store: &dyn Store,
) -> Result<HashMap<CampaignId, Campaign>, StoreError> {
    let bad = |what: &str| StoreError::Backend(format!("unreadable campaign {what} record"));
    let mut campaigns = HashMap::new();
    for (k, v) in store.meta_scan(&[campaign::CAMPAIGN_PREFIX])? {
        let (id, _) = campaign::split_key(&k).ok_or_else(|| bad("key"))?;
        let record = CampaignRecord::decode(v).map_err(|_| bad("campaign"))?;
        let mut c = Campaign::new(id, record);
        c.durable = true;
        campaigns.insert(id, c);
    }
    for (k, v) in store.meta_scan(&[campaign::COUNTS_PREFIX])? {
        let (id, _) = campaign::split_key(&k).ok_or_else(|| bad("key"))?;
        let record = campaign::CountsRecord::decode(v).map_err(|_| bad("counts"))?;
        if let Some(c) = campaigns.get_mut(&id) {
            c.restore_counts(&record);
        }
    }
    for (k, v) in store.meta_scan(&[campaign::CHUNK_PREFIX])? {
        let Some((id, Some(seq))) = campaign::split_key(&k) else {
            return Err(bad("chunk key"));
        };
        let record = ChunkRecord::decode(v).map_err(|_| bad("chunk"))?;
        if let Some(c) = campaigns.get_mut(&id) {
            c.chunks.insert(seq, (record, true));
        }
    }
    Ok(campaigns)
}
