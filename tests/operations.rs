//! What an operator relies on: readiness follows Postgres, authentication
//! (SCRAM, md5) and TLS (verify-full against a CA made by the test) work,
//! and secrets never show up in logs or /status.

mod support;

use std::process::Command;
use std::time::Duration;

use support::*;

const WAIT: Duration = Duration::from_secs(60);

async fn http_code(w: &Walcast, path: &str) -> Option<u16> {
    w.http(path).await.map(|(c, _)| c)
}

async fn wait_code(w: &Walcast, path: &str, code: u16) {
    let deadline = std::time::Instant::now() + WAIT;
    while http_code(w, path).await != Some(code) {
        assert!(
            std::time::Instant::now() < deadline,
            "{path} never answered {code}; log:\n{}",
            tail(&w.log(), 3000)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_postgres_and_nothing_is_lost_across_its_restart() {
    let pg = TempCluster::start(&[
        "wal_level = logical",
        "max_replication_slots = 4",
        "max_wal_senders = 4",
    ]);
    pg.client()
        .await
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let port = pg.port;
    let w = Walcast::start_with(|out, admin| {
        file_pipeline_config(
            "ready",
            "postgres",
            &["public.t"],
            "retry_max_backoff = \"1s\"",
            out,
            admin,
        )
        .replace(&format!("port = {}", pg_port()), &format!("port = {port}"))
    });
    wait_code(&w, "/readyz", 200).await;
    assert_eq!(http_code(&w, "/healthz").await, Some(200));
    pg.client()
        .await
        .batch_execute("INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    w.wait_events("row 1", WAIT, |e| e.len() == 1).await;

    pg.stop();
    wait_code(&w, "/readyz", 503).await;
    assert_eq!(
        http_code(&w, "/healthz").await,
        Some(200),
        "alive while Postgres is down"
    );
    let (_, body) = w.http("/readyz").await.unwrap();
    assert!(
        body.contains("ready") && body.contains("Retrying"),
        "{body}"
    );

    pg.start_again();
    wait_code(&w, "/readyz", 200).await;
    pg.client()
        .await
        .batch_execute("INSERT INTO t VALUES (2)")
        .await
        .unwrap();
    let ev = w
        .wait_events("row 2 after the restart", WAIT, |e| {
            e.iter().any(|x| x["value"]["after"]["id"] == 2)
        })
        .await;
    let ids: Vec<i64> = ev
        .iter()
        .filter_map(|x| x["value"]["after"]["id"].as_i64())
        .collect();
    assert!(ids.contains(&1) && ids.contains(&2), "{ids:?}");
    let (_, metrics) = w.http("/metrics").await.unwrap();
    assert!(
        metrics.contains("walcast_pipeline_restarts_total{pipeline=\"ready\"}"),
        "restarts are counted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_and_md5_roles_capture_and_secrets_stay_out_of_logs() {
    for (user_var, pw_var) in [
        (
            "WALCAST_TEST_PG_SCRAM_USER",
            "WALCAST_TEST_PG_SCRAM_PASSWORD",
        ),
        ("WALCAST_TEST_PG_MD5_USER", "WALCAST_TEST_PG_MD5_PASSWORD"),
    ] {
        let user = var(user_var);
        let password = var(pw_var);
        let db = TestDb::new("wc_auth").await;
        let pipeline = unique("auth");
        // The role may not own the table: create the publication for it.
        db.exec(&format!("CREATE TABLE t (id int PRIMARY KEY, v text); CREATE PUBLICATION walcast_{pipeline} FOR TABLE t;")).await;
        let w = Walcast::start_with(|out, admin| {
            // The password arrives through a file, as a Kubernetes secret would.
            let pwfile = out.with_file_name("pw");
            std::fs::write(&pwfile, format!("{password}\n")).unwrap();
            file_pipeline_config(
                &pipeline,
                &db.name,
                &["public.t"],
                // The stack's Postgres has no TLS: md5 over plain text is
                // refused unless allowed (see the test below).
                &format!(
                    "password_file = \"{}\"\nallow_plaintext_password = true",
                    pwfile.display()
                ),
                out,
                admin,
            )
            .replace("user = \"postgres\"", &format!("user = \"{user}\""))
        });
        w.wait_state("streaming", WAIT).await;
        db.exec("INSERT INTO t VALUES (1, 'x')").await;
        w.wait_events("the row", WAIT, |e| e.len() == 1).await;
        let status = w.http("/status").await.unwrap().1;
        let metrics = w.http("/metrics").await.unwrap().1;
        for (what, text) in [("log", w.log()), ("/status", status), ("/metrics", metrics)] {
            assert!(
                !text.contains(&password),
                "the {user} password appears in the {what}"
            );
        }
    }
}

fn openssl(args: &[&str], dir: &std::path::Path) {
    let st = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl (Debian package openssl)");
    assert!(
        st.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&st.stderr)
    );
}

/// A CA, a server certificate for `localhost` signed by it (server.crt,
/// server.key), and a second CA that signed nothing, all in `d`.
fn pki(d: &std::path::Path) {
    openssl(
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=walcast test CA",
        ],
        d,
    );
    openssl(
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
        d,
    );
    std::fs::write(d.join("ext.cnf"), "subjectAltName=DNS:localhost\n").unwrap();
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
        d,
    );
    // A second CA that did not sign the server's certificate.
    openssl(
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "other.key",
            "-out",
            "other.crt",
            "-days",
            "2",
            "-subj",
            "/CN=other CA",
        ],
        d,
    );
}

/// [`pki`], and a cluster serving TLS with that certificate, with a table `t`.
async fn tls_cluster(d: &std::path::Path) -> (TempCluster, tokio_postgres::Client) {
    pki(d);
    let pg = TempCluster::start(&[
        "wal_level = logical",
        "max_replication_slots = 4",
        "max_wal_senders = 8",
    ]);
    for f in ["server.crt", "server.key"] {
        std::fs::copy(d.join(f), pg.data_dir().join(f)).unwrap();
    }
    Command::new("chown")
        .args(["postgres"])
        .arg(pg.data_dir().join("server.key"))
        .arg(pg.data_dir().join("server.crt"))
        .status()
        .unwrap();
    Command::new("chmod")
        .args(["600"])
        .arg(pg.data_dir().join("server.key"))
        .status()
        .unwrap();
    let c = pg.client().await;
    c.batch_execute("ALTER SYSTEM SET ssl = on").await.unwrap();
    c.batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    c.batch_execute("SELECT pg_reload_conf()").await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    (pg, c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_verify_full_checks_the_ca_and_the_host_name() {
    let pki = tempfile::tempdir().unwrap();
    let d = pki.path();
    let (pg, c) = tls_cluster(d).await;

    let cfg = |host: &str, mode: &str, ca: &str| {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "[pipelines.tls]\nkind = \"capture\"\nformat = \"json\"\n[pipelines.tls.source]\nhost = \"{host}\"\nport = {port}\ndatabase = \"postgres\"\nuser = \"postgres\"\ntables = [\"public.t\"]\nsslmode = \"{mode}\"\nssl_root_cert = \"{ca}\"\nconnect_timeout = \"5s\"\n[[pipelines.tls.sinks]]\ntype = \"file\"\npath = \"-\"\n",
            port = pg.port,
            ca = d.join(ca).display()
        );
        let p = dir.path().join("tls.toml");
        std::fs::write(&p, text).unwrap();
        (dir, p)
    };
    let (_k1, good) = cfg("localhost", "verify-full", "ca.crt");
    let (ok, out) = check(&good);
    assert!(ok, "verify-full with the right CA and host name: {out}");
    let (_k2, wrong_name) = cfg("127.0.0.1", "verify-full", "ca.crt");
    let (ok, out) = check(&wrong_name);
    assert!(
        !ok,
        "verify-full must refuse a certificate not issued for 127.0.0.1: {out}"
    );
    let (_k3, ca_only) = cfg("127.0.0.1", "verify-ca", "ca.crt");
    let (ok, out) = check(&ca_only);
    assert!(ok, "verify-ca ignores the host name: {out}");
    let (_k4, wrong_ca) = cfg("localhost", "verify-full", "other.crt");
    let (ok, out) = check(&wrong_ca);
    assert!(
        !ok,
        "verify-full must refuse a certificate from another CA: {out}"
    );

    // Streaming over TLS (the replication connection, not only the catalog).
    let ca = d.join("ca.crt").display().to_string();
    let port = pg.port;
    let w = Walcast::start_with(|out, admin| {
        file_pipeline_config(
            "tlsrun",
            "postgres",
            &["public.t"],
            &format!("sslmode = \"verify-full\"\nssl_root_cert = \"{ca}\""),
            out,
            admin,
        )
        .replace("host = \"127.0.0.1\"", "host = \"localhost\"")
        .replace(&format!("port = {}", pg_port()), &format!("port = {port}"))
    });
    w.wait_state("streaming", WAIT).await;
    c.batch_execute("INSERT INTO t VALUES (42)").await.unwrap();
    w.wait_events("the row over TLS", WAIT, |e| e.len() == 1)
        .await;
    let ssl_walsenders: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_replication r USING (pid) WHERE s.ssl",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(ssl_walsenders, 1, "the walsender connection is encrypted");
}

/// Passwords never cross the network readable, SCRAM binds to the server's
/// certificate, and `require` with a root certificate checks the CA
/// (libpq's rules), for the catalog and the replication connections alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_are_protected_and_scram_binds_to_the_certificate() {
    let pki = tempfile::tempdir().unwrap();
    let d = pki.path();
    let (pg, c) = tls_cluster(d).await;
    c.batch_execute(
        "SET password_encryption = 'md5'; CREATE ROLE md5u LOGIN REPLICATION SUPERUSER PASSWORD 'md5-secret';
         SET password_encryption = 'scram-sha-256';
         CREATE ROLE clear LOGIN REPLICATION SUPERUSER PASSWORD 'clear-secret';
         CREATE ROLE scram LOGIN REPLICATION SUPERUSER PASSWORD 'scram-secret';",
    )
    .await
    .unwrap();
    let hba = pg.data_dir().join("pg_hba.conf");
    let rest = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!(
            "host all md5u 127.0.0.1/32 md5\nhost all clear 127.0.0.1/32 password\nhost all scram 127.0.0.1/32 scram-sha-256\n{rest}"
        ),
    )
    .unwrap();
    c.batch_execute("SELECT pg_reload_conf()").await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;

    let run = |host: &str, user: &str, password: &str, extra: &str| {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "[pipelines.sec]\nkind = \"capture\"\nformat = \"json\"\n[pipelines.sec.source]\nhost = \"{host}\"\nport = {port}\n\
             database = \"postgres\"\nuser = \"{user}\"\npassword = \"{password}\"\ntables = [\"public.t\"]\nconnect_timeout = \"5s\"\n{extra}\n\
             [[pipelines.sec.sinks]]\ntype = \"file\"\npath = \"-\"\n",
            port = pg.port,
        );
        let p = dir.path().join("sec.toml");
        std::fs::write(&p, text).unwrap();
        check(&p)
    };
    let ca = d.join("ca.crt").display().to_string();
    let other = d.join("other.crt").display().to_string();

    for (user, pw, method) in [
        ("clear", "clear-secret", "in clear text"),
        ("md5u", "md5-secret", "as md5"),
    ] {
        let (ok, out) = run("127.0.0.1", user, pw, "sslmode = \"disable\"");
        assert!(
            !ok,
            "{user}: a password {method} over plain text was sent:\n{out}"
        );
        assert!(
            out.contains(method) && out.contains("allow_plaintext_password"),
            "{out}"
        );
        let (ok, out) = run(
            "127.0.0.1",
            user,
            pw,
            "sslmode = \"disable\"\nallow_plaintext_password = true",
        );
        assert!(ok, "{user} with allow_plaintext_password: {out}");
        // Over TLS the same exchange is fine.
        let (ok, out) = run("127.0.0.1", user, pw, "sslmode = \"require\"");
        assert!(ok, "{user} over TLS: {out}");
    }
    // SCRAM bound to the certificate, required: the replication and the
    // catalog connection both authenticate with SCRAM-SHA-256-PLUS.
    let (ok, out) = run(
        "localhost",
        "scram",
        "scram-secret",
        &format!(
            "sslmode = \"verify-full\"\nssl_root_cert = \"{ca}\"\nchannel_binding = \"require\""
        ),
    );
    assert!(ok, "SCRAM-SHA-256-PLUS: {out}");
    assert!(
        !out.contains("warning: sslmode"),
        "no warning for verify-full on localhost: {out}"
    );
    let (ok, out) = run(
        "127.0.0.1",
        "scram",
        "scram-secret",
        "sslmode = \"disable\"\nchannel_binding = \"require\"",
    );
    assert!(
        !ok && out.contains("channel_binding"),
        "binding required without TLS: {out}"
    );
    let (ok, out) = run(
        "127.0.0.1",
        "clear",
        "clear-secret",
        "sslmode = \"require\"\nchannel_binding = \"require\"",
    );
    assert!(
        !ok && out.contains("channel_binding"),
        "binding required with a password exchange: {out}"
    );
    // `require` with a root certificate verifies the CA.
    let (ok, out) = run(
        "127.0.0.1",
        "scram",
        "scram-secret",
        &format!("sslmode = \"require\"\nssl_root_cert = \"{other}\""),
    );
    assert!(
        !ok,
        "require with another CA's root certificate connected: {out}"
    );
    let (ok, out) = run(
        "127.0.0.1",
        "scram",
        "scram-secret",
        &format!("sslmode = \"require\"\nssl_root_cert = \"{ca}\""),
    );
    assert!(
        ok,
        "require with the right CA (host name not checked): {out}"
    );
}

