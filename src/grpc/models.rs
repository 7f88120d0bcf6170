//! The `riskserve.v1.Models` service: list, show, load, serve and unload versions.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::grpc::pb::{self, models_server::Models};
use crate::grpc::to_the_end;
use crate::registry::Registry;
use crate::rollout::Control;

/// Model management over a shared [`Registry`].
#[derive(Debug, Clone)]
pub struct ModelsService {
    registry: Arc<Registry>,
    control: Arc<Control>,
}

impl ModelsService {
    pub fn new(registry: Arc<Registry>, control: Arc<Control>) -> Self {
        ModelsService { registry, control }
    }
}

#[tonic::async_trait]
impl Models for ModelsService {
    async fn list_models(
        &self,
        _: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let models = self
            .registry
            .list()
            .into_iter()
            .map(|m| pb::ModelStatus {
                name: m.name,
                serving_version: m.serving.unwrap_or_default(),
                versions: m.versions.into_iter().map(Into::into).collect(),
            })
            .collect();
        Ok(Response::new(pb::ListModelsResponse { models }))
    }

    async fn get_manifest(
        &self,
        request: Request<pb::VersionRef>,
    ) -> Result<Response<pb::ManifestResponse>, Status> {
        let r = request.into_inner();
        let bundle = self.registry.bundle(&r.model, &r.version)?;
        Ok(Response::new(pb::ManifestResponse {
            model: r.model,
            version: r.version,
            digest: bundle.digest.to_string(),
            manifest_toml: bundle.manifest_text.clone(),
        }))
    }

    async fn load_version(
        &self,
        request: Request<pb::VersionRef>,
    ) -> Result<Response<pb::VersionStatus>, Status> {
        let r = request.into_inner();
        let registry = self.registry.clone();
        let info = to_the_end(async move { registry.load(&r.model, &r.version).await }).await?;
        Ok(Response::new(info.into()))
    }

    async fn serve_version(
        &self,
        request: Request<pb::VersionRef>,
    ) -> Result<Response<pb::VersionStatus>, Status> {
        let r = request.into_inner();
        let control = self.control.clone();
        let info =
            to_the_end(async move { control.serve_unless_rolling_out(&r.model, &r.version).await })
                .await?;
        Ok(Response::new(info.into()))
    }

    async fn unload_version(
        &self,
        request: Request<pb::VersionRef>,
    ) -> Result<Response<pb::VersionStatus>, Status> {
        let r = request.into_inner();
        let control = self.control.clone();
        let info =
            to_the_end(async move { control.unload_unless_used(&r.model, &r.version).await })
                .await?;
        Ok(Response::new(info.into()))
    }
}
