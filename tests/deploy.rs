//! Offline checks of everything under deploy/: the systemd unit (with
//! `systemd-analyze` when the machine has it), the Kubernetes manifests, the
//! Docker files and the Grafana dashboard. Nothing here needs a running
//! service, a Docker engine or a cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;

use serde_yaml::Value as Yaml;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    let p = root().join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()))
}

// ---------------------------------------------------------------- systemd

/// `Key=value` lines of a unit file, by section; a key may repeat.
fn unit_directives(text: &str) -> BTreeMap<(String, String), Vec<String>> {
    let mut out: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    let mut section = String::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if line.starts_with('[') && line.ends_with(']') {
            section = line[1..line.len() - 1].to_string();
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not a Key=value line: {line}"));
        out.entry((section.clone(), k.trim().to_string()))
            .or_default()
            .push(v.trim().to_string());
    }
    out
}

#[test]
fn systemd_unit_has_the_intended_settings() {
    let unit = read("deploy/systemd/walcast.service");
    let d = unit_directives(&unit);
    let one = |key: &str| -> String {
        let v = d
            .get(&("Service".to_string(), key.to_string()))
            .unwrap_or_else(|| panic!("[Service] {key}= is missing"));
        assert_eq!(v.len(), 1, "[Service] {key}= is set {} times", v.len());
        v[0].clone()
    };
    let expected = [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        ("Environment", "MALLOC_ARENA_MAX=2"),
        (
            "ExecStart",
            "/usr/local/bin/walcast run -c /etc/walcast/walcast.toml",
        ),
        ("Restart", "on-failure"),
        ("RestartSec", "5"),
        ("WatchdogSec", "30"),
        ("TimeoutStopSec", "60"),
        ("KillSignal", "SIGTERM"),
        ("DynamicUser", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("NoNewPrivileges", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectKernelLogs", "yes"),
        ("ProtectControlGroups", "yes"),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("RestrictNamespaces", "yes"),
        ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("SystemCallArchitectures", "native"),
        ("SystemCallFilter", "@system-service"),
        ("CapabilityBoundingSet", ""),
        ("EnvironmentFile", "-/etc/walcast/walcast.env"),
        ("ConfigurationDirectory", "walcast"),
        ("StateDirectory", "walcast"),
        ("LimitNOFILE", "65536"),
    ];
    for (k, v) in expected {
        assert_eq!(one(k), v, "[Service] {k}=");
    }
    assert!(
        !d.contains_key(&("Service".to_string(), "ExecReload".to_string())),
        "the daemon has no reload"
    );
    // The stop timeout must leave room for the default drain (30 s).
    let stop: u64 = one("TimeoutStopSec").parse().unwrap();
    assert!(
        stop > 30,
        "TimeoutStopSec={stop} does not exceed the default shutdown_timeout of 30 s"
    );
    assert_eq!(
        d.get(&("Install".to_string(), "WantedBy".to_string()))
            .map(Vec::as_slice),
        Some(&["multi-user.target".to_string()][..])
    );

    let env = read("deploy/systemd/walcast.env.example");
    assert!(
        env.lines()
            .any(|l| l.starts_with("WALCAST_PIPELINES__ORDERS__SOURCE__PASSWORD=")),
        "walcast.env.example shows the password variable"
    );
}

fn systemd_analyze() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/bin")])
        .map(|d| d.join("systemd-analyze"))
        .find(|p| p.is_file())
}

/// `systemd-analyze verify` loads the unit offline (no systemd as PID 1 is
/// needed) but checks that ExecStart's binary exists, so it runs on a copy
/// whose ExecStart is the walcast binary this test was built with.
#[test]
fn systemd_unit_passes_systemd_analyze() {
    let Some(analyze) = systemd_analyze() else {
        // deploy/local/test installs it and sets WALCAST_TEST_REQUIRE_TOOLS:
        // there (and in CI) a missing tool is a failure, not a pass that
        // verified nothing.
        assert!(
            !tools_required(),
            "systemd-analyze is not installed (apt-get install systemd): the unit cannot be verified \
             (WALCAST_TEST_REQUIRE_TOOLS or CI is set, so this is a failure, not a skip)"
        );
        eprintln!("SKIPPED: systemd-analyze is not installed (apt-get install systemd); unit not verified");
        return;
    };
    let help = Command::new(&analyze)
        .arg("--help")
        .output()
        .expect("systemd-analyze --help");
    let help = String::from_utf8_lossy(&help.stdout).into_owned();

    let unit = read("deploy/systemd/walcast.service");
    let bin = env!("CARGO_BIN_EXE_walcast");
    let original = "ExecStart=/usr/local/bin/walcast ";
    assert!(unit.contains(original));
    let copy = unit.replace(original, &format!("ExecStart={bin} "));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("walcast.service");
    std::fs::write(&path, copy).unwrap();

    let mut cmd = Command::new(&analyze);
    cmd.arg("verify").arg("--man=no");
    if help.contains("--recursive-errors") {
        // Only this unit's problems, not those of the targets it names.
        cmd.arg("--recursive-errors=no");
    }
    let out = cmd
        .arg(&path)
        .env("SYSTEMD_LOG_COLOR", "0")
        .output()
        .expect("run systemd-analyze verify");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "systemd-analyze verify failed ({}):\n{text}",
        out.status
    );
    // Unknown keys and unparsable values are only warnings (exit 0), so
    // any line about the unit fails the test.
    let about_unit: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("walcast.service") || l.contains(&*dir.path().to_string_lossy()))
        .collect();
    assert!(
        about_unit.is_empty(),
        "systemd-analyze verify warned:\n{}",
        about_unit.join("\n")
    );

    if help.contains("--offline") && help.contains("--threshold") {
        // Exposure score ×10: 30 is "OK" territory (the unit rates ~1.6).
        let out = Command::new(&analyze)
            .args(["security", "--offline=yes", "--threshold=30", "--no-pager"])
            .arg(&path)
            .output()
            .expect("run systemd-analyze security");
        assert!(
            out.status.success(),
            "systemd-analyze security: exposure above 3.0:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    } else {
        eprintln!("systemd-analyze has no offline security check; skipped");
    }
}

