//! The I/O half of the replication connection.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::backend::{ErrorFields, ErrorResponseBody, Message};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use walcast_sdk::Lsn;

use super::protocol::{self, ServerMessage};
use super::tls::{self, SslMode};

/// One server of the `host` / `port` lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') && !self.host.starts_with('[') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Which server of the list a session may use: libpq's
/// `target_session_attrs`, restricted to the values that make sense for a
/// capture. Hosts are tried in the order given; a server that does not
/// qualify is skipped as if it were down.
///
/// The default is `primary`, not libpq's `any`: a slot can only be created
/// and read with its watermarks and signals on the primary, so a standby in
/// the list (the one a failover promotes) must be passed over until it is
/// promoted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TargetSessionAttrs {
    /// The first server that accepts the connection.
    Any,
    /// A server that is not in recovery (not a standby).
    #[default]
    Primary,
    /// A server that is not in recovery and accepts writes by default
    /// (`default_transaction_read_only = off`).
    ReadWrite,
}

impl TargetSessionAttrs {
    pub fn as_str(self) -> &'static str {
        match self {
            TargetSessionAttrs::Any => "any",
            TargetSessionAttrs::Primary => "primary",
            TargetSessionAttrs::ReadWrite => "read-write",
        }
    }

    /// Whether a server in this state qualifies.
    pub fn accepts(self, in_recovery: bool, read_only: bool) -> bool {
        match self {
            TargetSessionAttrs::Any => true,
            TargetSessionAttrs::Primary => !in_recovery,
            TargetSessionAttrs::ReadWrite => !in_recovery && !read_only,
        }
    }
}

/// `host1:port1,host2:port2`, for messages.
pub fn describe_endpoints(endpoints: &[Endpoint]) -> String {
    endpoints
        .iter()
        .map(Endpoint::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Where and how to connect. Built from the pipeline's `source` config.
#[derive(Clone)]
pub struct ConnectParams {
    /// The servers to try, in order (libpq's host and port lists).
    pub endpoints: Vec<Endpoint>,
    pub target_session_attrs: TargetSessionAttrs,
    pub user: String,
    pub password: Option<String>,
    pub database: String,
    pub sslmode: SslMode,
    pub ssl_root_cert: Option<PathBuf>,
    pub application_name: String,
    pub connect_timeout: Duration,
    /// How long a connection may stay silent before it is taken for dead
    /// (`source.receive_timeout`): the replication stream's liveness check
    /// and the SQL connection's TCP user timeout.
    pub receive_timeout: Duration,
    /// Send a password in clear text, or as md5, over a connection that
    /// is not encrypted. Off by default: anyone on the path reads it (md5
    /// is as good as the password to them).
    pub allow_plaintext_password: bool,
    pub channel_binding: tls::ChannelBindingMode,
}

impl std::fmt::Debug for ConnectParams {
    // The password never reaches a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectParams")
            .field("endpoints", &describe_endpoints(&self.endpoints))
            .field("target_session_attrs", &self.target_session_attrs)
            .field("user", &self.user)
            .field("database", &self.database)
            .field("sslmode", &self.sslmode)
            .finish_non_exhaustive()
    }
}

/// An error reported by the server, with the fields an operator needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerError {
    pub severity: String,
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.severity, self.code, self.message)?;
        if let Some(d) = &self.detail {
            write!(f, " (detail: {d})")?;
        }
        if let Some(h) = &self.hint {
            write!(f, " (hint: {h})")?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error("cannot reach Postgres at {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("timed out after {0:?} connecting to Postgres")]
    ConnectTimeout(Duration),
    #[error("replication connection I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("TLS handshake with Postgres failed: {0}")]
    TlsHandshake(std::io::Error),
    #[error("Postgres does not accept TLS on this port but sslmode={0} requires it")]
    TlsRefused(&'static str),
    #[error("Postgres asks for a password for user `{user}` and none is configured (set `password` or `password_file`)")]
    PasswordRequired { user: String },
    #[error(
        "Postgres asks for the password {method} over a connection that is not encrypted (sslmode = {sslmode}), \
         so anyone on the network path could read it; walcast refuses. Turn TLS on in Postgres and use \
         sslmode = \"verify-full\" (or \"require\"), use scram-sha-256 in pg_hba.conf, or set \
         allow_plaintext_password = true in the pipeline's source to accept the risk"
    )]
    PlaintextPassword {
        method: &'static str,
        sslmode: &'static str,
    },
    #[error(
        "channel_binding = \"require\" but {0}; use TLS (sslmode = \"verify-full\") and scram-sha-256 \
         authentication with a certificate signed with SHA-256/384/512, or set channel_binding = \"prefer\""
    )]
    ChannelBindingUnavailable(&'static str),
    #[error("Postgres asks for authentication method {0}, which walcast does not support (use scram-sha-256, md5 or trust)")]
    UnsupportedAuth(String),
    #[error(
        "Postgres at {endpoint} is {found}, and target_session_attrs = \"{wanted}\" asks for another kind of server; \
         waiting for one in the `host` list to qualify (a standby is passed over until it is promoted)"
    )]
    WrongSession {
        endpoint: String,
        wanted: &'static str,
        found: &'static str,
    },
    #[error("Postgres: {0}")]
    Server(ServerError),
    #[error("unexpected message from Postgres during {during}: tag {tag:?}")]
    Unexpected { during: &'static str, tag: char },
    #[error(transparent)]
    Protocol(#[from] protocol::ProtocolError),
    #[error("the replication stream ended")]
    Closed,
    #[error(
        "no message from Postgres in {0:?}, not even the keepalive walcast asked for: the connection is taken \
         for dead (a cut network path, a frozen server) and reopened; raise source.receive_timeout if the \
         server is only slow"
    )]
    Silent(Duration),
}

