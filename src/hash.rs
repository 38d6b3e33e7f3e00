//! `nebula hash PATH`: the blob id of a file, as `b3sum` prints it.

use std::{fs::File, path::PathBuf};

use anyhow::Context as _;
use nebula_common::outboard::digest_path_mmap;

use crate::{
    json::BlobSummary,
    output::{bad_input, print_json, print_line},
};

/// Flags of `nebula hash`.
#[derive(Debug, clap::Args)]
pub(crate) struct HashArgs {
    /// The file to hash.
    path: PathBuf,
    /// Print `{"id","size","sha256","chunk_size","chunks"}` instead of the id alone.
    #[arg(long, env = "NEBULA_JSON", action = clap::ArgAction::SetTrue, value_parser = clap::builder::BoolishValueParser::new())]
    json: bool,
}

pub(crate) fn run(args: HashArgs) -> anyhow::Result<()> {
    let shown = args.path.display();
    let file =
        File::open(&args.path).map_err(|e| bad_input(format!("cannot read {shown}: {e}")))?;
    let meta = file
        .metadata()
        .map_err(|e| bad_input(format!("cannot read {shown}: {e}")))?;
    if meta.is_dir() {
        return Err(bad_input(format!("cannot hash {shown}: it is a directory")));
    }
    if !meta.is_file() {
        // A pipe or device has no length to cut into chunks up front.
        return Err(bad_input(format!(
            "cannot hash {shown}: not a regular file"
        )));
    }
    // SHA-256 runs only for --json: it is sequential and slower than BLAKE3.
    let digest =
        digest_path_mmap(&args.path, args.json).with_context(|| format!("reading {shown}"))?;
    let ob = &digest.outboard;
    if args.json {
        print_json(&BlobSummary {
            id: ob.id().to_string(),
            size: ob.size(),
            sha256: digest.sha256.map(|d| d.to_string()),
            chunk_size: ob.geometry().chunk_size(),
            chunks: ob.geometry().chunk_count().into(),
        })?;
    } else {
        print_line(ob.id())?;
    }
    Ok(())
}
