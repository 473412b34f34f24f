//! Floods and slow peers, on both transports (SPEC.md 8.4, 8.5, 11.3, 11.5): a million tiny
//! frames, a flood of pings and one of messages, handshakes trickled byte by byte, and peers
//! that never read. The relay answers each with the spec's code, never buffers without bound,
//! releases the connection, and a well-behaved pair of peers (the [`Witness`]) gets its
//! messages through meanwhile.

mod common;

use common::{
    ChildRelay, InProcess, Target, Transport, Wire, Witness, deliver, envelope, key, metric, setup,
};
use federation_spec::frame::encode_to_bytes;
use federation_spec::proto::{ErrorCode, Frame, Hello, Lane, Ping, frame::Kind};
use std::time::{Duration, Instant};

/// How long the witness may take for one message while the relay is being abused.
const WITNESS_BOUND: Duration = Duration::from_secs(3);

fn ping(nonce: u64) -> Frame {
    Frame {
        kind: Some(Kind::Ping(Ping { nonce })),
    }
}

/// Sends `bytes` as the flood goes on each transport: one WebSocket message, or a write on
/// the QUIC chat lane stream. False once the relay no longer takes them (within `limit`).
async fn push(wire: &mut Wire, bytes: Vec<u8>, limit: Duration) -> bool {
    use futures_util::SinkExt;
    match wire {
        Wire::Ws(p) => {
            let send = p.ws.send(tokio_tungstenite::tungstenite::Message::Binary(
                bytes.into(),
            ));
            matches!(tokio::time::timeout(limit, send).await, Ok(Ok(())))
        }
        Wire::Quic(p) => {
            let send = p.lane_bytes(Lane::Chat, &bytes);
            matches!(tokio::time::timeout(limit, send).await, Ok(Ok(())))
        }
    }
}