impl ReplicationError {
    /// SQLSTATE when the server reported the error.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            ReplicationError::Server(e) => Some(&e.code),
            _ => None,
        }
    }

    /// Whether reconnecting later may succeed: network trouble, a server
    /// shutting down, or a slot another process holds (that is how a standby
    /// daemon takes a slot over when the active one dies).
    pub fn is_transient(&self) -> bool {
        match self {
            ReplicationError::Connect { .. }
            | ReplicationError::ConnectTimeout(_)
            | ReplicationError::Io(_)
            | ReplicationError::WrongSession { .. }
            | ReplicationError::Silent(_)
            | ReplicationError::Closed => true,
            ReplicationError::Server(e) => {
                e.code == "55006" // object_in_use: the slot is active elsewhere
                    || e.code == "53300" // too_many_connections
                    || e.code.starts_with("57P") // admin/crash shutdown, cannot connect now
                    || e.code == "53000" // insufficient_resources
                    || e.code.starts_with("08")
            }
            _ => false,
        }
    }
}

/// The most a message's announced length reserves in one go (a message
/// longer than this grows the buffer as its bytes arrive).
const MAX_RESERVE: usize = 1 << 20;

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// What IDENTIFY_SYSTEM answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemInfo {
    pub system_id: String,
    pub timeline: u32,
    pub xlog_pos: Lsn,
    pub database: Option<String>,
}

/// What CREATE_REPLICATION_SLOT answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotCreated {
    pub slot_name: String,
    /// Changes committed after this LSN are streamed; the exported snapshot
    /// sees everything before it.
    pub consistent_point: Lsn,
    pub snapshot_name: Option<String>,
}

/// A walsender session before streaming starts.
pub struct ReplicationConnection {
    io: Box<dyn Stream>,
    buf: BytesMut,
    out: BytesMut,
    pub parameters: HashMap<String, String>,
    /// `None` in plain text; with TLS, the certificate's
    /// `tls-server-end-point` data when it has one.
    tls: Option<Option<Vec<u8>>>,
}

