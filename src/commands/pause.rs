//! `walcast pause` / `walcast resume`: the management API's pause, for a
//! running daemon only (a pause exists only in a daemon's memory).

use std::process::ExitCode;

use crate::cli::DaemonArgs;
use crate::commands::daemon::{self, Reply};

pub(crate) async fn pause(
    args: &DaemonArgs,
    pipeline: &str,
    pause: bool,
) -> anyhow::Result<ExitCode> {
    let cfg = daemon::load_config(args)?;
    let what = if pause { "pause" } else { "resume" };
    let Some(d) = daemon::connect(args, cfg.as_ref())? else {
        anyhow::bail!(
            "the config disables the admin server (admin.listen = \"\"): {what} acts through a running daemon's \
             admin server; pass --admin host:port"
        );
    };
    match d
        .call(&format!("/pipelines/{pipeline}/{what}"), Some(serde_json::json!({})))
        .await?
    {
        Reply::Answered(code, v) => daemon::finish(code, &v),
        Reply::Unreachable(why) => anyhow::bail!(
            "no walcast daemon answers at {} ({why}): {what} acts on a running daemon (a stopped one reads \
             nothing anyway)",
            d.base
        ),
    }
}
