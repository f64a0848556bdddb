//! `ckptctl release NODE`: undoes an isolation through the isolator (`IsolatorAdmin.Release`), so
//! that the isolator's own record of isolated nodes stays consistent with the cluster.

use std::io::Write;
use std::path::PathBuf;

use crate::env::{ENV_ISOLATOR, ENV_ISOLATOR_TOKEN_FILE, ENV_ISOLATOR_URL};
use crate::isolator::link::{IsolatorLink, LinkCredentials};

/// Where the isolator is and how to authenticate.
#[derive(Debug, Clone, clap::Args)]
pub struct IsolatorTarget {
    /// Isolator URL (`http://host:7443` or `https://host:7443`) [env: CKPTD_ISOLATOR, or the
    /// older CKPTD_ISOLATOR_URL].
    #[arg(long, env = ENV_ISOLATOR, value_name = "URL")]
    pub isolator: Option<String>,
    /// File holding the bearer token.
    #[arg(long, env = ENV_ISOLATOR_TOKEN_FILE, value_name = "FILE")]
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
    /// The isolator URL: `--isolator`, else [`ENV_ISOLATOR`], else [`ENV_ISOLATOR_URL`].
    pub fn url(&self) -> anyhow::Result<String> {
        self.url_or(std::env::var(ENV_ISOLATOR_URL).ok())
    }

    fn url_or(&self, legacy: Option<String>) -> anyhow::Result<String> {
        self.isolator.clone().or(legacy.filter(|u| !u.is_empty())).ok_or_else(|| {
            anyhow::Error::new(crate::Error::Config {
                what: "--isolator".into(),
                reason: format!("is required: pass the isolator's URL or set {ENV_ISOLATOR}"),
            })
        })
    }

    /// Connects with the configured credentials.
    pub async fn connect(&self) -> anyhow::Result<IsolatorLink> {
        let read = |p: &PathBuf| std::fs::read(p).map_err(|e| crate::Error::unreadable("isolator credentials", p, &e));
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
        Ok(IsolatorLink::connect(&self.url()?, creds).await?)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn target(isolator: Option<&str>) -> IsolatorTarget {
        IsolatorTarget { isolator: isolator.map(String::from), token_file: None, cert: None, key: None, ca: None }
    }

    #[test]
    fn the_flag_wins_over_the_former_variable_which_still_works() {
        let legacy = Some("http://old:7443".to_string());
        assert_eq!(target(Some("http://new:7443")).url_or(legacy.clone()).unwrap(), "http://new:7443");
        assert_eq!(target(None).url_or(legacy).unwrap(), "http://old:7443");
        let err = target(None).url_or(None).unwrap_err();
        assert!(super::super::exit_code(&err) == super::super::EXIT_USAGE, "{err}");
        assert!(err.to_string().contains(ENV_ISOLATOR), "{err}");
    }
}
