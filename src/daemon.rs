//! `nebula daemon` and the client commands that talk to it.

macro_rules! stub_args {
    ($($name:ident),*) => {$(
        /// Flags.
        #[derive(Debug, clap::Args)]
        pub(crate) struct $name {}
    )*};
}
stub_args!(DaemonArgs, AddArgs, FetchArgs, LsArgs, RmArgs, StatusArgs);

pub(crate) async fn run_daemon(_a: DaemonArgs) -> anyhow::Result<()> { anyhow::bail!("not built yet") }
pub(crate) async fn run_add(_a: AddArgs) -> anyhow::Result<()> { anyhow::bail!("not built yet") }
pub(crate) async fn run_fetch(_a: FetchArgs) -> anyhow::Result<()> { anyhow::bail!("not built yet") }
pub(crate) async fn run_ls(_a: LsArgs) -> anyhow::Result<()> { anyhow::bail!("not built yet") }
pub(crate) async fn run_rm(_a: RmArgs) -> anyhow::Result<()> { anyhow::bail!("not built yet") }
pub(crate) async fn run_status(_a: StatusArgs) -> anyhow::Result<()> { anyhow::bail!("not built yet") }
