//! Property tests: decode(encode(x)) == x for generated frames of every kind, the streaming
//! decoder is indifferent to how the bytes are split, and no input makes it panic.

use bytes::Bytes;
use federation_spec::frame::{self, FrameDecoder, encode_to_bytes};
use federation_spec::proto::{self, Frame, frame::Kind};
use proptest::collection::vec;
use proptest::prelude::*;

fn bytes(max: usize) -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..max).prop_map(Bytes::from)
}

fn text() -> impl Strategy<Value = String> {
    "[a-z0-9@.+-]{0,40}"
}

fn enum_value() -> impl Strategy<Value = i32> {
    // Known values and a few unknown ones, which must survive a round trip too.
    prop_oneof![0..4i32, 0..24i32, any::<i32>()]
}

prop_compose! {
    fn counts()(platform in text(), a in any::<u64>(), d in any::<u64>(), p in any::<u64>(), e in any::<u64>(), r in any::<u64>(), c in any::<u64>()) -> proto::CampaignCounts {
        proto::CampaignCounts { platform, accepted: a, delivered: d, pending: p, expired: e, rejected: r, cancelled: c }
    }
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        (vec(any::<u32>(), 0..4), text(), bytes(40), text()).prop_map(
            |(versions, peer, client_nonce, agent)| Kind::Hello(proto::Hello {
                versions,
                peer,
                client_nonce,
                agent
            })
        ),
        (
            any::<u32>(),
            text(),
            bytes(40),
            bytes(40),
            bytes(70),
            enum_value()
        )
            .prop_map(
                |(version, relay_id, relay_nonce, relay_key, relay_signature, binding)| {
                    Kind::Challenge(proto::Challenge {
                        version,
                        relay_id,
                        relay_nonce,
                        relay_key,
                        relay_signature,
                        binding,
                    })
                }
            ),
        (bytes(40), bytes(70), any::<u32>()).prop_map(|(public_key, signature, receive_window)| {
            Kind::Auth(proto::Auth {
                public_key,
                signature,
                receive_window,
            })
        }),
        (
            bytes(16),
            enum_value(),
            any::<[u32; 7]>(),
            vec((enum_value(), any::<u32>(), any::<u32>()), 0..4),
            vec((text(), enum_value(), vec(bytes(32), 0..3)), 0..4)
        )
            .prop_map(|(session_id, role, l, lanes, dir)| {
                Kind::Welcome(proto::Welcome {
                    session_id,
                    role,
                    limits: Some(proto::Limits {
                        max_frame_bytes: l[0],
                        max_payload_bytes: l[1],
                        max_inflight: l[2],
                        max_msgs_per_s: l[3],
                        idle_timeout_ms: l[4],
                        max_chunk_recipients: l[5],
                        receive_window: l[6],
                    }),
                    lanes: lanes
                        .into_iter()
                        .map(|(lane, default_ttl_s, max_ttl_s)| proto::LaneTtl {
                            lane,
                            default_ttl_s,
                            max_ttl_s,
                        })
                        .collect(),
                    directory: dir
                        .into_iter()
                        .map(|(peer, role, keys)| proto::PeerKeys { peer, role, keys })
                        .collect(),
                })
            }),
        (bytes(300), bytes(64), bytes(32), any::<u64>()).prop_map(
            |(envelope, signature, signer, tag)| Kind::Deliver(proto::Deliver {
                envelope,
                signature,
                signer,
                tag
            })
        ),
        (bytes(16), any::<u64>(), any::<bool>(), any::<bool>()).prop_map(
            |(id, expires_at_ms, duplicate, receipt)| Kind::Accepted(proto::Accepted {
                id,
                expires_at_ms,
                duplicate,
                receipt
            })
        ),
        (
            bytes(16),
            enum_value(),
            any::<u32>(),
            text(),
            bytes(16),
            any::<u32>(),
            any::<bool>()
        )
            .prop_map(
                |(id, code, retry_after_ms, detail, campaign_id, seq, receipt)| {
                    Kind::Rejected(proto::Rejected {
                        id,
                        code,
                        retry_after_ms,
                        detail,
                        campaign_id,
                        seq,
                        receipt,
                    })
                }
            ),
        vec(any::<u64>(), 0..50).prop_map(|tags| Kind::Ack(proto::Ack { tags })),
        (
            bytes(16),
            text(),
            text(),
            enum_value(),
            any::<u64>(),
            any::<u64>()
        )
            .prop_map(
                |(id, from, to, kind, at_ms, tag)| Kind::Receipt(proto::Receipt {
                    id,
                    from,
                    to,
                    kind,
                    at_ms,
                    tag
                })
            ),
        (bytes(16), text(), any::<u64>(), any::<u64>(), bytes(16)).prop_map(
            |(id, to, expired_at_ms, tag, campaign_id)| Kind::Expired(proto::Expired {
                id,
                to,
                expired_at_ms,
                tag,
                campaign_id
            })
        ),
        any::<u32>().prop_map(|receive_window| Kind::Credit(proto::Credit { receive_window })),
        any::<u64>().prop_map(|nonce| Kind::Ping(proto::Ping { nonce })),
        any::<u64>().prop_map(|nonce| Kind::Pong(proto::Pong { nonce })),
        (enum_value(), text(), any::<u32>()).prop_map(|(code, reason, reconnect_after_ms)| {
            Kind::Goaway(proto::Goaway {
                code,
                reason,
                reconnect_after_ms,
            })
        }),
        enum_value().prop_map(|lane| Kind::StreamInit(proto::StreamInit { lane })),
        (bytes(16), bytes(300), bytes(64), bytes(32), text()).prop_map(
            |(campaign_id, envelope, signature, signer, label)| {
                Kind::CampaignBegin(proto::CampaignBegin {
                    campaign_id,
                    envelope,
                    signature,
                    signer,
                    label,
                })
            }
        ),
        (bytes(16), any::<u32>(), vec(text(), 0..20)).prop_map(|(campaign_id, seq, recipients)| {
            Kind::CampaignChunk(proto::CampaignChunk {
                campaign_id,
                seq,
                recipients,
            })
        }),
        (bytes(16), any::<u32>()).prop_map(|(campaign_id, chunks)| Kind::CampaignEnd(
            proto::CampaignEnd {
                campaign_id,
                chunks
            }
        )),
        (
            bytes(16),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<bool>()
        )
            .prop_map(|(campaign_id, seq, accepted, rejected, duplicate)| {
                Kind::CampaignAck(proto::CampaignAck {
                    campaign_id,
                    seq,
                    accepted,
                    rejected,
                    duplicate,
                })
            }),
        bytes(16).prop_map(|campaign_id| Kind::CampaignStatusRequest(
            proto::CampaignStatusRequest { campaign_id }
        )),
        (
            bytes(16),
            enum_value(),
            text(),
            proptest::option::of(counts()),
            vec(counts(), 0..4)
        )
            .prop_map(|(campaign_id, state, label, total, platforms)| {
                Kind::CampaignStatus(proto::CampaignStatus {
                    campaign_id,
                    state,
                    label,
                    total,
                    platforms,
                })
            }),
        bytes(16)
            .prop_map(|campaign_id| Kind::CampaignCancel(proto::CampaignCancel { campaign_id })),
        (
            any::<u64>(),
            bytes(16),
            bytes(300),
            bytes(64),
            bytes(32),
            vec(text(), 0..20)
        )
            .prop_map(
                |(tag, campaign_id, envelope, signature, signer, recipients)| {
                    Kind::BulkDeliver(proto::BulkDeliver {
                        tag,
                        campaign_id,
                        envelope,
                        signature,
                        signer,
                        recipients,
                    })
                }
            ),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn decode_encode_round_trip(kinds in vec(kind(), 1..8), cuts in vec(any::<prop::sample::Index>(), 0..6)) {
        let frames: Vec<Frame> = kinds.into_iter().map(|k| Frame { kind: Some(k) }).collect();
        let mut wire = Vec::new();
        for f in &frames {
            wire.extend_from_slice(&encode_to_bytes(f));
        }
        // Whole, as one WebSocket message.
        prop_assert_eq!(&frame::decode_message(&wire, frame::ABSOLUTE_MAX_FRAME).unwrap(), &frames);
        // Cut at arbitrary points, as a QUIC stream delivers it.
        let mut points: Vec<usize> = cuts.iter().map(|c| c.index(wire.len() + 1)).collect();
        points.sort_unstable();
        let mut decoder = FrameDecoder::new(frame::ABSOLUTE_MAX_FRAME);
        let mut got = Vec::new();
        let mut start = 0;
        for end in points.into_iter().chain([wire.len()]) {
            decoder.extend(&wire[start..end]);
            start = end;
            while let Some(f) = decoder.next_frame().unwrap() {
                got.push(f);
            }
        }
        prop_assert_eq!(got, frames);
        decoder.finish().unwrap();
    }

    #[test]
    fn arbitrary_bytes_never_panic(data in vec(any::<u8>(), 0..2048), max in 0usize..4096) {
        let mut decoder = FrameDecoder::new(max);
        decoder.extend(&data);
        while let Ok(Some(_)) = decoder.next_frame() {}
        let _ = frame::decode_message(&data, max);
    }
}
