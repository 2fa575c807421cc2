//! `docker-compose.yml` checked mechanically against the binaries it runs.
//!
//! There may be no Docker engine where the tests run, so the file is read as YAML and
//! every service that runs our image has its `command` and `environment` turned into the
//! argument list the binary would see: each variable becomes the flag that reads it
//! (clap `env`), `${VAR:-default}` takes its default. That list is then parsed by the
//! binary's own clap definition (`ingest`, `fanout`), or checked against `loadgen`'s
//! `--help`, so a renamed flag, a misspelt variable, a missing required setting or a
//! value the binary would refuse fails here instead of on somebody's Docker host.
//! Other tests check the shape the issue asks for: JetStream on, monitoring port, no
//! fixed fanout port, health-gated start order, profiles, and the gateway routes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use yaml_serde::Value;

/// Variables outside clap: tracing's filter, the development flag, and the password
/// only compose's PostgreSQL reads.
const NON_CLAP_ENV: &[&str] = &["RUST_LOG", "RELAY_DEV", "POSTGRES_PASSWORD"];
/// The image every relay service runs.
const RELAY_IMAGE: &str = "unipile-relay:latest";

fn repo_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(name)
}

/// One compose file as YAML, `<<: *anchor` merges resolved as compose resolves them.
fn compose_file(name: &str) -> Value {
    let path = repo_file(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut value: Value = yaml_serde::from_str(&text).unwrap_or_else(|e| panic!("{name} is not YAML: {e}"));
    value.apply_merge().expect("YAML merge keys resolve");
    value
}

/// `override` merged into `base` as `docker compose -f base -f override` merges a
/// service: mappings (environment, depends_on, healthcheck) key by key, `ports`,
/// `expose` and `volumes` joined, anything else (command, a healthcheck's test)
/// replaced.
fn merge_service(base: &mut Value, over: &Value) {
    let (Some(base), Some(over)) = (base.as_mapping_mut(), over.as_mapping()) else { return };
    for (key, value) in over {
        let joined = ["ports", "expose", "volumes"].contains(&key.as_str().unwrap_or_default());
        match (base.get_mut(key), value) {
            (Some(existing @ Value::Mapping(_)), Value::Mapping(_)) => merge_service(existing, value),
            (Some(Value::Sequence(existing)), Value::Sequence(more)) if joined => {
                existing.extend(more.iter().filter(|v| !existing.contains(v)).cloned().collect::<Vec<_>>())
            }
            _ => {
                base.insert(key.clone(), value.clone());
            }
        }
    }
}

/// The services of these compose files, merged in order.
fn services_of(files: &[&str]) -> BTreeMap<String, Value> {
    let mut merged: BTreeMap<String, Value> = BTreeMap::new();
    for file in files {
        let compose = compose_file(file);
        let services = compose.get("services").and_then(Value::as_mapping).expect("compose has services");
        for (name, service) in services {
            let name = name.as_str().expect("service name").to_owned();
            match merged.get_mut(&name) {
                Some(existing) => merge_service(existing, service),
                None => {
                    merged.insert(name, service.clone());
                }
            }
        }
    }
    merged
}

/// The default deployment: `docker compose up`.
fn services() -> BTreeMap<String, Value> {
    services_of(&["docker-compose.yml"])
}

/// NATS as a three-server cluster:
/// `docker compose -f docker-compose.yml -f docker-compose.cluster.yml up`.
const CLUSTER: &[&str] = &["docker-compose.yml", "docker-compose.cluster.yml"];

fn cluster_services() -> BTreeMap<String, Value> {
    services_of(CLUSTER)
}

fn strings(value: Option<&Value>) -> Vec<String> {
    match value {
        Some(Value::Sequence(items)) => {
            items.iter().map(|v| v.as_str().expect("a list of strings").to_owned()).collect()
        }
        Some(Value::String(s)) => s.split_whitespace().map(str::to_owned).collect(),
        _ => Vec::new(),
    }
}

/// What a variable without a default stands for: long enough to pass as a secret.
const SET_BY_OPERATOR: &str = "set-by-operator-0123456789abcdef01234567";

/// `${VAR:-default}` / `${VAR-default}` → default, `${VAR}` and `${VAR:?message}` → a
/// placeholder.
fn interpolate(value: &str) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').expect("unterminated ${") + start;
        let inner = &rest[start + 2..end];
        // `${VAR:?message}` has no default: the operator must set it.
        let default = match inner.split_once(":?") {
            Some(_) => None,
            None => inner.split_once(":-").or_else(|| inner.split_once('-')).map(|(_, d)| d),
        };
        out.push_str(default.unwrap_or(SET_BY_OPERATOR));
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

fn environment(service: &Value) -> BTreeMap<String, String> {
    match service.get("environment") {
        Some(Value::Mapping(map)) => map
            .iter()
            .map(|(k, v)| {
                let value = match v {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    other => panic!("environment value {other:?}"),
                };
                (k.as_str().unwrap().to_owned(), interpolate(&value))
            })
            .collect(),
        Some(Value::Sequence(items)) => items
            .iter()
            .map(|item| {
                let (k, v) = item.as_str().unwrap().split_once('=').expect("KEY=value");
                (k.to_owned(), interpolate(v))
            })
            .collect(),
        _ => BTreeMap::new(),
    }
}

fn relay_services_of(services: BTreeMap<String, Value>) -> BTreeMap<String, Value> {
    services
        .into_iter()
        .filter(|(_, s)| s.get("image").and_then(Value::as_str) == Some(RELAY_IMAGE))
        .collect()
}

/// The argument list a service's binary would see: its command plus one flag per variable.
fn argv_with_env(name: &str, service: &Value, subcommand: &clap::Command) -> Vec<String> {
    let mut argv: Vec<String> = strings(service.get("command")).iter().map(|a| interpolate(a)).collect();
    for (var, value) in environment(service) {
        if NON_CLAP_ENV.contains(&var.as_str()) {
            continue;
        }
        let arg = subcommand
            .get_arguments()
            .find(|a| a.get_env().and_then(|e| e.to_str()) == Some(var.as_str()))
            .unwrap_or_else(|| {
                panic!(
                    "service {name}: {var} is not read by `{}` (variables it reads: {:?})",
                    argv.join(" "),
                    subcommand.get_arguments().filter_map(|a| a.get_env()).collect::<Vec<_>>()
                )
            });
        argv.push(format!("--{}={value}", arg.get_long().expect("env args have a long flag")));
    }
    argv
}

/// The command with environment fallbacks removed from one subcommand, so only what the
/// compose file gives counts (the test process may have DATABASE_URL and friends set).
fn without_env(root: clap::Command, subcommand: &str) -> clap::Command {
    root.mut_subcommand(subcommand, |sub| sub.mut_args(|arg| arg.env(None::<&'static str>)))
}

fn subcommand<'a>(root: &'a clap::Command, name: &str) -> &'a clap::Command {
    root.find_subcommand(name).unwrap_or_else(|| panic!("`{}` has no subcommand {name}", root.get_name()))
}

#[test]
fn compose_runs_only_binaries_and_subcommands_that_exist() {
    let services = relay_services_of(cluster_services());
    assert!(services.len() >= 3, "ingest, fanout and the simulator run our image: {:?}", services.keys());
    let dockerfile = std::fs::read_to_string(repo_file("Dockerfile")).expect("Dockerfile");
    for (name, service) in &services {
        let command = strings(service.get("command"));
        let binary = command.first().unwrap_or_else(|| panic!("service {name} names its binary"));
        assert!(
            ["ingest", "fanout", "loadgen"].contains(&binary.as_str()),
            "service {name} runs unknown binary {binary}"
        );
        assert!(dockerfile.contains(&format!("target/release/{binary}")), "the image does not ship {binary}");
    }
}

/// Parses every compose service that runs `binary` with the binary's own clap
/// configuration (environment fallbacks off, so the compose file must name everything
/// that is required), in the default deployment and in the cluster one; returns how
/// many services were checked in each.
fn check_services_of(binary: &str, root: fn() -> clap::Command) -> (usize, usize) {
    (
        check_relay_services(relay_services_of(services()), binary, root),
        check_relay_services(relay_services_of(cluster_services()), binary, root),
    )
}

fn check_relay_services(
    services: BTreeMap<String, Value>,
    binary: &str,
    root: fn() -> clap::Command,
) -> usize {
    let mut checked = 0;
    for (name, service) in services.iter().filter(|(_, s)| strings(s.get("command"))[0] == binary) {
        let command = strings(service.get("command"));
        let full = root();
        let argv = argv_with_env(name, service, subcommand(&full, &command[1]));
        if let Err(error) = without_env(root(), &command[1]).try_get_matches_from(&argv) {
            panic!("service {name}: {binary} refuses {argv:?}:\n{error}");
        }
        checked += 1;
    }
    checked
}

#[test]
fn ingest_service_parses_with_ingest_own_configuration() {
    assert_eq!(check_services_of("ingest", ingest::cli::Cli::command), (1, 1), "one ingest service");
}

#[test]
fn fanout_service_parses_with_fanout_own_configuration() {
    assert_eq!(check_services_of("fanout", fanout::config::Cli::command), (1, 1), "one fanout service");
}

#[test]
fn simulator_service_uses_only_flags_and_variables_loadgen_accepts() {
    assert_eq!(check_services_of("loadgen", loadgen::Cli::command), (1, 1), "one simulator service");
}

/// The NATS services of a deployment: `nats`, and `nats-2`, `nats-3` in the cluster.
fn nats_services(services: &BTreeMap<String, Value>) -> Vec<(&String, &Value)> {
    services
        .iter()
        .filter(|(name, s)| name.starts_with("nats") && strings(s.get("command")).contains(&"-js".to_owned()))
        .collect()
}

#[test]
fn nats_runs_jetstream_with_its_monitoring_port() {
    for services in [services(), cluster_services()] {
        let servers = nats_services(&services);
        assert!(servers.iter().any(|(name, _)| *name == "nats"), "a nats service");
        for (name, nats) in servers {
            let command = strings(nats.get("command"));
            assert!(
                command.windows(2).any(|w| w == ["-m", "8222"]),
                "{name}: monitoring on 8222: {command:?}"
            );
            let health = strings(nats["healthcheck"].get("test")).join(" ");
            assert!(health.contains("8222/healthz"), "{name} is healthy when JetStream is: {health}");
        }
    }
}

const CLUSTER_NATS: [&str; 3] = ["nats", "nats-2", "nats-3"];

fn flag<'a>(command: &'a [String], name: &str) -> &'a str {
    command
        .windows(2)
        .find(|w| w[0] == name)
        .map(|w| w[1].as_str())
        .unwrap_or_else(|| panic!("no {name} in {command:?}"))
}

