//! [`IsolatorLink`]: the agent's side of the isolator protocol (and `ckptctl jobs` / `release`).
//!
//! One link per agent. It registers the agent's ranks, sends heartbeats, faults and durable
//! votes, and keeps a reconnecting command stream. It tracks the job's restart generation: the
//! register reply sets it and every restore command raises it, so calls always carry the current
//! one. Errors: [`ErrorKind::Stale`](crate::ErrorKind::Stale) means "wait for the restore
//! command", [`ErrorKind::IsolatorUnavailable`](crate::ErrorKind::IsolatorUnavailable) means
//! "retry later", [`ErrorKind::NotLeader`](crate::ErrorKind::NotLeader) means "retry: another
//! replica leads", [`ErrorKind::UnknownJob`](crate::ErrorKind::UnknownJob) means "register again"
//! (a new leader took over and knows nothing yet; the link sends its generation along). Statuses
//! become errors through [`crate::rpc::from_isolator_status`], which keeps the isolator's kind.
//!
//! ```no_run
//! # async fn demo(info: ckpt_core::ShardInfo) -> ckptd::Result<()> {
//! use ckptd::isolator::link::{IsolatorLink, LinkCredentials};
//! let link = IsolatorLink::connect("http://isolator:7443", LinkCredentials::token("s3cr3t-token-0123")).await?;
//! link.register("job", &[0, 1], 8, "node-a", "pod-a", "train", "s3://bucket/ckpt").await?;
//! let mut commands = link.commands();
//! link.heartbeat(0, 100, std::time::Duration::from_millis(850)).await?;
//! let committed = link.vote_durable(&info, &Default::default()).await?;
//! while let Some(cmd) = commands.recv().await { /* snapshot-now, stop, restore */ }
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ckpt_core::ShardInfo;
use ckptd_proto::v1::isolator_admin_client::IsolatorAdminClient;
use ckptd_proto::v1::isolator_client::IsolatorClient;
use ckptd_proto::v1::{
    Command, CommandsRequest, DurableVote, FaultAck, FaultReport, JobStatus, ListJobsRequest, RankHeartbeat,
    RegisterReply, RegisterRequest, ReleaseRequest, command,
};
use tokio::sync::mpsc;
use tonic::Request;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tracing::Instrument as _;

use crate::layout::Layout;
use crate::rpc::from_isolator_status;
use crate::{Error, Result};

/// Capacity of the queue [`IsolatorLink::commands`] returns.
pub const COMMAND_QUEUE: usize = 16;
/// Longest pause between two reconnection attempts of the command stream.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// How the agent proves who it is: a bearer token, a client certificate, or both; plus the CA
/// that signs the isolator's certificate when the URL is `https://`.
#[derive(Clone, Default)]
pub struct LinkCredentials {
    token: Option<String>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
    ca: Option<Vec<u8>>,
    domain: Option<String>,
}

impl std::fmt::Debug for LinkCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkCredentials")
            .field("token", &self.token.is_some())
            .field("client_cert", &self.identity.is_some())
            .field("ca", &self.ca.is_some())
            .field("domain", &self.domain)
            .finish()
    }
}

impl LinkCredentials {
    /// A bearer token.
    pub fn token(token: impl Into<String>) -> LinkCredentials {
        LinkCredentials { token: Some(token.into()), ..Default::default() }
    }

    /// A client certificate and key (PEM) for mTLS, and the CA (PEM) of the isolator's certificate.
    pub fn mtls(cert_pem: Vec<u8>, key_pem: Vec<u8>, ca_pem: Vec<u8>) -> LinkCredentials {
        LinkCredentials { identity: Some((cert_pem, key_pem)), ca: Some(ca_pem), ..Default::default() }
    }

    /// Trusts `ca_pem` for the isolator's certificate (token over TLS).
    pub fn with_ca(mut self, ca_pem: Vec<u8>) -> LinkCredentials {
        self.ca = Some(ca_pem);
        self
    }

