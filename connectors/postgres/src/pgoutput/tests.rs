//! Decoding frames captured from Postgres 15 by
//! `tests/fixtures/pgoutput/capture.sh`; the script shows the SQL behind
//! each frame.

use bytes::Bytes;
use walcast_sdk::Lsn;

use super::*;

/// One hex line as bytes.
fn unhex(l: &str) -> Vec<u8> {
    (0..l.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&l[i..i + 2], 16).unwrap())
        .collect()
}

/// The payloads of `streamed.hex` (protocol 2 with streaming; see
/// `tests/fixtures/pgoutput/capture_streamed.sh`), as sent.
pub(crate) fn streamed_payloads() -> Vec<Bytes> {
    include_str!("../../tests/fixtures/pgoutput/streamed.hex")
        .lines()
        .map(|l| Bytes::from(unhex(l)))
        .collect()
}

/// The frames of `session1.hex`, decoded (the assembler's tests read
/// them too).
pub(crate) fn frames() -> Vec<Message> {
    include_str!("../../tests/fixtures/pgoutput/session1.hex")
        .lines()
        .map(|l| {
            let bytes: Vec<u8> = (0..l.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&l[i..i + 2], 16).unwrap())
                .collect();
            decode(Bytes::from(bytes)).unwrap_or_else(|e| panic!("frame {l}: {e}"))
        })
        .collect()
}

fn text(v: &TupleValue) -> &str {
    match v {
        TupleValue::Text(b) => std::str::from_utf8(b).unwrap(),
        other => panic!("expected text, got {other:?}"),
    }
}

#[test]
fn decodes_a_captured_session() {
    let m = frames();
    assert_eq!(m.len(), 35);

    let Message::Begin(begin) = &m[0] else {
        panic!("{:?}", m[0])
    };
    let Message::Relation(rel) = &m[1] else {
        panic!("{:?}", m[1])
    };
    assert_eq!(
        (rel.namespace.as_str(), rel.name.as_str()),
        ("public", "fx_items")
    );
    assert_eq!(rel.replica_identity, ReplicaIdentitySetting::Default);
    let names: Vec<_> = rel
        .columns
        .iter()
        .map(|c| (c.name.as_str(), c.identity, c.type_oid))
        .collect();
    assert_eq!(
        names,
        [
            ("id", true, 20),
            ("name", false, 25),
            ("price", false, 1700),
            ("big", false, 25)
        ]
    );
    assert_eq!(
        rel.columns[2].type_modifier,
        ((12 << 16) | 2) + 4,
        "numeric(12,2) typmod"
    );

    let Message::Insert(ins) = &m[2] else {
        panic!("{:?}", m[2])
    };
    assert_eq!(ins.relation_id, rel.id);
    assert_eq!(text(&ins.new[0]), "1");
    assert_eq!(text(&ins.new[2]), "1.50");
    assert_eq!(ins.new[3], TupleValue::Null);
    let Message::Insert(ins2) = &m[3] else {
        panic!()
    };
    assert_eq!(
        text(&ins2.new[3]).len(),
        9600,
        "the long value arrives whole on insert"
    );

    let Message::Commit(commit) = &m[4] else {
        panic!("{:?}", m[4])
    };
    assert_eq!(commit.commit_lsn, begin.final_lsn);
    assert!(commit.end_lsn > commit.commit_lsn);
    assert_eq!(commit.commit_time, begin.commit_time);

    // UPDATE name: no old tuple under REPLICA IDENTITY DEFAULT.
    let Message::Update(u) = &m[6] else {
        panic!("{:?}", m[6])
    };
    assert_eq!(u.old, None);
    assert_eq!(text(&u.new[1]), "green apple");

    // UPDATE id: the old key arrives as 'K' with only the key column set.
    let Message::Update(u) = &m[9] else {
        panic!("{:?}", m[9])
    };
    let Some(OldTuple::Key(old)) = &u.old else {
        panic!("{u:?}")
    };
    assert_eq!(text(&old[0]), "1");
    assert_eq!(old[1], TupleValue::Null);
    assert_eq!(text(&u.new[0]), "3");

    // UPDATE price: the unchanged TOASTed column is 'u', not null.
    let Message::Update(u) = &m[12] else {
        panic!("{:?}", m[12])
    };
    assert_eq!(text(&u.new[2]), "2.00");
    assert_eq!(u.new[3], TupleValue::UnchangedToast);

    let Message::Delete(d) = &m[15] else {
        panic!("{:?}", m[15])
    };
    assert!(matches!(&d.old, OldTuple::Key(k) if text(&k[0]) == "3"));

    // REPLICA IDENTITY FULL: every column flagged, old rows are 'O'.
    let Message::Relation(full) = &m[18] else {
        panic!("{:?}", m[18])
    };
    assert_eq!(full.replica_identity, ReplicaIdentitySetting::Full);
    assert!(full.columns.iter().all(|c| c.identity));
    let Message::Update(u) = &m[22] else {
        panic!("{:?}", m[22])
    };
    assert!(matches!(&u.old, Some(OldTuple::Full(o)) if text(&o[1]) == "a"));
    let Message::Delete(d) = &m[25] else {
        panic!("{:?}", m[25])
    };
    assert!(matches!(&d.old, OldTuple::Full(o) if text(&o[1]) == "b"));

    let Message::Truncate(t) = &m[30] else {
        panic!("{:?}", m[30])
    };
    assert_eq!(t.relation_ids, vec![rel.id, full.id]);
    assert!(!t.cascade && !t.restart_identity);

    let Message::Message(lm) = &m[33] else {
        panic!("{:?}", m[33])
    };
    assert!(lm.transactional);
    assert_eq!(lm.prefix, "walcast");
    assert_eq!(&lm.content[..], b"hello");
}

