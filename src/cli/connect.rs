//! The connection every client command uses: `--server`, TLS, and the caller's bearer
//! token sent with each request; and how a server's refusal becomes a CLI error.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

#[derive(Debug, Clone, Args)]
pub(crate) struct ServerArg {
    /// The riskserve server to talk to.
    #[arg(
        long,
        global = true,
        env = "RISKSERVE_SERVER",
        default_value = "http://127.0.0.1:50051"
    )]
    pub(crate) server: String,
}

/// A refusal from the server as a CLI error: the gRPC code and the server's message.
pub(crate) fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

/// A connection to the server that sends the caller's credentials with every request.
pub type Conn = InterceptedService<Channel, Credentials>;

/// The bearer token from `RISKSERVE_TOKEN`, if set (kept off the command line, where any
/// user of the machine could read it).
#[derive(Debug, Clone)]
pub struct Credentials(Option<MetadataValue<Ascii>>);

impl Interceptor for Credentials {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(bearer) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", bearer.clone());
        }
        Ok(request)
    }
}

/// Connects to `--server`, accepting a bare `host:port`. `https://` uses TLS, trusting
/// `RISKSERVE_CA_CERT` (PEM) if set, and presents `RISKSERVE_CLIENT_CERT` and
/// `RISKSERVE_CLIENT_KEY` for mutual TLS; `RISKSERVE_TOKEN` is sent as a bearer token.
pub async fn connect(server: &str) -> anyhow::Result<Conn> {
    let uri = if server.contains("://") {
        server.to_string()
    } else {
        format!("http://{server}")
    };
    let mut endpoint = Channel::from_shared(uri.clone())
        .with_context(|| format!("bad server address {server}"))?
        .connect_timeout(Duration::from_secs(5));
    if uri.starts_with("https://") {
        let read = |var: &str| -> anyhow::Result<Option<Vec<u8>>> {
            match std::env::var_os(var) {
                Some(path) => std::fs::read(&path)
                    .map(Some)
                    .with_context(|| format!("reading {var}={}", Path::new(&path).display())),
                None => Ok(None),
            }
        };
        let mut tls = ClientTlsConfig::new().with_enabled_roots();
        if let Some(ca) = read("RISKSERVE_CA_CERT")? {
            tls = tls.ca_certificate(Certificate::from_pem(ca));
        }
        match (
            read("RISKSERVE_CLIENT_CERT")?,
            read("RISKSERVE_CLIENT_KEY")?,
        ) {
            (Some(cert), Some(key)) => tls = tls.identity(Identity::from_pem(cert, key)),
            (None, None) => {}
            _ => bail!("RISKSERVE_CLIENT_CERT and RISKSERVE_CLIENT_KEY go together"),
        }
        endpoint = endpoint.tls_config(tls).context("configuring TLS")?;
    }
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("connecting to {uri}"))?;
    let token = match std::env::var("RISKSERVE_TOKEN") {
        Ok(t) if !t.is_empty() => Some(
            format!("Bearer {t}")
                .parse()
                .context("RISKSERVE_TOKEN holds characters a header cannot carry")?,
        ),
        _ => None,
    };
    Ok(InterceptedService::new(channel, Credentials(token)))
}

/// Who to record as the actor of a control operation: the login name.
pub(crate) fn who() -> String {
    std::env::var("USER").unwrap_or_else(|_| "cli".into())
}
