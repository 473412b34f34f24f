//! The relay's handshake state machine fed arbitrary frames, and a client fed arbitrary relay
//! answers: no panic, and nobody is authenticated without a valid signature.
#![no_main]

use ed25519_dalek::{SigningKey, VerifyingKey};
use federation_spec::frame::FrameDecoder;
use federation_spec::handshake::{ChannelBinding, ClientHandshake, PeerDirectory, ServerHandshake, ServerStep};
use federation_spec::proto::Role;
use libfuzzer_sys::fuzz_target;

struct Dir(VerifyingKey);
impl PeerDirectory for Dir {
    fn lookup(&self, peer: &str) -> Option<(Role, Vec<VerifyingKey>)> {
        (peer == "alpha").then(|| (Role::Platform, vec![self.0]))
    }
}

fuzz_target!(|data: &[u8]| {
    let relay = SigningKey::from_bytes(&[1; 32]);
    // The fuzzer cannot forge alpha's signature, so it only knows a key nobody registered.
    let dir = Dir(SigningKey::from_bytes(&[2; 32]).verifying_key());
    let mut server = ServerHandshake::new(relay.clone(), "fuzz", ChannelBinding::none(), [4; 32]);
    let mut client = ClientHandshake::new("alpha", SigningKey::from_bytes(&[9; 32]), Some(relay.verifying_key()), ChannelBinding::none(), [3; 32]);
    let _ = client.hello();
    let mut decoder = FrameDecoder::new(64 * 1024);
    decoder.extend(data);
    while let Ok(Some(frame)) = decoder.next_frame() {
        if let Ok(ServerStep::Authenticated(a)) = server.handle(frame.clone(), &dir) {
            panic!("authenticated without alpha's key: {a:?}");
        }
        let _ = client.handle(frame);
    }
});
