//! `nebula admin …`: calls of the control plane's `Admin` service, printed as
//! tables or JSON.

use std::{path::PathBuf, str::FromStr, time::Duration};

use anyhow::Context as _;
use nebula_common::{BlobRef, rate::format_bytes};
use nebula_control::{
    PeerId,
    client::{self, AdminClient, BearerToken},
};
use nebula_proto::client::{SystemResolver, expand};
use nebula_proto::tls::TlsConfig;
use nebula_proto::v1::{
    GetSwarmRequest, ListPeersRequest, PeerInfo, PeerRequest, PeerState, StatsRequest,
};
use tonic::{Code, Status};

use crate::{
    flags::{TlsFlags, check_control_tls, explain_tls_failure, parse_control_url, parse_duration},
    json,
    output::{bad_input, print_json, print_line, print_table},
};

/// Flags of `nebula admin`.
#[derive(Debug, clap::Args)]
pub(crate) struct AdminArgs {
    /// The control plane: `http://host:port` or `host:port`; several replicas
    /// as `URL,URL,…` (the first that answers is used).
    #[arg(
        long,
        global = true,
        env = "NEBULA_CONTROL",
        default_value = "http://127.0.0.1:7700",
        value_parser = parse_control_url
    )]
    control: String,
    /// The control plane's admin token (for --control; a control plane
    /// without one answers admin calls only on its --admin-socket).
    #[arg(
        long,
        global = true,
        env = "NEBULA_ADMIN_TOKEN",
        hide_env_values = true
    )]
    admin_token: Option<String>,
    /// Reach the control plane on its admin socket (`nebula control
    /// --admin-socket PATH`) instead of --control; needs no token or TLS.
    #[arg(long, global = true, env = "NEBULA_ADMIN_SOCKET", value_name = "PATH")]
    admin_socket: Option<PathBuf>,
    /// Print one JSON object instead of a table.
    #[arg(long, global = true, env = "NEBULA_JSON", action = clap::ArgAction::SetTrue, value_parser = clap::builder::BoolishValueParser::new())]
    json: bool,
    /// Deadline of the call.
    #[arg(long, global = true, env = "NEBULA_TIMEOUT", value_parser = parse_duration, default_value = "10s")]
    timeout: Duration,
    #[command(flatten)]
    tls: TlsFlags,
    #[command(subcommand)]
    command: AdminCommand,
}

