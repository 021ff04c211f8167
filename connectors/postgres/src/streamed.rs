//! Streamed transactions held until they commit.
//!
//! With `streaming` on, Postgres sends a large transaction while it runs
//! (see [`crate::pgoutput::streaming`]), but walcast publishes only what
//! committed, in commit order, exactly as with protocol 1. So the blocks of
//! every transaction still in progress are held here, under its top-level
//! xid, until Stream Commit releases them as one transaction through the
//! ordinary path (the outbox, the acknowledgements, the checkpoint), or
//! Stream Abort drops them.
//!
//! What is held is the pgoutput payload of each change as it arrived, not
//! events: an event's source block needs the commit's LSN and time, which
//! only Stream Commit tells, and replaying the payloads at the commit runs
//! them through the very code a protocol 1 transaction goes through
//! (Relation messages included: they describe the table as of their place
//! in the transaction, so they are applied when it commits, as Postgres's
//! own apply worker does).
//!
//! Memory is bounded by bytes: when the payloads held in memory pass the
//! budget, the largest transaction goes to a spill file in the pipeline's
//! state directory, and its later changes are appended there; at its commit
//! the file is read back one change at a time. A rolled-back savepoint
//! removes its subtransaction's changes (by xid) from memory, or marks them
//! to be skipped when read back from a file.
//!
//! Nothing here outlives a session: after a reconnect Postgres sends every
//! transaction still in progress again from its start (it skips only the
//! transactions that committed before the confirmed position, and decodes
//! from the slot's restart_lsn, which is before any transaction still
//! running), so the buffers of a dead session are dropped, their files
//! deleted, and files a killed process left behind are deleted when the
//! next session starts. For the same reason a held transaction does not
//! keep the checkpoint from following the server's WAL end while nothing
//! else is pending ([`crate::checkpoint`]): whatever position is confirmed,
//! a transaction that has not committed yet is sent again whole.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use walcast_sdk::Lsn;

/// What one held change costs besides its payload (the entry, the
/// `Bytes` handle, the vector slot), counted against the budget.
const ENTRY_OVERHEAD: usize = 48;

/// A spill file's entry header: LSN, xid, payload length.
const HEADER: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum StreamedError {
    /// Writing or reading a spill file failed. Transient: the next session
    /// receives the transaction again from Postgres.
    #[error(
        "{action} the spill file {path} of a streamed transaction: {source}; \
         check free space and permissions of the pipeline's state_dir"
    )]
    Spill {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The stream broke the protocol's nesting (a block inside a block, a
    /// change outside one).
    #[error("streamed transactions: {0}")]
    Protocol(String),
}

impl StreamedError {
    pub fn is_transient(&self) -> bool {
        matches!(self, StreamedError::Spill { .. })
    }
}

/// One change of a streamed transaction, as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub lsn: Lsn,
    /// The (sub)transaction that made it.
    pub xid: u32,
    /// The pgoutput payload, xid prefix included.
    pub payload: Bytes,
}

impl Entry {
    fn cost(&self) -> usize {
        self.payload.len() + ENTRY_OVERHEAD
    }
}

/// A spill file being written.
struct Spill {
    path: PathBuf,
    out: BufWriter<File>,
    entries: u64,
}

/// One transaction in progress.
#[derive(Default)]
struct Held {
    memory: Vec<Entry>,
    memory_bytes: usize,
    /// Once spilled, every later change goes to the file too, so the file
    /// holds the transaction in order.
    spill: Option<Spill>,
    /// Subtransactions rolled back after their changes were spilled.
    aborted: HashSet<u32>,
}

/// The streamed transactions in progress in one session.
pub struct Streamed {
    dir: PathBuf,
    pipeline: String,
    budget: usize,
    held: HashMap<u32, Held>,
    memory_bytes: usize,
    /// The transaction whose block is open (between Stream Start and Stop).
    open: Option<u32>,
}

impl Streamed {
    /// Buffers for a new session, holding at most `budget` bytes in memory;
    /// deletes the spill files of earlier sessions of `pipeline` in `dir`.
    pub fn new(dir: &Path, pipeline: &str, budget: usize) -> Self {
        let s = Streamed {
            dir: dir.to_path_buf(),
            pipeline: pipeline.to_string(),
            budget,
            held: HashMap::new(),
            memory_bytes: 0,
            open: None,
        };
        s.delete_leftovers();
        s
    }

