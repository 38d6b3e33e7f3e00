use nebula_common::rate::format_bytes;

#[test]
fn control_urls() {
    let control_url = |s| crate::flags::parse_control_url(s).unwrap();
    assert_eq!(control_url("127.0.0.1:7700"), "http://127.0.0.1:7700");
    assert_eq!(control_url("http://h:1"), "http://h:1");
    assert_eq!(control_url(" https://h:1 "), "https://h:1");
}

#[test]
fn human_sizes() {
    assert_eq!(format_bytes(512), "512 B");
    assert_eq!(format_bytes(3 << 20), "3.0 MiB");
}