// ------------------------------------------------------------- kubernetes

/// Every document of every YAML file of a directory, by file name.
fn yaml_docs(dir: &str) -> BTreeMap<String, Vec<Yaml>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(root().join(dir)).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !(name.ends_with(".yaml") || name.ends_with(".yml")) {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let docs: Vec<Yaml> = serde_yaml::Deserializer::from_str(&text)
            .map(|d| {
                serde::Deserialize::deserialize(d)
                    .unwrap_or_else(|e| panic!("{name}: invalid YAML: {e}"))
            })
            .filter(|v: &Yaml| !v.is_null())
            .collect();
        assert!(!docs.is_empty(), "{name} holds no document");
        out.insert(name, docs);
    }
    out
}

/// `walcast check --offline`: the daemon's own parser and validation.
fn walcast_accepts(config: &std::path::Path) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_walcast"));
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("WALCAST_")) {
        cmd.env_remove(k);
    }
    let out = cmd
        .arg("check")
        .arg("--offline")
        .arg("-c")
        .arg(config)
        .output()
        .expect("run walcast check");
    assert!(
        out.status.success(),
        "walcast check --offline -c {} refused it:\n{}{}",
        config.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn s<'a>(v: &'a Yaml, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what}: expected a string, found {v:?}"))
}

/// The one document of `file`, checked to be `apiVersion`/`kind`.
fn k8s_object<'a>(
    docs: &'a BTreeMap<String, Vec<Yaml>>,
    file: &str,
    api: &str,
    kind: &str,
) -> &'a Yaml {
    let d = docs
        .get(file)
        .unwrap_or_else(|| panic!("deploy/kubernetes/{file} is missing"));
    assert_eq!(d.len(), 1, "{file}: one object per file");
    let o = &d[0];
    assert_eq!(s(&o["apiVersion"], "apiVersion"), api, "{file}: apiVersion");
    assert_eq!(s(&o["kind"], "kind"), kind, "{file}: kind");
    o
}

