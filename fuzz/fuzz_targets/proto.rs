//! The broker protocol's frame decoder (`src/proto.rs`), both directions: `split_frame` over a
//! stream of frames (4-byte big-endian length, the MAX_FRAME cap before any body is read), strict
//! `decode` of each body as a `ClientMsg` (what the broker reads from an agent) and a
//! `BrokerMsg` (what aap-exec reads), `claimed_version`, and the same bytes through a real
//! `Conn::recv` on a socket pair, which must see exactly the frames `split_frame` sees.
#![no_main]

use aap::proto::{
    BrokerMsg, ClientMsg, Conn, MAX_FRAME, ProtoError, claimed_version, decode, encode,
    split_frame,
};
use libfuzzer_sys::fuzz_target;
use std::io::Write;

/// Decoded as `$t`, a message re-encodes to one frame that decodes to the same message.
macro_rules! round_trips {
    ($t:ty, $body:expr) => {{
        match decode::<$t>($body) {
            Ok(m) => {
                let f = encode(&m);
                let (b, rest) = split_frame(&f)
                    .expect("an encoded message is within MAX_FRAME")
                    .expect("an encoded message is one whole frame");
                assert!(rest.is_empty());
                assert_eq!(decode::<$t>(b).expect("a re-encoded message decodes"), m);
                true
            }
            Err(ProtoError::Malformed(_)) => false,
            Err(e) => panic!("decode failed otherwise: {e}"),
        }
    }};
}

/// One frame's verdict, as both readers must agree on it.
#[derive(Debug, PartialEq)]
enum Seen {
    Client(bool),
    TooLarge(usize),
    /// The stream ended: nothing, or part of a frame, left.
    End,
}

fuzz_target!(|data: &[u8]| {
    // split_frame over the stream: each frame's body, at most 64 of them.
    let mut by_split = Vec::new();
    let mut buf = data;
    loop {
        if by_split.len() == 64 {
            break;
        }
        match split_frame(buf) {
            Ok(Some((body, rest))) => {
                assert!(body.len() <= MAX_FRAME);
                assert_eq!(4 + body.len() + rest.len(), buf.len());
                let declared = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
                assert_eq!(body.len(), declared);
                let client = round_trips!(ClientMsg, body);
                let _ = round_trips!(BrokerMsg, body);
                // A request that decodes says our version or another, as the broker checks.
                let claimed = claimed_version(body);
                if client && claimed.is_none() {
                    assert!(matches!(
                        decode::<ClientMsg>(body),
                        Ok(ClientMsg::Started { .. } | ClientMsg::Ended { .. })
                    ));
                }
                by_split.push(Seen::Client(client));
                buf = rest;
            }
            Ok(None) => {
                assert!(
                    buf.len() < 4
                        || buf.len()
                            < 4 + u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize
                );
                by_split.push(Seen::End);
                break;
            }
            Err(ProtoError::TooLarge(n)) => {
                assert!(n > MAX_FRAME);
                by_split.push(Seen::TooLarge(n));
                break;
            }
            Err(e) => panic!("split_frame failed otherwise: {e}"),
        }
    }

    // The same bytes through Conn::recv, as the broker reads them (kept well under the
    // socket buffer, so that one thread can write all before reading).
    if data.len() > 64 * 1024 {
        return;
    }
    let (mut tx, rx) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    tx.write_all(data).expect("write to the socket pair");
    drop(tx);
    let mut conn = Conn::new(rx);
    let mut by_conn = Vec::new();
    while by_conn.len() < by_split.len() {
        match conn.recv::<ClientMsg>() {
            Ok(_) => by_conn.push(Seen::Client(true)),
            Err(ProtoError::Malformed(_)) => by_conn.push(Seen::Client(false)),
            Err(ProtoError::TooLarge(n)) => {
                by_conn.push(Seen::TooLarge(n));
                break;
            }
            Err(ProtoError::Closed) => {
                by_conn.push(Seen::End);
                break;
            }
            Err(e) => panic!("Conn::recv failed otherwise: {e}"),
        }
    }
    assert_eq!(by_conn, by_split);
    // No descriptors came; none are handed out.
    assert!(conn.take_fds(0).is_ok());
});