    /// These credentials' token with `tls`'s certificates (for callers that gather both).
    pub fn merge_tls(mut self, tls: LinkCredentials) -> LinkCredentials {
        self.identity = tls.identity;
        self.ca = tls.ca;
        self.domain = tls.domain;
        self
    }

    /// The name to check the isolator's certificate against, when it differs from the URL's host.
    pub fn with_domain(mut self, domain: impl Into<String>) -> LinkCredentials {
        self.domain = Some(domain.into());
        self
    }
}

#[derive(Debug, Default)]
struct Registration {
    job: String,
    ranks: Vec<u32>,
}

/// A connection to the isolator. Cheap to clone; clones share the generation.
#[derive(Debug, Clone)]
pub struct IsolatorLink {
    url: String,
    channel: Channel,
    token: Option<MetadataValue<tonic::metadata::Ascii>>,
    generation: Arc<AtomicU64>,
    registration: Arc<Mutex<Registration>>,
    parallel: Option<Layout>,
}

impl IsolatorLink {
    /// Connects to `url` (`http://host:port` or `https://host:port`).
    pub async fn connect(url: &str, creds: LinkCredentials) -> Result<IsolatorLink> {
        super::install_crypto_provider();
        let mut ep = Endpoint::from_shared(url.to_string())
            .map_err(|e| Error::Config { what: "isolator URL".into(), reason: format!("`{url}`: {e}") })?
            .connect_timeout(Duration::from_secs(5))
            .tcp_keepalive(Some(Duration::from_secs(30)))
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_while_idle(true);
        if url.starts_with("https://") || creds.identity.is_some() {
            let mut tls = ClientTlsConfig::new();
            if let Some(ca) = &creds.ca {
                tls = tls.ca_certificate(Certificate::from_pem(ca));
            }
            if let Some((c, k)) = &creds.identity {
                tls = tls.identity(Identity::from_pem(c, k));
            }
            if let Some(d) = &creds.domain {
                tls = tls.domain_name(d.clone());
            }
            ep =
                ep.tls_config(tls).map_err(|e| Error::Config { what: "isolator TLS".into(), reason: e.to_string() })?;
        }
        let token =
            match &creds.token {
                Some(t) => Some(format!("Bearer {t}").parse().map_err(|_| Error::Config {
                    what: "isolator token".into(),
                    reason: "not printable ASCII".into(),
                })?),
                None => None,
            };
        let channel = ep.connect().await.map_err(|e| Error::isolator_transport(url, &e))?;
        Ok(IsolatorLink {
            url: url.to_string(),
            channel,
            token,
            generation: Arc::new(AtomicU64::new(0)),
            registration: Arc::new(Mutex::new(Registration::default())),
            parallel: None,
        })
    }

    /// Sends `layout` (the job's declared `ckptd.io/parallel`) with every registration whose world
    /// size it matches; the isolator keeps it for `ckptctl jobs`.
    pub fn with_parallel(mut self, layout: Option<Layout>) -> IsolatorLink {
        self.parallel = layout;
        self
    }