fn find_by_name<'a>(list: &'a Yaml, name: &str) -> Option<&'a Yaml> {
    list.as_sequence()?
        .iter()
        .find(|i| i["name"].as_str() == Some(name))
}

#[test]
fn kubernetes_manifests_are_consistent() {
    let docs = yaml_docs("deploy/kubernetes");

    // Namespace-less, named objects.
    for (file, ds) in &docs {
        if file == "kustomization.yaml" {
            continue;
        }
        for o in ds {
            assert!(
                o["kind"].is_string() && o["apiVersion"].is_string(),
                "{file}: kind and apiVersion"
            );
            assert!(o["metadata"]["name"].is_string(), "{file}: metadata.name");
            assert!(
                o["metadata"]["namespace"].is_null(),
                "{file}: manifests carry no namespace"
            );
        }
    }

    // The kustomization lists exactly the manifests there are.
    let k = k8s_object(
        &docs,
        "kustomization.yaml",
        "kustomize.config.k8s.io/v1beta1",
        "Kustomization",
    );
    let listed: BTreeSet<String> = k["resources"]
        .as_sequence()
        .expect("kustomization resources")
        .iter()
        .map(|r| s(r, "resource").to_string())
        .collect();
    // prometheusrule.yaml needs the Prometheus Operator's CRD, so it is
    // applied on its own (see its header), not by `kubectl apply -k`.
    let present: BTreeSet<String> = docs
        .keys()
        .filter(|f| *f != "kustomization.yaml" && *f != "prometheusrule.yaml")
        .cloned()
        .collect();
    assert_eq!(
        listed, present,
        "kustomization.yaml resources vs the manifests in deploy/kubernetes"
    );
    for f in &listed {
        assert!(
            root().join("deploy/kubernetes").join(f).is_file(),
            "{f} listed but missing"
        );
    }
    for f in [
        "configmap.yaml",
        "secret.yaml",
        "deployment.yaml",
        "service.yaml",
    ] {
        assert!(listed.contains(f), "{f} is part of the kustomization");
    }

    // ConfigMap: a walcast.toml with pipelines.
    let cm = k8s_object(&docs, "configmap.yaml", "v1", "ConfigMap");
    let cm_name = s(&cm["metadata"]["name"], "configmap name");
    let toml_text = s(&cm["data"]["walcast.toml"], "configmap data walcast.toml");
    let cfg: toml::Table =
        toml::from_str(toml_text).unwrap_or_else(|e| panic!("walcast.toml in the ConfigMap: {e}"));
    let pipelines = cfg
        .get("pipelines")
        .and_then(|p| p.as_table())
        .expect("walcast.toml has a [pipelines] table");
    assert!(!pipelines.is_empty(), "at least one pipeline");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("walcast.toml");
    std::fs::write(&file, toml_text).unwrap();
    walcast_accepts(&file);
    let orders = pipelines
        .get("orders")
        .and_then(|p| p.as_table())
        .expect("pipelines.orders");
    assert_eq!(orders.get("kind").and_then(|k| k.as_str()), Some("capture"));
    assert!(
        orders["source"].get("password").is_none(),
        "no password in the ConfigMap"
    );
    let sinks = orders
        .get("sinks")
        .and_then(|s| s.as_array())
        .expect("pipelines.orders.sinks");
    assert!(
        sinks
            .iter()
            .any(|s| s.get("type").and_then(|t| t.as_str()) == Some("kafka")),
        "the orders pipeline publishes to Kafka"
    );

    // Secret: the password as an environment variable, for an existing pipeline.
    let secret = k8s_object(&docs, "secret.yaml", "v1", "Secret");
    let secret_name = s(&secret["metadata"]["name"], "secret name");
    let var = "WALCAST_PIPELINES__ORDERS__SOURCE__PASSWORD";
    assert!(
        secret["stringData"][var].is_string(),
        "secret stringData.{var}"
    );
    for key in secret["stringData"].as_mapping().unwrap().keys() {
        let key = s(key, "secret key");
        if let Some(rest) = key.strip_prefix("WALCAST_PIPELINES__") {
            let name = rest.split("__").next().unwrap().to_lowercase();
            assert!(
                pipelines.contains_key(&name),
                "{key} overrides a pipeline `{name}` that the ConfigMap lacks"
            );
        }
    }

    // Deployment.
    let dep = k8s_object(&docs, "deployment.yaml", "apps/v1", "Deployment");
    let spec = &dep["spec"];
    assert_eq!(
        spec["replicas"].as_u64(),
        Some(1),
        "one replica: a replication slot has one reader"
    );
    assert_eq!(s(&spec["strategy"]["type"], "strategy"), "Recreate");
    let labels = spec["template"]["metadata"]["labels"]
        .as_mapping()
        .expect("pod labels");
    for (k, v) in spec["selector"]["matchLabels"]
        .as_mapping()
        .expect("selector.matchLabels")
    {
        assert_eq!(labels.get(k), Some(v), "selector matches the pod labels");
    }
    let pod = &spec["template"]["spec"];
    assert_eq!(pod["terminationGracePeriodSeconds"].as_u64(), Some(60));
    let containers = pod["containers"].as_sequence().expect("containers");
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    assert_eq!(s(&c["image"], "image"), "walcast:0.1.0");
    let args: Vec<&str> = c["args"]
        .as_sequence()
        .expect("args")
        .iter()
        .map(|a| s(a, "arg"))
        .collect();
    assert_eq!(args, ["run", "-c", "/etc/walcast/walcast.toml"]);
    let env_from = c["envFrom"].as_sequence().expect("envFrom");
    assert!(
        env_from
            .iter()
            .any(|e| e["secretRef"]["name"].as_str() == Some(secret_name)),
        "envFrom the Secret {secret_name}"
    );
    let listen =
        find_by_name(&c["env"], "WALCAST_ADMIN__LISTEN").expect("env WALCAST_ADMIN__LISTEN");
    assert_eq!(s(&listen["value"], "listen"), "0.0.0.0:9187");
    let arenas = find_by_name(&c["env"], "MALLOC_ARENA_MAX").expect("env MALLOC_ARENA_MAX");
    assert_eq!(s(&arenas["value"], "MALLOC_ARENA_MAX"), "2");
    let port = find_by_name(&c["ports"], "metrics").expect("a port named metrics");
    assert_eq!(port["containerPort"].as_u64(), Some(9187));
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["path"].as_str(), Some(path), "{probe} path");
        assert!(
            get["port"].as_str() == Some("metrics") || get["port"].as_u64() == Some(9187),
            "{probe} port is the admin port"
        );
    }
    for kind in ["requests", "limits"] {
        for r in ["cpu", "memory"] {
            assert!(!c["resources"][kind][r].is_null(), "resources.{kind}.{r}");
        }
    }
    let sc = &c["securityContext"];
    assert_eq!(sc["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
    let drop: Vec<&str> = sc["capabilities"]["drop"]
        .as_sequence()
        .expect("capabilities.drop")
        .iter()
        .map(|c| s(c, "cap"))
        .collect();
    assert_eq!(drop, ["ALL"]);
    // The config file is the ConfigMap, mounted where args point.
    let vol = pod["volumes"]
        .as_sequence()
        .expect("volumes")
        .iter()
        .find(|v| v["configMap"]["name"].as_str() == Some(cm_name))
        .expect("a volume of the ConfigMap");
    let vol_name = s(&vol["name"], "volume name");
    let mount = c["volumeMounts"]
        .as_sequence()
        .expect("volumeMounts")
        .iter()
        .find(|m| m["name"].as_str() == Some(vol_name))
        .expect("the config volume is mounted");
    let mount_path = s(&mount["mountPath"], "mountPath");
    assert_eq!(mount_path, "/etc/walcast");
    if let Some(items) = vol["configMap"]["items"].as_sequence() {
        assert!(items
            .iter()
            .any(|i| i["key"].as_str() == Some("walcast.toml")
                && i["path"].as_str() == Some("walcast.toml")));
    }

    // Service.
    let svc = k8s_object(&docs, "service.yaml", "v1", "Service");
    assert_eq!(
        svc["spec"]["type"].as_str().unwrap_or("ClusterIP"),
        "ClusterIP"
    );
    for (k, v) in svc["spec"]["selector"]
        .as_mapping()
        .expect("service selector")
    {
        assert_eq!(
            labels.get(k),
            Some(v),
            "the Service selects the walcast pods"
        );
    }
    let sp = find_by_name(&svc["spec"]["ports"], "metrics").expect("service port metrics");
    assert_eq!(sp["port"].as_u64(), Some(9187));
    assert!(
        sp["targetPort"].as_str() == Some("metrics") || sp["targetPort"].as_u64() == Some(9187)
    );
    let ann = &svc["metadata"]["annotations"];
    assert_eq!(ann["prometheus.io/scrape"].as_str(), Some("true"));
    assert_eq!(ann["prometheus.io/port"].as_str(), Some("9187"));
    assert_eq!(ann["prometheus.io/path"].as_str(), Some("/metrics"));
}

// ----------------------------------------------------------------- docker

#[test]
fn dockerfile_is_multi_stage_and_runs_as_non_root() {
    let text = read("deploy/docker/Dockerfile");
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let froms: Vec<Vec<&str>> = lines
        .iter()
        .filter(|l| l.to_uppercase().starts_with("FROM "))
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert!(froms.len() >= 2, "a builder stage and a runtime stage");
    assert_eq!(froms[0][1], "rust:1-bookworm");
    assert!(
        froms[0].len() == 4 && froms[0][2].eq_ignore_ascii_case("as"),
        "the builder stage is named"
    );
    let builder = froms[0][3];
    assert_eq!(froms.last().unwrap()[1], "debian:bookworm-slim");
    assert!(text.contains("cargo build --release --locked --bin walcast"));
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(&format!("COPY --from={builder} "))
                && l.ends_with(" /usr/local/bin/walcast")),
        "the runtime copies the binary from {builder} to /usr/local/bin/walcast"
    );

    // USER in the final stage, not root.
    let last_from = lines
        .iter()
        .rposition(|l| l.to_uppercase().starts_with("FROM "))
        .unwrap();
    let users: Vec<&str> = lines[last_from..]
        .iter()
        .filter(|l| l.to_uppercase().starts_with("USER "))
        .map(|l| l[5..].trim())
        .collect();
    let user = *users.last().expect("a USER line in the runtime stage");
    let who = user.split(':').next().unwrap();
    assert!(who != "root" && who != "0", "USER {user} is root");
    assert!(lines.contains(&"EXPOSE 9187"));
    assert!(lines.contains(&r#"ENTRYPOINT ["walcast"]"#));
    assert!(lines.contains(&r#"CMD ["run", "-c", "/etc/walcast/walcast.toml"]"#));
}

#[test]
fn compose_file_builds_walcast_with_its_services() {
    let docs = yaml_docs("deploy/docker");
    let compose = &docs
        .get("compose.yaml")
        .expect("deploy/docker/compose.yaml")[0];
    let services = compose["services"].as_mapping().expect("services");
    let image = |name: &str| -> String {
        let svc = &compose["services"][name];
        assert!(!svc.is_null(), "service {name} is missing");
        svc["image"].as_str().unwrap_or_default().to_string()
    };
    assert_eq!(image("postgres"), "postgres:15");
    assert_eq!(image("kafka"), "apache/kafka:4.1.0");
    assert_eq!(image("redis"), "redis:7");
    assert_eq!(image("opensearch"), "opensearchproject/opensearch:2.19.1");
    assert!(image("registry").starts_with("apicurio/apicurio-registry:"));
    assert_eq!(
        services.len(),
        6,
        "postgres, kafka, registry, redis, opensearch, walcast"
    );

    let pg_cmd: Vec<&str> = compose["services"]["postgres"]["command"]
        .as_sequence()
        .expect("postgres command")
        .iter()
        .map(|a| s(a, "arg"))
        .collect();
    assert!(
        pg_cmd.windows(2).any(|w| w == ["-c", "wal_level=logical"]),
        "postgres runs with wal_level=logical"
    );
    let kafka_env = &compose["services"]["kafka"]["environment"];
    assert_eq!(
        kafka_env["KAFKA_PROCESS_ROLES"].as_str(),
        Some("broker,controller"),
        "KRaft single node"
    );
    let os_env = &compose["services"]["opensearch"]["environment"];
    assert_eq!(os_env["discovery.type"].as_str(), Some("single-node"));
    assert_eq!(os_env["DISABLE_SECURITY_PLUGIN"].as_str(), Some("true"));

    // walcast builds from the Dockerfile with the repository as context.
    let w = &compose["services"]["walcast"];
    let context = s(&w["build"]["context"], "build.context");
    let dockerfile = s(&w["build"]["dockerfile"], "build.dockerfile");
    let compose_dir = root().join("deploy/docker");
    let ctx = compose_dir.join(context).canonicalize().unwrap();
    assert_eq!(
        ctx,
        root().canonicalize().unwrap(),
        "the build context is the repository root"
    );
    assert_eq!(
        ctx.join(dockerfile).canonicalize().unwrap(),
        compose_dir.join("Dockerfile").canonicalize().unwrap()
    );
    assert!(w["environment"]["WALCAST_PIPELINES__ORDERS__SOURCE__PASSWORD"].is_string());

    // The mounted config exists and is a walcast.toml with pipelines.
    let mount = w["volumes"]
        .as_sequence()
        .expect("walcast volumes")
        .iter()
        .map(|v| s(v, "volume"))
        .find(|v| v.split(':').nth(1) == Some("/etc/walcast/walcast.toml"))
        .expect("a volume mounted at /etc/walcast/walcast.toml");
    let host = compose_dir.join(mount.split(':').next().unwrap());
    let cfg: toml::Table = toml::from_str(&std::fs::read_to_string(&host).unwrap())
        .expect("deploy/docker/walcast.toml");
    walcast_accepts(&host);
    let p = cfg["pipelines"].as_table().expect("pipelines");
    assert!(
        p.contains_key("orders"),
        "the password variable names pipeline orders"
    );
    assert_eq!(
        cfg["admin"]["listen"].as_str(),
        Some("0.0.0.0:9187"),
        "reachable through the published port"
    );
    // Every host file the compose file mounts exists.
    for (name, svc) in services {
        for v in svc["volumes"].as_sequence().into_iter().flatten() {
            let v = s(v, "volume");
            if v.starts_with("./") || v.starts_with("../") {
                let f = compose_dir.join(v.split(':').next().unwrap());
                assert!(
                    f.exists(),
                    "service {}: {} does not exist",
                    s(name, "service"),
                    f.display()
                );
            }
        }
    }
}

// ---------------------------------------------------------------- grafana

/// `walcast_...` names in a text (PromQL), histogram suffixes removed.
fn metric_names(text: &str) -> Vec<String> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(off) = text[i..].find("walcast_") {
        let start = i + off;
        let mut end = start + "walcast_".len();
        while end < b.len() && (b[end].is_ascii_lowercase() || b[end] == b'_') {
            end += 1;
        }
        let prev_ok = start == 0 || !(b[start - 1].is_ascii_alphanumeric() || b[start - 1] == b'_');
        if prev_ok {
            out.push(text[start..end].to_string());
        }
        i = end;
    }
    out
}

/// The string constants `"walcast_..."` of connectors/sdk/src/telemetry.rs.
fn defined_metrics() -> BTreeSet<String> {
    let src = read("connectors/sdk/src/telemetry.rs");
    let mut out = BTreeSet::new();
    for part in src.split('"').skip(1).step_by(2) {
        if part.starts_with("walcast_") && part.bytes().all(|c| c.is_ascii_lowercase() || c == b'_')
        {
            out.insert(part.to_string());
        }
    }
    assert!(
        out.len() >= 10,
        "found only {out:?} in connectors/sdk/src/telemetry.rs"
    );
    out
}

fn collect_queries(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("expr" | "query" | "definition", serde_json::Value::String(q)) => {
                        out.push(q.clone())
                    }
                    _ => collect_queries(x, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| collect_queries(x, out)),
        _ => {}
    }
}

#[test]
fn grafana_dashboard_uses_only_exported_metrics() {
    let dash: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/walcast.json")).expect("dashboard JSON");
    assert!(
        dash["schemaVersion"].as_u64().unwrap_or(0) >= 36,
        "a current schemaVersion"
    );
    assert!(
        dash["__inputs"]
            .as_array()
            .expect("__inputs")
            .iter()
            .any(|i| i["name"] == "DS_PROMETHEUS" && i["pluginId"] == "prometheus"),
        "a DS_PROMETHEUS datasource input"
    );

    let panels = dash["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    for p in panels {
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "duplicate panel id {}",
            p["id"]
        );
        if p["type"] != "row" {
            assert_eq!(
                p["datasource"]["uid"], "${DS_PROMETHEUS}",
                "panel {} uses the input datasource",
                p["title"]
            );
            assert!(
                !p["targets"].as_array().map_or(true, Vec::is_empty),
                "panel {} has queries",
                p["title"]
            );
        }
    }

    let mut queries = Vec::new();
    collect_queries(&dash, &mut queries);
    let defined = defined_metrics();
    let mut used = BTreeSet::new();
    for q in &queries {
        for name in metric_names(q) {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suf| name.strip_suffix(suf).filter(|b| defined.contains(*b)))
                .unwrap_or(&name)
                .to_string();
            assert!(
                defined.contains(&base),
                "the dashboard queries {name}, which connectors/sdk/src/telemetry.rs does not define: {q}"
            );
            used.insert(base);
        }
    }
    for wanted in [
        "walcast_events_total",
        "walcast_transactions_total",
        "walcast_replication_lag_bytes",
        "walcast_replication_lag_seconds",
        "walcast_commit_to_ack_seconds",
        "walcast_slot_wal_retained_bytes",
        "walcast_in_flight_events",
        "walcast_sink_errors_total",
        "walcast_sink_events_total",
        "walcast_pipeline_restarts_total",
        "walcast_streaming",
    ] {
        assert!(used.contains(wanted), "no panel shows {wanted}");
    }
    assert!(
        queries.iter().any(|q| q.contains("histogram_quantile(0.99")
            && q.contains("walcast_commit_to_ack_seconds_bucket")),
        "a p99 of commit-to-ack latency"
    );
}