#[test]
fn truncated_and_unknown_frames_are_errors_not_panics() {
    let lines: Vec<&str> = include_str!("../../tests/fixtures/pgoutput/session1.hex")
        .lines()
        .collect();
    for l in lines {
        let bytes: Vec<u8> = (0..l.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&l[i..i + 2], 16).unwrap())
            .collect();
        for cut in 0..bytes.len() {
            // Every prefix either decodes (a shorter valid message) or errors.
            let _ = decode(Bytes::copy_from_slice(&bytes[..cut]));
        }
        assert!(
            decode(Bytes::copy_from_slice(&bytes[..bytes.len() - 1])).is_err(),
            "{l}"
        );
    }
    assert_eq!(decode(Bytes::from_static(b"")), Err(DecodeError::Empty));
    assert_eq!(
        decode(Bytes::from_static(b"Z")),
        Err(DecodeError::UnknownTag(b'Z'))
    );
    assert_eq!(
        decode(Bytes::from_static(b"P\0\0\0\x01\x01")),
        Err(DecodeError::Unrequested('P'))
    );
}

/// The streamed session: messages inside a block carry their
/// (sub)transaction's xid; the control messages around the blocks tell
/// the outcome. See capture_streamed.sh for the SQL.
#[test]
fn decodes_a_captured_streamed_session() {
    use streaming::{decode_in_stream, in_stream_xid, InStream};
    let mut in_block = false;
    let mut seen = Vec::new();
    for p in streamed_payloads() {
        if in_block {
            let xid = in_stream_xid(&p).unwrap();
            let m = decode_in_stream(p.clone()).unwrap();
            match m {
                InStream::Stop => {
                    assert_eq!(xid, None);
                    in_block = false;
                    seen.push("E".to_string());
                }
                InStream::Change { xid: x, message } => {
                    assert_eq!(Some(x), xid);
                    // The same body as protocol 1: the payload without
                    // its xid decodes the same.
                    let mut v1 = vec![p[0]];
                    v1.extend_from_slice(&p[5..]);
                    assert_eq!(decode(Bytes::from(v1)).unwrap(), message);
                    let tag = match &message {
                        Message::Relation(r) => format!("R{x}:{}", r.name),
                        Message::Insert(i) => format!("I{x}:{}", text(&i.new[1])),
                        Message::Message(m) => format!("M{x}:{}", m.prefix),
                        other => panic!("{other:?}"),
                    };
                    seen.push(tag);
                }
            }
            continue;
        }
        let m = decode(p).unwrap();
        seen.push(match m {
            Message::StreamStart(s) => {
                in_block = true;
                format!("S{}:{}", s.xid, s.first_segment)
            }
            Message::StreamCommit(c) => {
                assert!(c.end_lsn > c.commit_lsn);
                format!("c{}", c.xid)
            }
            Message::StreamAbort(a) => format!("A{}:{}", a.xid, a.subxid),
            Message::Begin(_) => "B".into(),
            Message::Commit(_) => "C".into(),
            Message::Relation(r) => format!("R:{}", r.name),
            Message::Insert(i) => format!("I:{}", text(&i.new[1])),
            other => panic!("{other:?}"),
        });
    }
    seen.dedup();
    let s: Vec<&str> = seen.iter().map(String::as_str).collect();
    // Xids differ from one capture to the next: name them.
    let xid = |i: usize| s[i][1..].split(':').next().unwrap().to_string();
    // After ROLLBACK TO SAVEPOINT the savepoint stands again: a new
    // subtransaction (sub2) makes the last row, and pgoutput describes the
    // table again after the abort.
    let (a, sub, sub2, c) = (xid(0), xid(11), xid(15), xid(19));
    let want = format!(
        "S{a}:true R{a}:fx_s I{a}:A E B R:fx_s I:B C S{a}:false I{a}:A M{a}:walcast I{sub}:A-sub E \
         A{a}:{sub} S{a}:false R{sub2}:fx_s I{sub2}:A E c{a} S{c}:true R{c}:fx_s I{c}:C E A{c}:{c}"
    );
    assert_ne!(sub, sub2);
    assert_eq!(s.join(" "), want);
    assert_ne!(
        a, sub,
        "the savepoint's changes carry the subtransaction's xid"
    );
}