fn server_error(body: &ErrorResponseBody) -> ServerError {
    fields_error(body.fields())
}

/// An ErrorResponse's or a NoticeResponse's fields.
fn fields_error(mut fields: ErrorFields<'_>) -> ServerError {
    let mut e = ServerError {
        severity: String::new(),
        code: String::new(),
        message: String::new(),
        detail: None,
        hint: None,
    };
    while let Ok(Some(f)) = fields.next() {
        let v = String::from_utf8_lossy(f.value_bytes()).into_owned();
        match f.type_() {
            b'S' => e.severity = v,
            b'C' => e.code = v,
            b'M' => e.message = v,
            b'D' => e.detail = Some(v),
            b'H' => e.hint = Some(v),
            _ => {}
        }
    }
    e
}

impl ReplicationConnection {
    /// Connects to the first server of the list that answers and
    /// qualifies under `target_session_attrs`. A server that cannot be
    /// reached, or does not qualify, is skipped; a definite refusal (a wrong
    /// password) stops the search at once, because the next server would
    /// most likely say the same and the operator must act.
    pub async fn connect(p: &ConnectParams) -> Result<Self, ReplicationError> {
        let mut last = None;
        for e in &p.endpoints {
            let attempt = tokio::time::timeout(p.connect_timeout, Self::connect_inner(p, e))
                .await
                .map_err(|_| ReplicationError::ConnectTimeout(p.connect_timeout))
                .and_then(|r| r);
            let mut conn = match attempt {
                Ok(conn) => conn,
                Err(err) if err.is_transient() => {
                    if p.endpoints.len() > 1 {
                        tracing::debug!(endpoint = %e, error = %err, "Postgres server not usable, trying the next");
                    }
                    last = Some(err);
                    continue;
                }
                Err(err) => return Err(err),
            };
            let (in_recovery, read_only) = conn.session_state().await?;
            if p.target_session_attrs.accepts(in_recovery, read_only) {
                return Ok(conn);
            }
            last = Some(ReplicationError::WrongSession {
                endpoint: e.to_string(),
                wanted: p.target_session_attrs.as_str(),
                found: if in_recovery {
                    "a standby (in recovery)"
                } else {
                    "read-only (default_transaction_read_only = on)"
                },
            });
        }
        Err(last.unwrap_or(ReplicationError::Closed))
    }

    /// Whether the server is in recovery (a standby) and read-only by
    /// default: from the parameters Postgres 14+ reports at startup
    /// (`in_hot_standby`, `default_transaction_read_only`), else asked.
    async fn session_state(&mut self) -> Result<(bool, bool), ReplicationError> {
        let on = |v: &String| v == "on";
        if let (Some(h), Some(r)) = (
            self.parameters.get("in_hot_standby"),
            self.parameters.get("default_transaction_read_only"),
        ) {
            return Ok((on(h), on(r)));
        }
        let rows = self
            .simple_query("SELECT pg_is_in_recovery()::text, current_setting('default_transaction_read_only')")
            .await?;
        let row = rows.first().cloned().unwrap_or_default();
        let col = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
        Ok((col(0) == "true", col(1) == "on"))
    }

