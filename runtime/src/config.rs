//! Configuration pieces both binaries share, read by clap from flags or environment.

use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use secrecy::{ExposeSecret, SecretString};

use shared::subjects::Subjects;

/// Parses a secret that must not be empty; used as a clap `value_parser`.
pub fn parse_secret(value: &str) -> Result<SecretString, String> {
    if value.trim().is_empty() {
        Err("must not be empty".into())
    } else {
        Ok(SecretString::from(value.to_owned()))
    }
}

/// The shortest secret the relay's own secrets (`WEBHOOK_SECRET`, `JWT_SECRET`) may be.
pub const MIN_SECRET_BYTES: usize = 32;
/// Set to `1` (as `scripts/dev.sh` does) to accept short or documented secrets, for
/// development only.
pub const DEV_ENV: &str = "RELAY_DEV";
/// Values the documentation and examples show: public, so never accepted outside
/// development.
const DOCUMENTED_SECRETS: &[&str] =
    &["change-me-webhook-secret", "change-me-jwt-secret", "dev-webhook-secret", "dev-jwt-secret"];

/// Whether [`DEV_ENV`] asks for development mode.
pub fn dev_mode() -> bool {
    std::env::var(DEV_ENV).is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}

/// Parses one of the relay's own secrets: at least [`MIN_SECRET_BYTES`] and not a value
/// the documentation shows, unless [`DEV_ENV`] is `1`.
pub fn parse_strong_secret(value: &str) -> Result<SecretString, String> {
    let secret = parse_secret(value)?;
    if dev_mode() {
        return Ok(secret);
    }
    let how = format!("generate one with `openssl rand -hex 32` (or set {DEV_ENV}=1 for development)");
    if DOCUMENTED_SECRETS.contains(&value.trim()) {
        return Err(format!("is the documented example, which anyone can read; {how}"));
    }
    if value.len() < MIN_SECRET_BYTES {
        return Err(format!(
            "must be at least {MIN_SECRET_BYTES} bytes (this one has {}); {how}",
            value.len()
        ));
    }
    Ok(secret)
}

/// Optional `iss` and `aud` of client tokens; when set, both services require and check
/// them, and the tokens they issue carry them.
#[derive(Debug, Clone, Default, Args)]
pub struct JwtClaimsArgs {
    /// The `iss` every client token must carry (unset: not checked).
    #[arg(long, env = "JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// The `aud` every client token must carry (unset: not checked).
    #[arg(long, env = "JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
}

/// Where NATS is and which stream and subjects the relay uses.
#[derive(Debug, Clone, Args)]
pub struct NatsArgs {
    /// NATS server URL(s), comma-separated.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// JetStream stream that holds the events.
    #[arg(long, env = "STREAM_NAME", default_value = "RELAY_EVENTS")]
    pub stream_name: String,
    /// Subject prefix; events go to `{prefix}.{account}.{chat}.{type}`.
    #[arg(long, env = "SUBJECT_PREFIX", default_value = "relay.events", value_parser = parse_prefix)]
    pub subject_prefix: Subjects,
    /// User name NATS asks for (with `NATS_PASSWORD`); unset: no user.
    #[arg(long, env = "NATS_USER")]
    pub nats_user: Option<String>,
    /// Password of `NATS_USER`.
    #[arg(long, env = "NATS_PASSWORD", hide_env_values = true, value_parser = parse_secret)]
    pub nats_password: Option<SecretString>,
}

pub fn parse_prefix(value: &str) -> Result<Subjects, String> {
    Subjects::new(value).map_err(|e| e.to_string())
}

impl NatsArgs {
    /// Connects, retrying in the background if the server is not up yet, so a process
    /// can start (and serve what does not need NATS) while NATS is away.
    pub async fn connect(&self, name: &str) -> anyhow::Result<async_nats::Client> {
        self.options(name)?
            .retry_on_initial_connect()
            .connect(self.servers()?)
            .await
            .with_context(|| format!("connecting to NATS at {}", without_credentials(&self.nats_url)))
    }

    /// Connects once, failing at once when the server is away or refuses the
    /// credentials: for commands, which have nothing to serve meanwhile.
    pub async fn connect_now(&self, name: &str) -> anyhow::Result<async_nats::Client> {
        self.options(name)?
            .connect(self.servers()?)
            .await
            .with_context(|| format!("connecting to NATS at {}", without_credentials(&self.nats_url)))
    }