    fn prefix(&self) -> String {
        format!("{}.streamed-", self.pipeline)
    }

    fn delete_leftovers(&self) {
        let Ok(dir) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let prefix = self.prefix();
        for f in dir.flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            if name.starts_with(&prefix) && name.ends_with(".spill") {
                let _ = std::fs::remove_file(f.path());
            }
        }
    }

    /// The transaction whose block is open.
    pub fn open_block(&self) -> Option<u32> {
        self.open
    }

    /// Bytes held in memory (the spilled ones are not).
    pub fn memory_bytes(&self) -> usize {
        self.memory_bytes
    }

    /// Transactions in progress.
    pub fn in_progress(&self) -> usize {
        self.held.len()
    }

    /// Stream Start.
    pub fn start(&mut self, xid: u32) -> Result<(), StreamedError> {
        if let Some(open) = self.open {
            return Err(StreamedError::Protocol(format!(
                "Stream Start of transaction {xid} inside the block of transaction {open}"
            )));
        }
        self.open = Some(xid);
        self.held.entry(xid).or_default();
        Ok(())
    }

    /// Stream Stop.
    pub fn stop(&mut self) {
        self.open = None;
    }

    /// A change of the open block. Spills the largest transactions while
    /// memory is over the budget.
    pub fn push(&mut self, entry: Entry) -> Result<(), StreamedError> {
        let Some(top) = self.open else {
            return Err(StreamedError::Protocol(format!(
                "a change of transaction {} at {} outside any streamed block",
                entry.xid, entry.lsn
            )));
        };
        let held = self.held.entry(top).or_default();
        if let Some(spill) = held.spill.as_mut() {
            return write_entry(spill, &entry);
        }
        // A copy: the payload is a slice of the frame it was read with,
        // which would otherwise stay allocated as long as this entry.
        let entry = Entry {
            payload: Bytes::copy_from_slice(&entry.payload),
            ..entry
        };
        held.memory_bytes += entry.cost();
        self.memory_bytes += entry.cost();
        held.memory.push(entry);
        while self.memory_bytes > self.budget {
            self.spill_largest()?;
        }
        Ok(())
    }

    /// Moves the transaction holding the most memory to its spill file.
    fn spill_largest(&mut self) -> Result<(), StreamedError> {
        let Some((&xid, _)) = self
            .held
            .iter()
            .filter(|(_, h)| h.memory_bytes > 0)
            .max_by_key(|(_, h)| h.memory_bytes)
        else {
            return Ok(());
        };
        let path = self.dir.join(format!("{}{xid}.spill", self.prefix()));
        let io = |action| {
            let path = path.clone();
            move |source| StreamedError::Spill {
                action,
                path,
                source,
            }
        };
        std::fs::create_dir_all(&self.dir).map_err(io("creating the directory of"))?;
        let file = File::create(&path).map_err(io("creating"))?;
        let mut spill = Spill {
            path: path.clone(),
            out: BufWriter::with_capacity(64 * 1024, file),
            entries: 0,
        };
        let held = self.held.get_mut(&xid).expect("found above");
        for e in std::mem::take(&mut held.memory) {
            write_entry(&mut spill, &e)?;
        }
        tracing::info!(xid, bytes = held.memory_bytes, path = %path.display(),
            "a streamed transaction outgrew the memory budget (half of max_in_flight_bytes): held in a spill file until it ends");
        self.memory_bytes -= held.memory_bytes;
        held.memory_bytes = 0;
        held.spill = Some(spill);
        Ok(())
    }

    /// Stream Abort: the whole transaction (`subxid == xid`) or one
    /// subtransaction's changes are dropped.
    pub fn abort(&mut self, xid: u32, subxid: u32) {
        if xid == subxid {
            if let Some(held) = self.held.remove(&xid) {
                self.memory_bytes -= held.memory_bytes;
                if let Some(spill) = held.spill {
                    let _ = std::fs::remove_file(&spill.path);
                }
            }
            return;
        }
        let Some(held) = self.held.get_mut(&xid) else {
            return;
        };
        let before = held.memory_bytes;
        held.memory.retain(|e| e.xid != subxid);
        held.memory_bytes = held.memory.iter().map(Entry::cost).sum();
        self.memory_bytes -= before - held.memory_bytes;
        if held.spill.is_some() {
            held.aborted.insert(subxid);
        }
    }

    /// Stream Commit: the transaction's changes, in order, without those
    /// of its rolled-back subtransactions. A transaction never seen (all
    /// its changes filtered by the publication) has none.
    pub fn commit(&mut self, xid: u32) -> Result<Replay, StreamedError> {
        let Some(held) = self.held.remove(&xid) else {
            return Ok(Replay::default());
        };
        self.memory_bytes -= held.memory_bytes;
        let file = match held.spill {
            None => None,
            Some(spill) => {
                let Spill { path, out, entries } = spill;
                let io = |action| {
                    let path = path.clone();
                    move |source| StreamedError::Spill {
                        action,
                        path,
                        source,
                    }
                };
                out.into_inner()
                    .map_err(|e| e.into_error())
                    .map_err(io("writing"))?;
                let reader = File::open(&path).map_err(io("reopening"))?;
                Some(SpillReader {
                    path,
                    input: BufReader::with_capacity(64 * 1024, reader),
                    left: entries,
                })
            }
        };
        Ok(Replay {
            file,
            memory: held.memory.into(),
            aborted: held.aborted,
        })
    }
}

