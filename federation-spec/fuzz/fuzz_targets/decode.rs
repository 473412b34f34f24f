//! The streaming decoder and the message checks on arbitrary bytes: no panic, and every frame
//! that decodes re-encodes to something that decodes to the same frame.
#![no_main]

use federation_spec::frame::{FrameDecoder, encode_to_bytes};
use federation_spec::message::{check_campaign_begin, check_deliver, check_receipt, recipient_platform};
use federation_spec::proto::frame::Kind;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte chooses where the stream is cut, to exercise partial reads.
    let Some((&cut, data)) = data.split_first() else { return };
    let cut = (cut as usize).min(data.len());
    let mut decoder = FrameDecoder::new(1 << 20);
    for part in [&data[..cut], &data[cut..]] {
        decoder.extend(part);
        while let Ok(Some(frame)) = decoder.next_frame() {
            let again = federation_spec::frame::decode_message(&encode_to_bytes(&frame), 1 << 21)
                .expect("re-encoded frame decodes");
            assert_eq!(again, vec![frame.clone()]);
            match &frame.kind {
                Some(Kind::Deliver(d)) => {
                    let _ = check_deliver(d, "alpha", 65536);
                }
                Some(Kind::Receipt(r)) => {
                    let _ = check_receipt(r, "alpha");
                }
                Some(Kind::CampaignBegin(c)) => {
                    let _ = check_campaign_begin(c, "news", 65536);
                }
                Some(Kind::CampaignChunk(c)) => {
                    for r in &c.recipients {
                        let _ = recipient_platform(r);
                    }
                }
                _ => {}
            }
        }
    }
});
