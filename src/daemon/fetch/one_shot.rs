//! A fetch without a daemon: a node of its own for one blob or URL, stopped once
//! the blob is exported.

use std::io::Write;

use anyhow::anyhow;
use nebula_peer::{Config, Node, Wanted};
use nebula_proto::v1 as pb;

use super::{Bar, FetchArgs, Fetched, Output, ProgressMode};
use crate::{
    daemon::serve::bind,
    flags::check_control_tls,
    output::{bad_input, stdout_error},
};

pub(super) async fn fetch_one_shot(
    args: &FetchArgs,
    wanted: &Wanted,
    output: &Output,
    progress_mode: ProgressMode,
) -> anyhow::Result<Fetched> {
    let mut config = Config::new(args.daemon.store(), args.control.clone());
    config.join_token = args.join_token.clone();
    config.no_provider_timeout = args.timeout;
    args.origin.apply(&mut config)?;
    config.tls = args.tls.load()?;
    if let Some(control) = &args.control {
        check_control_tls(control, config.tls.as_ref())?;
    }
    config.validate().map_err(|e| bad_input(e.to_string()))?;
    let listener = bind(&args.listen, "--listen").await?;
    let node = Node::start(listener, config).await?;
    let fetch = node.fetcher().start(wanted.clone(), Some(args.timeout));
    let mut progress = fetch.progress();
    let bar = Bar::new(progress_mode);
    let fetched = {
        let result = fetch.result();
        tokio::pin!(result);
        loop {
            tokio::select! {
                r = &mut result => break r,
                Ok(()) = progress.changed() => {
                    let p = progress.borrow_and_update().clone();
                    bar.update(p.total, p.bytes_done, p.providers);
                }
            }
        }
    };
    bar.finish();
    let result = match fetched {
        Ok(outcome) => {
            let b = outcome.blob;
            let exported = match output {
                Output::None => Ok(()),
                Output::File(dest) => {
                    let (b2, dest) = (std::sync::Arc::clone(&b), dest.clone());
                    tokio::task::spawn_blocking(move || {
                        // Chunk by chunk through the sink, so that a write
                        // error names the output, not the store.
                        let mut sink = dest.open()?;
                        for i in 0..b2.geometry().chunk_count() {
                            sink.append(&b2.read_chunk(i)?)?;
                        }
                        sink.finish()
                    })
                    .await
                    .map_err(|_| anyhow!("export task failed"))
                    .and_then(|r| r)
                }
                Output::Stdout => {
                    let b2 = std::sync::Arc::clone(&b);
                    tokio::task::spawn_blocking(move || {
                        let mut out = std::io::stdout().lock();
                        b2.copy_to(&mut out).map_err(anyhow::Error::from)?;
                        out.flush().map_err(stdout_error)
                    })
                    .await
                    .map_err(|_| anyhow!("export task failed"))
                    .and_then(|r| r)
                }
            };
            exported.map(|()| Fetched {
                id: b.id(),
                size: b.outboard().size(),
                resumed: outcome.resumed_bytes,
                sources: outcome
                    .sources
                    .iter()
                    .map(pb::ProviderBytes::from)
                    .collect(),
                origin_bytes: outcome.origin_bytes,
                notice: outcome.notice.clone(),
            })
        }
        Err(e) => Err(anyhow::Error::from(e)),
    };
    let stopped = node.shutdown().await;
    let fetched = result?;
    stopped?;
    Ok(fetched)
}
