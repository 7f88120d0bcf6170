//! Who is calling and what they may do.
//!
//! A caller proves who they are with a bearer token (`authorization: Bearer <token>`; the
//! configuration keeps only each token's SHA-256) or with a client certificate under mutual
//! TLS (its subject common name). Each identity holds roles, and each service needs one:
//! scorer for Scoring, operator for Models and Rollouts, reviewer for Trace. Health stays
//! open so that orchestrators can probe it. A gate ([`super`]) in front of every service decides,
//! before any handler runs, and puts the [`Caller`] in the request's extensions so that
//! decisions and rollout transitions record who asked.
//!
//! Auth is required whenever the server listens beyond loopback or any credential is
//! configured; a loopback development server without credentials lets everyone in.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tonic::codegen::http;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use super::Gatekeeper;
use crate::grpc::status::Refusal;

/// What an identity may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Scoring (and the inference protocol): asks for decisions.
    Scorer,
    /// Models and Rollouts: changes what decides.
    Operator,
    /// Trace: reads the decision log.
    Reviewer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Scorer => "scorer",
            Role::Operator => "operator",
            Role::Reviewer => "reviewer",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A bearer token: its name (recorded as the caller), roles, and SHA-256 (hex).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    pub name: String,
    pub roles: Vec<Role>,
    pub sha256: String,
}

/// A client certificate's subject common name and its roles (mutual TLS).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientEntry {
    pub common_name: String,
    pub roles: Vec<Role>,
}

/// The `[auth]` section of the configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Whether every request but health needs credentials. Default: yes when listening
    /// beyond loopback or when any token or client is configured.
    pub required: Option<bool>,
    pub tokens: Vec<TokenEntry>,
    pub clients: Vec<ClientEntry>,
}

impl AuthConfig {
    pub fn required(&self, listen: SocketAddr) -> bool {
        self.required.unwrap_or(
            !listen.ip().is_loopback() || !self.tokens.is_empty() || !self.clients.is_empty(),
        )
    }

    /// Checks what parsing cannot; the message names the offending entry.
    pub fn check(&self, listen: SocketAddr) -> Result<(), String> {
        if self.required(listen) && self.tokens.is_empty() && self.clients.is_empty() {
            return Err(format!(
                "auth is required (listening on {listen}) but no [[auth.tokens]] or \
                 [[auth.clients]] are configured; set auth.required = false only behind \
                 something else that authenticates"
            ));
        }
        let mut names = std::collections::HashSet::new();
        for t in &self.tokens {
            if t.name.is_empty() || !names.insert(t.name.as_str()) {
                return Err(format!(
                    "auth.tokens: name {:?} is empty or repeated",
                    t.name
                ));
            }
            if t.sha256.len() != 64 || hex::decode(&t.sha256).is_err() {
                return Err(format!(
                    "auth.tokens {:?}: sha256 must be 64 hex digits (`riskserve token` prints one)",
                    t.name
                ));
            }
            if t.roles.is_empty() {
                return Err(format!("auth.tokens {:?}: roles must not be empty", t.name));
            }
        }
        for c in &self.clients {
            if c.common_name.is_empty() || c.roles.is_empty() {
                return Err(format!(
                    "auth.clients {:?}: common_name and roles must not be empty",
                    c.common_name
                ));
            }
        }
        Ok(())
    }
}

/// The hex SHA-256 of a token, as the configuration keeps it.
pub fn token_sha256(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Who made a request; in its extensions once authorized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// `token:<name>`, `cert:<common name>`, or `anonymous` on an open development server.
    pub name: String,
}

/// Why a request was refused before reaching its service.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error(
        "authorization: credentials required: send `authorization: Bearer <token>` or a client certificate"
    )]
    Missing,
    #[error("authorization: expected `Bearer <token>`")]
    Malformed,
    #[error("authorization: the bearer token is not known")]
    UnknownToken,
    #[error("client certificate: common name {0:?} is not configured")]
    UnknownClient(String),
    #[error("{caller} lacks the {role} role that {service} requires")]
    Forbidden {
        caller: String,
        role: Role,
        service: String,
    },
}

/// The role a gRPC path requires; `None` for the open health service.
pub fn required_role(path: &str) -> Option<Option<Role>> {
    let service = path.trim_start_matches('/').split('/').next().unwrap_or("");
    match service {
        "grpc.health.v1.Health" => None,
        "riskserve.v1.Scoring" | "inference.GRPCInferenceService" => Some(Some(Role::Scorer)),
        "riskserve.v1.Models" | "riskserve.v1.Rollouts" => Some(Some(Role::Operator)),
        "riskserve.v1.Trace" => Some(Some(Role::Reviewer)),
        // Reflection and anything unknown: any authenticated caller.
        _ => Some(None),
    }
}

/// Decides each request from the configured identities.
#[derive(Debug)]
pub struct Authorizer {
    required: bool,
    tokens: HashMap<[u8; 32], (String, Vec<Role>)>,
    clients: HashMap<String, Vec<Role>>,
}

impl Authorizer {
    pub fn new(config: &AuthConfig, listen: SocketAddr) -> Authorizer {
        let tokens = config
            .tokens
            .iter()
            .filter_map(|t| {
                let hash: [u8; 32] = hex::decode(&t.sha256).ok()?.try_into().ok()?;
                Some((hash, (t.name.clone(), t.roles.clone())))
            })
            .collect();
        let clients = config
            .clients
            .iter()
            .map(|c| (c.common_name.clone(), c.roles.clone()))
            .collect();
        Authorizer {
            required: config.required(listen),
            tokens,
            clients,
        }
    }