/// One redaction rule for every secret: a canary in every credential slot
/// of every connector's config (the Postgres password, the registry's URL
/// and password, Kafka client properties of the sink and of a relay's
/// source, the Redis URL, the Elasticsearch URL and basic auth) never
/// appears in `walcast check`'s output, in the daemon's debug log while it
/// runs and fails to authenticate, or in its admin endpoints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_a_log_an_error_or_the_admin_api() {
    const CANARY: &str = "CANARYc4n4ry";
    let db = TestDb::new("wc_canary").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, v text)").await;
    let bootstrap = var("WALCAST_TEST_KAFKA_BOOTSTRAP");
    let registry =
        var("WALCAST_TEST_REGISTRY_URL").replacen("://", &format!("://walcast:{CANARY}@"), 1);
    let redis = var("WALCAST_TEST_REDIS_URL").replacen("://", &format!("://:{CANARY}@"), 1);
    let search =
        var("WALCAST_TEST_OPENSEARCH_URL").replacen("://", &format!("://walcast:{CANARY}@"), 1);
    let prefix = unique("canary");
    let text = |admin: &str, redis: &str, search: &str| {
        format!(
            r#"[admin]
listen = "{admin}"
[log]
format = "json"
level = "debug"
[pipelines.cap]
kind = "capture"
topic_prefix = "{prefix}"
format = "avro"
[pipelines.cap.registry]
url = "{registry}"
username = "walcast"
password = "{CANARY}"
[pipelines.cap.source]
host = "127.0.0.1"
port = {port}
database = "{db}"
user = "postgres"
password = "{CANARY}"
tables = ["public.t"]
[[pipelines.cap.sinks]]
type = "kafka"
bootstrap_servers = "{bootstrap}"
producer = {{ "sasl.password" = "{CANARY}", "sasl.username" = "walcast" }}
[[pipelines.cap.sinks]]
type = "redis"
urls = ["{redis}"]
mode = {{ type = "upsert", key_template = "{prefix}:{{id}}" }}
retry_max_ms = 500
[[pipelines.cap.sinks]]
type = "elasticsearch"
url = "{search}"
auth = {{ type = "basic", username = "walcast", password = "{CANARY}" }}
retry_max_ms = 500
[pipelines.rel]
kind = "relay"
[pipelines.rel.source]
bootstrap_servers = "{bootstrap}"
group_id = "{prefix}-relay"
subscribe = {{ topics = ["{prefix}.public.t"] }}
consumer = {{ "sasl.password" = "{CANARY}", "ssl.key.password" = "{CANARY}" }}
[pipelines.rel.registry]
url = "{registry}"
username = "walcast"
password = "{CANARY}"
[[pipelines.rel.sinks]]
type = "redis"
urls = ["{redis}"]
mode = {{ type = "invalidate", key_template = "{prefix}:{{id}}" }}
retry_max_ms = 500
"#,
            port = pg_port(),
            db = db.name,
        )
    };
    // Redis refuses the password (it has none): the daemon stops, naming
    // the URL without it.
    let mut refused = Walcast::start_with(|_, admin| text(admin, &redis, &search));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while refused.exited().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "walcast kept running with a refused Redis password"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let refusal = refused.log();
    assert!(
        refusal.contains("redis://:<redacted>@"),
        "{}",
        tail(&refusal, 2000)
    );
    // Everything else carries the canary and runs.
    let plain_redis = var("WALCAST_TEST_REDIS_URL");
    // An unreachable search cluster: the sink's errors name its URL.
    let closed = format!("http://walcast:{CANARY}@127.0.0.1:{}", free_port());
    let closed_registry = format!("http://walcast:{CANARY}@127.0.0.1:{}", free_port());
    let mut unreachable = Walcast::start_with(|_, admin| {
        text(admin, &plain_redis, &closed).replace(&registry, &closed_registry)
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !unreachable
        .log()
        .contains("elasticsearch sink: cannot reach")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no word of the unreachable search cluster:\n{}",
            tail(&unreachable.log(), 3000)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    unreachable.kill9();
    // `check` asks the unreachable registry too, and says so.
    let (_, checked_unreachable) = check(&unreachable.config);
    assert!(
        checked_unreachable.contains("registry"),
        "{checked_unreachable}"
    );
    let refusal = refusal + &unreachable.log() + &checked_unreachable;
    let mut w = Walcast::start_with(|_, admin| text(admin, &plain_redis, &search));
    let (_, checked) = check(&w.config);
    w.wait_state("streaming", Duration::from_secs(60)).await;
    db.exec("INSERT INTO t VALUES (1, 'x')").await;
    let client = reqwest::Client::new();
    let mut admin_answers = String::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        for path in ["status", "metrics", "readyz", "healthz", "api/v1/slots"] {
            if let Ok(r) = client
                .get(format!("http://{}/{path}", w.admin))
                .send()
                .await
            {
                admin_answers.push_str(&r.text().await.unwrap_or_default());
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    w.kill9();
    let log = w.log() + &refusal;
    assert!(log.len() > 1000, "the daemon logged almost nothing:\n{log}");
    assert!(
        admin_answers.contains("cap"),
        "the admin API did not answer: {admin_answers}\n{}",
        tail(&log, 3000)
    );
    for (what, text) in [
        ("check", &checked),
        ("the log", &log),
        ("the admin API", &admin_answers),
    ] {
        if let Some(at) = text.find(CANARY) {
            let from = at.saturating_sub(300);
            panic!(
                "a secret in {what}: ...{}...",
                &text[from..(at + 100).min(text.len())]
            );
        }
    }
}

/// The admin server beyond loopback: HTTPS with the configured certificate,
/// a bearer token for everything but the probes, and `walcast status`
/// passing both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_server_takes_a_token_and_serves_https() {
    let pki_dir = tempfile::tempdir().unwrap();
    let d = pki_dir.path();
    pki(d);
    let token = "s3cr3t-admin-token-0123456789";
    std::fs::write(d.join("token"), format!("{token}\n")).unwrap();
    let db = TestDb::new("wc_admintls").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let mut w = Walcast::start_with(|out, admin| {
        file_pipeline_config("admintls", &db.name, &["public.t"], "", out, admin).replace(
            "[log]",
            &format!(
                "token_file = \"{}\"\ntls = {{ cert_file = \"{}\", key_file = \"{}\" }}\n[log]",
                d.join("token").display(),
                d.join("server.crt").display(),
                d.join("server.key").display()
            ),
        )
    });
    let port = w.admin.rsplit(':').next().unwrap().to_string();
    let base = format!("https://localhost:{port}");
    let ca = reqwest::Certificate::from_pem(&std::fs::read(d.join("ca.crt")).unwrap()).unwrap();
    let client = reqwest::Client::builder()
        .add_root_certificate(ca)
        .build()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let r = client
            .get(format!("{base}/status"))
            .bearer_auth(token)
            .send()
            .await;
        if let Ok(r) = r {
            if r.status().is_success() && r.text().await.unwrap_or_default().contains("streaming") {
                break;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no streaming status over HTTPS:\n{}",
            tail(&w.log(), 3000)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let get = |path: &str, token: Option<&str>| {
        let mut r = client.get(format!("{base}/{path}"));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send()
    };
    assert_eq!(
        get("healthz", None).await.unwrap().status(),
        200,
        "probes need no token"
    );
    assert_eq!(
        get("readyz", None).await.unwrap().status(),
        200,
        "probes need no token"
    );
    assert_eq!(get("status", None).await.unwrap().status(), 401);
    assert_eq!(get("metrics", None).await.unwrap().status(), 401);
    assert_eq!(
        get("status", Some("s3cr3t-admin-token-012345678X"))
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(get("metrics", Some(token)).await.unwrap().status(), 200);
    // Plain HTTP on the HTTPS port gets nothing.
    assert!(
        reqwest::get(format!("http://127.0.0.1:{port}/status"))
            .await
            .map(|r| r.status().is_success())
            .unwrap_or(false)
            == false
    );
    // `walcast status` with the token and the CA.
    let status = |args: &[&str]| {
        let out = std::process::Command::new(bin())
            .arg("status")
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let token_file = d.join("token").display().to_string();
    let ca_file = d.join("ca.crt").display().to_string();
    let (ok, out) = status(&[
        "--admin",
        &base,
        "--token-file",
        &token_file,
        "--ca-file",
        &ca_file,
    ]);
    assert!(
        ok && out.contains("admintls") && out.contains("streaming"),
        "{out}"
    );
    let (ok, out) = status(&["--admin", &base, "--ca-file", &ca_file]);
    assert!(!ok && out.contains("--token-file"), "{out}");
    w.kill9();
}

/// A refused password is definite: the daemon stops with exit code 1 and
/// says so, instead of retrying forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_password_stops_the_daemon() {
    let db = TestDb::new("wc_badpw").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY)").await;
    let user = var("WALCAST_TEST_PG_SCRAM_USER");
    let mut w = Walcast::start_with(|out, admin| {
        file_pipeline_config(
            "badpw",
            &db.name,
            &["public.t"],
            "password = \"not-the-password\"",
            out,
            admin,
        )
        .replace("user = \"postgres\"", &format!("user = \"{user}\""))
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = w.exited() {
            break st;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "walcast kept retrying a refused password:\n{}",
            tail(&w.log(), 2000)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(status.code(), Some(1));
    assert!(
        w.log().contains("password authentication failed"),
        "{}",
        tail(&w.log(), 2000)
    );
}

/// The machine's first address that is not loopback (`hostname -I`).
fn non_loopback_address() -> Option<String> {
    let out = Command::new("hostname").arg("-I").output().ok()?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .find(|a| {
            a.parse::<std::net::Ipv4Addr>()
                .is_ok_and(|ip| !ip.is_loopback())
        })
        .map(String::from)
}

/// A server reached over an address that is not this machine's loopback,
/// without `verify-full`: `walcast check` and the daemon both warn, naming
/// the host and the risk; on loopback they do not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_off_this_machine_without_verify_full_is_warned_about() {
    let Some(ip) = non_loopback_address() else {
        eprintln!("SKIPPED: this machine has no non-loopback IPv4 address to reach Postgres by");
        return;
    };
    let pg = TempCluster::start(&[
        "wal_level = logical",
        "max_replication_slots = 4",
        "max_wal_senders = 8",
        "listen_addresses = '*'",
    ]);
    let hba = pg.data_dir().join("pg_hba.conf");
    let mut rules = std::fs::read_to_string(&hba).unwrap();
    rules.push_str(&format!(
        "host all all {ip}/32 trust\nhost replication all {ip}/32 trust\n"
    ));
    std::fs::write(&hba, rules).unwrap();
    pg.stop_mode("fast");
    pg.start_again();
    let c = pg.client().await;
    c.batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = |host: &str| {
        let text = format!(
            "[pipelines.far]\nkind = \"capture\"\nformat = \"json\"\n[pipelines.far.source]\nhost = \"{host}\"\nport = {port}\ndatabase = \"postgres\"\nuser = \"postgres\"\ntables = [\"public.t\"]\nsslmode = \"disable\"\nconnect_timeout = \"5s\"\n[[pipelines.far.sinks]]\ntype = \"file\"\npath = \"-\"\n",
            port = pg.port
        );
        let p = dir.path().join(format!("{host}.toml"));
        std::fs::write(&p, text).unwrap();
        p
    };
    let warning =
        format!("warning: sslmode = \"disable\" for host {ip}, which is not on this machine");
    let (ok, out) = check(&cfg(&ip));
    assert!(ok, "check over {ip}: {out}");
    assert!(
        out.contains(&warning) && out.contains("in clear text") && out.contains("verify-full"),
        "no warning for a server off this machine without verify-full: {out}"
    );
    let (ok, out) = check(&cfg("127.0.0.1"));
    assert!(ok, "check over loopback: {out}");
    assert!(
        !out.contains("warning: sslmode"),
        "a warning for a loopback connection: {out}"
    );

    let port = pg.port;
    let w = Walcast::start_with(|out, admin| {
        file_pipeline_config(
            "farrun",
            "postgres",
            &["public.t"],
            "sslmode = \"disable\"",
            out,
            admin,
        )
        .replace("host = \"127.0.0.1\"", &format!("host = \"{ip}\""))
        .replace(&format!("port = {}", pg_port()), &format!("port = {port}"))
    });
    w.wait_state("streaming", WAIT).await;
    c.batch_execute("INSERT INTO t VALUES (7)").await.unwrap();
    w.wait_events("the row over the non-loopback address", WAIT, |e| {
        e.len() == 1
    })
    .await;
    let log = w.log();
    assert!(
        log.contains(&format!(
            "sslmode = \\\"disable\\\" for host {ip}, which is not on this machine"
        )) || log.contains(&format!(
            "sslmode = \"disable\" for host {ip}, which is not on this machine"
        )),
        "the daemon did not warn:\n{}",
        tail(&log, 3000)
    );
}