#[test]
fn the_cluster_file_runs_three_nats_servers_routed_to_each_other_each_with_its_store() {
    let services = cluster_services();
    let names: Vec<&String> = nats_services(&services).into_iter().map(|(name, _)| name).collect();
    assert_eq!(names, CLUSTER_NATS, "three NATS servers");
    let mut stores = Vec::new();
    for name in CLUSTER_NATS {
        let nats = &services[name];
        let command: Vec<String> = strings(nats.get("command")).iter().map(|a| interpolate(a)).collect();
        assert_eq!(flag(&command, "--name"), name, "{name}: server names are distinct");
        assert_eq!(flag(&command, "--cluster_name"), "relay", "{name}");
        let route = |host: &str| format!("nats://route:{SET_BY_OPERATOR}@{host}:6222");
        assert_eq!(flag(&command, "--cluster"), route("0.0.0.0"), "{name}: routes log in with NATS_PASSWORD");
        let mut routes: Vec<&str> = flag(&command, "--routes").split(',').collect();
        routes.sort();
        let mut others: Vec<String> = CLUSTER_NATS.iter().filter(|n| **n != name).map(|n| route(n)).collect();
        others.sort();
        assert_eq!(routes, others, "{name} routes to the other two");
        let store = flag(&command, "-sd");
        let volume = strings(nats.get("volumes"))
            .into_iter()
            .find(|v| v.ends_with(&format!(":{store}")))
            .unwrap_or_else(|| panic!("{name}: {store} is a volume"));
        stores.push(volume);
    }
    stores.sort();
    stores.dedup();
    assert_eq!(stores.len(), 3, "a store each: {stores:?}");
}

