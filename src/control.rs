//! `nebula control` and `nebula admin …`.

/// Flags of `nebula control`.
#[derive(Debug, clap::Args)]
pub(crate) struct ControlArgs {}

/// Flags of `nebula admin`.
#[derive(Debug, clap::Args)]
pub(crate) struct AdminArgs {}

pub(crate) async fn run_control(_args: ControlArgs) -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}

pub(crate) async fn run_admin(_args: AdminArgs) -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}
