//! The client side of the management API (`/api/v1`, see
//! `crate::admin::api`): where the daemon is (the config's `[admin]`
//! section, or `--admin`), its token, and one call.
//!
//! A daemon that does not answer at all (connection refused, no admin
//! server configured) is told apart from one that answered with an error:
//! the commands that can act without a daemon (`snapshot`, `slots`) fall
//! back to acting directly only in the first case, saying so.

use std::path::Path;

use anyhow::Context;

use crate::cli::DaemonArgs;
use crate::config::{self, Config, PipelineConfig};
use crate::manage::Capture;

/// A running daemon's management API.
pub(crate) struct Daemon {
    pub base: String,
    http: reqwest::Client,
    token: Option<String>,
    actor: String,
}

/// The answer of a call.
pub(crate) enum Reply {
    /// The daemon answered: the status code and its JSON body.
    Answered(u16, serde_json::Value),
    /// Nobody answered at the address: why.
    Unreachable(String),
}

/// The config, when `--config` (or `WALCAST_CONFIG`) names one.
pub(crate) fn load_config(args: &DaemonArgs) -> anyhow::Result<Option<Config>> {
    Ok(args.config.as_deref().map(config::load).transpose()?)
}

/// Where the daemon listens, from `--admin` or the config; `None` when the
/// config disables the admin server.
pub(crate) fn connect(args: &DaemonArgs, cfg: Option<&Config>) -> anyhow::Result<Option<Daemon>> {
    let base = match (&args.admin, cfg) {
        (Some(a), _) if a.contains("://") => a.trim_end_matches('/').to_string(),
        (Some(a), _) => format!("http://{a}"),
        (None, Some(c)) => {
            let Some(addr) = c.admin.address() else {
                return Ok(None);
            };
            let mut addr = addr.context("admin.listen")?;
            // A daemon listening on every address is reached on loopback.
            if addr.ip().is_unspecified() {
                addr.set_ip(if addr.is_ipv4() {
                    std::net::Ipv4Addr::LOCALHOST.into()
                } else {
                    std::net::Ipv6Addr::LOCALHOST.into()
                });
            }
            let scheme = if c.admin.tls.is_some() {
                "https"
            } else {
                "http"
            };
            format!("{scheme}://{addr}")
        }
        (None, None) => format!("http://{}", config::DEFAULT_ADMIN_LISTEN),
    };
    let token_file = args
        .token_file
        .clone()
        .or_else(|| cfg.and_then(|c| c.admin.token_file.clone()));
    let token = match token_file {
        Some(path) => Some(
            std::fs::read_to_string(&path)
                .with_context(|| format!("admin token file {}", path.display()))?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    let mut http = reqwest::Client::builder().timeout(std::time::Duration::from_secs(60));
    if let Some(ca) = &args.ca_file {
        let pem = std::fs::read(ca).with_context(|| format!("--ca-file {}", ca.display()))?;
        http = http.add_root_certificate(
            reqwest::Certificate::from_pem(&pem)
                .with_context(|| format!("--ca-file {}", ca.display()))?,
        );
    }
    let actor = args
        .actor
        .clone()
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "unknown".into());
    Ok(Some(Daemon {
        base,
        http: http.build()?,
        token,
        actor,
    }))
}

impl Daemon {
    /// `GET` (no body) or `POST` (a body) of `path` under `/api/v1`.
    pub async fn call(&self, path: &str, body: Option<serde_json::Value>) -> anyhow::Result<Reply> {
        let url = format!("{}/api/v1{path}", self.base);
        let mut request = match &body {
            Some(b) => self.http.post(&url).json(b),
            None => self.http.get(&url),
        }
        .header(crate::admin::api::ACTOR_HEADER, &self.actor);
        if let Some(t) = &self.token {
            request = request.bearer_auth(t);
        }
        let response = match request.send().await {
            Ok(r) => r,
            Err(e) if e.is_connect() => return Ok(Reply::Unreachable(format!("{e:#}"))),
            Err(e) => return Err(e).with_context(|| format!("calling the daemon at {url}")),
        };
        let code = response.status().as_u16();
        anyhow::ensure!(
            code != 401,
            "the daemon at {url} wants its admin token: pass --config (its admin.token_file) or --token-file"
        );
        let text = response.text().await.unwrap_or_default();
        // A daemon older than the API answers 404 in plain text.
        let value = serde_json::from_str(&text).unwrap_or_else(
            |_| serde_json::json!({ "error": format!("{url}: HTTP {code}: {}", text.trim()) }),
        );
        Ok(Reply::Answered(code, value))
    }
}

/// Prints a successful answer's message, or fails with its error.
pub(crate) fn finish(code: u16, v: &serde_json::Value) -> anyhow::Result<std::process::ExitCode> {
    if (200..300).contains(&code) {
        println!("{}", v["message"].as_str().unwrap_or_default());
        Ok(std::process::ExitCode::SUCCESS)
    } else {
        anyhow::bail!(
            "{}",
            v["error"]
                .as_str()
                .map(String::from)
                .unwrap_or_else(|| v.to_string())
        )
    }
}

/// The config's capture pipelines, for acting without a daemon.
pub(crate) fn captures(cfg: &Config) -> anyhow::Result<Vec<Capture>> {
    let mut out = Vec::new();
    for (name, p) in &cfg.pipelines {
        if let PipelineConfig::Capture(c) = p {
            out.push(Capture {
                name: name.clone(),
                settings: crate::pipeline::capture_settings(name, c)?,
            });
        }
    }
    Ok(out)
}

/// The config file, required to act without a daemon.
pub(crate) fn required<'a>(
    cfg: Option<&'a Config>,
    path: Option<&'a Path>,
    why: &str,
) -> anyhow::Result<(&'a Config, &'a Path)> {
    match (cfg, path) {
        (Some(c), Some(p)) => Ok((c, p)),
        _ => anyhow::bail!("{why}: pass --config (or WALCAST_CONFIG)"),
    }
}