/// The cluster's NATS commands as nats-server itself reads them (`-t`: check the
/// configuration and exit), with the mounted config file and a scratch store.
#[test]
fn nats_server_accepts_every_nats_command_of_both_deployments() {
    let binary = std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "/usr/sbin/nats-server".to_owned());
    let store = std::env::temp_dir().join(format!("compose-nats-{}", uuid::Uuid::new_v4().simple()));
    for services in [services(), cluster_services()] {
        for (name, nats) in nats_services(&services) {
            let mounts: BTreeMap<String, String> = strings(nats.get("volumes"))
                .into_iter()
                .filter_map(|v| {
                    let mut parts = v.split(':');
                    let (host, target) = (parts.next()?, parts.next()?);
                    host.starts_with("./")
                        .then(|| (target.to_owned(), repo_file(&host[2..]).display().to_string()))
                })
                .collect();
            let command: Vec<String> = strings(nats.get("command"))
                .iter()
                .map(|a| interpolate(a))
                .map(|a| mounts.get(&a).cloned().unwrap_or(a))
                .map(|a| if a == "/data" { store.display().to_string() } else { a })
                .collect();
            let output = std::process::Command::new(&binary)
                .args(&command)
                .arg("-t")
                .env("NATS_PASSWORD", SET_BY_OPERATOR)
                .output()
                .unwrap_or_else(|e| panic!("cannot run {binary} (set NATS_SERVER_BIN): {e}"));
            let said = format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
            assert!(
                output.status.success() && said.contains("is valid") && !said.contains("Usage:"),
                "{name}: nats-server refuses {command:?}:\n{said}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&store);
}

#[test]
fn in_the_cluster_both_services_know_every_server_and_the_stream_keeps_three_copies() {
    let services = cluster_services();
    let every = "nats://nats:4222,nats://nats-2:4222,nats://nats-3:4222";
    for name in ["ingest", "fanout", "nats-box"] {
        assert_eq!(environment(&services[name]).get("NATS_URL").map(String::as_str), Some(every), "{name}");
    }
    assert_eq!(environment(&services["ingest"]).get("STREAM_REPLICAS").map(String::as_str), Some("3"));
    assert_eq!(
        environment(&self::services()["ingest"]).get("STREAM_REPLICAS"),
        None,
        "one copy on one server"
    );
    for name in ["ingest", "fanout"] {
        let depends = services[name]["depends_on"].as_mapping().unwrap();
        for nats in CLUSTER_NATS {
            assert!(depends.contains_key(nats), "{name} waits for {nats}");
        }
    }
}

#[test]
fn only_the_gateway_is_published_on_the_host() {
    for (name, service) in services().into_iter().chain(cluster_services()) {
        let ports = strings(service.get("ports"));
        assert!(name == "gateway" || ports.is_empty(), "{name} publishes {ports:?} on the host");
    }
}

#[test]
fn nats_requires_the_password_every_client_service_is_given() {
    for services in [services(), cluster_services()] {
        for (name, nats) in nats_services(&services) {
            let command = strings(nats.get("command"));
            let config = flag(&command, "-c");
            let mounted = strings(nats.get("volumes"))
                .into_iter()
                .find_map(|v| v.strip_suffix(&format!(":{config}:ro")).map(str::to_owned))
                .unwrap_or_else(|| panic!("{name}: the config file is mounted read-only"));
            let text = std::fs::read_to_string(repo_file(mounted.trim_start_matches("./"))).unwrap();
            assert!(text.contains("user: relay") && text.contains("password: $NATS_PASSWORD"), "{text}");
            assert!(environment(nats).contains_key("NATS_PASSWORD"), "{name} reads NATS_PASSWORD");
        }
        for name in ["ingest", "fanout", "nats-box"] {
            let env = environment(&services[name]);
            assert_eq!(env.get("NATS_USER").map(String::as_str), Some("relay"), "{name}");
            assert!(env.contains_key("NATS_PASSWORD"), "{name} has no NATS_PASSWORD");
        }
    }
}

#[test]
fn no_secret_has_a_default() {
    let text = CLUSTER.iter().map(|f| std::fs::read_to_string(repo_file(f)).unwrap()).collect::<String>();
    for secret in ["WEBHOOK_SECRET", "JWT_SECRET", "NATS_PASSWORD", "POSTGRES_PASSWORD"] {
        let uses: Vec<&str> = text.match_indices(&format!("${{{secret}")).map(|(i, _)| &text[i..]).collect();
        assert!(!uses.is_empty(), "{secret} is not used");
        for used in uses {
            let expression = &used[..used.find('}').unwrap() + 1];
            assert!(expression.starts_with(&format!("${{{secret}:?")), "{expression} has a default");
        }
    }
}

#[test]
fn postgres_keeps_its_data_in_a_volume_and_has_a_healthcheck() {
    let postgres = &services()["postgres"];
    assert!(
        strings(postgres.get("volumes")).iter().any(|v| v.ends_with(":/var/lib/postgresql/data")),
        "data volume"
    );
    assert!(postgres.get("healthcheck").is_some(), "healthcheck");
}

#[test]
fn fanout_runs_three_replicas_from_the_file_so_down_and_up_keeps_them() {
    let fanout = &services()["fanout"];
    assert_eq!(fanout.get("scale").and_then(Value::as_u64), Some(3), "`scale: 3` in the file");
}

#[test]
fn fanout_has_no_fixed_host_port_so_it_can_scale() {
    let fanout = &services()["fanout"];
    assert!(fanout.get("ports").is_none(), "`--scale fanout=3` needs fanout without host ports");
    assert!(fanout.get("container_name").is_none(), "a fixed container name prevents scaling");
}

#[test]
fn services_start_in_order_of_health() {
    for services in [services(), cluster_services()] {
        start_in_order_of_health(&services);
    }
}

fn start_in_order_of_health(services: &BTreeMap<String, Value>) {
    for (name, service) in services {
        let Some(depends) = service.get("depends_on") else { continue };
        let depends = depends.as_mapping().unwrap_or_else(|| panic!("{name}: depends_on with conditions"));
        for (target, how) in depends {
            let target = target.as_str().unwrap();
            assert_eq!(
                how.get("condition").and_then(Value::as_str),
                Some("service_healthy"),
                "{name} waits for {target} to be healthy"
            );
            assert!(services[target].get("healthcheck").is_some(), "{target} has a healthcheck");
        }
    }
    for name in ["ingest", "fanout", "gateway"] {
        assert!(services[name].get("depends_on").is_some(), "{name} declares what it waits for");
    }
}

#[test]
fn debug_and_demo_extras_sit_behind_profiles() {
    let services = services();
    assert_eq!(strings(services["nats-box"].get("profiles")), ["debug"]);
    assert_eq!(strings(services["simulator"].get("profiles")), ["demo"]);
}

/// `host:port` from a listen address in a service's environment.
fn listen_port(service: &Value, var: &str) -> String {
    let listen = environment(service).get(var).cloned().unwrap_or_else(|| panic!("{var} set"));
    listen.rsplit(':').next().unwrap().to_owned()
}

#[test]
fn gateway_routes_match_the_ports_the_services_listen_on() {
    let services = services();
    let ingest_port = listen_port(&services["ingest"], "INGEST_LISTEN");
    let fanout_port = listen_port(&services["fanout"], "FANOUT_LISTEN");
    let nginx = std::fs::read_to_string(repo_file("deploy/nginx.conf")).expect("deploy/nginx.conf");
    assert!(nginx.contains(&format!("ingest:{ingest_port}")), "/api goes to ingest:{ingest_port}");
    assert!(nginx.contains(&format!("fanout:{fanout_port}")), "/ws and / go to fanout:{fanout_port}");
    let ws = nginx.split("location /ws/").nth(1).expect("a /ws/ location");
    let ws = &ws[..ws.find("location ").unwrap_or(ws.len())];
    for needle in ["Upgrade $http_upgrade", "Connection $connection_upgrade", "proxy_read_timeout"] {
        assert!(ws.contains(needle), "/ws/ location has {needle}");
    }
    assert!(nginx.contains("location /api/"), "an /api/ location");
    assert!(nginx.contains("location / "), "a / location for the page");
    for (name, var, port) in
        [("ingest", "INGEST_LISTEN", &ingest_port), ("fanout", "FANOUT_LISTEN", &fanout_port)]
    {
        let health = strings(services[name]["healthcheck"].get("test")).join(" ");
        assert!(health.contains(&format!(":{port}/")), "{name} healthcheck uses {var}'s port: {health}");
    }
    let simulator = strings(services["simulator"].get("command")).join(" ");
    assert!(simulator.contains(&format!("http://ingest:{ingest_port}")), "the simulator posts to ingest");
}

#[test]
fn interpolation_takes_defaults() {
    assert_eq!(interpolate("a${X:-b}c${Y-d}"), "abcd");
    assert_eq!(interpolate("${X}"), SET_BY_OPERATOR);
    assert_eq!(interpolate("${X:?set X, e.g. openssl rand -hex 32}"), SET_BY_OPERATOR, "no default");
}

/// Every variable the services read, by the services' own clap definitions.
fn variables_read_by(root: clap::Command, subcommand_name: &str) -> BTreeMap<String, String> {
    subcommand(&root, subcommand_name)
        .get_arguments()
        .filter_map(|arg| {
            let env = arg.get_env()?.to_str()?.to_owned();
            Some((env, arg.get_long().unwrap_or_default().to_owned()))
        })
        .collect()
}

#[test]
fn env_example_documents_exactly_the_variables_the_services_read() {
    let text = std::fs::read_to_string(repo_file(".env.example")).expect(".env.example");
    let documented: BTreeMap<String, String> = text
        .lines()
        .map(|line| line.trim().trim_start_matches('#').trim())
        .filter_map(|line| line.split_once('='))
        .filter(|(name, _)| !name.is_empty() && name.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .collect();
    let mut read = variables_read_by(ingest::cli::Cli::command(), "serve");
    read.extend(variables_read_by(fanout::config::Cli::command(), "serve"));
    for variable in read.keys() {
        assert!(documented.contains_key(variable), ".env.example does not document {variable}");
    }
    for variable in documented.keys().filter(|v| !NON_CLAP_ENV.contains(&v.as_str())) {
        assert!(read.contains_key(variable), ".env.example names {variable}, which no service reads");
    }
}

/// `build: .` sends the repository to the Docker engine: a `.env` with the secrets
/// must never be part of it, nor end up in an image layer.
#[test]
fn the_image_build_context_leaves_out_env_files_and_keeps_the_example() {
    let ignore = std::fs::read_to_string(repo_file(".dockerignore")).expect(".dockerignore");
    let rules: Vec<&str> =
        ignore.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
    for rule in [".env", ".env.*", "!.env.example"] {
        assert!(rules.contains(&rule), ".dockerignore lacks {rule}: {rules:?}");
    }
    let last_env_rule = rules.iter().rposition(|r| r.trim_start_matches('!').starts_with(".env")).unwrap();
    assert_eq!(rules[last_env_rule], "!.env.example", "the exception comes after the exclusions");
}