/// Waits until `series` reads `want`.
async fn wait_metric(admin: std::net::SocketAddr, series: &str, want: f64, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let got = metric(admin, series).await;
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "{series} = {got}, want {want}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A million frames with no kind (4 bytes each, the cheapest frame there is): ignored after
/// the handshake (SPEC.md 4.4). The relay takes them all, in order, stays responsive for
/// others, and still answers the flooder's Ping right after.
///
/// SPEC.md 11.3 says a relay SHOULD also close a session whose frame rate is far too high
/// (Goaway{RATE_LIMITED}); this relay has no per-session frame-rate limit, so the flood is
/// absorbed at the speed the session can parse it (transport backpressure, bounded queues).
#[tokio::test]
async fn a_million_tiny_frames_are_absorbed_and_the_relay_stays_responsive() {
    const FRAMES: usize = 1_000_000;
    const PER_MESSAGE: usize = 16_384;
    let relay = InProcess::start("").await;
    let t = relay.target();
    let mut witness = Witness::start(&t).await;
    for transport in Transport::BOTH {
        let mut flooder = transport.connect(&t, "alpha").await;
        let started = Instant::now();
        let chunk = vec![0u8; 4 * PER_MESSAGE];
        for i in 0..FRAMES / PER_MESSAGE + 1 {
            let n = PER_MESSAGE.min(FRAMES - i * PER_MESSAGE);
            if n == 0 {
                break;
            }
            assert!(
                push(
                    &mut flooder,
                    chunk[..4 * n].to_vec(),
                    Duration::from_secs(20)
                )
                .await,
                "{transport:?}: the relay stopped taking frames"
            );
            if i % 16 == 0 {
                witness.check(WITNESS_BOUND).await;
            }
        }
        let nonce = 0x5eed + transport as u64;
        let probe = encode_to_bytes(&ping(nonce)).to_vec();
        assert!(push(&mut flooder, probe, Duration::from_secs(20)).await);
        let answer = tokio::time::timeout(Duration::from_secs(20), flooder.recv())
            .await
            .expect("pong within 20 s")
            .expect("session open");
        assert!(
            matches!(answer.kind, Some(Kind::Pong(p)) if p.nonce == nonce),
            "{transport:?}: {answer:?}"
        );
        eprintln!(
            "{transport:?}: {FRAMES} empty frames and a ping answered in {:?}; witness worst {:?}",
            started.elapsed(),
            witness.worst
        );
    }
    witness.check(WITNESS_BOUND).await;
    let (_, text) = common::http_get(t.admin, "/metrics").await;
    assert!(!text.contains("relay_protocol_errors_total{"), "{text}");
}

/// A ping flood from a peer that reads: every Ping is answered by its Pong, in order.
#[tokio::test]
async fn a_ping_flood_is_answered_in_order() {
    const PINGS: u64 = 100_000;
    const PER_MESSAGE: u64 = 4096;
    let relay = InProcess::start("").await;
    let t = relay.target();
    let mut witness = Witness::start(&t).await;
    for transport in Transport::BOTH {
        let mut flooder = transport.connect(&t, "alpha").await;
        let started = Instant::now();
        let mut next_pong = 0;
        let mut sent = 0;
        while sent < PINGS {
            let mut message = Vec::new();
            for n in sent..(sent + PER_MESSAGE).min(PINGS) {
                message.extend_from_slice(&encode_to_bytes(&ping(n)));
            }
            sent = (sent + PER_MESSAGE).min(PINGS);
            assert!(push(&mut flooder, message, Duration::from_secs(20)).await);
            // Read what is answered so far, keeping at most one message's worth unread.
            while next_pong + PER_MESSAGE < sent {
                let f = flooder.recv().await.expect("session open");
                assert!(
                    matches!(f.kind, Some(Kind::Pong(p)) if p.nonce == next_pong),
                    "{transport:?}: expected pong {next_pong}, got {f:?}"
                );
                next_pong += 1;
            }
        }
        while next_pong < PINGS {
            let f = flooder.recv().await.expect("session open");
            assert!(matches!(f.kind, Some(Kind::Pong(p)) if p.nonce == next_pong));
            next_pong += 1;
        }
        witness.check(WITNESS_BOUND).await;
        eprintln!(
            "{transport:?}: {PINGS} pings answered in {:?}",
            started.elapsed()
        );
    }
}

/// Floods `frames` copies of one Deliver from alpha and counts the answers: (accepted,
/// FLOW_CONTROL, RATE_LIMITED). Every frame gets exactly one; the session stays open.
async fn flood_messages(t: &Target, transport: Transport, frames: usize) -> [usize; 3] {
    const PER_MESSAGE: usize = 1000;
    let alpha_key = key(&t.dir, "alpha").secret;
    let mut flooder = transport.connect(t, "alpha").await;
    // The same message again and again: what gets through is accepted once, then as a
    // duplicate (SPEC.md 6.6), so the flood costs the store nothing.
    let frame = encode_to_bytes(&deliver(
        &envelope([1; 16], "ali@alpha", "cy@gamma", "flood"),
        &alpha_key,
    ));
    for _ in 0..frames / PER_MESSAGE {
        let message = frame.repeat(PER_MESSAGE);
        assert!(push(&mut flooder, message, Duration::from_secs(20)).await);
    }
    let mut counts = [0; 3];
    for _ in 0..frames {
        match flooder.recv().await.expect("session open").kind {
            Some(Kind::Accepted(_)) => counts[0] += 1,
            Some(Kind::Rejected(r)) if r.code == ErrorCode::FlowControl as i32 => counts[1] += 1,
            Some(Kind::Rejected(r)) if r.code == ErrorCode::RateLimited as i32 => {
                assert!(r.retry_after_ms >= 1, "{r:?}");
                counts[2] += 1;
            }
            other => panic!("{transport:?}: unexpected {other:?}"),
        }
    }
    flooder.send(&ping(7)).await;
    let f = flooder.recv().await.expect("session open");
    assert!(
        matches!(f.kind, Some(Kind::Pong(p)) if p.nonce == 7),
        "{f:?}"
    );
    counts
}

async fn rejected(t: &Target, reason: &str) -> usize {
    let series = format!("relay_messages_rejected_total{{lane=\"chat\",reason=\"{reason}\"}}");
    metric(t.admin, &series).await as usize
}

/// A flood of messages (SPEC.md 8.4, 8.5): beyond `max_inflight` unanswered ones, each gets
/// Rejected{FLOW_CONTROL}; beyond `max_msgs_per_s`, Rejected{RATE_LIMITED, retry_after_ms}.
/// Every frame is answered exactly once, the session stays open, and the counters match
/// what the flooder was told. One relay per limit, so that each is met for sure.
#[tokio::test]
async fn a_message_flood_gets_flow_control_and_rate_limits() {
    for transport in Transport::BOTH {
        let relay = InProcess::start("[limits]\nmax_inflight = 64\n").await;
        let t = relay.target();
        let mut witness = Witness::start(&t).await;
        let [accepted, flow, rate] = flood_messages(&t, transport, 10_000).await;
        assert_eq!((accepted + flow, rate), (10_000, 0), "{transport:?}");
        assert!(
            accepted >= 1 && flow > 0,
            "{transport:?}: {accepted} {flow}"
        );
        assert_eq!(rejected(&t, "ERROR_CODE_FLOW_CONTROL").await, flow);
        witness.check(WITNESS_BOUND).await;
        eprintln!("{transport:?}: {accepted} accepted, {flow} flow control");

        let relay = InProcess::start("[limits]\nmax_msgs_per_s = 100\n").await;
        let t = relay.target();
        let mut witness = Witness::start(&t).await;
        let started = Instant::now();
        let [accepted, flow, rate] = flood_messages(&t, transport, 2_000).await;
        assert_eq!((accepted + rate, flow), (2_000, 0), "{transport:?}");
        // A bucket of one second's worth, refilled at the rate.
        let most = 100.0 * (1.0 + started.elapsed().as_secs_f64());
        assert!(
            accepted >= 1 && accepted as f64 <= most,
            "{transport:?}: {accepted} accepted, at most {most}"
        );
        assert_eq!(rejected(&t, "ERROR_CODE_RATE_LIMITED").await, rate);
        witness.check(WITNESS_BOUND).await;
        eprintln!("{transport:?}: {accepted} accepted, {rate} rate limited");
    }
}

/// Sends `bytes` one per WebSocket fragment of a binary message never finished, one every
/// `drip`, until the relay answers; returns its Goaway.
async fn trickle_fragments(
    ws: &mut common::RawPeer,
    bytes: &[u8],
    drip: Duration,
) -> federation_spec::proto::Goaway {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::frame::{Frame as WsFrame, coding};
    let mut pieces = bytes.iter().enumerate();
    loop {
        if let Some((i, b)) = pieces.next() {
            let opcode = if i == 0 {
                coding::OpCode::Data(coding::Data::Binary)
            } else {
                coding::OpCode::Data(coding::Data::Continue)
            };
            let _ = ws
                .ws
                .send(Message::Frame(WsFrame::message(vec![*b], opcode, false)))
                .await;
        }
        tokio::select! {
            f = ws.recv() => match f {
                Some(Frame { kind: Some(Kind::Goaway(g)) }) => return g,
                other => panic!("unexpected {other:?}"),
            },
            _ = tokio::time::sleep(drip) => {}
        }
    }
}

/// Bytes trickled so slowly the handshake cannot finish in `limits.handshake_timeout_ms`:
/// the upgrade request itself (the socket is closed), the Hello (one byte per WebSocket
/// fragment, or per QUIC write), an Auth after a prompt Hello, and a QUIC connection that
/// never opens its control stream. Each ends within the timeout plus a margin, with
/// Goaway{HANDSHAKE_TIMEOUT} where a session had begun; and a peer that then goes silent
/// (neither reads nor closes) does not keep its socket at the relay.
#[tokio::test]
async fn slowloris_handshakes_time_out_and_release_the_socket() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const TIMEOUT: Duration = Duration::from_millis(400);
    const DRIP: Duration = Duration::from_millis(40);
    let dir = setup("[limits]\nhandshake_timeout_ms = 400\n");
    let relay = ChildRelay::start_logged(dir.path());
    let t = relay.target();
    let mut witness = Witness::start(&t).await;
    let fds = relay.open_fds();
    let hello = encode_to_bytes(&Frame {
        kind: Some(Kind::Hello(Hello {
            versions: vec![1],
            peer: "alpha".into(),
            client_nonce: vec![7; 32].into(),
            agent: "slowloris".into(),
        })),
    });
    let within = |started: Instant, what: &str| {
        let took = started.elapsed();
        assert!(
            took >= TIMEOUT - Duration::from_millis(50) && took < TIMEOUT + Duration::from_secs(2),
            "{what}: ended after {took:?}"
        );
    };

    // 1. The HTTP upgrade request, a byte at a time: the socket is closed (no session yet).
    let mut tcp = tokio::net::TcpStream::connect(t.ws).await.unwrap();
    let request = "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: relay-fed.v1\r\n\r\n";
    let started = Instant::now();
    let mut closed = false;
    for b in request.as_bytes() {
        let mut buf = [0u8; 64];
        tokio::select! {
            read = tcp.read(&mut buf) => {
                assert!(matches!(read, Ok(0) | Err(_)), "the relay answered a partial request");
                closed = true;
                break;
            }
            _ = tokio::time::sleep(DRIP) => {}
        }
        if tcp.write_all(&[*b]).await.is_err() {
            closed = true;
            break;
        }
    }
    assert!(closed, "upgrade trickled to the end without being cut");
    within(started, "trickled upgrade");
    drop(tcp);

    // 2. Hello in one-byte WebSocket fragments (no message completes).
    let mut ws = common::RawPeer::open(t.ws).await;
    let started = Instant::now();
    let goaway = trickle_fragments(&mut ws, &hello, DRIP).await;
    assert_eq!(goaway.code, ErrorCode::HandshakeTimeout as i32);
    within(started, "fragmented hello");
    // The peer now goes silent: it neither reads the close nor closes. Kept open below.
    let silent_ws = ws;

    // 3. A prompt Hello, then the Auth trickled: the timer covers the whole handshake.
    let mut ws = common::RawPeer::open(t.ws).await;
    let started = Instant::now();
    ws.send(&Frame {
        kind: Some(Kind::Hello(Hello {
            versions: vec![1],
            peer: "alpha".into(),
            client_nonce: common::rand_nonce().to_vec().into(),
            agent: String::new(),
        })),
    })
    .await;
    let challenge = ws.recv().await.expect("challenge");
    assert!(matches!(challenge.kind, Some(Kind::Challenge(_))));
    let auth = encode_to_bytes(&Frame {
        kind: Some(Kind::Auth(Default::default())),
    });
    let goaway = trickle_fragments(&mut ws, &auth, DRIP).await;
    assert_eq!(goaway.code, ErrorCode::HandshakeTimeout as i32);
    within(started, "trickled auth");
    drop(ws);

    // 4. QUIC: the Hello a byte at a time on the control stream.
    let mut quic = common::quic::QuicPeer::open(t.quic, &t.dir).await;
    let started = Instant::now();
    let mut sent = 0;
    let mut code = None;
    while code.is_none() {
        if sent < hello.len() {
            let _ = quic.send_bytes(&hello[sent..sent + 1]).await;
            sent += 1;
        }
        tokio::select! {
            f = quic.recv() => match f {
                Some(Frame { kind: Some(Kind::Goaway(g)) }) => code = Some(g.code),
                other => panic!("unexpected {other:?}"),
            },
            _ = tokio::time::sleep(DRIP) => {}
        }
    }
    assert_eq!(code, Some(ErrorCode::HandshakeTimeout as i32));
    within(started, "trickled QUIC hello");
    assert_eq!(
        quic.close_code(Duration::from_secs(3)).await,
        Some(ErrorCode::HandshakeTimeout as u64)
    );

    // 5. QUIC: connected, but no control stream ever: the relay drops the connection.
    let idle = common::quic::QuicPeer::open(t.quic, &t.dir).await;
    let started = Instant::now();
    let _ = tokio::time::timeout(Duration::from_secs(3), idle.conn.closed())
        .await
        .expect("the relay drops a QUIC connection without a control stream");
    // The relay's timer started before the QUIC handshake that `open` waited for.
    assert!(
        started.elapsed() < TIMEOUT + Duration::from_secs(2),
        "QUIC without a control stream: ended after {:?}",
        started.elapsed()
    );

    witness.check(WITNESS_BOUND).await;
    assert_eq!(
        metric(t.admin, "relay_auth_failures_total{reason=\"timeout\"}").await,
        3.0
    );
    // The silent WebSocket peer still holds its end open, yet the relay let go of its socket.
    let deadline = Instant::now() + Duration::from_secs(5);
    while relay.open_fds() > fds {
        assert!(
            Instant::now() < deadline,
            "the relay still holds {} more sockets than before the slow peers",
            relay.open_fds() - fds
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(silent_ws);
}

/// A peer that floods pings and never reads the pongs. The relay must not queue for it
/// without bound: once its send queue is full it ends the session (Goaway{FLOW_CONTROL},
/// and over QUIC the close code 16), releases the connection, and its memory stays flat,
/// while the witness keeps working. Nothing the peer had is lost: it had nothing in flight.
#[tokio::test]
async fn a_peer_that_never_reads_is_disconnected_not_buffered() {
    const PER_MESSAGE: usize = 8192;
    /// Pings offered per transport: unbounded buffering of their pongs would cost hundreds
    /// of MiB.
    const OFFERED: usize = 4_000_000;
    let dir = setup("");
    let relay = ChildRelay::start_logged(dir.path());
    let t: Target = relay.target();
    let mut witness = Witness::start(&t).await;
    witness.check(WITNESS_BOUND).await;
    let fds = relay.open_fds();
    let rss_before = relay.rss_kib();
    let mut rss_peak = rss_before;
    let chunk: Vec<u8> = (0..PER_MESSAGE)
        .flat_map(|n| encode_to_bytes(&ping(n as u64)).to_vec())
        .collect();
    for transport in Transport::BOTH {
        let series = format!(
            "relay_sessions{{peer=\"alpha\",transport=\"{}\"}}",
            match transport {
                Transport::Ws => "ws",
                Transport::Quic => "quic",
            }
        );
        let mut flooder = transport.connect(&t, "alpha").await;
        wait_metric(t.admin, &series, 1.0, Duration::from_secs(5)).await;
        let started = Instant::now();
        let mut offered = 0;
        while offered < OFFERED {
            if !push(&mut flooder, chunk.clone(), Duration::from_secs(2)).await {
                break;
            }
            offered += PER_MESSAGE;
            rss_peak = rss_peak.max(relay.rss_kib());
        }
        // The session ends by itself, without the peer reading anything.
        let deadline = Instant::now() + Duration::from_secs(20);
        while metric(t.admin, &series).await != 0.0 {
            assert!(
                Instant::now() < deadline,
                "{transport:?}: session still open after {offered} pings offered"
            );
            rss_peak = rss_peak.max(relay.rss_kib());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            offered < OFFERED,
            "{transport:?}: the relay read all {offered} pings of a peer that never reads"
        );
        if let Wire::Quic(q) = &flooder {
            assert_eq!(
                q.close_code(Duration::from_secs(5)).await,
                Some(ErrorCode::FlowControl as u64),
                "QUIC close code"
            );
        }
        witness.check(WITNESS_BOUND).await;
        eprintln!(
            "{transport:?}: closed after {offered} pings offered, {:?}; rss {} -> peak {} KiB",
            started.elapsed(),
            rss_before,
            rss_peak
        );
        // The peer still holds its end, but the relay has let go of the socket (a WebSocket
        // uses one per connection; QUIC shares the endpoint's).
        let deadline = Instant::now() + Duration::from_secs(10);
        while relay.open_fds() > fds {
            assert!(
                Instant::now() < deadline,
                "{transport:?}: the relay still holds the socket of a peer it closed"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(flooder);
    }
    assert!(
        rss_peak - rss_before < 64 * 1024,
        "relay memory grew by {} KiB",
        rss_peak - rss_before
    );
    witness.check(WITNESS_BOUND).await;
}