#[derive(Debug, clap::Subcommand)]
enum AdminCommand {
    /// Every registered peer with its state, last heartbeat, load and blob count.
    Peers,
    /// The providers of one blob (by BLAKE3 id or sha256:<hex>), unfiltered.
    Swarm {
        /// `<hex>`, `blake3:<hex>` or `sha256:<hex>`.
        id: String,
    },
    /// Take a peer out of discovery; it keeps its lease and open streams.
    Drain {
        /// The peer id.
        peer: String,
        /// Shown in the peer listing.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Take a peer out of discovery until unbanned.
    Ban {
        /// The peer id.
        peer: String,
        /// Shown in the peer listing.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Lift a ban, a quarantine or a drain.
    Unban {
        /// The peer id.
        peer: String,
    },
    /// Cluster-wide figures.
    Stats,
}

fn parse_peer(s: &str) -> anyhow::Result<String> {
    PeerId::from_str(s).map_err(|e| bad_input(format!("{e}")))?;
    Ok(s.to_owned())
}

fn code_name(code: Code) -> &'static str {
    match code {
        Code::InvalidArgument => "invalid argument",
        Code::NotFound => "not found",
        Code::Unauthenticated => "unauthenticated",
        Code::PermissionDenied => "permission denied",
        Code::Unavailable => "unavailable",
        Code::DeadlineExceeded => "deadline exceeded",
        Code::ResourceExhausted => "resource exhausted",
        Code::Unimplemented => "unimplemented",
        _ => "failed",
    }
}

/// A failed admin call as one line, naming what was reached when it is not
/// a control plane (a peer's port answers `unimplemented` with no message).
fn rpc_error(control: &str, status: Status) -> anyhow::Error {
    if status.code() == Code::Unimplemented {
        return anyhow::anyhow!(
            "{control} is not a Nebula control plane: it does not serve the admin API (unimplemented)"
        );
    }
    if status.message().is_empty() {
        return anyhow::anyhow!("{control}: {}", code_name(status.code()));
    }
    // A transport failure keeps its cause (a TLS alert, say) in the source
    // chain; each cause is said once.
    let mut line = status.message().to_owned();
    let mut source = std::error::Error::source(&status);
    while let Some(cause) = source {
        let text = cause.to_string();
        if !line.ends_with(&text) {
            line.push_str(&format!(": {text}"));
        }
        source = cause.source();
    }
    anyhow::anyhow!("{line} ({})", code_name(status.code()))
}

/// Connects to `--admin-socket` when given, else to the first replica of
/// `--control` that accepts a connection; a host name counts once per
/// address it resolves to.
async fn connect(args: &AdminArgs, tls: Option<&TlsConfig>) -> anyhow::Result<AdminClient> {
    let token = BearerToken::optional(args.admin_token.as_deref())
        .map_err(|_| bad_input("--admin-token must be visible ASCII"))?;
    if let Some(path) = &args.admin_socket {
        return client::admin_over_socket(path.clone(), token, args.timeout)
            .await
            .with_context(|| {
                format!(
                    "cannot reach the control plane's admin socket {}",
                    path.display()
                )
            });
    }
    // `--control` was checked and normalized by `parse_control_urls`, and
    // agrees with the TLS flags (`check_control_tls`).
    let replicas = expand(&args.control, &SystemResolver).await;
    let endpoints = replicas
        .iter()
        .map(|replica| {
            let endpoint = replica
                .endpoint(tls)
                .map_err(|e| bad_input(format!("invalid --control: {e}")))?;
            Ok((replica, client::control_endpoint(endpoint, args.timeout)))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let channel = client::connect_first(endpoints).await?;
    Ok(client::admin(channel, token))
}

/// A peer's state as the tables and `--json` name it.
pub(crate) fn state_name(info: &PeerInfo) -> &'static str {
    match info.state() {
        PeerState::Healthy => "HEALTHY",
        PeerState::Unhealthy => "UNHEALTHY",
        PeerState::Draining => "DRAINING",
        PeerState::Banned => "BANNED",
        PeerState::Quarantined => "QUARANTINED",
        PeerState::Unspecified => "UNKNOWN",
    }
}

fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".to_owned()
    } else {
        s.to_owned()
    }
}

fn peer_row(p: &PeerInfo) -> Vec<String> {
    let load = p.load.unwrap_or_default();
    vec![
        p.peer_id.clone(),
        p.address.clone(),
        or_dash(&p.zone),
        state_name(p).to_owned(),
        format!("{:.1}s ago", p.last_seen_ms_ago as f64 / 1000.0),
        format!("{}/{}", load.active_uploads, load.upload_slots),
        format!("{}/s", format_bytes(load.upload_bytes_per_sec)),
        p.blob_count.to_string(),
        p.reports.to_string(),
        or_dash(&p.reason),
    ]
}

const PEER_HEADER: [&str; 10] = [
    "PEER",
    "ADDRESS",
    "ZONE",
    "STATE",
    "LAST SEEN",
    "UPLOADS",
    "UPLOAD RATE",
    "BLOBS",
    "REPORTS",
    "REASON",
];

pub(crate) async fn run_admin(args: AdminArgs) -> anyhow::Result<()> {
    // Bad input is refused before any network call.
    let blob = match &args.command {
        AdminCommand::Swarm { id } => Some(
            id.parse::<BlobRef>()
                .map_err(|e| bad_input(e.to_string()))?,
        ),
        _ => None,
    };
    if let AdminCommand::Drain { peer, .. }
    | AdminCommand::Ban { peer, .. }
    | AdminCommand::Unban { peer } = &args.command
    {
        parse_peer(peer)?;
    }
    if args.admin_socket.is_some() {
        // A Unix socket: no TLS, and --control is not dialed.
        return call(&args, None, blob).await;
    }
    let tls = args.tls.load()?;
    check_control_tls(&args.control, tls.as_ref())?;
    match call(&args, tls.as_ref(), blob).await {
        Ok(()) => Ok(()),
        Err(err) => Err(explain_tls_failure(&args.control, tls.as_ref(), err).await),
    }
}