    async fn connect_inner(p: &ConnectParams, e: &Endpoint) -> Result<Self, ReplicationError> {
        let addr = e.to_string();
        let mut tcp =
            TcpStream::connect(&addr)
                .await
                .map_err(|source| ReplicationError::Connect {
                    addr: addr.clone(),
                    source,
                })?;
        tcp.set_nodelay(true)?;
        let mut end_point = None;
        let io: Box<dyn Stream> = match tls::client_config(p.sslmode, p.ssl_root_cert.as_deref())? {
            None => Box::new(tcp),
            Some(config) => {
                let mut req = BytesMut::new();
                frontend::ssl_request(&mut req);
                tcp.write_all(&req).await?;
                let mut answer = [0u8; 1];
                tcp.read_exact(&mut answer).await?;
                match answer[0] {
                    b'S' => {
                        let name = rustls::pki_types::ServerName::try_from(e.host.clone())
                            .map_err(|e| {
                                ReplicationError::TlsHandshake(std::io::Error::other(e))
                            })?;
                        let tls = tokio_rustls::TlsConnector::from(config)
                            .connect(name, tcp)
                            .await
                            .map_err(ReplicationError::TlsHandshake)?;
                        end_point = Some(
                            tls.get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|c| c.first())
                                .and_then(|c| tls::server_end_point(c.as_ref())),
                        );
                        Box::new(tls)
                    }
                    // The server declined TLS; under `prefer` the same
                    // connection goes on in plain text, as libpq does.
                    _ if p.sslmode == SslMode::Prefer => Box::new(tcp),
                    _ => return Err(ReplicationError::TlsRefused(p.sslmode.as_str())),
                }
            }
        };
        let mut conn = ReplicationConnection {
            io,
            buf: BytesMut::with_capacity(64 * 1024),
            out: BytesMut::new(),
            parameters: HashMap::new(),
            tls: end_point,
        };
        conn.startup(p).await?;
        Ok(conn)
    }

    /// Whether a password may go out in clear text or as md5 here: over
    /// TLS, or when the user accepted the risk.
    fn plaintext_allowed(
        &self,
        p: &ConnectParams,
        method: &'static str,
    ) -> Result<(), ReplicationError> {
        if self.tls.is_some() || p.allow_plaintext_password || p.password.is_none() {
            return Ok(());
        }
        Err(ReplicationError::PlaintextPassword {
            method,
            sslmode: p.sslmode.as_str(),
        })
    }

    /// The SCRAM mechanism and channel binding to use: SCRAM-SHA-256-PLUS
    /// bound to the server's certificate whenever TLS is on and the server
    /// offers it (what libpq does), unless disabled.
    fn channel_binding(
        &self,
        mode: tls::ChannelBindingMode,
        offered: bool,
    ) -> Result<(&'static str, ChannelBinding), ReplicationError> {
        use tls::ChannelBindingMode as M;
        let required = mode == M::Require;
        match (&self.tls, mode) {
            (_, M::Disable) => Ok(("SCRAM-SHA-256", ChannelBinding::unsupported())),
            (None, _) if required => Err(ReplicationError::ChannelBindingUnavailable(
                "the connection is not encrypted",
            )),
            (None, _) => Ok(("SCRAM-SHA-256", ChannelBinding::unsupported())),
            (Some(Some(end_point)), _) if offered => Ok((
                "SCRAM-SHA-256-PLUS",
                ChannelBinding::tls_server_end_point(end_point.clone()),
            )),
            (Some(_), _) if required => {
                Err(ReplicationError::ChannelBindingUnavailable(if offered {
                    "the server's certificate names no usable hash"
                } else {
                    "the server does not offer SCRAM-SHA-256-PLUS"
                }))
            }
            // We could bind, the server did not offer to: say so ("y"),
            // so a server that did offer it and was stripped is detected.
            (Some(_), _) => Ok(("SCRAM-SHA-256", ChannelBinding::unrequested())),
        }
    }

    async fn flush_out(&mut self) -> Result<(), ReplicationError> {
        self.io.write_all(&self.out).await?;
        self.io.flush().await?;
        self.out.clear();
        Ok(())
    }

    /// Reads one backend message. Cancel-safe: bytes read stay in the buffer
    /// until a whole message is there.
    async fn read_message(&mut self) -> Result<Message, ReplicationError> {
        loop {
            if self.buf.len() >= 5 {
                let tag = self.buf[0];
                let len = u32::from_be_bytes(self.buf[1..5].try_into().expect("4 bytes")) as usize;
                if tag == b'W' {
                    // CopyBothResponse, which postgres-protocol does not know.
                    if self.buf.len() >= len + 1 {
                        self.buf.advance(len + 1);
                        return Ok(Message::CopyInResponse(copy_both_placeholder()?));
                    }
                } else if let Some(m) = Message::parse(&mut self.buf)? {
                    return Ok(m);
                }
                // The length comes from the network: reserve at most a
                // bounded step ahead, and let the buffer grow with the bytes
                // that actually arrive.
                self.buf.reserve((len + 1).min(MAX_RESERVE));
            }
            let n = self.io.read_buf(&mut self.buf).await?;
            if n == 0 {
                return Err(ReplicationError::Closed);
            }
        }
    }

    async fn startup(&mut self, p: &ConnectParams) -> Result<(), ReplicationError> {
        let mut params = vec![
            ("user", p.user.as_str()),
            ("database", p.database.as_str()),
            ("replication", "database"),
            ("application_name", p.application_name.as_str()),
            ("client_encoding", "UTF8"),
        ];
        // The walsender formats values with these settings: fix them so
        // that text values parse the same on every server.
        params.extend(crate::convert::SESSION_SETTINGS.iter().copied());
        frontend::startup_message(params.iter().copied(), &mut self.out)?;
        self.flush_out().await?;
        let mut scram: Option<ScramSha256> = None;
        let mut bound = false;
        loop {
            match self.read_message().await? {
                Message::AuthenticationOk => {
                    if p.channel_binding == tls::ChannelBindingMode::Require && !bound {
                        return Err(ReplicationError::ChannelBindingUnavailable(
                            "the server let walcast in without a SCRAM exchange bound to its certificate",
                        ));
                    }
                }
                Message::AuthenticationCleartextPassword => {
                    self.plaintext_allowed(p, "in clear text")?;
                    let pw = p.password.as_deref().ok_or_else(|| {
                        ReplicationError::PasswordRequired {
                            user: p.user.clone(),
                        }
                    })?;
                    frontend::password_message(pw.as_bytes(), &mut self.out)?;
                    self.flush_out().await?;
                }
                Message::AuthenticationMd5Password(body) => {
                    self.plaintext_allowed(p, "as md5")?;
                    let pw = p.password.as_deref().ok_or_else(|| {
                        ReplicationError::PasswordRequired {
                            user: p.user.clone(),
                        }
                    })?;
                    let hash = md5_hash(p.user.as_bytes(), pw.as_bytes(), body.salt());
                    frontend::password_message(hash.as_bytes(), &mut self.out)?;
                    self.flush_out().await?;
                }
                Message::AuthenticationSasl(body) => {
                    let pw = p.password.as_deref().ok_or_else(|| {
                        ReplicationError::PasswordRequired {
                            user: p.user.clone(),
                        }
                    })?;
                    let mut mechanisms = body.mechanisms();
                    let (mut plain, mut plus) = (false, false);
                    while let Some(m) = mechanisms.next()? {
                        plain |= m == "SCRAM-SHA-256";
                        plus |= m == "SCRAM-SHA-256-PLUS";
                    }
                    let (mechanism, binding) = self.channel_binding(p.channel_binding, plus)?;
                    bound = mechanism == "SCRAM-SHA-256-PLUS";
                    if !plain && mechanism == "SCRAM-SHA-256" {
                        return Err(ReplicationError::UnsupportedAuth(
                            "SASL without SCRAM-SHA-256".into(),
                        ));
                    }
                    let s = ScramSha256::new(pw.as_bytes(), binding);
                    frontend::sasl_initial_response(mechanism, s.message(), &mut self.out)?;
                    self.flush_out().await?;
                    scram = Some(s);
                }
                Message::AuthenticationSaslContinue(body) => {
                    let s = scram.as_mut().ok_or(ReplicationError::Unexpected {
                        during: "authentication",
                        tag: 'R',
                    })?;
                    s.update(body.data())?;
                    frontend::sasl_response(s.message(), &mut self.out)?;
                    self.flush_out().await?;
                }
                Message::AuthenticationSaslFinal(body) => {
                    let mut s = scram.take().ok_or(ReplicationError::Unexpected {
                        during: "authentication",
                        tag: 'R',
                    })?;
                    s.finish(body.data())?;
                }
                Message::AuthenticationKerberosV5 => {
                    return Err(ReplicationError::UnsupportedAuth("Kerberos V5".into()))
                }
                Message::AuthenticationScmCredential => {
                    return Err(ReplicationError::UnsupportedAuth("SCM credentials".into()))
                }
                Message::AuthenticationGss | Message::AuthenticationSspi => {
                    return Err(ReplicationError::UnsupportedAuth("GSSAPI/SSPI".into()))
                }
                Message::ParameterStatus(body) => {
                    self.parameters
                        .insert(body.name()?.to_string(), body.value()?.to_string());
                }
                Message::BackendKeyData(_) | Message::NoticeResponse(_) => {}
                Message::ReadyForQuery(_) => return Ok(()),
                Message::ErrorResponse(body) => {
                    return Err(ReplicationError::Server(server_error(&body)))
                }
                _ => {
                    return Err(ReplicationError::Unexpected {
                        during: "startup",
                        tag: '?',
                    })
                }
            }
        }
    }

    /// Runs one command with the simple query protocol and returns its rows
    /// as text.
    pub async fn simple_query(
        &mut self,
        sql: &str,
    ) -> Result<Vec<Vec<Option<String>>>, ReplicationError> {
        frontend::query(sql, &mut self.out)?;
        self.flush_out().await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self.read_message().await? {
                Message::DataRow(body) => {
                    let buf = body.buffer();
                    let mut ranges = body.ranges();
                    let mut row = Vec::new();
                    while let Some(r) = ranges.next()? {
                        row.push(r.map(|r| String::from_utf8_lossy(&buf[r]).into_owned()));
                    }
                    rows.push(row);
                }
                Message::ErrorResponse(body) => error = Some(server_error(&body)),
                Message::ReadyForQuery(_) => break,
                _ => {}
            }
        }
        match error {
            Some(e) => Err(ReplicationError::Server(e)),
            None => Ok(rows),
        }
    }

    pub async fn identify_system(&mut self) -> Result<SystemInfo, ReplicationError> {
        let rows = self.simple_query("IDENTIFY_SYSTEM").await?;
        let row = rows.first().ok_or(ReplicationError::Unexpected {
            during: "IDENTIFY_SYSTEM",
            tag: 'D',
        })?;
        let col = |i: usize| row.get(i).cloned().flatten();
        Ok(SystemInfo {
            system_id: col(0).unwrap_or_default(),
            timeline: col(1).and_then(|t| t.parse().ok()).unwrap_or(0),
            xlog_pos: col(2).and_then(|l| l.parse().ok()).unwrap_or_default(),
            database: col(3),
        })
    }

    /// Creates a logical slot for pgoutput. With `export_snapshot`, the
    /// snapshot stays usable (SET TRANSACTION SNAPSHOT) until this
    /// connection runs its next command. With `failover` (Postgres 17+),
    /// the slot is a failover slot: standbys with `sync_replication_slots`
    /// keep a copy that a promoted standby serves from.
    pub async fn create_slot(
        &mut self,
        slot: &str,
        temporary: bool,
        export_snapshot: bool,
        failover: bool,
    ) -> Result<SlotCreated, ReplicationError> {
        let snapshot = if export_snapshot { "export" } else { "nothing" };
        // The option-list syntax (Postgres 15+) is the only one that takes
        // FAILOVER; the older keywords serve every supported version.
        let sql = if failover && !temporary {
            format!(
                "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput (SNAPSHOT '{snapshot}', FAILOVER true)",
                quote_ident(slot)
            )
        } else {
            format!(
                "CREATE_REPLICATION_SLOT {}{} LOGICAL pgoutput {}",
                quote_ident(slot),
                if temporary { " TEMPORARY" } else { "" },
                if export_snapshot {
                    "EXPORT_SNAPSHOT"
                } else {
                    "NOEXPORT_SNAPSHOT"
                }
            )
        };
        let rows = self.simple_query(&sql).await?;
        let row = rows.first().ok_or(ReplicationError::Unexpected {
            during: "CREATE_REPLICATION_SLOT",
            tag: 'D',
        })?;
        Ok(SlotCreated {
            slot_name: row.first().cloned().flatten().unwrap_or_default(),
            consistent_point: row
                .get(1)
                .cloned()
                .flatten()
                .and_then(|l| l.parse().ok())
                .unwrap_or_default(),
            snapshot_name: row.get(2).cloned().flatten(),
        })
    }

    /// Makes an existing slot a failover slot (Postgres 17+:
    /// `ALTER_REPLICATION_SLOT ... (FAILOVER true)`), for a pipeline whose
    /// slot was created before `slot_failover` was set.
    pub async fn enable_failover(&mut self, slot: &str) -> Result<(), ReplicationError> {
        self.simple_query(&format!(
            "ALTER_REPLICATION_SLOT {} (FAILOVER true)",
            quote_ident(slot)
        ))
        .await
        .map(|_| ())
    }

    /// Starts streaming. `start` 0/0 lets the server resume from the slot's
    /// confirmed_flush_lsn, the only safe place.
    pub async fn start_replication(
        mut self,
        slot: &str,
        start: Lsn,
        options: &[(&str, String)],
    ) -> Result<ReplicationStream, ReplicationError> {
        let opts: Vec<String> = options
            .iter()
            .map(|(k, v)| format!("{} {}", quote_ident(k), quote_literal(v)))
            .collect();
        let sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {} ({})",
            quote_ident(slot),
            start,
            opts.join(", ")
        );
        frontend::query(&sql, &mut self.out)?;
        self.flush_out().await?;
        loop {
            match self.read_message().await? {
                Message::CopyInResponse(_) => return Ok(ReplicationStream { conn: self }),
                Message::ErrorResponse(body) => {
                    let e = server_error(&body);
                    // Drain to ReadyForQuery so the error is the whole story.
                    return Err(ReplicationError::Server(e));
                }
                Message::NoticeResponse(_) | Message::ParameterStatus(_) => {}
                other => {
                    return Err(ReplicationError::Unexpected {
                        during: "START_REPLICATION",
                        tag: tag(&other),
                    })
                }
            }
        }
    }
}

