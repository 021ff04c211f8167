//! A sink that writes events as JSON lines, one envelope per line, to
//! standard output or a file. For debugging, for tests that read a
//! pipeline's output, and for piping into other tools.
//!
//! Each line carries the envelope and the key:
//! `{"key": {...}, "value": {before, after, source, op, ts_ms, transaction}}`,
//! written by the Kafka sink's JSON encoder ([`JsonEncoder`]): fields in
//! Debezium's order, the bytes written directly (this sink used to build a
//! `serde_json` tree per event, with its fields sorted by name).
//! A batch is acknowledged once its lines are written and flushed (and, for
//! a file, fsync'd when `fsync = true`).

use std::path::PathBuf;

use async_trait::async_trait;
use serde::Deserialize;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use walcast_sdk::json::JsonOptions;
use walcast_sdk::{Batch, JsonEncoder, Sink, SinkError};

/// `[[pipelines.NAME.sinks]] type = "file"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSinkConfig {
    /// A file to append to, or `-` for standard output.
    pub path: String,
    /// fsync after each batch (slower; only matters for files).
    #[serde(default)]
    pub fsync: bool,
}

pub struct FileSink {
    out: Box<dyn AsyncWrite + Unpin + Send>,
    file: Option<tokio::fs::File>,
    fsync: bool,
    encoder: JsonEncoder,
    path: String,
    /// Bytes per line of the last batch, with an eighth to spare.
    line_size: usize,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot open {path} for the file sink: {source}")]
pub struct OpenError {
    path: PathBuf,
    source: std::io::Error,
}

impl FileSink {
    pub async fn open(cfg: &FileSinkConfig) -> Result<Self, OpenError> {
        if cfg.path == "-" {
            return Ok(FileSink {
                out: Box::new(tokio::io::stdout()),
                file: None,
                fsync: false,
                encoder: JsonEncoder::new(JsonOptions::default()),
                path: "-".into(),
                line_size: 512,
            });
        }
        let f = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&cfg.path)
            .await
            .map_err(|source| OpenError {
                path: cfg.path.clone().into(),
                source,
            })?;
        let writer = f.try_clone().await.map_err(|source| OpenError {
            path: cfg.path.clone().into(),
            source,
        })?;
        Ok(FileSink {
            out: Box::new(writer),
            file: Some(f),
            fsync: cfg.fsync,
            encoder: JsonEncoder::new(JsonOptions::default()),
            path: cfg.path.clone(),
            line_size: 512,
        })
    }
}

#[async_trait]
impl Sink for FileSink {
    fn name(&self) -> &str {
        "file"
    }

    async fn send(&mut self, batch: Batch) -> Result<(), SinkError> {
        let mut buf = Vec::with_capacity(self.line_size * batch.events.len());
        for e in batch.events.iter() {
            self.encoder.write_key_value(&mut buf, e);
            buf.push(b'\n');
        }
        // Sized from the last batch's lines, so that the next buffer is
        // allocated once instead of grown (and copied) as it fills.
        if let Some(n) = buf.len().checked_div(batch.events.len()) {
            self.line_size = n + n / 8;
        }
        let path = self.path.clone();
        let io = |e: std::io::Error| {
            SinkError::transient("file", format!("writing {path}: {e}")).with_source(e)
        };
        self.out.write_all(&buf).await.map_err(io)?;
        self.out.flush().await.map_err(io)?;
        if self.fsync {
            if let Some(f) = &self.file {
                f.sync_data().await.map_err(io)?;
            }
        }
        batch.acker.ack();
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), SinkError> {
        Ok(())
    }
}
