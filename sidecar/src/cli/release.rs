//! `ckptctl release NODE`: undoes an isolation through the isolator (`IsolatorAdmin.Release`), so
//! that the isolator's own record of isolated nodes stays consistent with the cluster.

use std::io::Write;
use std::path::PathBuf;

use crate::isolator::link::{IsolatorLink, LinkCredentials};

/// Environment variable: the isolator URL, when `--isolator` is not given.
pub const ENV_ISOLATOR: &str = "CKPTD_ISOLATOR_URL";
/// Environment variable: the bearer token file, when `--token-file` is not given.
pub const ENV_TOKEN_FILE: &str = "CKPTD_ISOLATOR_TOKEN_FILE";

/// Where the isolator is and how to authenticate.
#[derive(Debug, Clone, clap::Args)]
pub struct IsolatorTarget {
    /// Isolator URL (`http://host:7443` or `https://host:7443`).
    #[arg(long, env = ENV_ISOLATOR, value_name = "URL")]
    pub isolator: String,
    /// File holding the bearer token.
    #[arg(long, env = ENV_TOKEN_FILE, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Client certificate (PEM) for mTLS.
    #[arg(long, value_name = "FILE", requires = "key")]
    pub cert: Option<PathBuf>,
    /// Client key (PEM) for mTLS.
    #[arg(long, value_name = "FILE", requires = "cert")]
    pub key: Option<PathBuf>,
    /// CA (PEM) of the isolator's certificate.
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
}

impl IsolatorTarget {
    /// Connects with the configured credentials.
    pub async fn connect(&self) -> anyhow::Result<IsolatorLink> {
        let read = |p: &PathBuf| std::fs::read(p).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", p.display()));
        let mut creds = match (&self.cert, &self.key) {
            (Some(c), Some(k)) => LinkCredentials::mtls(read(c)?, read(k)?, Vec::new()),
            _ => LinkCredentials::default(),
        };
        if let Some(ca) = &self.ca {
            creds = creds.with_ca(read(ca)?);
        }
        if let Some(t) = &self.token_file {
            let token = String::from_utf8(read(t)?)?.trim().to_string();
            creds = LinkCredentials::token(token).merge_tls(creds);
        }
        Ok(IsolatorLink::connect(&self.isolator, creds).await?)
    }
}

/// Runs `fut` on a small runtime of its own (`ckptctl` is otherwise synchronous).
pub fn block_on<T>(fut: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(fut)
}

/// `ckptctl release`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReleaseArgs {
    #[command(flatten)]
    pub isolator: IsolatorTarget,
    /// The node to release.
    pub node: String,
}

/// Runs `ckptctl release`.
pub fn run(args: &ReleaseArgs, out: &mut dyn Write) -> anyhow::Result<u8> {
    let was = block_on(async {
        let link = args.isolator.connect().await?;
        Ok(link.release(&args.node).await?)
    })?;
    if was {
        writeln!(out, "released node {}", args.node)?;
    } else {
        writeln!(out, "node {} was not isolated", args.node)?;
    }
    Ok(super::EXIT_OK)
}