fn copy_both_placeholder(
) -> std::io::Result<postgres_protocol::message::backend::CopyInResponseBody> {
    // Reuse the CopyInResponse variant to signal CopyBoth: parse an empty
    // CopyIn body (format 0, zero columns).
    let mut b = BytesMut::from(&b"G\0\0\0\x07\0\0\0"[..]);
    match Message::parse(&mut b)? {
        Some(Message::CopyInResponse(body)) => Ok(body),
        _ => Err(std::io::Error::other("cannot build CopyBoth marker")),
    }
}

/// The protocol tag of a backend message, to name it in an error.
fn tag(m: &Message) -> char {
    match m {
        Message::AuthenticationOk
        | Message::AuthenticationCleartextPassword
        | Message::AuthenticationMd5Password(_)
        | Message::AuthenticationSasl(_)
        | Message::AuthenticationSaslContinue(_)
        | Message::AuthenticationSaslFinal(_) => 'R',
        Message::BackendKeyData(_) => 'K',
        Message::BindComplete => '2',
        Message::CloseComplete => '3',
        Message::CommandComplete(_) => 'C',
        Message::CopyData(_) => 'd',
        Message::CopyDone => 'c',
        Message::CopyInResponse(_) => 'G',
        Message::CopyOutResponse(_) => 'H',
        Message::DataRow(_) => 'D',
        Message::EmptyQueryResponse => 'I',
        Message::ErrorResponse(_) => 'E',
        Message::NoData => 'n',
        Message::NoticeResponse(_) => 'N',
        Message::NotificationResponse(_) => 'A',
        Message::ParameterDescription(_) => 't',
        Message::ParameterStatus(_) => 'S',
        Message::ParseComplete => '1',
        Message::PortalSuspended => 's',
        Message::ReadyForQuery(_) => 'Z',
        Message::RowDescription(_) => 'T',
        _ => '?',
    }
}