// ------------------------------------------------------------------- helm

/// The configs the chart ships (its default `config.toml` and the one of
/// each `ci/*.yaml` that has one) pass `walcast check --offline`, and the
/// chart's security context is the manifests'. (helm lint, helm template
/// and the schema validation of the rendered objects: deploy/ci/check-deploy.)
#[test]
fn helm_chart_configs_pass_walcast_check() {
    let chart = root().join("deploy/helm/walcast");
    let mut files = vec![chart.join("values.yaml")];
    let mut ci: Vec<_> = std::fs::read_dir(chart.join("ci"))
        .expect("deploy/helm/walcast/ci")
        .map(|e| e.unwrap().path())
        .collect();
    ci.sort();
    files.extend(ci);
    let dir = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for f in &files {
        let values: Yaml = serde_yaml::from_str(&std::fs::read_to_string(f).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let Some(toml_text) = values["config"]["toml"].as_str() else {
            continue;
        };
        let path = dir.path().join(format!("{checked}.toml"));
        std::fs::write(&path, toml_text).unwrap();
        walcast_accepts(&path);
        checked += 1;
    }
    assert!(checked >= 2, "the default config and a ci/ one");

    // The same locked-down pod as deploy/kubernetes/deployment.yaml.
    let values: Yaml = serde_yaml::from_str(&read("deploy/helm/walcast/values.yaml")).unwrap();
    let docs = yaml_docs("deploy/kubernetes");
    let d = k8s_object(&docs, "deployment.yaml", "apps/v1", "Deployment");
    assert_eq!(
        values["podSecurityContext"],
        d["spec"]["template"]["spec"]["securityContext"]
    );
    assert_eq!(
        values["securityContext"],
        d["spec"]["template"]["spec"]["containers"][0]["securityContext"]
    );
    assert_eq!(
        values["resources"],
        d["spec"]["template"]["spec"]["containers"][0]["resources"]
    );
}

// ----------------------------------------------------------------- alerts

/// The rule file, the PrometheusRule and the chart's copy hold the same
/// rules, and every rule queries only metrics the daemon exports. (promtool
/// checks and unit-tests the rules themselves: deploy/ci/check-deploy.)
#[test]
fn alert_rules_agree_and_use_only_exported_metrics() {
    let rules: Yaml = serde_yaml::from_str(&read("deploy/prometheus/walcast-rules.yaml"))
        .expect("deploy/prometheus/walcast-rules.yaml: YAML");
    let docs = yaml_docs("deploy/kubernetes");
    let pr = k8s_object(
        &docs,
        "prometheusrule.yaml",
        "monitoring.coreos.com/v1",
        "PrometheusRule",
    );
    assert_eq!(
        pr["spec"], rules,
        "deploy/kubernetes/prometheusrule.yaml differs from deploy/prometheus/walcast-rules.yaml: run deploy/ci/generate"
    );
    let chart: Yaml = serde_yaml::from_str(&read("deploy/helm/walcast/files/walcast-rules.yaml"))
        .expect("chart rules: YAML");
    assert_eq!(
        chart, rules,
        "deploy/helm/walcast/files/walcast-rules.yaml differs from deploy/prometheus/walcast-rules.yaml: run deploy/ci/generate"
    );

    let defined = defined_metrics();
    let mut alerts = BTreeSet::new();
    for group in rules["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let name = s(&rule["alert"], "alert").to_string();
            let expr = s(&rule["expr"], "expr");
            for m in metric_names(expr) {
                assert!(
                    defined.contains(&m),
                    "alert {name} queries {m}, which connectors/sdk/src/telemetry.rs does not define"
                );
            }
            assert!(
                matches!(
                    rule["labels"]["severity"].as_str(),
                    Some("warning" | "critical")
                ),
                "alert {name}: severity warning or critical"
            );
            assert!(
                rule["annotations"]["summary"].is_string(),
                "alert {name}: a summary"
            );
            // Every alert has a unit test in deploy/prometheus/tests.
            let tested = std::fs::read_dir(root().join("deploy/prometheus/tests"))
                .expect("deploy/prometheus/tests")
                .any(|e| {
                    std::fs::read_to_string(e.unwrap().path())
                        .unwrap_or_default()
                        .contains(&format!("alertname: {name}\n"))
                });
            assert!(
                tested,
                "alert {name} has no test in deploy/prometheus/tests"
            );
            alerts.insert(name);
        }
    }
    for wanted in [
        "WalcastPipelineNotStreaming",
        "WalcastReplicationLagBytes",
        "WalcastReplicationLagSeconds",
        "WalcastSlotWalRetained",
        "WalcastSinkErrors",
        "WalcastDeadLettersGrowing",
        "WalcastInFlightSaturated",
        "WalcastSnapshotStalled",
    ] {
        assert!(alerts.contains(wanted), "no alert {wanted}");
    }
}

#[test]
fn metric_name_scanner() {
    assert_eq!(
        metric_names(
            r#"histogram_quantile(0.5, sum by (le) (rate(walcast_commit_to_ack_seconds_bucket{pipeline=~"$p"}[5m]))) / x_walcast_no"#
        ),
        ["walcast_commit_to_ack_seconds_bucket"]
    );
}

/// Whether a missing test tool fails the test instead of skipping it:
/// `deploy/local/test` sets `WALCAST_TEST_REQUIRE_TOOLS=1` after installing
/// them; `CI` counts too.
fn tools_required() -> bool {
    std::env::var("WALCAST_TEST_REQUIRE_TOOLS").is_ok_and(|v| v == "1")
        || std::env::var("CI").is_ok()
}
