//! The `control_plane` case.

pub(crate) async fn run(_quick: bool) -> serde_json::Value {
    serde_json::json!({"case": "control_plane", "error": "not measured yet"})
}
