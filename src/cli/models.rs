//! `riskserve models`: list, show, load, serve and unload versions on a running server.

use std::process::ExitCode;

use clap::{Args, Subcommand};

use super::connect::{ServerArg, connect, status_error};
use crate::grpc::pb;
use crate::grpc::pb::models_client::ModelsClient;

#[derive(Debug, Args)]
pub(crate) struct ModelsArgs {
    #[command(flatten)]
    server: ServerArg,
    #[command(subcommand)]
    action: ModelsAction,
}

#[derive(Debug, Subcommand)]
enum ModelsAction {
    /// Every model and version with its state.
    List,
    /// A version's manifest.
    Show { model: String, version: String },
    /// Load models/<MODEL>/<VERSION> (verify, validate, warm up).
    Load { model: String, version: String },
    /// Make a loaded version serve.
    Serve { model: String, version: String },
    /// Unload a version that does not serve.
    Unload { model: String, version: String },
}

pub(crate) async fn run(args: ModelsArgs) -> anyhow::Result<ExitCode> {
    let ModelsArgs { server, action } = args;
    let mut client = ModelsClient::new(connect(&server.server).await?);
    let status = status_error;
    let print_version = |v: &pb::VersionStatus| {
        let state = pb::VersionState::try_from(v.state)
            .map(|s| {
                s.as_str_name()
                    .trim_start_matches("VERSION_STATE_")
                    .to_lowercase()
            })
            .unwrap_or_default();
        println!(
            "  {:<10} {:<8} {:<20} {:<23} {}",
            v.version,
            state,
            v.created_at,
            v.kind,
            if v.error.is_empty() {
                &v.digest
            } else {
                &v.error
            }
        );
    };
    match action {
        ModelsAction::List => {
            let list = client
                .list_models(pb::ListModelsRequest {})
                .await
                .map_err(status)?;
            for m in list.into_inner().models {
                let serving = if m.serving_version.is_empty() {
                    "none"
                } else {
                    &m.serving_version
                };
                println!("{}  (serving: {serving})", m.name);
                for v in &m.versions {
                    print_version(v);
                }
            }
        }
        ModelsAction::Show { model, version } => {
            let m = client
                .get_manifest(pb::VersionRef { model, version })
                .await
                .map_err(status)?
                .into_inner();
            println!("# {}/{}  {}", m.model, m.version, m.digest);
            print!("{}", m.manifest_toml);
        }
        ModelsAction::Load { model, version } => {
            let v = client
                .load_version(pb::VersionRef { model, version })
                .await
                .map_err(status)?;
            print_version(&v.into_inner());
        }
        ModelsAction::Serve { model, version } => {
            let v = client
                .serve_version(pb::VersionRef { model, version })
                .await
                .map_err(status)?;
            print_version(&v.into_inner());
        }
        ModelsAction::Unload { model, version } => {
            let v = client
                .unload_version(pb::VersionRef { model, version })
                .await
                .map_err(status)?;
            print_version(&v.into_inner());
        }
    }
    Ok(ExitCode::SUCCESS)
}