/// Payloads inside a block: only changes and Stream Stop belong there,
/// and a cut one is an error, never a panic.
#[test]
fn streamed_payloads_cut_anywhere_are_errors() {
    use streaming::{decode_in_stream, in_stream_xid};
    for p in streamed_payloads() {
        for cut in 0..p.len().min(64) {
            let _ = decode_in_stream(p.slice(..cut));
            let _ = in_stream_xid(&p[..cut]);
            let _ = decode(p.slice(..cut));
        }
    }
    assert!(in_stream_xid(b"I\0\0").is_err(), "xid cut");
    assert!(
        in_stream_xid(b"B\0\0\0\x01").is_err(),
        "Begin inside a block"
    );
    assert!(decode_in_stream(Bytes::from_static(b"c\0\0\0\x01")).is_err());
    assert_eq!(in_stream_xid(b"E"), Ok(None));
    assert_eq!(
        decode(Bytes::from_static(b"A\0\0\0\x07\0\0\0\x09")),
        Ok(Message::StreamAbort(StreamAbort { xid: 7, subxid: 9 }))
    );
}

/// Frames captured from Postgres 15 with `messages 'true'`: a
/// non-transactional watermark (sent on its own, no Begin) and a
/// transactional signal (between Begin and Commit), as the incremental
/// snapshot writes and reads them.
#[test]
fn decodes_watermark_and_signal_messages() {
    let hex = |s: &str| -> Bytes {
        Bytes::from(
            (0..s.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
                .collect::<Vec<u8>>(),
        )
    };
    let low = decode(hex("4d000000000003cea0b877616c636173742e77617465726d61726b00000000317b22706970656c696e65223a2270222c2272756e223a2272222c226368756e6b223a312c226b696e64223a226c6f77227d")).unwrap();
    let Message::Message(low) = low else {
        panic!("{low:?}")
    };
    assert!(!low.transactional);
    assert_eq!(low.lsn, Lsn(0x3CEA0B8));
    assert_eq!(low.prefix, "walcast.watermark");
    assert_eq!(
        &low.content[..],
        br#"{"pipeline":"p","run":"r","chunk":1,"kind":"low"}"#
    );
    let signal = decode(hex("4d010000000003cea13077616c636173742e7369676e616c00000000317b2274797065223a22657865637574652d736e617073686f74222c227461626c6573223a5b227075626c69632e74225d7d")).unwrap();
    let Message::Message(signal) = signal else {
        panic!("{signal:?}")
    };
    assert!(signal.transactional);
    assert_eq!(signal.prefix, "walcast.signal");
    assert_eq!(
        &signal.content[..],
        br#"{"type":"execute-snapshot","tables":["public.t"]}"#
    );
    assert!(matches!(
        decode(hex("420000000003cea130000303f0bc98ba4700004cfa")),
        Ok(Message::Begin(_))
    ));
}

/// The decoder takes bytes from the network: no input may panic it, and
/// what it allocates is bounded by the bytes present. Captured frames are
/// mutated (bytes flipped, cut, spliced, counts set to extremes) and fed to
/// the pgoutput decoder and to the replication message parser.
/// `WALCAST_FUZZ_CASES` sets the number of cases (CI: the default; a long
/// run: e.g. 2000000). A failing input is printed as hex: add it to
/// tests/fixtures/pgoutput/regressions.hex.
mod fuzz {
    use bytes::Bytes;
    use proptest::prelude::*;

    use super::super::decode;
    use crate::replication::protocol::parse_server_message;

    /// Protocol 1 frames, and the streamed session's (read once: the
    /// corpus is large).
    fn captured() -> &'static [Vec<u8>] {
        static FRAMES: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
        FRAMES.get_or_init(|| {
            include_str!("../../tests/fixtures/pgoutput/session1.hex")
                .lines()
                .chain(include_str!("../../tests/fixtures/pgoutput/streamed.hex").lines())
                .map(hex)
                .collect()
        })
    }

    fn hex(l: &str) -> Vec<u8> {
        (0..l.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&l[i..i + 2], 16).unwrap())
            .collect()
    }

    fn cases() -> u32 {
        std::env::var("WALCAST_FUZZ_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20_000)
    }

    #[derive(Debug, Clone)]
    enum Mutation {
        Flip(usize, u8),
        Cut(usize),
        Splice(usize, Vec<u8>),
        /// Overwrite 4 bytes at a position with an extreme count.
        Count(usize, u32),
    }

    fn mutation() -> impl Strategy<Value = Mutation> {
        prop_oneof![
            (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Flip(i, b)),
            any::<usize>().prop_map(Mutation::Cut),
            (
                any::<usize>(),
                proptest::collection::vec(any::<u8>(), 0..16)
            )
                .prop_map(|(i, b)| Mutation::Splice(i, b)),
            (
                any::<usize>(),
                prop_oneof![
                    Just(u32::MAX),
                    Just(0x7fff_ffff),
                    Just(0x8000_0000),
                    Just(0xffff),
                    any::<u32>()
                ]
            )
                .prop_map(|(i, c)| Mutation::Count(i, c)),
        ]
    }

    fn apply(mut f: Vec<u8>, ms: &[Mutation]) -> Vec<u8> {
        for m in ms {
            if f.is_empty() {
                break;
            }
            let n = f.len();
            match m {
                Mutation::Flip(i, b) => f[i % n] ^= b | 1,
                Mutation::Cut(i) => f.truncate(i % n),
                Mutation::Splice(i, b) => {
                    let at = i % n;
                    f.splice(at..at, b.iter().copied());
                }
                Mutation::Count(i, c) => {
                    let at = i % n;
                    for (k, byte) in c.to_be_bytes().iter().enumerate() {
                        if at + k < f.len() {
                            f[at + k] = *byte;
                        }
                    }
                }
            }
        }
        f
    }

    /// Decoding may fail, never panic (outside a streamed block and
    /// inside one); XLogData wrapping the frame too.
    fn feed(frame: &[u8]) {
        let _ = decode(Bytes::copy_from_slice(frame));
        let _ = super::super::streaming::decode_in_stream(Bytes::copy_from_slice(frame));
        let _ = super::super::streaming::in_stream_xid(frame);
        let mut w = vec![b'w'];
        w.extend_from_slice(&[0u8; 24]);
        w.extend_from_slice(frame);
        if let Ok(crate::replication::ServerMessage::XLogData { data, .. }) =
            parse_server_message(Bytes::from(w))
        {
            let _ = decode(data);
        }
        let _ = parse_server_message(Bytes::copy_from_slice(frame));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]
        #[test]
        fn mutated_frames_never_panic(
            which in any::<usize>(),
            ms in proptest::collection::vec(mutation(), 1..6),
        ) {
            let frames = captured();
            let frame = apply(frames[which % frames.len()].clone(), &ms);
            feed(&frame);
        }

        #[test]
        fn random_bytes_never_panic(tag in prop_oneof![Just(b'B'), Just(b'C'), Just(b'R'), Just(b'I'), Just(b'U'), Just(b'D'), Just(b'T'), Just(b'Y'), Just(b'O'), Just(b'M'), Just(b'S'), Just(b'E'), Just(b'c'), Just(b'A'), any::<u8>()],
                                    rest in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut f = vec![tag];
            f.extend(rest);
            feed(&f);
        }
    }

    /// Inputs that once broke the decoder, or that assert its bounds.
    #[test]
    fn regression_frames() {
        for l in include_str!("../../tests/fixtures/pgoutput/regressions.hex").lines() {
            let l = l.split('#').next().unwrap_or("").trim();
            if l.is_empty() {
                continue;
            }
            feed(&hex(l));
        }
    }

    /// A Truncate announcing 2^31 relations in a 10-byte message fails as
    /// truncated, without reserving 8 GiB first.
    #[test]
    fn a_lying_count_reserves_nothing_big() {
        let frame = hex("547fffffff00000004d2");
        let e = decode(Bytes::from(frame)).unwrap_err();
        assert!(e.to_string().contains("relation id"), "{e}");
        // A tuple announcing 32767 columns in a 7-byte insert.
        let e = decode(Bytes::from(hex("49000040194e7fff"))).unwrap_err();
        assert!(e.to_string().contains("column kind"), "{e}");
    }
}
