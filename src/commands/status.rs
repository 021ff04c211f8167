//! `walcast status`: the admin server's `/status`, printed.

use std::process::ExitCode;

use anyhow::Context;

pub(crate) async fn status(
    admin: &str,
    token_file: Option<&std::path::Path>,
    ca_file: Option<&std::path::Path>,
) -> anyhow::Result<ExitCode> {
    let url = if admin.contains("://") {
        format!("{}/status", admin.trim_end_matches('/'))
    } else {
        format!("http://{admin}/status")
    };
    let mut client = reqwest::Client::builder();
    if let Some(ca) = ca_file {
        let pem = std::fs::read(ca).with_context(|| format!("--ca-file {}", ca.display()))?;
        client = client.add_root_certificate(
            reqwest::Certificate::from_pem(&pem)
                .with_context(|| format!("--ca-file {}", ca.display()))?,
        );
    }
    let mut request = client.build()?.get(&url);
    if let Some(path) = token_file {
        let token = std::fs::read_to_string(path)
            .with_context(|| format!("--token-file {}", path.display()))?;
        request = request.bearer_auth(token.trim());
    }
    let response = request
        .send()
        .await
        .with_context(|| format!("cannot reach the daemon at {url}"))?;
    anyhow::ensure!(
        response.status() != reqwest::StatusCode::UNAUTHORIZED,
        "the daemon at {url} wants its admin token: pass --token-file (or WALCAST_ADMIN_TOKEN_FILE)"
    );
    let body = response.text().await?;
    let v: serde_json::Value =
        serde_json::from_str(&body).context("the daemon's /status is not JSON")?;
    for p in v["pipelines"].as_array().into_iter().flatten() {
        // A pause asked for while the pipeline did not stream yet.
        let pending_pause = p["pause_requested"] == true && p["state"] != "paused";
        println!(
            "{:<20} {:<10} confirmed={} wal_end={} lag_bytes={} in_flight={} events={}{}{}",
            p["name"].as_str().unwrap_or("?"),
            p["state"].as_str().unwrap_or("?"),
            p["confirmed_lsn"].as_str().unwrap_or("-"),
            p["wal_end"].as_str().unwrap_or("-"),
            p["lag_bytes"],
            p["in_flight_events"],
            p["events_total"],
            if pending_pause {
                " pause_requested"
            } else {
                ""
            },
            p["last_error"]
                .as_str()
                .map(|e| format!(" last_error={e}"))
                .unwrap_or_default(),
        );
        // Snapshots in progress (or just finished): rows, estimate, rate, ETA.
        for (what, g) in p["progress"].as_object().into_iter().flatten() {
            println!(
                "  {what}: {} rows={}/{} rows_per_second={} eta_seconds={}{}",
                g["state"].as_str().unwrap_or("?"),
                g["rows"],
                g["estimated_total"],
                g["rows_per_second"],
                g["eta_seconds"],
                g["table"]
                    .as_str()
                    .map(|t| format!(" table={t}"))
                    .unwrap_or_default(),
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