    fn req<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        if let Some(t) = &self.token {
            r.metadata_mut().insert("authorization", t.clone());
        }
        r
    }

    fn client(&self) -> IsolatorClient<Channel> {
        IsolatorClient::new(self.channel.clone())
            .max_decoding_message_size(ckptd_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(ckptd_proto::MAX_MESSAGE_BYTES)
    }

    fn job(&self) -> String {
        self.registration.lock().map(|r| r.job.clone()).unwrap_or_default()
    }

    /// The job's restart generation as this link last learned it.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Registers the agent's `ranks` of `job`. The reply carries the generation (kept by the
    /// link) and the newest globally committed step, which a fresh pod restores. The layout of
    /// [`IsolatorLink::with_parallel`] goes along when its product is `world_size`; otherwise it is
    /// left out with an error in the log, and the ranks still register.
    #[allow(clippy::too_many_arguments)]
    pub async fn register(
        &self,
        job: &str,
        ranks: &[u32],
        world_size: u32,
        node: &str,
        pod: &str,
        namespace: &str,
        store: &str,
    ) -> Result<RegisterReply> {
        let parallel = match self.parallel {
            Some(l) if l.mismatch(u64::from(world_size)).is_none() => Some(l),
            Some(l) => {
                tracing::error!(parallel = %l, world_size, "the declared parallel layout does not match the world size the trainers report: registering without it");
                None
            }
            None => None,
        };
        let mut last = None;
        for &rank in ranks {
            let msg = RegisterRequest {
                job: job.to_string(),
                rank,
                world_size,
                node: node.to_string(),
                pod: pod.to_string(),
                namespace: namespace.to_string(),
                agent_version: crate::VERSION.to_string(),
                store: store.to_string(),
                generation: self.generation(),
                parallel: parallel.map(Into::into),
            };
            let reply = self
                .client()
                .register(self.req(msg))
                .await
                .map_err(|s| from_isolator_status(&self.url, "register", &s))?
                .into_inner();
            self.generation.fetch_max(reply.generation, Ordering::AcqRel);
            last = Some(reply);
        }
        if let Ok(mut r) = self.registration.lock() {
            r.job = job.to_string();
            r.ranks = ranks.to_vec();
        }
        last.ok_or_else(|| Error::InvalidRequest { what: "ranks".into(), reason: "register at least one rank".into() })
    }

    /// Reports a rank's progress, its phase unknown. Returns the job's generation.
    pub async fn heartbeat(&self, rank: u32, step: u64, step_time: Duration) -> Result<u64> {
        self.heartbeat_in(rank, step, step_time, None).await
    }

    /// Reports a rank's progress and its phase, by which the isolator handles the rank's faults.
    /// Returns the job's generation.
    pub async fn heartbeat_in(
        &self,
        rank: u32,
        step: u64,
        step_time: Duration,
        phase: Option<ckpt_core::Phase>,
    ) -> Result<u64> {
        let msg = RankHeartbeat {
            job: self.job(),
            rank,
            generation: self.generation(),
            step,
            step_time_ms: step_time.as_millis() as u64,
            phase: phase.map(|p| p.as_str().to_string()).unwrap_or_default(),
        };
        let ack = self
            .client()
            .heartbeat(self.req(msg))
            .await
            .map_err(|s| from_isolator_status(&self.url, "heartbeat", &s))?;
        Ok(ack.into_inner().generation)
    }

    /// Reports a fault; the link fills in the job (when empty) and the current generation. The ack
    /// says what the isolator did (it may downgrade the action).
    pub async fn report_fault(&self, mut report: FaultReport) -> Result<FaultAck> {
        if report.job.is_empty() {
            report.job = self.job();
        }
        report.generation = self.generation();
        let ack = self
            .client()
            .report_fault(self.req(report))
            .await
            .map_err(|s| from_isolator_status(&self.url, "report-fault", &s))?;
        Ok(ack.into_inner())
    }

    /// Votes that `shard` (as `Engine::write_shard` returned it) is durable. `metadata` reaches
    /// the MANIFEST when this is rank 0. Returns whether the step is now committed globally.
    pub async fn vote_durable(&self, shard: &ShardInfo, metadata: &BTreeMap<String, String>) -> Result<bool> {
        self.vote_durable_at(shard, metadata, self.generation()).await
    }

    /// [`vote_durable`](IsolatorLink::vote_durable) for a snapshot taken at `generation`: a vote
    /// of an older generation than the job's is refused as stale, so a shard of a timeline that a
    /// restart abandoned is never committed.
    pub async fn vote_durable_at(
        &self,
        shard: &ShardInfo,
        metadata: &BTreeMap<String, String>,
        generation: u64,
    ) -> Result<bool> {
        let entry = shard.entry();
        let metadata = if metadata.is_empty() { Vec::new() } else { serde_json::to_vec(metadata).unwrap_or_default() };
        let msg = DurableVote {
            job: self.job(),
            step: shard.step,
            rank: shard.rank,
            world_size: shard.world_size,
            generation,
            shard_key: entry.object,
            shard_len: entry.size,
            shard_crc32c: entry.index_crc32c,
            metadata,
            region_len: entry.region_len,
        };
        let ack = self
            .client()
            .vote_durable(self.req(msg))
            .await
            .map_err(|s| from_isolator_status(&self.url, "vote-durable", &s))?;
        Ok(ack.into_inner().committed)
    }

    /// The commands for the registered ranks, over a stream that reconnects (with backoff) until
    /// the receiver is dropped. A restore command raises the link's generation before it is
    /// delivered. Call after [`register`](IsolatorLink::register).
    pub fn commands(&self) -> mpsc::Receiver<Command> {
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        let link = self.clone();
        let span = tracing::info_span!("isolator-commands", url = %self.url);
        let task = async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                let (job, ranks) = match link.registration.lock() {
                    Ok(r) => (r.job.clone(), r.ranks.clone()),
                    Err(_) => return,
                };
                let req = CommandsRequest { job, ranks, generation: link.generation() };
                let mut client = link.client();
                let stream = tokio::select! {
                    () = tx.closed() => return,
                    r = client.commands(link.req(req)) => r,
                };
                match stream {
                    Ok(s) => {
                        backoff = Duration::from_millis(100);
                        let mut s = s.into_inner();
                        loop {
                            let msg = tokio::select! {
                                () = tx.closed() => return,
                                m = s.message() => m,
                            };
                            match msg {
                                Ok(Some(cmd)) => {
                                    if let Some(command::Command::Restore(r)) = &cmd.command {
                                        link.generation.fetch_max(r.generation, Ordering::AcqRel);
                                    }
                                    if tx.send(cmd).await.is_err() {
                                        return;
                                    }
                                }
                                Ok(None) => break,
                                Err(s) => {
                                    tracing::warn!(error = %s.message(), "isolator command stream broke; reconnecting");
                                    break;
                                }
                            }
                        }
                    }
                    Err(s) => {
                        tracing::warn!(error = %s.message(), code = ?s.code(), "cannot open the isolator command stream")
                    }
                }
                tokio::select! {
                    () = tx.closed() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        };
        tokio::spawn(task.instrument(span));
        rx
    }

    fn admin(&self) -> IsolatorAdminClient<Channel> {
        IsolatorAdminClient::new(self.channel.clone()).max_decoding_message_size(ckptd_proto::MAX_MESSAGE_BYTES)
    }

    /// Every job the isolator knows (`ckptctl jobs`).
    pub async fn list_jobs(&self) -> Result<Vec<JobStatus>> {
        let r = self
            .admin()
            .list_jobs(self.req(ListJobsRequest {}))
            .await
            .map_err(|s| from_isolator_status(&self.url, "list-jobs", &s))?;
        Ok(r.into_inner().jobs)
    }

    /// The fault records of `job`, oldest first (`ckptctl faults`).
    pub async fn list_faults(&self, job: &str) -> Result<Vec<ckptd_proto::v1::FaultRecord>> {
        let r = self
            .admin()
            .list_faults(self.req(ckptd_proto::v1::ListFaultsRequest { job: job.to_string() }))
            .await
            .map_err(|s| from_isolator_status(&self.url, "list-faults", &s))?;
        Ok(r.into_inner().records)
    }

    /// Releases an isolated node (`ckptctl release`). Returns whether it was isolated.
    pub async fn release(&self, node: &str) -> Result<bool> {
        let r = self
            .admin()
            .release(self.req(ReleaseRequest { node: node.to_string() }))
            .await
            .map_err(|s| from_isolator_status(&self.url, "release", &s))?;
        Ok(r.into_inner().was_isolated)
    }
}
