//! The streamed session captured from Postgres 15
//! (`tests/fixtures/pgoutput/capture_streamed.sh`) through the buffers as
//! the capture loop feeds them: what a commit releases, with memory to
//! spare and with a budget so small that transactions are spilled (before
//! and after a savepoint is rolled back), and that no file outlives its
//! transaction or its session.

use bytes::Bytes;

use super::*;
use crate::pgoutput::streaming::{decode_in_stream, in_stream_xid, InStream};
use crate::pgoutput::{decode, Message, TupleValue};

/// What each commit released: per transaction, the row changes as
/// `who:id`, and the other messages by kind.
fn run(budget: usize, dir: &Path) -> (Vec<Vec<String>>, usize) {
    let mut st = Streamed::new(dir, "p", budget);
    let mut released = Vec::new();
    let mut most_in_memory = 0;
    for (i, p) in crate::pgoutput::tests::streamed_payloads()
        .into_iter()
        .enumerate()
    {
        let lsn = Lsn(1000 + i as u64);
        if st.open_block().is_some() {
            match in_stream_xid(&p).unwrap() {
                None => st.stop(),
                Some(xid) => st
                    .push(Entry {
                        lsn,
                        xid,
                        payload: p,
                    })
                    .unwrap(),
            }
            most_in_memory = most_in_memory.max(st.memory_bytes());
            assert!(st.memory_bytes() <= budget, "over the budget");
            continue;
        }
        match decode(p).unwrap() {
            Message::StreamStart(s) => st.start(s.xid).unwrap(),
            Message::StreamAbort(a) => st.abort(a.xid, a.subxid),
            Message::StreamCommit(c) => {
                let mut replay = st.commit(c.xid).unwrap();
                let mut tx = Vec::new();
                let mut last = Lsn(0);
                while let Some(e) = replay.next_entry().unwrap() {
                    assert!(e.lsn > last, "in order");
                    last = e.lsn;
                    let InStream::Change { message, .. } = decode_in_stream(e.payload).unwrap()
                    else {
                        panic!("a Stop held")
                    };
                    tx.push(describe(&message));
                }
                released.push(tx);
            }
            _ => {}
        }
    }
    assert_eq!(st.in_progress(), 0, "every transaction ended");
    assert_eq!(st.memory_bytes(), 0);
    (released, most_in_memory)
}

fn describe(m: &Message) -> String {
    let text = |v: &TupleValue| match v {
        TupleValue::Text(b) => String::from_utf8(b.to_vec()).unwrap(),
        other => panic!("{other:?}"),
    };
    match m {
        Message::Insert(i) => format!("{}:{}", text(&i.new[1]), text(&i.new[0])),
        Message::Relation(r) => format!("relation {}", r.name),
        Message::Message(m) => format!("message {}", m.prefix),
        other => panic!("{other:?}"),
    }
}

fn files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|f| f.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Only A committed: its 80 rows, its message and its last row, with the
/// Relation messages where Postgres put them; nothing of the rolled-back
/// savepoint (A-sub) or of the rolled-back transaction (C).
fn expected() -> Vec<String> {
    let mut want = vec!["relation fx_s".to_string()];
    want.extend((1..=80).map(|i| format!("A:{i}")));
    want.push("message walcast".into());
    want.push("relation fx_s".into());
    want.push("A:200".into());
    want
}

#[test]
fn a_commit_releases_only_what_committed_from_memory() {
    let dir = tempfile::tempdir().unwrap();
    let (released, most) = run(usize::MAX, dir.path());
    assert_eq!(released, vec![expected()]);
    assert!(most > 80 * 1000, "held in memory: {most}");
    assert!(files(dir.path()).is_empty());
}

#[test]
fn a_commit_releases_only_what_committed_from_spill_files() {
    // 4 kB: every transaction goes to a file within its first rows, so the
    // savepoint's rows are skipped as they are read back; 100 kB and
    // 120 kB: A spills in its second block, during its savepoint, whose
    // first rows are then in the file and the rest too.
    for budget in [4_000, 100_000, 120_000] {
        let dir = tempfile::tempdir().unwrap();
        let (released, _) = run(budget, dir.path());
        assert_eq!(released, vec![expected()], "budget {budget}");
        assert!(files(dir.path()).is_empty(), "budget {budget}: files left");
    }
}

#[test]
fn spill_files_do_not_outlive_a_session() {
    let dir = tempfile::tempdir().unwrap();
    // Left by a killed process: deleted when the next session starts;
    // another pipeline's files are not touched.
    std::fs::write(dir.path().join("p.streamed-77.spill"), b"x").unwrap();
    std::fs::write(dir.path().join("q.streamed-77.spill"), b"x").unwrap();
    let mut st = Streamed::new(dir.path(), "p", 10);
    assert_eq!(files(dir.path()), ["q.streamed-77.spill"]);
    st.start(5).unwrap();
    let payload = Bytes::from_static(b"I\0\0\0\x05rest of the change");
    st.push(Entry {
        lsn: Lsn(1),
        xid: 5,
        payload,
    })
    .unwrap();
    st.stop();
    assert_eq!(files(dir.path()).len(), 2, "spilled");
    assert_eq!(st.memory_bytes(), 0);
    // The session ends with the transaction in progress.
    drop(st);
    assert_eq!(files(dir.path()), ["q.streamed-77.spill"]);
}

#[test]
fn the_protocol_nesting_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let mut st = Streamed::new(dir.path(), "p", 1 << 20);
    let change = Entry {
        lsn: Lsn(1),
        xid: 5,
        payload: Bytes::from_static(b"I\0\0\0\x05"),
    };
    assert!(matches!(
        st.push(change.clone()),
        Err(StreamedError::Protocol(_))
    ));
    st.start(5).unwrap();
    assert!(matches!(st.start(6), Err(StreamedError::Protocol(_))));
    st.push(change).unwrap();
    st.stop();
    // An abort of a subtransaction that made no change, then of one of
    // another transaction: nothing of 5 goes.
    st.abort(5, 9);
    st.abort(6, 6);
    assert_eq!(
        st.commit(5).unwrap().next_entry().unwrap().map(|e| e.xid),
        Some(5)
    );
    // A commit of a transaction never seen releases nothing.
    assert!(st.commit(8).unwrap().next_entry().unwrap().is_none());
}