/// Connects and makes the admin call, printing its answer.
async fn call(
    args: &AdminArgs,
    tls: Option<&TlsConfig>,
    blob: Option<BlobRef>,
) -> anyhow::Result<()> {
    let mut admin = connect(args, tls).await?;
    let target = match &args.admin_socket {
        Some(path) => path.display().to_string(),
        None => args.control.clone(),
    };
    let rpc_error = |status| rpc_error(&target, status);
    match &args.command {
        AdminCommand::Peers => {
            let peers = admin
                .list_peers(ListPeersRequest {})
                .await
                .map_err(rpc_error)?
                .into_inner()
                .peers;
            if args.json {
                print_json(&json::Peers {
                    peers: peers.iter().map(json::Peer::new).collect(),
                })?;
            } else if peers.is_empty() {
                print_line("no peers registered")?;
            } else {
                print_table(
                    &PEER_HEADER,
                    &peers.iter().map(peer_row).collect::<Vec<_>>(),
                )?;
            }
        }
        AdminCommand::Swarm { .. } => {
            // Set above for this command.
            let blob = blob.map(|b| b.to_string()).unwrap_or_default();
            let swarm = admin
                .get_swarm(GetSwarmRequest { blob })
                .await
                .map_err(rpc_error)?
                .into_inner();
            // The control plane answers an empty swarm for a blob it never heard of.
            if swarm.members.is_empty() && swarm.size == 0 {
                return Err(anyhow::anyhow!(
                    "blob {} not found: no peer holds it",
                    or_dash(&swarm.id)
                ));
            }
            if args.json {
                print_json(&json::Swarm::new(&swarm))?;
            } else {
                print_line(format_args!("blob    {}", swarm.id))?;
                print_line(format_args!(
                    "size    {} ({} bytes)",
                    format_bytes(swarm.size),
                    swarm.size
                ))?;
                print_line(format_args!("sha256  {}", or_dash(&swarm.sha256)))?;
                if swarm.members.is_empty() {
                    print_line("no providers")?;
                } else {
                    let rows: Vec<Vec<String>> = swarm
                        .members
                        .iter()
                        .filter_map(|m| {
                            let p = m.peer.as_ref()?;
                            Some(vec![
                                p.peer_id.clone(),
                                p.address.clone(),
                                state_name(p).to_owned(),
                                if m.complete { "complete" } else { "partial" }.to_owned(),
                                m.chunks_held.to_string(),
                            ])
                        })
                        .collect();
                    print_line("")?;
                    print_table(&["PEER", "ADDRESS", "STATE", "HOLDS", "CHUNKS"], &rows)?;
                }
            }
        }
        AdminCommand::Drain { peer, reason } | AdminCommand::Ban { peer, reason } => {
            let req = PeerRequest {
                peer_id: peer.clone(),
                reason: reason.clone(),
            };
            let info = if matches!(args.command, AdminCommand::Drain { .. }) {
                admin.drain_peer(req).await
            } else {
                admin.ban_peer(req).await
            };
            print_peer_change(&info.map_err(rpc_error)?.into_inner(), args.json)?;
        }
        AdminCommand::Unban { peer } => {
            let req = PeerRequest {
                peer_id: peer.clone(),
                reason: String::new(),
            };
            print_peer_change(
                &admin.unban_peer(req).await.map_err(rpc_error)?.into_inner(),
                args.json,
            )?;
        }
        AdminCommand::Stats => {
            let s = admin
                .stats(StatsRequest {})
                .await
                .map_err(rpc_error)?
                .into_inner();
            if args.json {
                print_json(&json::Stats::from(&s))?;
            } else {
                let rows = [
                    ("peers", s.peers.to_string()),
                    ("healthy peers", s.healthy_peers.to_string()),
                    ("blobs", s.blobs.to_string()),
                    ("provider entries", s.provider_entries.to_string()),
                    ("find-providers served", s.find_providers_served.to_string()),
                    (
                        "uptime",
                        humantime::format_duration(Duration::from_secs(s.uptime_ms / 1000))
                            .to_string(),
                    ),
                ];
                let rows: Vec<Vec<String>> = rows
                    .into_iter()
                    .map(|(k, v)| vec![k.to_owned(), v])
                    .collect();
                print_table(&["FIGURE", "VALUE"], &rows)?;
            }
        }
    }
    Ok(())
}

fn print_peer_change(info: &PeerInfo, as_json: bool) -> anyhow::Result<()> {
    if as_json {
        print_json(&json::Peer::new(info))
    } else {
        print_table(&PEER_HEADER, &[peer_row(info)])
    }
}