/// Quotes an identifier for replication commands and SQL.
pub use walcast_sdk::table::quote_ident;

/// Quotes a string literal.
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// A walsender session in CopyBoth mode.
pub struct ReplicationStream {
    conn: ReplicationConnection,
}

impl ReplicationStream {
    /// The next replication message. Cancel-safe, so it can sit in a
    /// `select!` beside timers and acknowledgements.
    pub async fn recv(&mut self) -> Result<ServerMessage, ReplicationError> {
        loop {
            match self.conn.read_message().await? {
                Message::CopyData(body) => {
                    return Ok(protocol::parse_server_message(body.into_bytes())?)
                }
                // How a walsender ends the stream: CopyDone when it stops
                // streaming (a client's CopyDone answered, a timeline
                // switch), CommandComplete and ReadyForQuery when it exits
                // at a smart or fast shutdown without waiting for ours.
                // All mean "reconnect", never "stop the daemon".
                Message::CopyDone | Message::CommandComplete(_) | Message::ReadyForQuery(_) => {
                    return Err(ReplicationError::Closed)
                }
                Message::ErrorResponse(body) => {
                    return Err(ReplicationError::Server(server_error(&body)))
                }
                // Postgres 18's pgoutput no longer fails when the
                // publication is missing at the decoded WAL position: it
                // warns (55000, `skipped loading publication "x"`) and
                // publishes nothing, so every later change would be skipped
                // without a word. Taken as the error earlier versions raise.
                Message::NoticeResponse(body) => {
                    let n = fields_error(body.fields());
                    if n.message.starts_with("skipped loading publication") {
                        return Err(ReplicationError::Server(n));
                    }
                }
                Message::ParameterStatus(_) | Message::NotificationResponse(_) => {}
                other => {
                    return Err(ReplicationError::Unexpected {
                        during: "streaming",
                        tag: tag(&other),
                    })
                }
            }
        }
    }

    /// Sends a standby status update confirming `flushed`.
    pub async fn send_status(
        &mut self,
        flushed: Lsn,
        reply_requested: bool,
    ) -> Result<(), ReplicationError> {
        let payload: Bytes =
            protocol::standby_status_update(flushed, protocol::pg_now(), reply_requested);
        frontend::CopyData::new(&payload[..])?.write(&mut self.conn.out);
        self.conn.flush_out().await
    }

    /// Ends streaming politely after a final status update, and waits for
    /// the server to finish the exchange. Closing the socket while WAL is
    /// still arriving would make the kernel answer with a reset, which can
    /// discard the final status update unread on the server: the last
    /// confirmation would be lost and replayed on restart.
    pub async fn close(mut self, flushed: Lsn) -> Result<(), ReplicationError> {
        self.send_status(flushed, false).await?;
        frontend::copy_done(&mut self.conn.out);
        self.conn.flush_out().await?;
        let drain = async {
            loop {
                match self.conn.read_message().await {
                    Ok(Message::ReadyForQuery(_)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(10), drain).await;
        frontend::terminate(&mut self.conn.out);
        let _ = self.conn.flush_out().await;
        Ok(())
    }
}