impl Drop for Streamed {
    /// The session ended: what was held is sent again by the next one.
    fn drop(&mut self) {
        for held in self.held.values() {
            if let Some(spill) = &held.spill {
                let _ = std::fs::remove_file(&spill.path);
            }
        }
    }
}

fn write_entry(spill: &mut Spill, e: &Entry) -> Result<(), StreamedError> {
    let mut header = [0u8; HEADER];
    header[..8].copy_from_slice(&e.lsn.0.to_be_bytes());
    header[8..12].copy_from_slice(&e.xid.to_be_bytes());
    header[12..].copy_from_slice(&(e.payload.len() as u32).to_be_bytes());
    spill
        .out
        .write_all(&header)
        .and_then(|()| spill.out.write_all(&e.payload))
        .map_err(|source| StreamedError::Spill {
            action: "writing",
            path: spill.path.clone(),
            source,
        })?;
    spill.entries += 1;
    Ok(())
}

struct SpillReader {
    path: PathBuf,
    input: BufReader<File>,
    left: u64,
}

impl SpillReader {
    fn next(&mut self) -> Result<Option<Entry>, StreamedError> {
        if self.left == 0 {
            return Ok(None);
        }
        let io = |source| StreamedError::Spill {
            action: "reading",
            path: self.path.clone(),
            source,
        };
        let mut header = [0u8; HEADER];
        self.input.read_exact(&mut header).map_err(io)?;
        let lsn = Lsn(u64::from_be_bytes(header[..8].try_into().expect("8")));
        let xid = u32::from_be_bytes(header[8..12].try_into().expect("4"));
        let len = u32::from_be_bytes(header[12..].try_into().expect("4")) as usize;
        let mut payload = vec![0u8; len];
        self.input.read_exact(&mut payload).map_err(io)?;
        self.left -= 1;
        Ok(Some(Entry {
            lsn,
            xid,
            payload: payload.into(),
        }))
    }
}

/// A committed streamed transaction's changes, read one at a time (from
/// its spill file, if any, then from memory). The file is deleted when
/// the replay is dropped.
#[derive(Default)]
pub struct Replay {
    file: Option<SpillReader>,
    memory: VecDeque<Entry>,
    aborted: HashSet<u32>,
}

impl Replay {
    pub fn next_entry(&mut self) -> Result<Option<Entry>, StreamedError> {
        while let Some(file) = self.file.as_mut() {
            match file.next()? {
                Some(e) if self.aborted.contains(&e.xid) => continue,
                Some(e) => return Ok(Some(e)),
                None => {
                    let path = self.file.take().expect("some").path;
                    let _ = std::fs::remove_file(path);
                }
            }
        }
        Ok(self.memory.pop_front())
    }
}

impl Drop for Replay {
    fn drop(&mut self) {
        if let Some(file) = &self.file {
            let _ = std::fs::remove_file(&file.path);
        }
    }
}

#[cfg(test)]
mod tests;
