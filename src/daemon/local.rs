//! `nebula add`, `ls`, `rm` and `status`: requests to the local daemon over its socket.

use std::path::PathBuf;

use anyhow::anyhow;
use clap::{ArgAction, builder::BoolishValueParser};
use nebula_common::{BlobId, rate::format_bytes};
use nebula_proto::v1 as pb;

use super::{DaemonLocation, status_error};
use crate::{
    flags::tls_hint,
    output::{bad_input, print_json, print_line, print_table},
};

/// Flags of `nebula add`.
#[derive(Debug, clap::Args)]
pub(crate) struct AddArgs {
    /// The file to add.
    path: PathBuf,
    #[command(flatten)]
    daemon: DaemonLocation,
    /// Print one JSON object.
    #[arg(long, env = "NEBULA_JSON", action = ArgAction::SetTrue, value_parser = BoolishValueParser::new())]
    json: bool,
}

pub(crate) async fn run_add(args: AddArgs) -> anyhow::Result<()> {
    let path = std::fs::canonicalize(&args.path)
        .map_err(|e| bad_input(format!("cannot read {}: {e}", args.path.display())))?;
    // Checked with stat, before any open: opening a FIFO blocks until a writer comes.
    let meta = std::fs::metadata(&path)
        .map_err(|e| bad_input(format!("cannot read {}: {e}", args.path.display())))?;
    if meta.is_dir() {
        return Err(bad_input(format!(
            "cannot add {}: it is a directory",
            args.path.display()
        )));
    }
    if !meta.is_file() {
        return Err(bad_input(format!(
            "cannot add {}: not a regular file",
            args.path.display()
        )));
    }
    std::fs::File::open(&path)
        .map_err(|e| bad_input(format!("cannot read {}: {e}", args.path.display())))?;
    let mut client = args.daemon.connect().await?;
    let r = client
        .add(pb::AddRequest {
            path: path.display().to_string(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    if args.json {
        print_json(&crate::json::BlobSummary::from(r))?;
    } else {
        print_line(&r.id)?;
    }
    Ok(())
}

/// Flags of `nebula ls`.
#[derive(Debug, clap::Args)]
pub(crate) struct LsArgs {
    #[command(flatten)]
    daemon: DaemonLocation,
    /// Print one JSON object.
    #[arg(long, env = "NEBULA_JSON", action = ArgAction::SetTrue, value_parser = BoolishValueParser::new())]
    json: bool,
}

pub(crate) async fn run_ls(args: LsArgs) -> anyhow::Result<()> {
    let mut client = args.daemon.connect().await?;
    let list = client
        .list(pb::ListRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    if args.json {
        print_json(&crate::json::Listing::from(&list))?;
        return Ok(());
    }
    let rows: Vec<Vec<String>> = list
        .blobs
        .iter()
        .map(|b| {
            let state = if b.complete {
                "complete".to_owned()
            } else {
                format!("partial {}/{}", b.chunks_verified, b.chunks)
            };
            vec![b.id.clone(), format_bytes(b.size), state]
        })
        .collect();
    print_table(&["ID", "SIZE", "STATE"], &rows)?;
    Ok(())
}

/// Flags of `nebula rm`.
#[derive(Debug, clap::Args)]
pub(crate) struct RmArgs {
    /// The blob to remove.
    id: String,
    #[command(flatten)]
    daemon: DaemonLocation,
}

pub(crate) async fn run_rm(args: RmArgs) -> anyhow::Result<()> {
    let id: BlobId = args
        .id
        .parse()
        .map_err(|e: nebula_common::ParseIdError| bad_input(e.to_string()))?;
    let mut client = args.daemon.connect().await?;
    client
        .remove(pb::RemoveRequest {
            blob: id.to_string(),
        })
        .await
        .map_err(status_error)?;
    Ok(())
}

/// Flags of `nebula status`.
#[derive(Debug, clap::Args)]
pub(crate) struct StatusArgs {
    #[command(flatten)]
    daemon: DaemonLocation,
    /// Print one JSON object.
    #[arg(long, env = "NEBULA_JSON", action = ArgAction::SetTrue, value_parser = BoolishValueParser::new())]
    json: bool,
}

pub(crate) async fn run_status(args: StatusArgs) -> anyhow::Result<()> {
    let mut client = args.daemon.connect().await?;
    let s = client
        .status(pb::StatusRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    if args.json {
        print_json(&crate::json::Status::from(&s))?;
    } else {
        let rows = vec![
            vec!["peer".into(), s.peer_id.clone()],
            vec!["address".into(), s.address.clone()],
            vec!["control".into(), s.control.clone()],
            vec!["registered".into(), s.registered.to_string()],
            vec!["store".into(), s.store.clone()],
            vec!["blobs".into(), s.blobs.to_string()],
            vec!["uploads".into(), s.active_uploads.to_string()],
            vec!["uploaded".into(), format_bytes(s.uploaded_bytes)],
            vec!["downloaded".into(), format_bytes(s.downloaded_bytes)],
        ];
        print_table(&["", ""], &rows)?;
    }
    if s.registered {
        Ok(())
    } else if s.registration_error.is_empty() {
        Err(anyhow!(
            "the daemon is up but not registered with the control plane at {}",
            s.control
        ))
    } else {
        let hint = tls_hint(&s.registration_error, None)
            .map(|h| format!("; {h}"))
            .unwrap_or_default();
        Err(anyhow!(
            "the daemon is up but not registered with the control plane at {}: {}{hint}",
            s.control,
            s.registration_error
        ))
    }
}