    /// The servers of `NATS_URL`: a cluster's URLs, comma-separated (async-nats parses
    /// one URL per string).
    pub fn servers(&self) -> anyhow::Result<Vec<async_nats::ServerAddr>> {
        self.nats_url
            .split(',')
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .map(|url| {
                url.parse::<async_nats::ServerAddr>()
                    .with_context(|| format!("NATS_URL: {} is not a NATS URL", without_credentials(url)))
            })
            .collect()
    }

    fn options(&self, name: &str) -> anyhow::Result<async_nats::ConnectOptions> {
        let options = async_nats::ConnectOptions::new()
            .name(name)
            .connection_timeout(Duration::from_secs(5))
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::Connected => tracing::info!("nats connected"),
                    async_nats::Event::Disconnected => tracing::warn!("nats disconnected"),
                    // An authorization violation, say: the server will not take us as we are.
                    async_nats::Event::ServerError(error) => {
                        tracing::error!(error = %error, "nats server error")
                    }
                    other => tracing::debug!(event = %other, "nats event"),
                }
            });
        match (&self.nats_user, &self.nats_password) {
            (Some(user), Some(password)) => {
                Ok(options.user_and_password(user.clone(), password.expose_secret().to_owned()))
            }
            (None, None) => Ok(options),
            _ => anyhow::bail!("NATS_USER and NATS_PASSWORD go together: set both or neither"),
        }
    }
}

/// A NATS URL list fit for a log line: any `user:password@` is left out.
pub fn without_credentials(urls: &str) -> String {
    urls.split(',')
        .map(|url| match (url.find("://"), url.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                format!("{}***@{}", &url[..scheme + 3], &url[at + 1..])
            }
            (None, Some(at)) => format!("***@{}", &url[at + 1..]),
            _ => url.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Logging options.
#[derive(Debug, Clone, Args)]
pub struct TelemetryArgs {
    /// Log format: `text` for people, `json` for log collectors. Filter with RUST_LOG.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Development mode (`RELAY_DEV=1`) is tested through a binary: setting the
    /// variable here would be `unsafe`.
    #[test]
    fn the_relays_secrets_are_long_and_not_the_documented_ones() {
        assert!(parse_strong_secret("0123456789abcdef0123456789abcdef").is_ok());
        assert!(parse_strong_secret("0123456789abcdef0123456789abcde").unwrap_err().contains("at least 32"));
        assert!(parse_strong_secret("change-me-jwt-secret").unwrap_err().contains("documented example"));
        assert!(parse_strong_secret("   ").is_err());
    }

    #[test]
    fn a_comma_separated_nats_url_names_every_server_of_a_cluster() {
        let args = |url: &str| NatsArgs {
            nats_url: url.to_owned(),
            stream_name: "S".to_owned(),
            subject_prefix: Subjects::new("relay.events").unwrap(),
            nats_user: None,
            nats_password: None,
        };
        let servers = args("nats://a:4222, nats://b:4223,nats://c:4224").servers().unwrap();
        let ports: Vec<u16> = servers.iter().map(|s| s.port()).collect();
        assert_eq!(ports, [4222, 4223, 4224]);
        assert!(args("nats://a:4222,nats://b:notaport").servers().is_err());
    }

    /// A cluster's URL list as `NATS_URL` takes it: one server down, the next one used.
    /// Needs the machine's NATS (`NATS_URL`, default `nats://127.0.0.1:4222`).
    #[tokio::test]
    async fn a_nats_url_list_connects_to_a_server_of_the_list() {
        let live = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned());
        let args = NatsArgs {
            nats_url: format!("nats://127.0.0.1:1,{live}"),
            stream_name: "S".to_owned(),
            subject_prefix: Subjects::new("relay.events").unwrap(),
            nats_user: None,
            nats_password: None,
        };
        let client = args.connect_now("list-test").await.expect("connects through the list");
        client.flush().await.expect("NATS must be running (set NATS_URL)");
    }

    #[test]
    fn nats_urls_are_logged_without_their_credentials() {
        assert_eq!(
            without_credentials("nats://relay:s3cret@a:4222,nats://b:4222,tls://u:p@c"),
            "nats://***@a:4222,nats://b:4222,tls://***@c"
        );
        assert_eq!(without_credentials("relay:s3cret@a:4222"), "***@a:4222");
    }
}