    /// The caller of a request to `path`, or why it is refused. A token, when sent, is
    /// judged even on an open server: a wrong one is an error, not anonymity.
    pub fn authorize(
        &self,
        path: &str,
        authorization: Option<&[u8]>,
        client_common_name: Option<&str>,
    ) -> Result<Caller, AuthError> {
        let Some(needed) = required_role(path) else {
            return Ok(Caller {
                name: "anonymous".into(),
            });
        };
        let (name, roles): (String, &[Role]) = if let Some(header) = authorization {
            let header = std::str::from_utf8(header).map_err(|_| AuthError::Malformed)?;
            let token = header
                .strip_prefix("Bearer ")
                .or_else(|| header.strip_prefix("bearer "))
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .ok_or(AuthError::Malformed)?;
            let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
            let (name, roles) = self.tokens.get(&hash).ok_or(AuthError::UnknownToken)?;
            (format!("token:{name}"), roles)
        } else if let Some(cn) = client_common_name {
            match self.clients.get(cn) {
                Some(roles) => (format!("cert:{cn}"), roles),
                None if self.required => return Err(AuthError::UnknownClient(cn.into())),
                None => (format!("cert:{cn}"), &[][..]),
            }
        } else if self.required {
            return Err(AuthError::Missing);
        } else {
            return Ok(Caller {
                name: "anonymous".into(),
            });
        };
        if let Some(role) = needed
            && self.required
            && !roles.contains(&role)
        {
            return Err(AuthError::Forbidden {
                caller: name,
                role,
                service: path
                    .trim_start_matches('/')
                    .split('/')
                    .next()
                    .unwrap_or("")
                    .to_string(),
            });
        }
        Ok(Caller { name })
    }
}

/// The common name of the client certificate a TLS connection presented, if any.
fn client_common_name<B>(req: &http::Request<B>) -> Option<String> {
    let info = req.extensions().get::<TlsConnectInfo<TcpConnectInfo>>()?;
    let certs = info.peer_certs()?;
    let leaf = certs.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
    Some(cn.to_string())
}

impl Gatekeeper for Arc<Authorizer> {
    type Pass = ();

    fn admit<B>(&self, request: &mut http::Request<B>) -> Result<(), Refusal> {
        let authorization = request
            .headers()
            .get(http::header::AUTHORIZATION)
            .map(|v| v.as_bytes());
        // A token decides when sent, so the certificate is parsed only when there is none.
        let cn = match authorization {
            Some(_) => None,
            None => client_common_name(request),
        };
        let decided = self.authorize(request.uri().path(), authorization, cn.as_deref());
        match decided {
            Ok(caller) => {
                request.extensions_mut().insert(caller);
                Ok(())
            }
            Err(e) => {
                tracing::info!(path = request.uri().path(), error = %e, "request refused");
                Err(Refusal::from(&e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> AuthConfig {
        AuthConfig {
            required: None,
            tokens: vec![TokenEntry {
                name: "app".into(),
                roles: vec![Role::Scorer],
                sha256: token_sha256("s3cret"),
            }],
            clients: vec![ClientEntry {
                common_name: "ops".into(),
                roles: vec![Role::Operator, Role::Reviewer],
            }],
        }
    }

    #[test]
    fn tokens_and_certificates_map_to_roles_and_health_stays_open() {
        let loopback: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let a = Authorizer::new(&config(), loopback);
        let score = "/riskserve.v1.Scoring/Score";
        let trace = "/riskserve.v1.Trace/Verify";
        assert_eq!(
            a.authorize(score, Some(b"Bearer s3cret"), None)
                .unwrap()
                .name,
            "token:app"
        );
        assert!(matches!(
            a.authorize(trace, Some(b"Bearer s3cret"), None),
            Err(AuthError::Forbidden {
                role: Role::Reviewer,
                ..
            })
        ));
        assert_eq!(
            a.authorize(score, Some(b"Bearer nope"), None),
            Err(AuthError::UnknownToken)
        );
        assert_eq!(
            a.authorize(score, Some(b"s3cret"), None),
            Err(AuthError::Malformed)
        );
        assert_eq!(a.authorize(score, None, None), Err(AuthError::Missing));
        assert_eq!(
            a.authorize(trace, None, Some("ops")).unwrap().name,
            "cert:ops"
        );
        assert!(a.authorize(score, None, Some("ops")).is_err());
        assert!(a.authorize(score, None, Some("stranger")).is_err());
        assert!(
            a.authorize("/grpc.health.v1.Health/Check", None, None)
                .is_ok()
        );
    }

    #[test]
    fn beyond_loopback_auth_is_on_and_needs_credentials() {
        let public: SocketAddr = "0.0.0.0:50051".parse().unwrap();
        let loopback: SocketAddr = "127.0.0.1:50051".parse().unwrap();
        let none = AuthConfig::default();
        assert!(none.required(public) && none.check(public).is_err());
        assert!(!none.required(loopback) && none.check(loopback).is_ok());
        // Credentials configured on loopback: required too.
        assert!(config().required(loopback));
        let open = Authorizer::new(&none, loopback);
        assert_eq!(
            open.authorize("/riskserve.v1.Trace/Verify", None, None)
                .unwrap()
                .name,
            "anonymous"
        );
        // Even on an open server a wrong token is refused, not ignored.
        assert!(
            open.authorize("/riskserve.v1.Trace/Verify", Some(b"Bearer x"), None)
                .is_err()
        );
    }
}
