//! The gRPC shell: `Isolator` and `IsolatorAdmin` over the [`Coordinator`], with the
//! authentication interceptor. Handlers only translate; every decision is the coordinator's.

use std::pin::Pin;
use std::sync::Arc;

use ckptd_proto::v1::isolator_admin_server::IsolatorAdmin;
use ckptd_proto::v1::isolator_server::Isolator;
use ckptd_proto::v1::{
    Command, CommandsRequest, DurableVote, FaultAck, FaultReport, HeartbeatAck, ListFaultsReply, ListFaultsRequest,
    ListJobsReply, ListJobsRequest, RankHeartbeat, RegisterReply, RegisterRequest, ReleaseReply, ReleaseRequest,
    VoteAck,
};
use subtle::ConstantTimeEq;
use tokio_stream::Stream;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status};

use super::coordinator::Coordinator;
use super::request::{Fault, Heartbeat, Registration, ShardVote, Subscription};
use crate::ErrorKind;
use crate::rpc::{refuse, to_status};

/// Who may call: a client certificate that the TLS layer verified against `--client-ca`, or the
/// bearer token of `--token-file` (compared in constant time).
#[derive(Clone)]
pub struct Auth {
    token: Option<Arc<[u8]>>,
    mtls: bool,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth").field("token", &self.token.is_some()).field("mtls", &self.mtls).finish()
    }
}

impl Auth {
    /// Accepts `token` as a bearer token and, with `mtls`, any verified client certificate.
    pub fn new(token: Option<Vec<u8>>, mtls: bool) -> Auth {
        Auth { token: token.map(Arc::from), mtls }
    }

    fn check<T>(&self, req: &Request<T>) -> Result<(), Status> {
        if self.mtls && req.peer_certs().is_some_and(|c| !c.is_empty()) {
            return Ok(());
        }
        if let Some(expected) = &self.token {
            let presented = req
                .metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::as_bytes);
            if let Some(p) = presented
                && bool::from(p.ct_eq(expected))
            {
                return Ok(());
            }
        }
        Err(refuse(
            Code::Unauthenticated,
            ErrorKind::Config,
            "the isolator needs a client certificate signed by its CA or `authorization: Bearer <token>`",
        ))
    }
}

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        self.check(&req)?;
        Ok(req)
    }
}

/// The gRPC services.
#[derive(Debug, Clone)]
pub struct Service {
    coord: Arc<Coordinator>,
}

impl Service {
    /// Services over `coord`.
    pub fn new(coord: Arc<Coordinator>) -> Service {
        Service { coord }
    }
}

/// The stream of commands for one agent.
pub type CommandStream = Pin<Box<dyn Stream<Item = Result<Command, Status>> + Send>>;

#[tonic::async_trait]
impl Isolator for Service {
    async fn register(&self, req: Request<RegisterRequest>) -> Result<Response<RegisterReply>, Status> {
        let registration = Registration::try_from(req.get_ref()).map_err(|e| to_status(&e))?;
        self.coord.register(registration).await.map(Response::new).map_err(|e| to_status(&e))
    }

    async fn heartbeat(&self, req: Request<RankHeartbeat>) -> Result<Response<HeartbeatAck>, Status> {
        self.coord.heartbeat(Heartbeat::from(req.get_ref())).map(Response::new).map_err(|e| to_status(&e))
    }

    async fn report_fault(&self, req: Request<FaultReport>) -> Result<Response<FaultAck>, Status> {
        let fault = Fault::try_from(req.get_ref()).map_err(|e| to_status(&e))?;
        self.coord.report_fault(fault).await.map(Response::new).map_err(|e| to_status(&e))
    }

    async fn vote_durable(&self, req: Request<DurableVote>) -> Result<Response<VoteAck>, Status> {
        let vote = ShardVote::try_from(req.get_ref()).map_err(|e| to_status(&e))?;
        self.coord.vote(vote).await.map(|committed| Response::new(VoteAck { committed })).map_err(|e| to_status(&e))
    }

    type CommandsStream = CommandStream;

    async fn commands(&self, req: Request<CommandsRequest>) -> Result<Response<CommandStream>, Status> {
        let subscription = Subscription::try_from(req.get_ref()).map_err(|e| to_status(&e))?;
        let rx = self.coord.subscribe(subscription).map_err(|e| to_status(&e))?;
        let stream: CommandStream = Box::pin(ReceiverStream::new(rx).map(Ok));
        Ok(Response::new(stream))
    }
}

#[tonic::async_trait]
impl IsolatorAdmin for Service {
    async fn list_jobs(&self, _req: Request<ListJobsRequest>) -> Result<Response<ListJobsReply>, Status> {
        Ok(Response::new(ListJobsReply { jobs: self.coord.list() }))
    }

    async fn list_faults(&self, req: Request<ListFaultsRequest>) -> Result<Response<ListFaultsReply>, Status> {
        let records = self.coord.faults(&req.get_ref().job).await.map_err(|e| to_status(&e))?;
        Ok(Response::new(ListFaultsReply { records: records.iter().map(Into::into).collect() }))
    }

    async fn release(&self, req: Request<ReleaseRequest>) -> Result<Response<ReleaseReply>, Status> {
        let node = req.into_inner().node;
        self.coord
            .release(&node)
            .await
            .map(|was_isolated| Response::new(ReleaseReply { was_isolated }))
            .map_err(|e| to_status(&e))
    }
}
