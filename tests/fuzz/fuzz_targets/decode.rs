//! The input decoder under arbitrary bytes: the first byte picks the topic,
//! the second the key's length (255: no key), the rest is key then payload.
//!
//! Properties: `decode` never panics; an accepted event passes its own
//! validation and encodes to a payload that decodes to the same event; a
//! rejected message has a reason, and its dead letter fits the record limit
//! (a 1 MB topic and a small one) and carries the whole payload's digest.
#![no_main]

use libfuzzer_sys::fuzz_target;
use thaw::ingest::events::{sha256_hex, Source};
use thaw::ingest::{decode, DeadLetter, Limits, Topic};

const TOPICS: [Topic; 3] = [Topic::Items, Topic::ItemRelations, Topic::Interactions];

fuzz_target!(|data: &[u8]| {
    let [t, k, rest @ ..] = data else {
        return;
    };
    let topic = TOPICS[*t as usize % 3];
    let (key, payload) = if *k == 255 || (*k as usize) > rest.len() {
        (None, rest)
    } else {
        let (key, payload) = rest.split_at(*k as usize);
        (Some(key), payload)
    };
    let limits = Limits {
        max_message_bytes: 4096,
        ..Limits::default()
    };
    match decode(topic, key, payload, &limits) {
        Ok(event) => {
            assert_eq!(event.topic(), topic);
            event.validate(&limits).expect("an accepted event is valid");
            let again = event.encode().expect("an accepted event encodes");
            let back = decode(topic, key, &again, &Limits::default())
                .expect("an accepted event's own encoding is accepted");
            assert_eq!(back, event, "encode then decode is the identity");
        }
        Err(rejection) => {
            assert!(!rejection.to_string().is_empty(), "a rejection has a reason");
            let source = Source {
                topic: topic.name(),
                partition: 0,
                offset: 0,
                key,
                payload,
            };
            for max in [1_000_000, 6_000] {
                let letter = DeadLetter::within(&source, &rejection, 0, max);
                let record = letter.encode().expect("a dead letter encodes").len()
                    + DeadLetter::record_key(key).map_or(0, <[u8]>::len);
                assert!(record <= max, "a dead letter of {record} bytes over {max}");
                assert_eq!(letter.payload_sha256, sha256_hex(payload));
                assert_eq!(letter.reason_code, rejection.reason_code());
            }
        }
    }
});
