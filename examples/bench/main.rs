//! The benchmark: one JSON object per line, each figure beside its reference.
mod control_plane;

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let line = rt.block_on(control_plane::run(quick));
    println!("{line}");
}
